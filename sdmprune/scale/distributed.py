"""Small torch.distributed helpers that are safe in a single process.

Every function works without an initialized process group (rank 0 of a world of 1) and does the
right thing under one (gloo on CPU, nccl on CUDA). The pipeline uses them to give each rank a
disjoint shard of the calibration samples and to sum the per-rank channel scores before ranking.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..errors import InputError


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
    return all_reduce_sum_(scores)


def all_reduce_sum_(tensors: Dict) -> Dict:
    """Sum every rank's ``tensors`` in place ({key: tensor}, one dtype; kept as it is). No-op on one
    process. All keys are flattened into one buffer, so there is a single collective per call."""
    if not _initialized() or world_size() == 1 or not tensors:
        return tensors
    keys = sorted(tensors)
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flat = torch.cat([tensors[k].reshape(-1).to(device) for k in keys])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for k in keys:
        n = tensors[k].numel()
        tensors[k] = flat[offset:offset + n].view_as(tensors[k]).to(tensors[k].device)
        offset += n
    return tensors


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (picklable objects, e.g. a CPU token tensor); ``obj`` itself on one
    process. Collective: every rank must call it."""
    if not _initialized() or world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun each rank uses its own GPU (LOCAL_RANK) when the device is plain ``cuda``."""
    import os

    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_torchrun(device: torch.device) -> bool:
    """Join the process group of a torchrun launch (WORLD_SIZE > 1) unless one is initialized already:
    NCCL with each rank on GPU LOCAL_RANK, gloo when the run is on the CPU. True when it initialized."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return False
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        torch.distributed.init_process_group("gloo")
    return True


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if _initialized() and world_size() > 1:
        torch.distributed.barrier()
