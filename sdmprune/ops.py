"""In-place channel gather ops (the compiled extension ``sdmprune._C``, with a torch fallback).

``gather_rows_(w, idx)``: w [R, C] contiguous (any dtype), idx 1-D int64 on w's device, strictly
increasing, in [0, R), non-empty. Rows ``idx`` move to rows 0..k-1 of w's own storage; returns that
[k, C] view (same data pointer). Equals ``w.index_select(0, idx)``, bit for bit.

``gather_cols_(w, idx)``: idx in [0, C). Columns ``idx`` of every row are compacted so that the first
R*k elements of w's storage hold the contiguous [R, k] result; returns that view. Equals
``w.index_select(1, idx)``.

Memory: the extension moves bytes inside w's storage; its only extra memory is a scratch buffer of
at most ``max(scratch_bytes, one output row)`` bytes (default ``DEFAULT_SCRATCH_BYTES`` = 8 MiB),
allocated only when the wave plan needs it, plus a host copy of idx (validation and planning; on CUDA
that copy synchronises). The storage keeps its size: everything past the returned view is stale.
w is modified in place: a w that requires grad is refused while grad mode is on (pass ``param.data``
or use ``torch.no_grad()``), and w's version counter is bumped, so a graph that saved w fails loudly.

Fallback (extension not built, e.g. ``SDMPRUNE_SKIP_EXT=1`` at install, or a CUDA tensor with a
CPU-only build): the same checks and the same result in the same storage, but computed through
``index_select`` into a temporary, i.e. NOT in place: it needs k*C (resp. R*k) extra elements.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

DEFAULT_SCRATCH_BYTES = 8 << 20

__all__ = ["gather_rows_", "gather_cols_", "extension_available", "DEFAULT_SCRATCH_BYTES"]


@functools.lru_cache(maxsize=None)
def _ext():
    try:
        from . import _C  # noqa: F401  (also registers torch.ops.sdmprune.*)
    except ImportError:
        return None
    return _C


_ext()  # load the extension now, so torch.ops.sdmprune.* exist once sdmprune.ops is imported


def extension_available(device: Optional[torch.device] = None) -> bool:
    """True when the compiled op is used for tensors on ``device`` (default: CPU)."""
    ext = _ext()
    if ext is None:
        return False
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return bool(ext.compiled_with_cuda())
    return dev.type == "cpu"


def _check(w: torch.Tensor, idx: torch.Tensor, dim: int, op: str) -> None:
    """The extension's checks, with its messages, for the fallback path."""
    if w.layout != torch.strided:
        raise RuntimeError(f"{op}: w must be a dense (strided) tensor")
    if w.dim() != 2:
        raise RuntimeError(f"{op}: w must be 2-D [R, C], got a {w.dim()}-D tensor")
    if not w.is_contiguous():
        raise RuntimeError(f"{op}: w must be contiguous (call .contiguous() first)")
    if idx.dtype != torch.int64:
        raise RuntimeError(f"{op}: idx must be int64 (torch.long), got {idx.dtype}")
    if idx.dim() != 1:
        raise RuntimeError(f"{op}: idx must be 1-D, got a {idx.dim()}-D tensor")
    if torch.is_grad_enabled() and w.requires_grad:
        raise RuntimeError(
            f"sdmprune::{op}: w requires grad; call it on w.detach() / param.data or under torch.no_grad()"
        )
    if idx.device != w.device:
        raise RuntimeError(f"{op}: device mismatch: idx is on {idx.device} but w is on {w.device}")
    if idx.numel() == 0:
        raise RuntimeError(f"{op}: idx is empty (keep at least one index)")
    h = idx.cpu()
    extent = w.shape[dim]
    bad = ((h < 0) | (h >= extent)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise RuntimeError(f"{op}: idx out of range: idx[{i}] = {int(h[i])} is not in [0, {extent})")
    if h.numel() > 1:
        d = h[1:] - h[:-1]
        bad = (d <= 0).nonzero()
        if bad.numel():
            i = int(bad[0]) + 1
            if d[i - 1] == 0:
                raise RuntimeError(f"{op}: duplicate index {int(h[i])} at positions {i - 1} and {i}")
            raise RuntimeError(
                f"{op}: idx must be sorted (strictly increasing): idx[{i - 1}] = {int(h[i - 1])} > idx[{i}] = {int(h[i])}"
            )


def _scratch(scratch_bytes: Optional[int]) -> int:
    return -1 if scratch_bytes is None else int(scratch_bytes)


def gather_rows_(w: torch.Tensor, idx: torch.Tensor, scratch_bytes: Optional[int] = None) -> torch.Tensor:
    """In place: rows ``idx`` of w [R, C] -> rows 0..k-1 of its storage; returns the [k, C] view.

    ``scratch_bytes``: bound on the scratch buffer (None: 8 MiB; 0: one row, slowest, least memory).
    """
    if extension_available(w.device):
        return torch.ops.sdmprune.gather_rows_(w, idx, _scratch(scratch_bytes))
    _check(w, idx, 0, "gather_rows_")
    k, C = idx.numel(), w.shape[1]
    out = w.index_select(0, idx)  # fallback: a temporary copy of k*C elements
    view = w.as_strided((k, C), (C, 1), w.storage_offset())
    view.copy_(out)
    return view


def gather_cols_(w: torch.Tensor, idx: torch.Tensor, scratch_bytes: Optional[int] = None) -> torch.Tensor:
    """In place: columns ``idx`` of w [R, C] -> the first R*k elements of its storage; returns the [R, k] view.

    ``scratch_bytes``: bound on the scratch buffer (None: 8 MiB; 0: one output row).
    """
    if extension_available(w.device):
        return torch.ops.sdmprune.gather_cols_(w, idx, _scratch(scratch_bytes))
    _check(w, idx, 1, "gather_cols_")
    R, k = w.shape[0], idx.numel()
    out = w.index_select(1, idx)  # fallback: a temporary copy of R*k elements
    view = w.as_strided((R, k), (k, 1), w.storage_offset())
    view.copy_(out)
    return view
