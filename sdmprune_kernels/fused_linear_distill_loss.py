"""Fused LM-head self-distillation loss: CE + KL(teacher || student) without an N x V tensor.

Math (SDMPrune's loss), for student hidden states h_s [N, d], teacher hidden states h_t [N, d],
LM heads W [V, d] (student) and W_t [V, d] (teacher; defaults to W):

    z_s = h_s W^T,  z_t = h_t W_t^T                       (float32 logits, never all N rows at once)
    CE  = sum_{rows r with labels[r] != ignore_index} (lse(z_s[r]) - z_s[r, labels[r]]) / n_ce
    KL  = sum_{rows r with kl_mask[r]} sum_v p_t log(p_t / q_s) / n_kl,
          p_t = softmax(z_t / T)   (temperature on the TEACHER only),  q_s = softmax(z_s)
    loss = (1 - alpha) * CE + alpha * KL          (loss = CE when there is no teacher)

A term with no counted rows is 0 (n = 0 gives loss 0 and zero gradients, never NaN). A row counted
in neither term (an ignored label outside kl_mask, e.g. padding) gets an exact zero gradient and
never reaches dW, even when its hidden state is not finite.
d loss / d z_s[r] = c_ce[r] * (q_s - onehot(labels[r])) + c_kl[r] * (q_s - p_t), with
c_ce = (1 - alpha) / n_ce on CE rows and c_kl = alpha / n_kl on KL rows. Gradients flow to h_s
and, when it requires grad, to W; the teacher side (h_t, W_t) never gets gradients (when W_t is W,
only the student path contributes to dW).

Execution of the chunked backends "triton" and "torch" (``plan_chunks`` picks the sizes):
  for each token chunk of C rows:
    1. z_s (and z_t) = chunk GEMMs with float32 output          (cuBLAS on GPU: tensor cores, fp32 acc)
    2. one row-wise pass over the vocabulary in blocks of BLOCK_V (Triton kernel, or the PyTorch
       reference): online logsumexp of z_s and of z_t / T, the sums sum_v p_t*z_s and
       sum_v p_t*(z_t/T - max) by online rescaling, the target logit -> per-row CE and KL;
       when a gradient is needed, a second pass over the same row writes dz (the logit gradient).
       A chunk of few rows (e.g. 128 against an H100's 132 SMs) would leave most SMs idle with one
       program per row, so on CUDA each row is then split over the vocabulary (default_row_splits):
       (row, split) programs write partial statistics, then one more (row, split) launch merges a
       row's partials and writes its CE / KL and its part of dz
    3. dH[chunk] = dz @ W and, when W requires grad, dW += dz^T @ h_s[chunk] (float32 accumulator)
  The gradient is computed during the forward (like Liger's fused linear losses) and scaled by
  grad_output in backward, so the logits are made once.

Memory bound (the "scratch"): token_chunk * V * (4 + 4 [teacher] + g [grad]) bytes for the Triton
path, g = 2 for bf16/fp16 on GPU, 4 otherwise; plus the float32 dW accumulator [V, d] only when W
requires grad (plus one [V, d] float32 temporary per chunk), plus (CPU, non-float32 weights only)
one float32 copy of W (and W_t). The torch path holds up to ~8 float32 [C, V] tensors. Never N x V.
``plan_chunks`` picks token_chunk from a byte budget (768 MiB on CUDA: 512 rows at V = 128256 with
a teacher, 656 MB), so peak extra memory stays under 1 GB plus the gradient of h_s itself.

Backend "triton_tiled" (cut-cross-entropy style: no logits ever leave the chip):
  forward  grid (S vocab splits, token blocks of BLOCK_N): a program loops over the BLOCK_V tiles of
           its split; each logit tile is h_s[BLOCK_N, d] @ W[BLOCK_V, d]^T by tl.dot over BLOCK_D
           slices (fp32 accumulation), the teacher tile likewise (h_t, W_t, times 1/T; one W load
           when W_t is W); online float32 row statistics (student max/sumexp, teacher max/sumexp,
           sum p_t*z_s, sum p_t*(z_t/T - max), the target logit) go to a [7, S, N] float32 buffer,
           merged per row by a small torch combine (``_combine_splits``) into CE / KL rows and the
           two logsumexps.
  backward (autograd backward, so a no-grad forward does no gradient work) grid (token block,
           vocab tile), grouped so GROUP_N token blocks sweep the vocabulary together: recompute both
           logit tiles, dz = c_ce (q_s - onehot) + c_kl (q_s - p_t) in registers (the row
           coefficients carry grad_output, 1/count, alpha and the masks), then per d slice
           dH += dz @ W_tile and, when W requires grad, dW += dz^T @ h_s_tile, float32 atomic adds
           (results may differ in the last bits between GPU runs).
  Memory bound: 28 * S * N bytes of split statistics + a few float32 [N] rows, the float32 dH
  [N, d] accumulator (rounded once to h_s's dtype), the float32 dW [V, d] only when W requires
  grad; saved for backward: references to h_s, W, h_t, W_t and 5 float32 [N] rows. Nothing scales
  with N x V. Cost: the logit GEMMs run twice (forward and backward) instead of once, and dH costs
  N * d * V / BLOCK_V float32 atomics. Measured on an H100 (benchmarks/results), "triton" (logits
  through HBM, about 26 bytes per logit, cuBLAS GEMMs) is faster: 48.6 ms against 113.7 ms at
  8192 x 4096 x 128256, fwd + bwd. That is why "auto" picks "triton"; "triton_tiled" is the choice
  when its ~0.2 GB of scratch, against ~0.7 GB, matters.
"""
from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple, Optional

import torch

from .utils import LAUNCH_OPTIONS, interpreter_enabled, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - the PyTorch path covers every call
    triton = None
    tl = None

__all__ = [
    "ChunkPlan",
    "FusedLinearDistillLoss",
    "default_row_splits",
    "default_vocab_splits",
    "fused_linear_distill_loss",
    "plan_chunks",
    "reference_linear_distill_loss",
]

# Tests set this to True: scratch the kernel must fully overwrite (dz) is filled with NaN first.
POISON_SCRATCH = False

