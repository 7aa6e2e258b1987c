"""Fused LM-head self-distillation loss: CE + KL(teacher || student) without an N x V tensor.

Math (DESIGN section 1), for student hidden states h_s [N, d], teacher hidden states h_t [N, d],
LM heads W [V, d] (student) and W_t [V, d] (teacher; defaults to W):

    z_s = h_s W^T,  z_t = h_t W_t^T                       (float32 logits, never all N rows at once)
    CE  = sum_{rows r with labels[r] != ignore_index} (lse(z_s[r]) - z_s[r, labels[r]]) / n_ce
    KL  = sum_{rows r with kl_mask[r]} sum_v p_t log(p_t / q_s) / n_kl,
          p_t = softmax(z_t / T)   (temperature on the TEACHER only),  q_s = softmax(z_s)
    loss = (1 - alpha) * CE + alpha * KL          (loss = CE when there is no teacher)

A term with no counted rows is 0 (n = 0 gives loss 0 and zero gradients, never NaN).
d loss / d z_s[r] = c_ce[r] * (q_s - onehot(labels[r])) + c_kl[r] * (q_s - p_t), with
c_ce = (1 - alpha) / n_ce on CE rows and c_kl = alpha / n_kl on KL rows. Gradients flow to h_s
and, when it requires grad, to W; the teacher side (h_t, W_t) never gets gradients (when W_t is W,
only the student path contributes to dW).

Execution (both backends share it; ``plan_chunks`` picks the sizes):
  for each token chunk of C rows:
    1. z_s (and z_t) = chunk GEMMs with float32 output          (cuBLAS on GPU: tensor cores, fp32 acc)
    2. one row-wise pass over the vocabulary in blocks of BLOCK_V (Triton kernel, or the PyTorch
       reference): online logsumexp of z_s and of z_t / T, the sums sum_v p_t*z_s and
       sum_v p_t*(z_t/T - max) by online rescaling, the target logit -> per-row CE and KL;
       when a gradient is needed, a second pass over the same row writes dz (the logit gradient)
    3. dH[chunk] = dz @ W and, when W requires grad, dW += dz^T @ h_s[chunk] (float32 accumulator)
  The gradient is computed during the forward (like Liger's fused linear losses) and scaled by
  grad_output in backward, so the logits are made once.

Memory bound (the "scratch"): token_chunk * V * (4 + 4 [teacher] + g [grad]) bytes for the Triton
path, g = 2 for bf16/fp16 on GPU, 4 otherwise; plus the float32 dW accumulator [V, d] only when W
requires grad (plus one [V, d] float32 temporary per chunk), plus (CPU, non-float32 weights only)
one float32 copy of W (and W_t). The torch path holds up to ~8 float32 [C, V] tensors. Never N x V.
``plan_chunks`` picks token_chunk from a byte budget (768 MiB on CUDA: 512 rows at V = 128256 with
a teacher, 656 MB), so peak extra memory stays under 1 GB plus the gradient of h_s itself.

What would be faster (not done here): a cut-cross-entropy-style kernel that computes the logit
tiles with tl.dot and keeps them in SRAM (online statistics in the GEMM epilogue, logits recomputed
in the backward GEMM) saves the ~26 bytes per logit of HBM traffic of steps 1-2 (about 9 ms at
N x V = 8192 x 128256 on H100); steps 1 and 3 are already at the 3-GEMM floor.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .utils import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - the PyTorch path covers every call
    triton = None
    tl = None

__all__ = [
    "ChunkPlan",
    "FusedLinearDistillLoss",
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
        offs = tl.arange(0, BLOCK_V)

        # Pass 1: online logsumexp of z_s; of y = z_t / T; a = sum e^{y-m_t} z_s;
        # b = sum e^{y-m_t} (y - m_t) (kept relative to the running max for precision).
        m_s = -float("inf")
        s_s = 0.0
        m_t = -float("inf")
        s_t = 0.0
        a = 0.0
        b = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            mask = cols < V
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
            c_ce = tl.load(cce_ptr + row)
            c_kl = tl.load(ckl_ptr + row)
            dz_row = dz_ptr + row * stride_dz
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                mask = cols < V
                zs = tl.load(zs_row + cols, mask=mask, other=0.0)
                q = tl.exp(zs - lse_s)
                g = (c_ce + c_kl) * q - tl.where(cols == label, c_ce, 0.0)
                if HAS_TEACHER:
                    y = tl.load(zt_row + cols, mask=mask, other=0.0) * inv_T
                    g = g - c_kl * tl.exp(y - lse_t)
                tl.store(dz_row + cols, g.to(dz_ptr.dtype.element_ty), mask=mask)


def _rows_triton(zs, zt, labels, c_ce, c_kl, inv_T, ignore_index, dz, ce_out, kl_out, block_v, num_warps):
    n, V = zs.shape
    if n == 0:
        return
    has_t = zt is not None
    zt_ = zt if has_t else zs
    dz_ = dz if dz is not None else zs  # unused when NEED_GRAD is False
    _distill_rows_kernel[(n,)](
        zs, zt_, labels, c_ce, c_kl, dz_, ce_out, kl_out,
        V, zs.stride(0), zt_.stride(0), dz_.stride(0), float(inv_T), int(ignore_index),
        HAS_TEACHER=has_t, NEED_GRAD=dz is not None, BLOCK_V=block_v, num_warps=num_warps,
    )


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
        dz.copy_(g)


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
                token_chunk, vocab_block):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
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

        # GEMM operands: on CPU, half weights are upcast once (float32 GEMMs; see the memory bound).
        gemm_f32 = dev.type != "cuda" and h_s.dtype != torch.float32
        w_op = w.detach().float() if gemm_f32 else w.detach()
        wt_op = None
        if has_t:
            wt_op = w_op if w_t is w else (w_t.detach().float() if gemm_f32 else w_t.detach())
        gdt = _grad_dtype(h_s.dtype, dev)

        ce_rows = torch.full((N,), float("nan"), dtype=torch.float32, device=dev)
        kl_rows = torch.full((N,), float("nan"), dtype=torch.float32, device=dev)
        grad_h = torch.empty(h_s.shape, dtype=h_s.dtype, device=dev) if need_h else None  # contiguous rows
        grad_w32 = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_w else None
        inv_T = 1.0 / float(temperature)

        for s in range(0, N, plan.token_chunk):
            e = min(N, s + plan.token_chunk)
            hs_c = h_s[s:e].detach()
            hs_op = hs_c.float() if gemm_f32 else hs_c
            zs = _mm_f32(hs_op, w_op.t())
            zt = None
            if has_t:
                ht_c = h_t[s:e].detach()
                zt = _mm_f32(ht_c.float() if gemm_f32 else ht_c, wt_op.t())
            dz = None
            if need_grad:
                dz = torch.empty(zs.shape, dtype=gdt, device=dev)
                if POISON_SCRATCH:
                    dz.fill_(float("nan"))
            if impl == "triton":
                _rows_triton(zs, zt, labels[s:e], c_ce[s:e], c_kl[s:e], inv_T, ignore_index, dz,
                             ce_rows[s:e], kl_rows[s:e], plan.vocab_block, plan.num_warps)
            else:
                _rows_torch(zs, zt, labels[s:e], c_ce[s:e], c_kl[s:e], inv_T, ignore_index, dz,
                            ce_rows[s:e], kl_rows[s:e])
            del zs, zt
            if need_h:
                if dz.dtype == w_op.dtype == h_s.dtype:  # GPU: straight into the output rows
                    torch.mm(dz, w_op, out=grad_h[s:e])
                else:  # CPU, half inputs: float32 GEMM, then round once
                    grad_h[s:e] = (dz @ w_op.to(dz.dtype)).to(h_s.dtype)
            if need_w:
                grad_w32 += _mm_f32(dz.t(), hs_op)
            del dz

        ce = ce_rows.sum() / n_ce.clamp(min=1.0)
        if has_t:
            kl = torch.where(klm, kl_rows, torch.zeros_like(kl_rows)).sum() / n_kl.clamp(min=1.0)
            loss = (1.0 - alpha) * ce + alpha * kl
        else:
            kl = torch.zeros((), dtype=torch.float32, device=dev)
            loss = ce + 0.0  # a distinct tensor: ce is marked non-differentiable below
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
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None


def _run(impl, student_hidden, weight, labels, teacher_hidden, teacher_weight, alpha, temperature,
         ignore_index, kl_mask, return_parts, token_chunk, vocab_block):
    _check_inputs(student_hidden, weight, labels, teacher_hidden, teacher_weight, kl_mask, temperature)
    if labels.device.type == "cpu" and labels.numel():  # cheap on CPU; on GPU a check would sync
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, {weight.shape[0]}) or ignore_index={ignore_index}")
    h_t = teacher_hidden.detach() if teacher_hidden is not None else None
    w_t = teacher_weight.detach() if teacher_weight is not None else None
    loss, ce, kl = _LinearDistillFunction.apply(
        student_hidden, weight, labels, h_t, w_t, kl_mask, float(alpha), float(temperature),
        int(ignore_index), impl, token_chunk, vocab_block)
    if return_parts:
        return loss, ce.detach(), kl.detach()
    return loss


def fused_linear_distill_loss(student_hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              teacher_hidden: Optional[torch.Tensor] = None, *,
                              teacher_weight: Optional[torch.Tensor] = None, alpha: float = 0.5,
                              temperature: float = 1.0, ignore_index: int = -100,
                              kl_mask: Optional[torch.Tensor] = None, return_parts: bool = False,
                              backend: str = "auto", token_chunk: Optional[int] = None,
                              vocab_block: Optional[int] = None):
    """(1 - alpha) * CE + alpha * KL(softmax(z_t / T) || softmax(z_s)) from hidden states; float32
    scalar (or (loss, ce, kl) with return_parts, ce and kl detached).

    student_hidden [N, d] (bf16/fp16/fp32, differentiated), weight [V, d] (same dtype;
    differentiated when it requires grad), labels [N] int64 already shifted (ignore_index rows have
    no CE), teacher_hidden [N, d] or None (pure fused linear CE, alpha ignored), teacher_weight
    [V, d] or None (= weight), kl_mask [N] bool (rows counted in KL; default all). CE is a mean
    over non-ignored rows, KL a mean over counted rows; an empty set contributes 0.
    backend: "auto" (Triton when use_triton(...) else torch) | "triton" | "torch".
    token_chunk / vocab_block override plan_chunks (tests, tuning). Never allocates N x V.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    tensors = [t for t in (student_hidden, weight, teacher_hidden, teacher_weight) if t is not None]
    if backend == "auto":
        backend = "triton" if use_triton(*tensors) else "torch"
    elif backend == "triton" and not use_triton(*tensors):
        raise ValueError("backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
    return _run(backend, student_hidden, weight, labels, teacher_hidden, teacher_weight, alpha,
                temperature, ignore_index, kl_mask, return_parts, token_chunk, vocab_block)


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
