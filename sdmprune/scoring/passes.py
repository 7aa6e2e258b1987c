"""The mechanics shared by every pass over calibration batches: tokens to the device, labels, progress,
stage timers and peak memory."""
from __future__ import annotations

import resource
import sys
import time

import torch

from ..scale import distributed as dist


def causal_labels(x: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels of token ids [B, L]: the ids shifted left, the last position of every sample
    ignored (-100)."""
    labels = torch.full_like(x, -100)
    labels[:, :-1] = x[:, 1:]
    return labels


def tokens_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Token ids to ``device`` without stalling the host: a copy from pageable memory waits for all GPU
    work queued before it; one from pinned memory is queued like a kernel (torch's pinned-memory
    allocator keeps the buffer until the copy has run)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def peak_memory(device: torch.device) -> dict:
    """The run's peak memory: CUDA's allocator peak on a GPU, the process's max RSS elsewhere."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return {"peak_memory_bytes": int(rss), "peak_memory_kind": "process max RSS (ru_maxrss)"}


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "tok"):
    """A tqdm bar on stderr, on the main rank only."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "tok", dynamic_ncols=True, leave=True,
                disable=not (enabled and dist.is_main_process()), file=sys.stderr)


def tick(bar, ntok: int, device: torch.device) -> None:
    bar.update(ntok)
    if device.type == "cuda" and not bar.disable:
        bar.set_postfix(peak=f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}GiB", refresh=False)


def seconds_since(t0: float, device: torch.device) -> float:
    """Wall seconds since ``t0`` once the device has finished the work queued so far: the fused loop
    never waits on the GPU, so without the sync a stage timer would stop while its last batches are
    still running."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
