"""Fused LM-head entropy loss: the mean predictive entropy of a model's own logits, without an N x V tensor.

Math, for hidden states h [N, d], LM head W [V, d] and counted rows M (row_mask True; all rows by
default), n = |M|:

    z = h W^T                          (float32 logits, never all N rows at once)
    p = softmax(z),  H_r = -sum_v p_v log p_v            (entropy of row r)
    loss = sum_{r in M} H_r / n        (0 when n = 0: zero gradients, never NaN)

No labels, no teacher, no temperature: the label-free calibration loss of HFPrune. Rows outside M
never count: their entropy is dropped (not multiplied by 0) and their logit gradient is written as
zeros, so padding positions add nothing to any gradient.

Per row, float32, one pass over the vocabulary with online rescaling:

    m = max_v z_v,   s = sum_v e^{z_v - m},   a = sum_v e^{z_v - m} (z_v - m)
    lse = m + log s,   sum_v p_v z_v = m + a / s,   H = lse - sum_v p_v z_v = log s - a / s

(a is kept relative to the running max, like the teacher sums of the distillation loss.) The
gradient w.r.t. the logits is dH/dz_v = -p_v (log p_v + H) = -p_v ((z_v - m) - a / s); a counted
row's logit gradient is that times 1/n. Both paths form log p_v + H as (z_v - m) - a / s: on the
near-uniform rows of a random or heavily pruned model log p_v is close to -H, and adding the two
would cancel most of float32's digits (measured: 3e-6 against 4e-7 relative error of dh).

Execution (backends "triton" and "torch"; ``plan_chunks`` of the distillation loss picks the sizes):
  for each token chunk of C rows:
    1. z = one chunk GEMM with float32 output (cuBLAS on GPU)
    2. one row pass over the vocabulary in blocks of BLOCK_V (a Triton program per row, or the
       PyTorch reference): the three running sums -> H; when a gradient is needed, a second pass
       over the same row writes dz
    3. dh[chunk] = dz @ W and, only when W requires grad, dW += dz^T @ h[chunk] (float32)
  The gradient is computed during the forward and scaled by grad_output in backward, so the logits
  are made once.

Memory bound: token_chunk * V * (4 + g) bytes of chunk scratch on the Triton path (g = 2 for
bf16/fp16 on GPU, 4 otherwise; up to ~8 float32 [C, V] temporaries on the torch path), the float32
dW [V, d] only when W requires grad, and on CPU with half weights one float32 copy of W. Never
N x V. The split row pass of the distillation loss (more programs for chunks of few rows) is not
done here: the default chunk at V = 128256 is about 1000 rows, enough programs to fill a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from .fused_linear_distill_loss import chunked_head_pass, plan_chunks
from .utils import LAUNCH_OPTIONS, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - the PyTorch path covers every call
    triton = None
    tl = None

__all__ = ["fused_linear_entropy_loss", "reference_linear_entropy_loss"]

# Tests set this to True: the logit-gradient scratch (dz) is filled with NaN before a kernel writes it.
POISON_SCRATCH = False

_BACKENDS = ("auto", "triton", "torch")


# --------------------------------------------------------------------------------------------------
# Triton kernel: per-row entropy over the vocabulary of one token chunk (+ the logit gradient)
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _entropy_rows_kernel(
        z_ptr, c_ptr,  # inputs: logits [C, V] float32, row coefficients [C] float32 (1/n or 0)
        dz_ptr, ent_ptr,  # outputs: [C, V] grad dtype, [C] float32
        V, stride_z, stride_dz,
        NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One program = one token row; loops over the vocabulary in BLOCK_V blocks (ragged tail
        masked). All statistics in float32."""
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        offs = tl.arange(0, BLOCK_V)
        m = -float("inf")
        s = 0.0
        a = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=-float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new)  # 0 on masked columns
            zr = tl.where(mask, z - m_new, 0.0)
            # moving a's reference point from m to m_new adds (m - m_new) * s; guarded for the first
            # block, where s = 0 and m = -inf
            shift = tl.where(s > 0.0, m - m_new, 0.0) * s
            a = (a + shift) * scale + tl.sum(e * zr, axis=0)
            s = s * scale + tl.sum(e, axis=0)
            m = m_new
        log_s = tl.log(s)
        mean_rel = a / s  # sum_v p_v (z_v - m)
        tl.store(ent_ptr + row, log_s - mean_rel)
        if NEED_GRAD:
            c = tl.load(c_ptr + row)
            dz_row = dz_ptr + row * stride_dz
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                mask = cols < V
                zr = tl.load(z_row + cols, mask=mask, other=0.0) - m
                p = tl.exp(zr - log_s)
                g = -c * p * (zr - mean_rel)
                # rows that do not count get exact zeros, whatever their logits hold
                g = tl.where(c != 0.0, g, 0.0)
                tl.store(dz_row + cols, g.to(dz_row.dtype.element_ty), mask=mask)


def _rows_triton(z, coef, dz, ent_out, block_v, num_warps):
    n, V = z.shape
    if n == 0:
        return
    dz_ = dz if dz is not None else z  # unused when NEED_GRAD is False
    _entropy_rows_kernel[(n,)](z, coef, dz_, ent_out, V, z.stride(0), dz_.stride(0),
                               NEED_GRAD=dz is not None, BLOCK_V=block_v, num_warps=num_warps, **LAUNCH_OPTIONS)


