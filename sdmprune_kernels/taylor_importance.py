"""Fused first-order Taylor channel importance of a gated MLP, accumulated without weight gradients.

For one sample s (a segment of the flattened token dim) and MLP channel c (row c of W_gate/W_up,
column c of W_down), with the weight gradients that sample would produce

    G_gate = dG^T X   [I, d]      G_up = dU^T X   [I, d]      G_down^T = H^T dY   [I, d]

the element score is ``S_s[c, j] = G_up*W_up + G_gate*W_gate + G_down^T*W_down^T`` and the channel
score gains ``sum_j |S_s[c, j]| / d``. The abs is per segment, never of the batch sum.

Triton kernel: one program per (I block, d block, segment). It reduces the three products over the
segment's tokens into three fp32 register tiles (``tl.dot``), multiplies them by the weight tiles,
takes the abs, reduces over j and stores the [BLOCK_I] partial sum of its (segment, d block); one
float32 sum over those partials in a fixed order adds them into ``scores``. No [I, d] tensor is ever
written. The PyTorch path computes the same in chunks of channels (bounded memory) and is the CPU path.

Autotuning (GPU): two short tile lists, one for bf16/fp16 inputs (tensor-core dots) and one for
float32 inputs (IEEE dots, no TF32: more registers per product, so smaller tiles). Three fp32
accumulators leave little room. Compiled for sm_90 (Triton 3.9, ptxas 13.0), every tile of the
earlier, larger list hit 255 registers and spilled in bf16 with a token mask: from 16 B per thread
(128 x 64 x 32) to 2.9 KB (64 x 256 x 32). Its float32 variants spilled 112 B - 36 KB and took
4-15 s each to compile. Every listed tile compiles without spills; tests/test_taylor_importance.py
checks this with ptxas, no GPU needed. A three-pass variant held one accumulator at a time, which
allowed larger tiles but read x twice. It was dropped: all its tiles spilled too (1.2-7 KB per
thread).

Determinism: no atomics. The partials ([segments, d blocks, I] float32, at most PARTIAL_BYTES per
launch) are reduced by one torch sum, so the same inputs give the same scores, bit for bit, on every
run (for a given autotuned tile, which fixes the d blocks).
"""
from __future__ import annotations

from typing import Optional

import torch

from .utils import LAUNCH_OPTIONS, interpreter_enabled, triton_available, use_triton

# GPU autotune tiles, (BLOCK_I, BLOCK_D, BLOCK_T, num_warps, num_stages). Each compiles for sm_90
# without register spills, with and without a token mask, below 230 registers so that another ptxas
# version has room (ptxas -v: 128-223 for the half list, 110-147 for the float32 one; 16-56 KB of
# shared memory). One num_stages per tile: Triton 3.9 builds the same sm_90 binary for 2, 3 or 4.
HALF_TILES = ((64, 64, 32, 8, 3), (64, 128, 16, 8, 3), (32, 128, 64, 8, 3), (32, 128, 32, 8, 3),
              (64, 64, 16, 8, 3))
FP32_TILES = ((64, 64, 16, 8, 3), (32, 64, 32, 8, 3), (64, 32, 16, 8, 3))

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _taylor_scores_kernel(
        part_ptr, seg_ptr, keep_ptr,
        x_ptr, dg_ptr, du_ptr, h_ptr, dy_ptr,
        wg_ptr, wu_ptr, wd_ptr,
        I, D, inv_d,
        s_xt, s_xd, s_gt, s_gi, s_ut, s_ui, s_ht, s_hi, s_yt, s_yd,
        s_wgi, s_wgd, s_wui, s_wud, s_wdd, s_wdi,
        HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
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

    def _gpu_configs(tiles):
        return [triton.Config({"BLOCK_I": bi, "BLOCK_D": bd, "BLOCK_T": bt}, num_warps=warps, num_stages=stages)
                for bi, bd, bt, warps, stages in tiles]

    # Autotuning re-runs the kernel: harmless, every run overwrites the partials it reads back. The
    # choice is cached on disk (Triton's cache dir): later processes on the machine, a resumed prune
    # among them, use the same tile and so the same summation order.
    _TUNED = {kind: triton.autotune(configs=_gpu_configs(tiles), key=["I", "D", "PRECISION", "UPCAST"],
                                    cache_results=True)(_taylor_scores_kernel)
              for kind, tiles in (("half", HALF_TILES), ("fp32", FP32_TILES))}

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
                          tile: Optional[tuple] = None):
    """Triton path of ``accumulate_taylor_scores_`` (CUDA tensors, or CPU under TRITON_INTERPRET=1).

    tile: None autotunes over HALF_TILES / FP32_TILES on the GPU (fixed small tiles under the
    interpreter); a (BLOCK_I, BLOCK_D, BLOCK_T, num_warps, num_stages) tuple runs that tile instead
    (the GPU tests run every autotuned tile)."""
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
    tuned = on_gpu and tile is None
    if tuned:
        kind = "fp32" if dt == torch.float32 else "half"
        kernel, blocks = _TUNED[kind], {}
        # the partial buffer is sized for the most d blocks any tile of the list can use
        min_block_d = min(t[1] for t in (FP32_TILES if kind == "fp32" else HALF_TILES))
    else:
        kernel = _taylor_scores_kernel
        if tile is not None:
            bi, bd, bt, warps, stages = tile
            blocks = dict(BLOCK_I=bi, BLOCK_D=bd, BLOCK_T=bt, num_warps=warps, num_stages=stages)
        else:
            blocks = dict(_INTERPRETER_BLOCKS, num_warps=4)
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
                kernel[grid](*args, **flags, **blocks, **LAUNCH_OPTIONS)
        else:
            kernel[grid](*args, **flags, **blocks, **LAUNCH_OPTIONS)
        block_d = kernel.best_config.kwargs["BLOCK_D"] if tuned else min_block_d
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
