"""Activation Taylor channel importance of a gated MLP: sum over tokens of |H * dL/dH| per channel.

For the input H [T, I] of down_proj (the gated activation act(G) * U [* mask]) and its gradient
dH [T, I] (= dY W_down):

    score[c] += sum_{t counted} |H[t, c] * dH[t, c]|        (float32 accumulation)

The abs is per token element, so how tokens are grouped into samples does not change the score;
rows with token_mask False (padding) are left out (not multiplied by 0, so non-finite values there
cannot leak in). This is HFPrune's importance; no weight gradient and no I x d matrix is involved.

Triton kernel: one program per (I block, token split). It sums |h * dh| over its split's tokens in
float32 and stores one [BLOCK_I] partial; one float32 sum over the [splits, I] partials in a fixed
order adds them into ``scores``. No atomics: the same inputs give the same bits on every run on a
given device (the split count depends only on the shape and the device's SM count).
The PyTorch path computes the same in token chunks (bounded float32 temporaries) and is the CPU path.
"""
from __future__ import annotations

from typing import Optional

import torch

from .utils import LAUNCH_OPTIONS, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _activation_scores_kernel(
        part_ptr, h_ptr, dh_ptr, keep_ptr,  # part: [splits, I] float32 out; keep: [T] int8
        T, I, TOKENS_PER_SPLIT,
        s_ht, s_hi, s_dt, s_di,
        HAS_KEEP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        pid_i = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        mask_i = offs_i < I
        start = pid_s * TOKENS_PER_SPLIT
        end = tl.minimum(T, start + TOKENS_PER_SPLIT)
        acc = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # int64: T * I can pass 2**31
            mask_t = offs_t < end
            if HAS_KEEP:
                mask_t = mask_t & (tl.load(keep_ptr + offs_t, mask=mask_t, other=0) != 0)
            m = mask_t[:, None] & mask_i[None, :]
            h = tl.load(h_ptr + offs_t[:, None] * s_ht + offs_i[None, :] * s_hi, mask=m, other=0.0)
            dh = tl.load(dh_ptr + offs_t[:, None] * s_dt + offs_i[None, :] * s_di, mask=m, other=0.0)
            # bf16 x bf16 is exact in float32: the only rounding is the float32 sum
            acc += tl.abs(h.to(tl.float32) * dh.to(tl.float32))
        part = tl.sum(acc, axis=0)
        tl.store(part_ptr + pid_s.to(tl.int64) * I + offs_i, part, mask=mask_i)

# GPU tiles: rows of BLOCK_I contiguous channels (coalesced loads along I), BLOCK_T tokens a step.
_GPU_BLOCKS = dict(BLOCK_T=32, BLOCK_I=256, num_warps=8)
# Fixed small tiles under the interpreter (each program is simulated in numpy).
_INTERPRETER_BLOCKS = dict(BLOCK_T=16, BLOCK_I=32, num_warps=4)
# Programs a GPU launch aims for, per SM (the op streams memory: enough programs hide latency).
_PROGRAMS_PER_SM = 4
# Tests set this: fill the partial-sum buffer with NaN before the kernel writes it.
POISON_SCRATCH = False


def _check_inputs(scores, h, dh, token_mask):
    if h.dim() != 2:
        raise ValueError(f"h must be [T, I], got {tuple(h.shape)}")
    T, I = h.shape
    if scores.dtype != torch.float32 or scores.shape != (I,) or not scores.is_contiguous():
        raise ValueError(f"scores must be a contiguous float32 [{I}] tensor, got {scores.dtype} {tuple(scores.shape)}")
    if tuple(dh.shape) != (T, I):
        raise ValueError(f"dh must have shape {(T, I)}, got {tuple(dh.shape)}")
    if token_mask is not None and tuple(token_mask.shape) != (T,):
        raise ValueError(f"token_mask must have shape ({T},), got {tuple(token_mask.shape)}")


def token_splits(T: int, I: int, block_t: int, block_i: int, device) -> int:
    """Token splits of a launch: enough (I block, split) programs for about _PROGRAMS_PER_SM per SM
    on CUDA, each split at least 4 token blocks; 2 elsewhere (exercises the partial sum cheaply)."""
    t_blocks = max(1, -(-T // block_t))
    device = torch.device(device)
    if device.type != "cuda":
        return min(2, t_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-_PROGRAMS_PER_SM * sms // max(1, -(-I // block_i)))
    return int(max(1, min(want, t_blocks // 4)))


# elements per token chunk of the PyTorch path (its float32 temporaries: a few of this size)
TORCH_CHUNK_ELEMS = 1 << 24


def activation_scores_torch_(scores, h, dh, token_mask=None, chunk_elems: int = TORCH_CHUNK_ELEMS):
    """PyTorch path of ``accumulate_activation_scores_``: token chunks of at most ``chunk_elems``
    elements, products in float32 (or wider)."""
    T, I = h.shape
    if T == 0 or I == 0:
        return scores
    cdt = torch.promote_types(h.dtype, torch.float32)
    keep = None if token_mask is None else token_mask.to(device=h.device, dtype=torch.bool)
    chunk = max(1, chunk_elems // max(I, 1))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        rows = slice(t0, t1) if keep is None else torch.nonzero(keep[t0:t1]).squeeze(1) + t0
        prod = h[rows].to(cdt) * dh[rows].to(cdt)
        scores += prod.abs_().sum(dim=0).to(scores.dtype)
    return scores


def activation_scores_triton_(scores, h, dh, token_mask=None, splits: Optional[int] = None):
    """Triton path of ``accumulate_activation_scores_`` (CUDA tensors, or CPU under
    TRITON_INTERPRET=1). splits: token splits of the launch (default ``token_splits``)."""
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package")
    T, I = h.shape
    if T == 0 or I == 0:
        return scores
    on_gpu = h.is_cuda
    blocks = _GPU_BLOCKS if on_gpu else _INTERPRETER_BLOCKS
    S = int(splits) if splits is not None else token_splits(T, I, blocks["BLOCK_T"], blocks["BLOCK_I"], h.device)
    if S < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    tokens_per_split = -(-T // S)
    S = -(-T // tokens_per_split)  # no empty trailing split
    part = torch.empty((S, I), dtype=torch.float32, device=h.device)
    if POISON_SCRATCH:
        part.fill_(float("nan"))  # tests: a partial the kernel did not write shows up as NaN
    keep = token_mask.to(device=h.device, dtype=torch.int8).contiguous() if token_mask is not None else part
    grid = (triton.cdiv(I, blocks["BLOCK_I"]), S)
    args = (part, h, dh, keep, T, I, tokens_per_split, h.stride(0), h.stride(1), dh.stride(0), dh.stride(1))
    if on_gpu:
        with torch.cuda.device(h.device):
            _activation_scores_kernel[grid](*args, HAS_KEEP=token_mask is not None, **blocks, **LAUNCH_OPTIONS)
    else:
        _activation_scores_kernel[grid](*args, HAS_KEEP=token_mask is not None, **blocks, **LAUNCH_OPTIONS)
    scores.add_(part.sum(dim=0))  # fixed-order float32 sum over the splits: deterministic
    return scores


def accumulate_activation_scores_(scores: torch.Tensor, h: torch.Tensor, dh: torch.Tensor,
                                  token_mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Add ``sum_t |h[t, c] * dh[t, c]|`` into ``scores[c]`` (in place) and return ``scores``.

    scores: float32 [I], contiguous. h: [T, I] the (masked) input of down_proj; dh: [T, I] the
    gradient of the loss w.r.t. it (any float dtypes; products and sums in float32 or wider).
    token_mask: optional bool [T]; False rows (padding) are left out. Nothing is differentiated.
    backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton" or "torch".
    """
    _check_inputs(scores, h, dh, token_mask)
    if backend == "auto":
        backend = "triton" if use_triton(scores, h, dh) else "torch"
    if backend == "triton":
        if not use_triton(scores, h, dh):
            raise ValueError("backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
        return activation_scores_triton_(scores, h, dh, token_mask)
    if backend == "torch":
        return activation_scores_torch_(scores, h, dh, token_mask)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