_MiB = 1 << 20
_HALF = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Triton kernel: per-row statistics over the vocabulary of one token chunk (+ the logit gradient)
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _row_stats(zs_row, zt_row, lo, hi, inv_T, HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr):
        """Online statistics of columns [lo, hi) of one row, float32: (m_s, s_s) for the logsumexp of
        z_s; for y = z_t / T, (m_t, s_t), a = sum e^{y-m_t} z_s and b = sum e^{y-m_t} (y - m_t) (kept
        relative to the running max, for precision). An empty range gives (-inf, 0, -inf, 0, 0, 0)."""
        offs = tl.arange(0, BLOCK_V)
        m_s = -float("inf")
        s_s = 0.0
        m_t = -float("inf")
        s_t = 0.0
        a = 0.0
        b = 0.0
        for v0 in range(lo, hi, BLOCK_V):
            cols = v0 + offs
            mask = cols < hi
            zs = tl.load(zs_row + cols, mask=mask, other=-float("inf"))
            m_new = tl.maximum(m_s, tl.max(zs, axis=0))
            s_s = s_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(zs - m_new), axis=0)
            m_s = m_new
            if HAS_TEACHER:
                y = tl.load(zt_row + cols, mask=mask, other=-float("inf")) * inv_T
                mt_new = tl.maximum(m_t, tl.max(y, axis=0))
                scale = tl.exp(m_t - mt_new)
                e = tl.exp(y - mt_new)  # 0 on masked columns
                zs0 = tl.where(mask, zs, 0.0)
                y0 = tl.where(mask, y - mt_new, 0.0)
                # Shifting the reference point of b from m_t to mt_new adds (m_t - mt_new) * s_t;
                # guarded for the first block, where s_t = 0 and m_t = -inf.
                shift = tl.where(s_t > 0.0, m_t - mt_new, 0.0) * s_t
                b = (b + shift) * scale + tl.sum(e * y0, axis=0)
                a = a * scale + tl.sum(e * zs0, axis=0)
                s_t = s_t * scale + tl.sum(e, axis=0)
                m_t = mt_new
        return m_s, s_s, m_t, s_t, a, b

    @triton.jit
    def _row_grad(zs_row, zt_row, dz_row, lo, hi, label, lse_s, lse_t, c_ce, c_kl, inv_T,
                  HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr):
        """dz over columns [lo, hi) of one row: (c_ce + c_kl) q_s - c_ce onehot - c_kl p_t."""
        offs = tl.arange(0, BLOCK_V)
        for v0 in range(lo, hi, BLOCK_V):
            cols = v0 + offs
            mask = cols < hi
            zs = tl.load(zs_row + cols, mask=mask, other=0.0)
            q = tl.exp(zs - lse_s)
            g = (c_ce + c_kl) * q - tl.where(cols == label, c_ce, 0.0)
            if HAS_TEACHER:
                y = tl.load(zt_row + cols, mask=mask, other=0.0) * inv_T
                g = g - c_kl * tl.exp(y - lse_t)
            # a row without gradient writes exact zeros, even from non-finite logits (0 * inf = NaN)
            g = tl.where(c_ce + c_kl != 0.0, g, 0.0)
            tl.store(dz_row + cols, g.to(dz_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _distill_rows_kernel(
        zs_ptr, zt_ptr, labels_ptr, cce_ptr, ckl_ptr,  # inputs: [C, V] f32, [C, V] f32, [C], [C], [C]
        dz_ptr, ce_ptr, kl_ptr,  # outputs: [C, V] grad dtype, [C] f32, [C] f32
        V, stride_zs, stride_zt, stride_dz, inv_T, ignore_index,
        HAS_TEACHER: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One program = one token row; loops over the vocabulary in BLOCK_V blocks (ragged tail
        masked). All statistics in float32."""
        row = tl.program_id(0).to(tl.int64)
        zs_row = zs_ptr + row * stride_zs
        zt_row = zt_ptr + row * stride_zt
        label = tl.load(labels_ptr + row)
        ce_valid = label != ignore_index
        m_s, s_s, m_t, s_t, a, b = _row_stats(zs_row, zt_row, 0, V, inv_T, HAS_TEACHER, BLOCK_V)
        lse_s = m_s + tl.log(s_s)
        safe_label = tl.where(ce_valid, label, 0)
        z_target = tl.load(zs_row + safe_label)
        tl.store(ce_ptr + row, tl.where(ce_valid, lse_s - z_target, 0.0))
        lse_t = 0.0
        if HAS_TEACHER:
            lse_t = m_t + tl.log(s_t)
            # KL = E_p[y - lse_t] - E_p[z_s - lse_s] = b/s_t - log s_t - a/s_t + lse_s
            tl.store(kl_ptr + row, b / s_t - tl.log(s_t) - a / s_t + lse_s)
        else:
            tl.store(kl_ptr + row, 0.0)
        if NEED_GRAD:
            _row_grad(zs_row, zt_row, dz_ptr + row * stride_dz, 0, V, label, lse_s, lse_t,
                      tl.load(cce_ptr + row), tl.load(ckl_ptr + row), inv_T, HAS_TEACHER, BLOCK_V)

    # ---- split rows: (row, vocabulary split) programs, for chunks with few rows (see _rows_triton)
    @triton.jit
    def _split_rows_stats_kernel(zs_ptr, zt_ptr, part_ptr, C, V, SPAN, stride_zs, stride_zt, inv_T,
                                 HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr):
        """Statistics of columns [split * SPAN, (split + 1) * SPAN) of one row into part
        [6, S, C] float32 (m_s, s_s, m_t, s_t, a, b)."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        S = tl.num_programs(1)
        lo = split * SPAN
        hi = tl.minimum(V, lo + SPAN)
        m_s, s_s, m_t, s_t, a, b = _row_stats(zs_ptr + row * stride_zs, zt_ptr + row * stride_zt, lo, hi, inv_T,
                                              HAS_TEACHER, BLOCK_V)
        out = part_ptr + split.to(tl.int64) * C + row  # part[k, split, row] at out + k * S * C
        tl.store(out, m_s)
        tl.store(out + S * C, s_s)
        tl.store(out + 2 * S * C, m_t)
        tl.store(out + 3 * S * C, s_t)
        tl.store(out + 4 * S * C, a)
        tl.store(out + 5 * S * C, b)

    @triton.jit
    def _split_rows_finish_kernel(zs_ptr, zt_ptr, labels_ptr, cce_ptr, ckl_ptr, part_ptr, dz_ptr, ce_ptr, kl_ptr,
                                  C, V, SPAN, stride_zs, stride_zt, stride_dz, inv_T, ignore_index,
                                  HAS_TEACHER: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_S: tl.constexpr,
                                  BLOCK_V: tl.constexpr):
        """Merges the row's S partials (each program of the row, redundantly: 6 x S floats), writes
        CE / KL (split 0) and dz over its own columns."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        S = tl.num_programs(1)
        sp = tl.arange(0, BLOCK_S)
        ok = sp < S
        base = part_ptr + sp.to(tl.int64) * C + row
        m_s = tl.load(base + 0 * S * C, mask=ok, other=-float("inf"))
        s_s = tl.load(base + 1 * S * C, mask=ok, other=0.0)
        ms = tl.max(m_s, axis=0)  # finite: some split holds the row's largest logit
        lse_s = ms + tl.log(tl.sum(s_s * tl.exp(m_s - ms), axis=0))
        zs_row = zs_ptr + row * stride_zs
        zt_row = zt_ptr + row * stride_zt
        label = tl.load(labels_ptr + row)
        ce_valid = label != ignore_index
        lse_t = 0.0
        kl = 0.0
        if HAS_TEACHER:
            m_t = tl.load(base + 2 * S * C, mask=ok, other=-float("inf"))
            s_t = tl.load(base + 3 * S * C, mask=ok, other=0.0)
            a = tl.load(base + 4 * S * C, mask=ok, other=0.0)
            b = tl.load(base + 5 * S * C, mask=ok, other=0.0)
            mt = tl.max(m_t, axis=0)
            wgt = tl.exp(m_t - mt)  # 0 for empty splits (m_t = -inf)
            st = tl.sum(wgt * s_t, axis=0)
            at = tl.sum(wgt * a, axis=0)
            # b relative to the row's max: b_i + (m_i - M) s_i; an empty split adds nothing
            bt = tl.sum(wgt * (b + tl.where(s_t > 0.0, (m_t - mt) * s_t, 0.0)), axis=0)
            lse_t = mt + tl.log(st)
            kl = bt / st - tl.log(st) - at / st + lse_s
        if split == 0:
            z_target = tl.load(zs_row + tl.where(ce_valid, label, 0))
            tl.store(ce_ptr + row, tl.where(ce_valid, lse_s - z_target, 0.0))
            tl.store(kl_ptr + row, kl)
        if NEED_GRAD:
            lo = split * SPAN
            _row_grad(zs_row, zt_row, dz_ptr + row * stride_dz, lo, tl.minimum(V, lo + SPAN), label, lse_s,
                      lse_t, tl.load(cce_ptr + row), tl.load(ckl_ptr + row), inv_T, HAS_TEACHER, BLOCK_V)


def default_row_splits(n: int, V: int, block_v: int, device) -> int:
    """Vocabulary splits of the row pass for a chunk of n rows. One program per row leaves most of
    an H100 idle at n = 128 (132 SMs, one 8-warp program each, streaming 1 MB rows): on CUDA, a
    chunk of fewer than 2 rows per SM is split until about 4 programs per SM run (each split at
    least 4 vocabulary blocks, at most 64 splits). Larger chunks (the default 512 rows, which the
    measured benchmark used) keep one program per row. Elsewhere 1 (the interpreter runs programs
    one by one)."""
    device = torch.device(device)
    if device.type != "cuda" or n <= 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if n >= 2 * sms:
        return 1
    want = -(-4 * sms // n)
    return int(max(1, min(want, 64, V // (4 * block_v))))


def _rows_triton(zs, zt, labels, c_ce, c_kl, inv_T, ignore_index, dz, ce_out, kl_out, block_v, num_warps,
                 splits=1):
    """The row pass of one chunk: one program per row (splits = 1), or (row, split) programs: a
    statistics kernel, then a kernel that merges the partials, writes CE / KL and dz."""
    n, V = zs.shape
    if n == 0:
        return
    has_t = zt is not None
    zt_ = zt if has_t else zs
    dz_ = dz if dz is not None else zs  # unused when NEED_GRAD is False
    if splits <= 1:
        _distill_rows_kernel[(n,)](
            zs, zt_, labels, c_ce, c_kl, dz_, ce_out, kl_out,
            V, zs.stride(0), zt_.stride(0), dz_.stride(0), float(inv_T), int(ignore_index),
            HAS_TEACHER=has_t, NEED_GRAD=dz is not None, BLOCK_V=block_v, num_warps=num_warps, **LAUNCH_OPTIONS,
        )
        return
    span = -(-V // splits)
    part = torch.empty((6, splits, n), dtype=torch.float32, device=zs.device)
    if POISON_SCRATCH:
        part.fill_(float("nan"))
    _split_rows_stats_kernel[(n, splits)](zs, zt_, part, n, V, span, zs.stride(0), zt_.stride(0), float(inv_T),
                                          HAS_TEACHER=has_t, BLOCK_V=block_v, num_warps=num_warps,
                                          **LAUNCH_OPTIONS)
    _split_rows_finish_kernel[(n, splits)](
        zs, zt_, labels, c_ce, c_kl, part, dz_, ce_out, kl_out, n, V, span, zs.stride(0), zt_.stride(0),
        dz_.stride(0), float(inv_T), int(ignore_index), HAS_TEACHER=has_t, NEED_GRAD=dz is not None,
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_V=block_v, num_warps=num_warps, **LAUNCH_OPTIONS)


def _rows_torch(zs, zt, labels, c_ce, c_kl, inv_T, ignore_index, dz, ce_out, kl_out):
    """The same per-row math as the kernel, in PyTorch on a [C, V] float32 chunk."""
    lse_s = torch.logsumexp(zs, dim=1, keepdim=True)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    target = zs.gather(1, safe).squeeze(1)
    ce_out.copy_(torch.where(valid, lse_s.squeeze(1) - target, torch.zeros_like(target)))
    logq = zs - lse_s
    if zt is not None:
        logp = torch.log_softmax(zt * inv_T, dim=1)
        p = logp.exp()
        kl_out.copy_((p * (logp - logq)).sum(1))
    else:
        kl_out.zero_()
    if dz is not None:
        g = logq.exp_().mul_((c_ce + c_kl).unsqueeze(1))
        g.scatter_add_(1, safe, -(c_ce * valid).unsqueeze(1))
        if zt is not None:
            g.sub_(p * c_kl.unsqueeze(1))
        # a row without gradient writes exact zeros, even from non-finite logits (0 * inf = NaN)
        dz.copy_(torch.where((c_ce + c_kl != 0).unsqueeze(1), g, torch.zeros((), dtype=g.dtype, device=g.device)))


# --------------------------------------------------------------------------------------------------
# backend "triton_tiled": fully fused tiles (logits live only in registers / shared memory)
# --------------------------------------------------------------------------------------------------
# Per-(row, vocab split) partial statistics written by the forward kernel, float32 [_NSTAT, S, N]:
#   m_s, s_s: running max and sum of exp(z_s - m_s) (student logsumexp)
#   m_t, s_t: the same for y = z_t / T (teacher)
#   a       = sum_v exp(y - m_t) * z_s
#   b       = sum_v exp(y - m_t) * (y - m_t)      (relative to the running max, for precision)
#   tgt     = z_s[label] when the label falls in the split, else 0 (exactly one split has it)
_NSTAT = 7

if triton is not None:

    @triton.jit
    def _tile_logits(hs_ptr, ht_ptr, w_ptr, wt_ptr, rows, row_ok, cols, col_ok, D,
                     s_hs_n, s_hs_d, s_ht_n, s_ht_d, s_w_v, s_w_d, s_wt_v, s_wt_d,
                     HAS_TEACHER: tl.constexpr, SHARED_W: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        """Student and teacher logit tiles [BLOCK_N, BLOCK_V] (float32 accumulation over d tiles).
        rows / cols are int64 offsets; masked rows and columns read zeros."""
        acc_s = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        acc_t = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            m_nd = row_ok[:, None] & d_ok[None, :]
            m_vd = col_ok[:, None] & d_ok[None, :]
            h = tl.load(hs_ptr + rows[:, None] * s_hs_n + dd[None, :] * s_hs_d, mask=m_nd, other=0.0)
            # W tiles are read [BLOCK_V, BLOCK_D] (contiguous along d) and transposed for the dot
            w = tl.load(w_ptr + cols[:, None] * s_w_v + dd[None, :] * s_w_d, mask=m_vd, other=0.0)
            if UPCAST:
                # the Triton interpreter multiplies bf16/fp16 tiles as raw bits: fp32 copies of the
                # same values give the same products, accumulated in fp32 as on the GPU
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc_s = tl.dot(h, tl.trans(w), acc_s, input_precision=PRECISION)
            if HAS_TEACHER:
                ht = tl.load(ht_ptr + rows[:, None] * s_ht_n + dd[None, :] * s_ht_d, mask=m_nd, other=0.0)
                if SHARED_W:  # one LM head: the W tile is loaded once for both dots
                    wt = w
                else:
                    wt = tl.load(wt_ptr + cols[:, None] * s_wt_v + dd[None, :] * s_wt_d, mask=m_vd, other=0.0)
                if UPCAST:
                    ht = ht.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc_t = tl.dot(ht, tl.trans(wt), acc_t, input_precision=PRECISION)
        return acc_s, acc_t

    @triton.jit
    def _tiled_fwd_kernel(
        hs_ptr, w_ptr, ht_ptr, wt_ptr, labels_ptr, part_ptr,  # part: [_NSTAT, S, N] float32 out
        N, V, D, S, inv_T,
        s_hs_n, s_hs_d, s_w_v, s_w_d, s_ht_n, s_ht_d, s_wt_v, s_wt_d,
        HAS_TEACHER: tl.constexpr, SHARED_W: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Program (split, token block): online statistics of BLOCK_N rows over the vocabulary range
        of one split (a whole number of BLOCK_V tiles); writes all _NSTAT partials of its rows, also
        for an empty split (max -inf, sums 0)."""
        split = tl.program_id(0)  # splits vary fastest: programs running together share h rows in L2
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        rows = offs_n.to(tl.int64)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        tiles = tl.cdiv(tl.cdiv(V, BLOCK_V), S)
        v_start = split * tiles * BLOCK_V
        v_end = tl.minimum(V, v_start + tiles * BLOCK_V)

        m_s = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
        s_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        m_t = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
        s_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for v0 in range(v_start, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            col_ok = offs_v < v_end
            zs, zt = _tile_logits(hs_ptr, ht_ptr, w_ptr, wt_ptr, rows, row_ok, offs_v.to(tl.int64), col_ok,
                                  D, s_hs_n, s_hs_d, s_ht_n, s_ht_d, s_w_v, s_w_d, s_wt_v, s_wt_d,
                                  HAS_TEACHER, SHARED_W, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
            # every tile has >= 1 valid column, so the new maxima are finite
            zs_m = tl.where(col_ok[None, :], zs, -float("inf"))
            ms_new = tl.maximum(m_s, tl.max(zs_m, axis=1))
            s_s = s_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(zs_m - ms_new[:, None]), axis=1)
            m_s = ms_new
            tgt += tl.sum(tl.where(offs_v[None, :] == labels[:, None], zs, 0.0), axis=1)
            if HAS_TEACHER:
                y = tl.where(col_ok[None, :], zt * inv_T, -float("inf"))
                mt_new = tl.maximum(m_t, tl.max(y, axis=1))
                scale = tl.exp(m_t - mt_new)
                e = tl.exp(y - mt_new[:, None])  # 0 on masked columns
                y0 = tl.where(col_ok[None, :], y - mt_new[:, None], 0.0)
                zs0 = tl.where(col_ok[None, :], zs, 0.0)
                # moving b's reference point from m_t to mt_new adds (m_t - mt_new) * s_t; guarded for
                # the first tile (s_t = 0, m_t = -inf)
                shift = tl.where(s_t > 0.0, m_t - mt_new, 0.0) * s_t
                b = (b + shift) * scale + tl.sum(e * y0, axis=1)
                a = a * scale + tl.sum(e * zs0, axis=1)
                s_t = s_t * scale + tl.sum(e, axis=1)
                m_t = mt_new
        # (no .to() on the scalar arguments: Triton may specialize an argument equal to 1 into a
        # constexpr; S * N < 2**31 / 7 for any realistic batch)
        out = part_ptr + split.to(tl.int64) * N + rows
        plane = S * N
        tl.store(out, m_s, mask=row_ok)
        tl.store(out + plane, s_s, mask=row_ok)
        tl.store(out + 2 * plane, m_t, mask=row_ok)
        tl.store(out + 3 * plane, s_t, mask=row_ok)
        tl.store(out + 4 * plane, a, mask=row_ok)
        tl.store(out + 5 * plane, b, mask=row_ok)
        tl.store(out + 6 * plane, tgt, mask=row_ok)

    @triton.jit
    def _tiled_bwd_kernel(
        hs_ptr, w_ptr, ht_ptr, wt_ptr, labels_ptr, lse_s_ptr, lse_t_ptr, cce_ptr, ckl_ptr,
        dh_ptr, dw_ptr,  # float32 accumulators [N, d] and [V, d] (atomic adds)
        N, V, D, inv_T,
        s_hs_n, s_hs_d, s_w_v, s_w_d, s_ht_n, s_ht_d, s_wt_v, s_wt_d, s_dh_n, s_dh_d, s_dw_v, s_dw_d,
        HAS_TEACHER: tl.constexpr, SHARED_W: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Program = one (token block, vocab tile): recompute both logit tiles, form
        dz = c_ce (q_s - onehot) + c_kl (q_s - p_t) in registers, then per d tile
        dH[rows] += dz @ W[cols] and dW[cols] += dz^T @ h_s[rows] (float32 atomics)."""
        # Grouped order: GROUP_N token blocks sweep the vocabulary together, so their h rows stay
        # in L2 while W streams through (as in the Triton matmul tutorial).
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        num_v = tl.cdiv(V, BLOCK_V)
        per_group = GROUP_N * num_v
        first_n = (pid // per_group) * GROUP_N
        group_size = tl.minimum(num_n - first_n, GROUP_N)
        pid_n = first_n + (pid % per_group) % group_size
        pid_v = (pid % per_group) // group_size

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        rows = offs_n.to(tl.int64)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        cols = offs_v.to(tl.int64)
        zs, zt = _tile_logits(hs_ptr, ht_ptr, w_ptr, wt_ptr, rows, row_ok, cols, col_ok, D,
                              s_hs_n, s_hs_d, s_ht_n, s_ht_d, s_w_v, s_w_d, s_wt_v, s_wt_d,
                              HAS_TEACHER, SHARED_W, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
        c_ce = tl.load(cce_ptr + rows, mask=row_ok, other=0.0)  # 0 on ignored rows
        c_kl = tl.load(ckl_ptr + rows, mask=row_ok, other=0.0)  # 0 on rows outside kl_mask
        q = tl.exp(zs - lse_s[:, None])
        g = (c_ce + c_kl)[:, None] * q - tl.where(offs_v[None, :] == labels[:, None], c_ce[:, None], 0.0)
        if HAS_TEACHER:
            lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
            g = g - c_kl[:, None] * tl.exp(zt * inv_T - lse_t[:, None])
        # zero outside the tile so padded rows/columns add nothing, and on rows without gradient
        live = row_ok & (c_ce + c_kl != 0.0)
        g = tl.where(live[:, None] & col_ok[None, :], g, 0.0)
        if UPCAST:
            gd = g  # fp32 tiles under the interpreter
        else:
            gd = g.to(w_ptr.dtype.element_ty)  # the GEMM dtype (bf16 on GPU: tensor cores)

        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            if NEED_DH:
                w = tl.load(w_ptr + cols[:, None] * s_w_v + dd[None, :] * s_w_d,
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                part = tl.dot(gd, w, input_precision=PRECISION)  # [BLOCK_N, BLOCK_D]
                tl.atomic_add(dh_ptr + rows[:, None] * s_dh_n + dd[None, :] * s_dh_d, part,
                              mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
            if NEED_DW:
                h = tl.load(hs_ptr + rows[:, None] * s_hs_n + dd[None, :] * s_hs_d,
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                part_w = tl.dot(tl.trans(gd), h, input_precision=PRECISION)  # [BLOCK_V, BLOCK_D]
                tl.atomic_add(dw_ptr + cols[:, None] * s_dw_v + dd[None, :] * s_dw_d, part_w,
                              mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")

    def _tiled_configs():
        """A short list: every config costs a compile (about a second) per flag set on first use;
        SDMPRUNE_TILED_AUTOTUNE=full adds four more. Only tiles that compile for sm_90 without
        register spills for every flag set (teacher or not, shared or separate W, dW or not): the two
        float32 [BLOCK_N, BLOCK_V] logit tiles leave little room. Every tile of the previous lists
        (BLOCK_D 64 / 128, 128 x 128, 64 x 256, some with 4 warps) spilled 156 B - 4.6 KB per thread;
        128 x 128 still spills at BLOCK_D 16 / 32, 64 x 64 at BLOCK_D 64, and 4 warps beyond
        64 x 64 x 16 / 32 x 64 x 32 (tests/test_fused_linear_distill_loss.py checks the lists with
        ptxas). One num_stages per tile: Triton 3.9 builds the same sm_90 binary for 2, 3 or 4 stages
        of these loops."""
        grid = [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 8, 3), (64, 128, 16, 8, 3)]
        if os.environ.get("SDMPRUNE_TILED_AUTOTUNE", "") == "full":
            grid += [(128, 64, 16, 8, 3), (64, 64, 16, 8, 3), (64, 64, 16, 4, 3), (32, 64, 32, 4, 3)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
                for bn, bv, bd, w, s in grid]

    def _prune_tiled(configs, named_args, **kwargs):
        """Drop configs that cannot fit: two float32 [BLOCK_N, BLOCK_V] accumulators (student +
        teacher) spill registers at 128 x 128 and beyond (the lists keep smaller tiles); pipelined bf16 operand tiles beyond ~200 KB of
        shared memory do not launch on H100 (228 KB per SM)."""
        has_t = bool(kwargs.get("HAS_TEACHER", True))
        n_w = 1 if kwargs.get("SHARED_W", True) else 2
        esize = named_args["hs_ptr"].element_size() if "hs_ptr" in named_args else 2
        keep = []
        for c in configs:
            bn, bv, bd = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_D"]
            if bn * bv > 128 * 128:
                continue
            smem = c.num_stages * (bn * bd * (1 + has_t) + bv * bd * (n_w if has_t else 1)) * esize
            if smem > 200 * 1024:
                continue
            keep.append(c)
        return keep or configs[:1]

    _TILED_KEY = ["V", "D", "HAS_TEACHER", "SHARED_W", "UPCAST", "PRECISION"]
    _tiled_fwd_kernel_tuned = triton.autotune(
        configs=_tiled_configs(), key=_TILED_KEY, prune_configs_by={"early_config_prune": _prune_tiled},
    )(_tiled_fwd_kernel)
    # autotuning re-runs the kernel, which adds into dH / dW: zero them before each trial
    _tiled_bwd_kernel_tuned = triton.autotune(
        configs=_tiled_configs(), key=_TILED_KEY + ["NEED_DH", "NEED_DW"],
        prune_configs_by={"early_config_prune": _prune_tiled}, reset_to_zero=["dh_ptr", "dw_ptr"],
    )(_tiled_bwd_kernel)

# Under the interpreter every program is simulated in numpy: one fixed small tile configuration
# (tl.dot needs every dimension >= 16).
_INTERPRETER_TILES = dict(BLOCK_N=16, BLOCK_V=128, BLOCK_D=32)
_BWD_GROUP_N = 8


def _tiled_flags(dtype: torch.dtype, device: torch.device):
    on_gpu = device.type == "cuda"
    upcast = not on_gpu and dtype in _HALF
    # float32 inputs: IEEE products (no TF32 rounding), so float32 users get float32 accuracy
    precision = "ieee" if (dtype == torch.float32 or upcast) else "tf32"
    return on_gpu, upcast, precision


def default_vocab_splits(N: int, V: int, device) -> int:
    """Vocabulary splits S of the tiled forward. GPU: at least 8 (so that the programs running
    together cover few token blocks and their h rows stay in L2) and enough (token blocks of 128) x
    S programs to fill the SMs twice, at most 64 and at most one split per 512 vocabulary entries.
    Interpreter: 2 (exercises the split combine at tiny cost)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(8, -(-2 * sms // max(1, -(-N // 128))))
    return int(max(1, min(want, 64, -(-V // 512))))


def _combine_splits(part: torch.Tensor, labels: torch.Tensor, ignore_index: int, has_t: bool):
    """Merge the [_NSTAT, S, N] partials -> (ce_rows, kl_rows, lse_s, lse_t), float32 [N] each."""
    m_s, s_s, m_t, s_t, a, b, tgt = part.unbind(0)
    ms = m_s.max(0).values  # finite: some split holds each row's vocabulary
    lse_s = ms + torch.log((s_s * torch.exp(m_s - ms)).sum(0))
    valid = labels != ignore_index
    ce_rows = torch.where(valid, lse_s - tgt.sum(0), torch.zeros_like(lse_s))
    if not has_t:
        return ce_rows, torch.zeros_like(ce_rows), lse_s, torch.zeros_like(lse_s)
    mt = m_t.max(0).values
    wgt = torch.exp(m_t - mt)  # 0 for empty splits (m_t = -inf)
    st = (wgt * s_t).sum(0)
    at = (wgt * a).sum(0)
    # b relative to the global max: b_i + (m_i - M) s_i; an empty split (s_i = 0) adds nothing
    bt = (wgt * (b + torch.where(s_t > 0, (m_t - mt) * s_t, torch.zeros_like(s_t)))).sum(0)
    log_st = torch.log(st)
    lse_t = mt + log_st
    kl_rows = bt / st - log_st - at / st + lse_s  # E_p[y - lse_t] - E_p[z_s - lse_s]
    return ce_rows, kl_rows, lse_s, lse_t


def _tiled_forward_stats(h_s, w, h_t, w_t, labels, inv_T, splits):
    """Launch the forward kernel; returns the [_NSTAT, S, N] float32 partials."""
    N, D = h_s.shape
    V = w.shape[0]
    has_t = h_t is not None
    on_gpu, upcast, precision = _tiled_flags(h_s.dtype, h_s.device)
    part = torch.empty((_NSTAT, splits, N), dtype=torch.float32, device=h_s.device)
    if POISON_SCRATCH:
        part.fill_(float("nan"))
    ht_, wt_ = (h_t, w_t) if has_t else (h_s, w)
    args = (h_s, w, ht_, wt_, labels, part, N, V, D, splits, float(inv_T),
            h_s.stride(0), h_s.stride(1), w.stride(0), w.stride(1),
            ht_.stride(0), ht_.stride(1), wt_.stride(0), wt_.stride(1))
    flags = dict(HAS_TEACHER=has_t, SHARED_W=(not has_t) or (w_t is w), UPCAST=upcast, PRECISION=precision)

    def grid(meta):
        return (splits, triton.cdiv(N, meta["BLOCK_N"]))

    if on_gpu and not interpreter_enabled():
        with torch.cuda.device(h_s.device):
            _tiled_fwd_kernel_tuned[grid](*args, **flags, **LAUNCH_OPTIONS)
    else:
        _tiled_fwd_kernel[grid](*args, **flags, **_INTERPRETER_TILES, num_warps=4, **LAUNCH_OPTIONS)
    return part


def _tiled_backward(h_s, w, h_t, w_t, labels, lse_s, lse_t, c_ce, c_kl, inv_T, need_h, need_w):
    """Launch the backward kernel; returns float32 (dH [N, d] or None, dW [V, d] or None)."""
    N, D = h_s.shape
    V = w.shape[0]
    has_t = h_t is not None
    on_gpu, upcast, precision = _tiled_flags(h_s.dtype, h_s.device)
    dh = torch.zeros((N, D), dtype=torch.float32, device=h_s.device) if need_h else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=h_s.device) if need_w else None
    dh_ = dh if need_h else dw  # an unused pointer argument must still be a tensor
    dw_ = dw if need_w else dh
    ht_, wt_ = (h_t, w_t) if has_t else (h_s, w)
    lse_t_ = lse_t if has_t else lse_s
    args = (h_s, w, ht_, wt_, labels, lse_s, lse_t_, c_ce, c_kl, dh_, dw_, N, V, D, float(inv_T),
            h_s.stride(0), h_s.stride(1), w.stride(0), w.stride(1),
            ht_.stride(0), ht_.stride(1), wt_.stride(0), wt_.stride(1),
            dh_.stride(0), dh_.stride(1), dw_.stride(0), dw_.stride(1))
    flags = dict(HAS_TEACHER=has_t, SHARED_W=(not has_t) or (w_t is w), NEED_DH=need_h, NEED_DW=need_w,
                 UPCAST=upcast, PRECISION=precision, GROUP_N=_BWD_GROUP_N)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)

    if on_gpu and not interpreter_enabled():
        with torch.cuda.device(h_s.device):
            _tiled_bwd_kernel_tuned[grid](*args, **flags, **LAUNCH_OPTIONS)
    else:
        _tiled_bwd_kernel[grid](*args, **flags, **_INTERPRETER_TILES, num_warps=4, **LAUNCH_OPTIONS)
    return dh, dw


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------
class ChunkPlan(NamedTuple):
    """Launcher choices. scratch_bytes bounds the per-chunk buffers (see the module docstring)."""

    token_chunk: int  # rows of h per chunk (C)
    vocab_block: int  # BLOCK_V of the row kernel
    num_chunks: int
    scratch_bytes: int  # token_chunk * bytes_per_row
    bytes_per_row: int
    num_warps: int


def _grad_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype of dz: the GEMM input dtype on GPU (tensor cores), float32 on CPU."""
    return dtype if (torch.device(device).type == "cuda" and dtype in _HALF) else torch.float32


def _combine_loss(ce_rows, kl_rows, klm, n_ce, n_kl, alpha, has_t, dev):
    """(loss, ce, kl) float32 scalars from per-row CE/KL: CE mean over counted rows, KL mean over
    kl_mask rows, loss = (1 - alpha) CE + alpha KL (pure CE without a teacher)."""
    ce = ce_rows.sum() / n_ce.clamp(min=1.0)
    if has_t:
        kl = torch.where(klm, kl_rows, torch.zeros_like(kl_rows)).sum() / n_kl.clamp(min=1.0)
        return (1.0 - alpha) * ce + alpha * kl, ce, kl
    kl = torch.zeros((), dtype=torch.float32, device=dev)
    return ce + 0.0, ce, kl  # a distinct tensor: ce is marked non-differentiable by the callers


def plan_chunks(N: int, V: int, d: int, dtype: torch.dtype, device, *, has_teacher: bool = True,
                need_grad: bool = True, backend: str = "triton", budget_bytes: Optional[int] = None,
                token_chunk: Optional[int] = None, vocab_block: Optional[int] = None) -> ChunkPlan:
    """Choose (token_chunk, vocab_block, ...) so the chunk scratch stays under ``budget_bytes``
    (default 768 MiB on CUDA, 256 MiB on CPU). Triton path: bytes per row = V * (4 + 4*teacher +
    g*grad); torch path: up to ~8 float32 [C, V] tensors live at once, so V * 4 * 8. token_chunk is a
    multiple of 128 (or 16 when small) unless it covers all N rows. ``d`` is accepted for future
    tile choices (the row kernel does not depend on it)."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if backend == "torch":
        per_row = V * 4 * 8  # zs, zt, dz + log-softmax/prob/product temporaries at peak
    else:
        g = torch.empty((), dtype=_grad_dtype(dtype, device)).element_size() if need_grad else 0
        per_row = V * (4 + (4 if has_teacher else 0) + g)
    if token_chunk is None:
        budget = budget_bytes if budget_bytes is not None else (768 if on_cuda else 256) * _MiB
        c = max(1, budget // max(per_row, 1))
        if c >= 128:
            c = c // 128 * 128
        elif c >= 16:
            c = c // 16 * 16
        token_chunk = int(min(c, max(N, 1)))
    token_chunk = max(1, int(token_chunk))
    if vocab_block is None:
        # GPU: wide blocks stream the row; interpreter: fewer, vectorized steps are faster.
        cap = 2048 if on_cuda else 256
        vocab_block = min(cap, 1 << max(V - 1, 1).bit_length())  # next power of two >= V
    vocab_block = max(16, int(vocab_block))
    num_warps = 8 if vocab_block >= 2048 else 4
    num_chunks = math.ceil(N / token_chunk) if N > 0 else 0
    return ChunkPlan(token_chunk, vocab_block, num_chunks, token_chunk * per_row, per_row, num_warps)


# --------------------------------------------------------------------------------------------------
# GEMM helpers: bf16/fp16 inputs, float32 results
# --------------------------------------------------------------------------------------------------
_MM_OUT_DTYPE_OK = None  # whether torch.mm(..., out_dtype=float32) works for half inputs on CUDA


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result. On CUDA with half inputs: fp32 output straight from the GEMM
    (no rounding of the logits to bf16) when torch supports out_dtype, else a half GEMM upcast.
    Elsewhere the caller passes float32 operands."""
    global _MM_OUT_DTYPE_OK
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE_OK is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE_OK = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK = False
    return (a @ b).float() if a.is_cuda else a.float() @ b.float()


def _check_inputs(h_s, w, labels, h_t, w_t, kl_mask, temperature):
    if h_s.dim() != 2 or w.dim() != 2 or h_s.shape[1] != w.shape[1]:
        raise ValueError(f"student_hidden [N, d] and weight [V, d] expected, got {tuple(h_s.shape)} "
                         f"and {tuple(w.shape)}")
    N = h_s.shape[0]
    if labels.shape != (N,):
        raise ValueError(f"labels must be [N] = [{N}], got {tuple(labels.shape)}")
    if h_s.dtype != w.dtype:
        raise ValueError(f"student_hidden ({h_s.dtype}) and weight ({w.dtype}) must share a dtype")
    if h_t is not None:
        wt = w if w_t is None else w_t
        if h_t.shape != (N, wt.shape[1]) or wt.shape[0] != w.shape[0] or h_t.dtype != wt.dtype:
            raise ValueError(f"teacher_hidden {tuple(h_t.shape)} / teacher weight {tuple(wt.shape)} "
                             f"do not match student {tuple(h_s.shape)} / {tuple(w.shape)}")
    if kl_mask is not None and kl_mask.shape != (N,):
        raise ValueError(f"kl_mask must be [N] = [{N}], got {tuple(kl_mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


# --------------------------------------------------------------------------------------------------
# autograd.Function (both backends): gradients computed chunk by chunk during the forward
# --------------------------------------------------------------------------------------------------
class _LinearDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w, labels, h_t, w_t, kl_mask, alpha, temperature, ignore_index, impl,
                token_chunk, vocab_block, row_splits, grad_enabled):
        # under no_grad (evaluation) the caller's grad mode is off and no gradient is formed: inside
        # forward it is always off, so the launcher passes it in
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        N, d = h_s.shape
        V = w.shape[0]
        dev = h_s.device
        has_t = h_t is not None
        if has_t and w_t is None:
            w_t = w
        plan = plan_chunks(N, V, d, h_s.dtype, dev, has_teacher=has_t, need_grad=need_grad,
                           backend=impl, token_chunk=token_chunk, vocab_block=vocab_block)

        labels = labels.to(device=dev, dtype=torch.int64).contiguous()
        c_ce, c_kl, valid, klm, n_ce, n_kl = _row_coefficients(labels, kl_mask, alpha, ignore_index,
                                                               has_t, N, dev)

        # GEMM operands: on CPU, half weights are upcast once (float32 GEMMs; see the memory bound).
        gemm_f32 = dev.type != "cuda" and h_s.dtype != torch.float32
        w_op = w.detach().float() if gemm_f32 else w.detach()
        wt_op = None
        if has_t:
            wt_op = w_op if w_t is w else (w_t.detach().float() if gemm_f32 else w_t.detach())

        ce_rows = torch.full((N,), float("nan"), dtype=torch.float32, device=dev)
        kl_rows = torch.full((N,), float("nan"), dtype=torch.float32, device=dev)
        inv_T = 1.0 / float(temperature)

        def row_pass(s, e, zs, dz):
            zt = None
            if has_t:
                ht_c = h_t[s:e].detach()
                zt = _mm_f32(ht_c.float() if gemm_f32 else ht_c, wt_op.t())
            if impl == "triton":
                splits = (row_splits if row_splits is not None
                          else default_row_splits(e - s, V, plan.vocab_block, dev))
                _rows_triton(zs, zt, labels[s:e], c_ce[s:e], c_kl[s:e], inv_T, ignore_index, dz,
                             ce_rows[s:e], kl_rows[s:e], plan.vocab_block, plan.num_warps, splits)
            else:
                _rows_torch(zs, zt, labels[s:e], c_ce[s:e], c_kl[s:e], inv_T, ignore_index, dz,
                            ce_rows[s:e], kl_rows[s:e])

        counted = (valid | klm) if has_t else valid  # the rows with a gradient
        grad_h, grad_w32 = chunked_head_pass(h_s, w_op, plan, gemm_f32, need_h=need_h, need_w=need_w,
                                             counted=counted, poison=POISON_SCRATCH, row_pass=row_pass)

        loss, ce, kl = _combine_loss(ce_rows, kl_rows, klm, n_ce, n_kl, alpha, has_t, dev)
        grad_w = grad_w32.to(w.dtype) if need_w else None
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kl):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * g_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * g_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None, None, None


def chunked_head_pass(h: torch.Tensor, w_op: torch.Tensor, plan: ChunkPlan, gemm_f32: bool, *, need_h: bool,
                      need_w: bool, counted: Optional[torch.Tensor], poison: bool, row_pass: Callable) -> tuple:
    """The token-chunk loop of the chunked backends of the LM-head losses (this one and the entropy
    loss). For each chunk [s, e) of ``plan.token_chunk`` rows of h [N, d]: z = h[s:e] @ W^T in float32;
    when a gradient is needed, dz [C, V] (NaN-filled first when ``poison``); ``row_pass(s, e, z, dz)``
    writes the rows' statistics and dz; then dH[s:e] = dz @ W (h's dtype) and dW += dz^T h[s:e]
    (float32). Rows outside ``counted`` [N] bool (None: all count) are zeroed in h before dW, so a
    non-finite hidden state of a row without gradient cannot leak in (0 * inf = NaN). ``w_op``: W as
    the GEMM operand (float32 for half weights on CPU, ``gemm_f32``). Returns (dH or None, float32 dW
    or None)."""
    N, dev = h.shape[0], h.device
    gdt = _grad_dtype(h.dtype, dev)
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=dev) if need_h else None  # contiguous rows
    grad_w32 = torch.zeros(w_op.shape, dtype=torch.float32, device=dev) if need_w else None
    for s in range(0, N, plan.token_chunk):
        e = min(N, s + plan.token_chunk)
        h_op = h[s:e].detach()
        if gemm_f32:
            h_op = h_op.float()
        z = _mm_f32(h_op, w_op.t())
        dz = None
        if need_h or need_w:
            dz = torch.empty(z.shape, dtype=gdt, device=dev)
            if poison:
                dz.fill_(float("nan"))
        row_pass(s, e, z, dz)
        del z
        if need_h:
            if dz.dtype == w_op.dtype == h.dtype:  # GPU: straight into the output rows
                torch.mm(dz, w_op, out=grad_h[s:e])
            else:  # CPU, half inputs: float32 GEMM, then round once
                grad_h[s:e] = (dz @ w_op.to(dz.dtype)).to(h.dtype)
        if need_w:
            if counted is not None:
                h_op = torch.where(counted[s:e, None], h_op, torch.zeros((), dtype=h_op.dtype, device=dev))
            grad_w32 += _mm_f32(dz.t(), h_op)
        del dz
    return grad_h, grad_w32


def _row_coefficients(labels, kl_mask, alpha, ignore_index, has_t, N, dev):
    """(c_ce, c_kl, valid, kl rows, n_ce, n_kl): per-row float32 weights of the CE and KL gradients."""
    valid = labels != ignore_index
    n_ce = valid.sum().to(torch.float32)
    klm = torch.ones(N, dtype=torch.bool, device=dev) if kl_mask is None else kl_mask.to(dev, torch.bool)
    n_kl = klm.sum().to(torch.float32)
    if has_t:
        c_ce = valid.float() * ((1.0 - alpha) / n_ce.clamp(min=1.0))
        c_kl = klm.float() * (alpha / n_kl.clamp(min=1.0))
    else:
        c_ce = valid.float() / n_ce.clamp(min=1.0)
        c_kl = torch.zeros(N, dtype=torch.float32, device=dev)
    return c_ce, c_kl, valid, klm, n_ce, n_kl


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


class _TiledDistillFunction(torch.autograd.Function):
    """backend "triton_tiled": the forward kernel writes per-(row, split) statistics, a torch combine
    gives per-row CE / KL and the two logsumexps; backward recomputes the logit tiles and scales the
    row coefficients by grad_output. Saves h_s, W, h_t, W_t (references, no copies) and 5 [N] rows."""

    @staticmethod
    def forward(ctx, h_s, w, labels, h_t, w_t, kl_mask, alpha, temperature, ignore_index, splits):
        N, d = h_s.shape
        V = w.shape[0]
        dev = h_s.device
        has_t = h_t is not None
        if has_t and (w_t is None or _same_tensor(w_t, w)):
            w_t = w  # one LM head: the kernels load each W tile once for both dots
        labels = labels.to(device=dev, dtype=torch.int64).contiguous()
        c_ce, c_kl, valid, klm, n_ce, n_kl = _row_coefficients(labels, kl_mask, alpha, ignore_index,
                                                               has_t, N, dev)
        inv_T = 1.0 / float(temperature)
        S = int(splits) if splits is not None else default_vocab_splits(N, V, dev)
        if S < 1:
            raise ValueError(f"vocab_splits must be >= 1, got {splits}")
        h_s_, w_ = h_s.detach(), w.detach()
        if N > 0:
            part = _tiled_forward_stats(h_s_, w_, h_t, w_t, labels, inv_T, S)
            ce_rows, kl_rows, lse_s, lse_t = _combine_splits(part, labels, ignore_index, has_t)
            del part
        else:
            ce_rows = kl_rows = lse_s = lse_t = torch.zeros(0, dtype=torch.float32, device=dev)

        loss, ce, kl = _combine_loss(ce_rows, kl_rows, klm, n_ce, n_kl, alpha, has_t, dev)
        ctx.shared_w = has_t and w_t is w
        ctx.has_t = has_t
        ctx.inv_T = inv_T
        ctx.save_for_backward(h_s_, w_, h_t, None if ctx.shared_w else w_t, labels, lse_s, lse_t, c_ce, c_kl)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kl):
        h_s, w, h_t, w_t, labels, lse_s, lse_t, c_ce, c_kl = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = grad_w = None
        if need_h or need_w:
            if ctx.shared_w:
                w_t = w
            g = g_loss.to(torch.float32)
            if need_w:
                # dW reads h_s: a row without gradient may hold a non-finite hidden state (0 * inf = NaN),
                # so it is zeroed here (the kernel zeroes such rows' logit gradient, so dH needs no copy)
                h_s = torch.where((c_ce + c_kl != 0).unsqueeze(1), h_s, torch.zeros((), dtype=h_s.dtype,
                                                                                  device=h_s.device))
            if h_s.shape[0] > 0:
                dh, dw = _tiled_backward(h_s, w, h_t if ctx.has_t else None, w_t, labels, lse_s, lse_t,
                                         (c_ce * g).contiguous(), (c_kl * g).contiguous(), ctx.inv_T,
                                         need_h, need_w)
            else:
                dh = torch.zeros(h_s.shape, dtype=torch.float32, device=h_s.device) if need_h else None
                dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            grad_h = dh.to(h_s.dtype) if need_h else None
            grad_w = dw.to(w.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def _run(impl, student_hidden, weight, labels, teacher_hidden, teacher_weight, alpha, temperature,
         ignore_index, kl_mask, return_parts, token_chunk, vocab_block, vocab_splits=None):
    _check_inputs(student_hidden, weight, labels, teacher_hidden, teacher_weight, kl_mask, temperature)
    if vocab_splits is not None and int(vocab_splits) < 1:
        raise ValueError(f"vocab_splits must be >= 1, got {vocab_splits}")
    if labels.device.type == "cpu" and labels.numel():  # cheap on CPU; on GPU a check would sync
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, {weight.shape[0]}) or ignore_index={ignore_index}")
    h_t = teacher_hidden.detach() if teacher_hidden is not None else None
    w_t = teacher_weight.detach() if teacher_weight is not None else None
    if impl == "triton_tiled":
        loss, ce, kl = _TiledDistillFunction.apply(
            student_hidden, weight, labels, h_t, w_t, kl_mask, float(alpha), float(temperature),
            int(ignore_index), vocab_splits)
    else:
        loss, ce, kl = _LinearDistillFunction.apply(
            student_hidden, weight, labels, h_t, w_t, kl_mask, float(alpha), float(temperature),
            int(ignore_index), impl, token_chunk, vocab_block, vocab_splits, torch.is_grad_enabled())
    if return_parts:
        return loss, ce.detach(), kl.detach()
    return loss


def fused_linear_distill_loss(student_hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              teacher_hidden: Optional[torch.Tensor] = None, *,
                              teacher_weight: Optional[torch.Tensor] = None, alpha: float = 0.5,
                              temperature: float = 1.0, ignore_index: int = -100,
                              kl_mask: Optional[torch.Tensor] = None, return_parts: bool = False,
                              backend: str = "auto", token_chunk: Optional[int] = None,
                              vocab_block: Optional[int] = None, vocab_splits: Optional[int] = None):
    """(1 - alpha) * CE + alpha * KL(softmax(z_t / T) || softmax(z_s)) from hidden states; float32
    scalar (or (loss, ce, kl) with return_parts, ce and kl detached).

    student_hidden [N, d] (bf16/fp16/fp32, differentiated), weight [V, d] (same dtype;
    differentiated when it requires grad), labels [N] int64 already shifted (ignore_index rows have
    no CE), teacher_hidden [N, d] or None (pure fused linear CE, alpha ignored), teacher_weight
    [V, d] or None (= weight), kl_mask [N] bool (rows counted in KL; default all). CE is a mean
    over non-ignored rows, KL a mean over counted rows; an empty set contributes 0.
    backend: "auto" (Triton when use_triton(...) else torch) | "triton" (chunked: cuBLAS logits of
    a token chunk + Triton row kernel) | "triton_tiled" (fully fused tiles, no logits in HBM) |
    "torch". token_chunk / vocab_block override plan_chunks (chunked backends; ignored by
    "triton_tiled"); vocab_splits sets the vocabulary splits of the "triton_tiled" forward
    (default ``default_vocab_splits``) and of the "triton" row pass (default ``default_row_splits``:
    more programs for chunks of few rows). Never allocates N x V.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    tensors = [t for t in (student_hidden, weight, teacher_hidden, teacher_weight) if t is not None]
    if backend == "auto":
        # "triton" stays the default until the GPU benchmark (benchmarks/bench_fused_linear_distill_loss.py)
        # has compared it with "triton_tiled" on an H100; switch here only after measuring.
        backend = "triton" if use_triton(*tensors) else "torch"
    elif backend in ("triton", "triton_tiled") and not use_triton(*tensors):
        raise ValueError(f"backend={backend!r} needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
    return _run(backend, student_hidden, weight, labels, teacher_hidden, teacher_weight, alpha,
                temperature, ignore_index, kl_mask, return_parts, token_chunk, vocab_block, vocab_splits)


_BACKENDS = ("auto", "triton", "triton_tiled", "torch")


def reference_linear_distill_loss(student_hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                  teacher_hidden: Optional[torch.Tensor] = None, *,
                                  teacher_weight: Optional[torch.Tensor] = None, alpha: float = 0.5,
                                  temperature: float = 1.0, ignore_index: int = -100,
                                  kl_mask: Optional[torch.Tensor] = None, return_parts: bool = False,
                                  token_chunk: Optional[int] = None):
    """Plain-PyTorch reference of fused_linear_distill_loss (same math, same token chunking, so
    memory is bounded by token_chunk * V float32 temporaries); differentiable like the fused op.
    This is the package's CPU path (backend="torch")."""
    return _run("torch", student_hidden, weight, labels, teacher_hidden, teacher_weight, alpha,
                temperature, ignore_index, kl_mask, return_parts, token_chunk, None)


class FusedLinearDistillLoss(torch.nn.Module):
    """nn.Module wrapper of fused_linear_distill_loss (backend "auto")."""

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                 backend: str = "auto"):
        super().__init__()
        self.alpha, self.temperature, self.ignore_index, self.backend = alpha, temperature, ignore_index, backend

    def forward(self, student_hidden, weight, labels, teacher_hidden=None, kl_mask=None):
        return fused_linear_distill_loss(
            student_hidden, weight, labels, teacher_hidden, alpha=self.alpha,
            temperature=self.temperature, ignore_index=self.ignore_index, kl_mask=kl_mask,
            backend=self.backend)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, ignore_index={self.ignore_index}"