def _rows_torch(z, coef, dz, ent_out):
    """The same per-row math as the kernel, in PyTorch on a [C, V] float32 chunk. log p + H is
    formed as (z - m) - sum_v p_v (z_v - m), not as log p + H: near-uniform rows (a random or
    pruned model) have log p close to -H, and the difference of the two would lose the digits."""
    zr = z - z.max(dim=1, keepdim=True).values
    e = zr.exp()
    s = e.sum(dim=1, keepdim=True)
    p = e.div_(s)
    mean_rel = (p * zr).sum(dim=1, keepdim=True)  # sum_v p_v (z_v - m)
    ent_out.copy_((s.log() - mean_rel).squeeze(1))
    if dz is not None:
        g = zr.sub_(mean_rel).mul_(p).mul_(-coef.unsqueeze(1))  # dH/dz = -p (log p + H)
        dz.copy_(torch.where((coef != 0).unsqueeze(1), g, torch.zeros((), dtype=g.dtype, device=g.device)))


# --------------------------------------------------------------------------------------------------
# autograd.Function: gradients computed chunk by chunk during the forward
# --------------------------------------------------------------------------------------------------
class _LinearEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, row_mask, grad_enabled, impl, token_chunk, vocab_block):
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        N, d = h.shape
        V = w.shape[0]
        dev = h.device
        plan = plan_chunks(N, V, d, h.dtype, dev, has_teacher=False, need_grad=need_grad, backend=impl,
                           token_chunk=token_chunk, vocab_block=vocab_block)

        counted = (torch.ones(N, dtype=torch.bool, device=dev) if row_mask is None
                   else row_mask.to(device=dev, dtype=torch.bool))
        n = counted.sum().to(torch.float32)
        coef = counted.float() / n.clamp(min=1.0)  # d loss / d H_r; stays on the device (no sync)

        # GEMM operands: on CPU, half weights are upcast once (float32 GEMMs; see the memory bound).
        gemm_f32 = dev.type != "cuda" and h.dtype != torch.float32
        w_op = w.detach().float() if gemm_f32 else w.detach()
        ent_rows = torch.full((N,), float("nan"), dtype=torch.float32, device=dev)

        def row_pass(s, e, z, dz):
            if impl == "triton":
                _rows_triton(z, coef[s:e], dz, ent_rows[s:e], plan.vocab_block, plan.num_warps)
            else:
                _rows_torch(z, coef[s:e], dz, ent_rows[s:e])

        grad_h, grad_w32 = chunked_head_pass(h, w_op, plan, gemm_f32, need_h=need_h, need_w=need_w,
                                             counted=None if row_mask is None else counted,
                                             poison=POISON_SCRATCH, row_pass=row_pass)

        # dropped rows are selected out, not multiplied by 0 (a non-finite row cannot leak in)
        loss = torch.where(counted, ent_rows, torch.zeros_like(ent_rows)).sum() / n.clamp(min=1.0)
        grad_w = grad_w32.to(w.dtype) if need_w else None
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * g_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * g_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _check_inputs(h, w, row_mask):
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"hidden [N, d] and weight [V, d] expected, got {tuple(h.shape)} and {tuple(w.shape)}")
    if h.dtype != w.dtype:
        raise ValueError(f"hidden ({h.dtype}) and weight ({w.dtype}) must share a dtype")
    if w.shape[0] == 0:
        raise ValueError("weight has no rows (an empty vocabulary has no entropy)")
    if row_mask is not None and tuple(row_mask.shape) != (h.shape[0],):
        raise ValueError(f"row_mask must be [N] = [{h.shape[0]}], got {tuple(row_mask.shape)}")


def fused_linear_entropy_loss(hidden: torch.Tensor, weight: torch.Tensor, row_mask: Optional[torch.Tensor] = None, *,
                              backend: str = "auto", token_chunk: Optional[int] = None,
                              vocab_block: Optional[int] = None) -> torch.Tensor:
    """Mean over counted rows of the entropy of softmax(hidden @ weight^T); float32 scalar.

    hidden [N, d] (bf16/fp16/fp32, differentiated), weight [V, d] (same dtype; differentiated only
    when it requires grad), row_mask [N] bool or None (rows counted; default all). No counted row:
    loss 0 and zero gradients. The mean is over the rows of this call: for a batch where each
    sample keeps its own mean over its positions, call once per sample and add the results.
    backend: "auto" (Triton when use_triton(...) else torch) | "triton" (chunk GEMM + Triton row
    kernel; CUDA, or CPU under TRITON_INTERPRET=1) | "torch" (the chunked PyTorch reference).
    token_chunk / vocab_block override ``plan_chunks``. Never allocates N x V.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_inputs(hidden, weight, row_mask)
    if backend == "auto":
        backend = "triton" if use_triton(hidden, weight) else "torch"
    elif backend == "triton" and not use_triton(hidden, weight):
        raise ValueError("backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
    return _LinearEntropyFunction.apply(hidden, weight, row_mask, torch.is_grad_enabled(), backend,
                                        token_chunk, vocab_block)


def reference_linear_entropy_loss(hidden: torch.Tensor, weight: torch.Tensor,
                                  row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch with the full [N, V] logits (tests only): the same loss, differentiable by
    autograd, computed in float32 or wider (float64 inputs give a float64 reference)."""
    _check_inputs(hidden, weight, row_mask)
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    logp = torch.log_softmax(hidden.to(cdt) @ weight.to(cdt).t(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    if row_mask is None:
        return ent.mean() if ent.numel() else ent.sum()
    m = row_mask.to(device=ent.device, dtype=torch.bool)
    return torch.where(m, ent, torch.zeros_like(ent)).sum() / m.sum().clamp(min=1)
