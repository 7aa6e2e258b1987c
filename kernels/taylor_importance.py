"""Fused first-order Taylor channel importance of a gated MLP, accumulated without weight gradients.

For one sample s (a segment of the flattened token dim) and MLP channel c (row c of W_gate/W_up,
column c of W_down), with the weight gradients that sample would produce

    G_gate = dG^T X   [I, d]      G_up = dU^T X   [I, d]      G_down^T = H^T dY   [I, d]

the element score is ``S_s[c, j] = G_up*W_up + G_gate*W_gate + G_down^T*W_down^T`` and the channel
score gains ``sum_j |S_s[c, j]| / d``. The abs is per segment, never of the batch sum.

Triton kernel: one program per (I block, d block, segment). It reduces the three products over the
segment's tokens into fp32 register tiles (``tl.dot``), multiplies them by the weight tiles, takes
the abs, reduces over j and stores the [BLOCK_I] partial sum of its (segment, d block); one float32
sum over those partials in a fixed order adds them into ``scores``. No [I, d] tensor is ever written. Two variants, chosen by the GPU autotuner: one pass with three fp32
accumulators (small tiles), or SPLIT_ACC: three passes over the segment with one accumulator each,
folded into a running element score (two register tiles, so 128 x 128 tiles fit). The SPLIT_ACC
configs join the autotuner only with SDMPRUNE_TAYLOR_SPLIT_ACC=1: they were written after the last
GPU session, are tested under the interpreter and compiled for sm_90, and are still to be run and
timed on a GPU (tests/test_taylor_importance.py::test_kernel_variants_gpu forces them there). The
PyTorch path computes the same in chunks of channels (bounded memory) and is the CPU path.

Determinism: no atomics. The partials ([segments, d blocks, I] float32, at most PARTIAL_BYTES per
launch) are reduced by one torch sum, so the same inputs give the same scores, bit for bit, on every
run (for a given autotuned tile, which fixes the d blocks).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .utils import interpreter_enabled, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _segment_product(a_ptr, s_at, s_ai, b_ptr, s_bt, s_bd, keep_ptr, offs_i, offs_d, mask_i, mask_d,
                         start, end, HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
        """fp32 [BLOCK_I, BLOCK_D] tile of A[start:end, offs_i]^T @ B[start:end, offs_d] (A: [T, I], B: [T, d])."""
        acc = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # int64: T * I can pass 2**31
            mask_t = offs_t < end
            if HAS_KEEP:
                mask_t = mask_t & (tl.load(keep_ptr + offs_t, mask=mask_t, other=0) != 0)
            aT = tl.load(a_ptr + offs_t[None, :] * s_at + offs_i[:, None] * s_ai,
                         mask=mask_i[:, None] & mask_t[None, :], other=0.0)
            b = tl.load(b_ptr + offs_t[:, None] * s_bt + offs_d[None, :] * s_bd,
                        mask=mask_t[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                aT, b = aT.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(aT, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _taylor_scores_kernel(
        part_ptr, seg_ptr, keep_ptr,
        x_ptr, dg_ptr, du_ptr, h_ptr, dy_ptr,
        wg_ptr, wu_ptr, wd_ptr,
        I, D, inv_d,
        s_xt, s_xd, s_gt, s_gi, s_ut, s_ui, s_ht, s_hi, s_yt, s_yd,
        s_wgi, s_wgd, s_wui, s_wud, s_wdd, s_wdi,
        HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT_ACC: tl.constexpr,
    ):
        pid_i = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_s = tl.program_id(2)
        start = tl.load(seg_ptr + pid_s).to(tl.int32)
        end = tl.load(seg_ptr + pid_s + 1).to(tl.int32)

        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_i = offs_i < I
        mask_d = offs_d < D

        m_id = mask_i[:, None] & mask_d[None, :]
        if SPLIT_ACC:
            # three passes over the segment, one fp32 accumulator each, folded into the element
            # score as soon as it is complete: two [BLOCK_I, BLOCK_D] register tiles live instead of
            # three, so larger tiles fit (x is read twice)
            wg = tl.load(wg_ptr + offs_i[:, None] * s_wgi + offs_d[None, :] * s_wgd, mask=m_id, other=0.0)
            s = _segment_product(dg_ptr, s_gt, s_gi, x_ptr, s_xt, s_xd, keep_ptr, offs_i, offs_d, mask_i, mask_d,
                                 start, end, HAS_KEEP, PRECISION, UPCAST, BLOCK_I, BLOCK_D, BLOCK_T) * wg.to(tl.float32)
            wu = tl.load(wu_ptr + offs_i[:, None] * s_wui + offs_d[None, :] * s_wud, mask=m_id, other=0.0)
            s += _segment_product(du_ptr, s_ut, s_ui, x_ptr, s_xt, s_xd, keep_ptr, offs_i, offs_d, mask_i, mask_d,
                                  start, end, HAS_KEEP, PRECISION, UPCAST, BLOCK_I, BLOCK_D, BLOCK_T) * wu.to(tl.float32)
            wdT = tl.load(wd_ptr + offs_d[None, :] * s_wdd + offs_i[:, None] * s_wdi, mask=m_id, other=0.0)
            s += _segment_product(h_ptr, s_ht, s_hi, dy_ptr, s_yt, s_yd, keep_ptr, offs_i, offs_d, mask_i, mask_d,
                                  start, end, HAS_KEEP, PRECISION, UPCAST, BLOCK_I, BLOCK_D, BLOCK_T) * wdT.to(tl.float32)
        else:
            acc_g = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
            acc_h = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
            for t0 in range(start, end, BLOCK_T):
                # int64 token offsets: T * I can pass 2**31 elements for long batches
                offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
                mask_t = offs_t < end
                if HAS_KEEP:
                    # a dropped token (padding) contributes nothing: zero its rows of the left operands
                    mask_t = mask_t & (tl.load(keep_ptr + offs_t, mask=mask_t, other=0) != 0)
                # left operands loaded transposed, [BLOCK_I, BLOCK_T]
                m_it = mask_i[:, None] & mask_t[None, :]
                dgT = tl.load(dg_ptr + offs_t[None, :] * s_gt + offs_i[:, None] * s_gi, mask=m_it, other=0.0)
                duT = tl.load(du_ptr + offs_t[None, :] * s_ut + offs_i[:, None] * s_ui, mask=m_it, other=0.0)
                hT = tl.load(h_ptr + offs_t[None, :] * s_ht + offs_i[:, None] * s_hi, mask=m_it, other=0.0)
                m_td = mask_t[:, None] & mask_d[None, :]
                xs = tl.load(x_ptr + offs_t[:, None] * s_xt + offs_d[None, :] * s_xd, mask=m_td, other=0.0)
                dys = tl.load(dy_ptr + offs_t[:, None] * s_yt + offs_d[None, :] * s_yd, mask=m_td, other=0.0)
                if UPCAST:
                    # the Triton interpreter multiplies bf16 tiles as their raw uint16 bits; fp32 copies
                    # of bf16 values give the same products (exact in fp32) and the same fp32 accumulation
                    dgT, duT, hT = dgT.to(tl.float32), duT.to(tl.float32), hT.to(tl.float32)
                    xs, dys = xs.to(tl.float32), dys.to(tl.float32)
                acc_g = tl.dot(dgT, xs, acc_g, input_precision=PRECISION)
                acc_u = tl.dot(duT, xs, acc_u, input_precision=PRECISION)
                acc_h = tl.dot(hT, dys, acc_h, input_precision=PRECISION)
            wg = tl.load(wg_ptr + offs_i[:, None] * s_wgi + offs_d[None, :] * s_wgd, mask=m_id, other=0.0)
            wu = tl.load(wu_ptr + offs_i[:, None] * s_wui + offs_d[None, :] * s_wud, mask=m_id, other=0.0)
            # W_down is [d, I]; read its transpose tile [BLOCK_I, BLOCK_D]
            wdT = tl.load(wd_ptr + offs_d[None, :] * s_wdd + offs_i[:, None] * s_wdi, mask=m_id, other=0.0)
            s = acc_g * wg.to(tl.float32) + acc_u * wu.to(tl.float32) + acc_h * wdT.to(tl.float32)
        part = tl.sum(tl.abs(s), axis=1) * inv_d
        # one [BLOCK_I] partial per (segment, d block), summed afterwards in a fixed order: no atomics,
        # so the scores are the same bits on every run
        row = (pid_s * tl.num_programs(1) + pid_d).to(tl.int64)
        tl.store(part_ptr + row * I + offs_i, part, mask=mask_i)

    def _gpu_configs():
        """One-pass configs (three accumulators, so tiles stay small) and SPLIT_ACC configs (two
        register tiles: 128 x 128 fits); the autotuner keeps whichever is faster for the shape."""
        out = []
        for bi, bd, bt, warps, stages in (
            (64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 64, 4, 3), (64, 64, 32, 4, 4),
            (128, 128, 32, 8, 2), (64, 128, 64, 8, 2), (128, 64, 64, 8, 2), (32, 128, 64, 4, 3),
            (128, 128, 32, 8, 3), (64, 256, 32, 8, 3),  # BLOCK_T 128 pipelined needs > 227 KB of shared memory
        ):
            out.append(triton.Config({"BLOCK_I": bi, "BLOCK_D": bd, "BLOCK_T": bt, "SPLIT_ACC": False},
                                     num_warps=warps, num_stages=stages))
        if os.environ.get("SDMPRUNE_TAYLOR_SPLIT_ACC", "0") != "1":
            return out  # SPLIT_ACC is opt-in until it has been checked and timed on a GPU
        for bi, bd, bt, warps, stages in ((128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 256, 32, 8, 3),
                                          (64, 256, 64, 8, 3)):
            out.append(triton.Config({"BLOCK_I": bi, "BLOCK_D": bd, "BLOCK_T": bt, "SPLIT_ACC": True},
                                     num_warps=warps, num_stages=stages))
        return out

    # Autotuning re-runs the kernel: harmless, every run overwrites the partials it reads back. The
    # choice is cached on disk (Triton's cache dir): later processes on the machine, a resumed prune
    # among them, use the same tile and so the same summation order.
    _taylor_scores_kernel_tuned = triton.autotune(
        configs=_gpu_configs(), key=["I", "D", "PRECISION", "UPCAST"], cache_results=True,
    )(_taylor_scores_kernel)
    # the partial buffer is sized for the most d blocks any tuned config can use
    _TUNED_MIN_BLOCK_D = min(c.kwargs["BLOCK_D"] for c in _taylor_scores_kernel_tuned.configs)

# Fixed small tiles under the interpreter (each program is simulated in numpy).
_INTERPRETER_BLOCKS = dict(BLOCK_I=32, BLOCK_D=32, BLOCK_T=16)
# Bytes of float32 partial sums one launch may write (more segments: several launches).
PARTIAL_BYTES = 64 * 2**20
# Tests set this: fill the partial-sum buffer with NaN before the kernel writes it.
POISON_SCRATCH = False


def _check_inputs(scores, x, d_gate, d_up, h, dy, w_gate, w_up, w_down, seg_offsets, token_mask):
    T, D = x.shape
    I = w_gate.shape[0]
    if scores.dtype != torch.float32 or scores.shape != (I,) or not scores.is_contiguous():
        raise ValueError(f"scores must be a contiguous float32 [{I}] tensor, got {scores.dtype} {tuple(scores.shape)}")
    for name, t, shape in (("d_gate", d_gate, (T, I)), ("d_up", d_up, (T, I)), ("h", h, (T, I)),
                           ("dy", dy, (T, D)), ("w_gate", w_gate, (I, D)), ("w_up", w_up, (I, D)),
                           ("w_down", w_down, (D, I))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (offloaded weights must be materialized for backward)")
    if seg_offsets.dim() != 1 or seg_offsets.numel() < 2:
        raise ValueError("seg_offsets must be a 1-D int tensor [S+1] of token boundaries")
    if token_mask is not None and tuple(token_mask.shape) != (T,):
        raise ValueError(f"token_mask must have shape ({T},), got {tuple(token_mask.shape)}")


def taylor_scores_torch_(scores, x, d_gate, d_up, h, dy, w_gate, w_up, w_down, seg_offsets,
                         token_mask=None, chunk_elems: int = 1 << 22):
    """PyTorch path of ``accumulate_taylor_scores_`` (same math, fp32 or wider accumulation).

    Works over chunks of channels so that at most ``chunk_elems`` elements of each [C, d] product are
    held at once (no full [I, d] fp32 tensor for a large I).
    """
    T, D = x.shape
    I = w_gate.shape[0]
    cdt = torch.promote_types(x.dtype, torch.float32)
    chunk = max(1, min(I, chunk_elems // max(D, 1)))
    bounds = [int(v) for v in seg_offsets.tolist()]
    keep = None if token_mask is None else token_mask.to(device=x.device, dtype=torch.bool)
    for s in range(len(bounds) - 1):
        a, b = bounds[s], bounds[s + 1]
        if b <= a:
            continue
        # dropped (padding) rows are removed, not multiplied by 0, so non-finite values there stay out
        rows = slice(a, b) if keep is None else torch.nonzero(keep[a:b]).squeeze(1) + a
        xs = x[rows].to(cdt)
        dys = dy[rows].to(cdt)
        for c0 in range(0, I, chunk):
            c1 = min(I, c0 + chunk)
            dg = d_gate[rows, c0:c1].to(cdt)
            du = d_up[rows, c0:c1].to(cdt)
            hs = h[rows, c0:c1].to(cdt)
            S = (dg.t() @ xs).mul_(w_gate[c0:c1].to(cdt))
            S.addcmul_(du.t() @ xs, w_up[c0:c1].to(cdt))
            S.addcmul_(hs.t() @ dys, w_down[:, c0:c1].t().to(cdt))
            scores[c0:c1] += (S.abs_().sum(dim=1) / D).to(scores.dtype)
    return scores


def taylor_scores_triton_(scores, x, d_gate, d_up, h, dy, w_gate, w_up, w_down, seg_offsets, token_mask=None,
                          split_acc: Optional[bool] = None):
    """Triton path of ``accumulate_taylor_scores_`` (CUDA tensors, or CPU under TRITON_INTERPRET=1).

    split_acc: None picks the kernel variant by autotuning on the GPU (one-pass under the
    interpreter); True/False forces the three-pass / one-pass variant at a fixed tile (tests)."""
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package")
    T, D = x.shape
    I = w_gate.shape[0]
    S = seg_offsets.numel() - 1
    if T == 0 or I == 0 or D == 0 or S == 0:
        return scores
    # tl.dot needs both operands in one dtype: the activations/gradients share the model dtype.
    dt = x.dtype
    d_gate, d_up, h, dy = (t if t.dtype == dt else t.to(dt) for t in (d_gate, d_up, h, dy))
    seg = seg_offsets.to(device=x.device, dtype=torch.int32)
    keep = token_mask.to(device=x.device, dtype=torch.int8).contiguous() if token_mask is not None else seg
    on_gpu = x.is_cuda and not interpreter_enabled()
    upcast = not on_gpu and dt in (torch.bfloat16, torch.float16)
    precision = "ieee" if (dt == torch.float32 or upcast) else "tf32"  # fp32 models: no TF32 rounding
    flags = dict(HAS_KEEP=token_mask is not None, PRECISION=precision, UPCAST=upcast)
    if on_gpu and split_acc is None:
        kernel, blocks = _taylor_scores_kernel_tuned, {}
        min_block_d = _TUNED_MIN_BLOCK_D
    else:
        kernel = _taylor_scores_kernel
        if on_gpu:
            blocks = dict(BLOCK_I=128, BLOCK_D=128, BLOCK_T=32) if split_acc else dict(BLOCK_I=64, BLOCK_D=128, BLOCK_T=32)
            blocks.update(SPLIT_ACC=bool(split_acc), num_warps=8, num_stages=3)
        else:
            blocks = dict(_INTERPRETER_BLOCKS, SPLIT_ACC=bool(split_acc), num_warps=4)
        min_block_d = blocks["BLOCK_D"]
    # partial sums [segments, d blocks, I] in float32, a bounded number of segments per launch
    rows_per_segment = triton.cdiv(D, min_block_d)
    group = max(1, PARTIAL_BYTES // (rows_per_segment * I * 4))
    part = torch.empty(min(S, group) * rows_per_segment * I, dtype=torch.float32, device=x.device)
    if POISON_SCRATCH:
        part.fill_(float("nan"))  # tests: a partial the kernel did not write shows up as NaN

    def grid(meta):
        return (triton.cdiv(I, meta["BLOCK_I"]), triton.cdiv(D, meta["BLOCK_D"]), n_seg)

    for g0 in range(0, S, group):
        n_seg = min(S, g0 + group) - g0
        args = (part, seg[g0:g0 + n_seg + 1], keep, x, d_gate, d_up, h, dy, w_gate, w_up, w_down, I, D, 1.0 / D,
                x.stride(0), x.stride(1), d_gate.stride(0), d_gate.stride(1), d_up.stride(0), d_up.stride(1),
                h.stride(0), h.stride(1), dy.stride(0), dy.stride(1),
                w_gate.stride(0), w_gate.stride(1), w_up.stride(0), w_up.stride(1),
                w_down.stride(0), w_down.stride(1))
        if on_gpu:
            with torch.cuda.device(x.device):
                kernel[grid](*args, **flags, **blocks)
        else:
            kernel[grid](*args, **flags, **blocks)
        block_d = kernel.best_config.kwargs["BLOCK_D"] if kernel is _taylor_scores_kernel_tuned else min_block_d
        n_rows = n_seg * triton.cdiv(D, block_d)
        # a fixed-order float32 sum over (segment, d block): deterministic
        scores.add_(part[:n_rows * I].view(n_rows, I).sum(dim=0))
    return scores


def accumulate_taylor_scores_(scores: torch.Tensor, x: torch.Tensor, d_gate: torch.Tensor, d_up: torch.Tensor,
                              h: torch.Tensor, dy: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                              w_down: torch.Tensor, seg_offsets: Optional[torch.Tensor] = None,
                              token_mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Add each segment's Taylor channel scores into ``scores`` (in place) and return it.

    scores: float32 [I], contiguous. x: [T, d] MLP input. d_gate, d_up: [T, I] gradients at the
    gate (pre-activation) and up projection outputs. h: [T, I] the (masked) input of down_proj.
    dy: [T, d] gradient of the MLP output. w_gate, w_up: [I, d]; w_down: [d, I].
    seg_offsets: int [S+1] token boundaries of the samples (default: one segment of all T tokens);
    tokens outside every segment are ignored. token_mask: optional bool [T]; False rows (padding) are
    dropped. Padding rows whose loss terms are masked have zero gradient anyway, so the mask only
    matters when the loss does not ignore them.
    backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton" or "torch".

    Per segment s: ``scores[c] += sum_j |S_s[c, j]| / d`` with
    ``S_s = (dU_s^T X_s) W_up + (dG_s^T X_s) W_gate + (H_s^T dY_s) W_down^T`` (elementwise products).
    """
    if seg_offsets is None:
        seg_offsets = torch.tensor([0, x.shape[0]], device=x.device)
    _check_inputs(scores, x, d_gate, d_up, h, dy, w_gate, w_up, w_down, seg_offsets, token_mask)
    tensors = (scores, x, d_gate, d_up, h, dy, w_gate, w_up, w_down)
    if backend == "auto":
        backend = "triton" if use_triton(*tensors) else "torch"
    if backend == "triton":
        return taylor_scores_triton_(scores, x, d_gate, d_up, h, dy, w_gate, w_up, w_down, seg_offsets, token_mask)
    if backend == "torch":
        return taylor_scores_torch_(scores, x, d_gate, d_up, h, dy, w_gate, w_up, w_down, seg_offsets, token_mask)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
