"""Small torch.distributed helpers that are safe in a single process.

Every function works without an initialized process group (rank 0 of a world of 1) and does the
right thing under one (gloo on CPU, nccl on CUDA). The pipeline uses them to give each rank a
disjoint shard of the calibration samples and to sum the per-rank channel scores before ranking.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .errors import InputError


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    """True on rank 0: the only rank that writes outputs and shows progress."""
    return rank() == 0


def shard_indices(n: int) -> List[int]:
    """This rank's samples of ``n``: r, r + W, r + 2W, ... (disjoint, deterministic, covering 0..n-1)."""
    w = world_size()
    if w > n:
        raise InputError(f"{w} ranks but only {n} calibration samples: every rank needs at least one")
    return list(range(rank(), n, w))


def all_reduce_scores_(scores: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """Sum every rank's ``scores`` in place ({layer: tensor}); values become float32. No-op on one process.

    All layers are flattened into one buffer so there is a single collective per call.
    """
    for k in list(scores):
        if scores[k].dtype != torch.float32:
            scores[k] = scores[k].float()
    if not _initialized() or world_size() == 1 or not scores:
        return scores
    keys = sorted(scores)
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flat = torch.cat([scores[k].reshape(-1).to(device) for k in keys])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for k in keys:
        n = scores[k].numel()
        scores[k] = flat[offset:offset + n].view_as(scores[k]).to(scores[k].device)
        offset += n
    return scores


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (picklable objects, e.g. a CPU token tensor); ``obj`` itself on one
    process. Collective: every rank must call it."""
    if not _initialized() or world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if _initialized() and world_size() > 1:
        torch.distributed.barrier()
