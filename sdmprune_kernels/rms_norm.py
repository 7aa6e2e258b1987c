"""RMSNorm of LLaMA-family models, one Triton pass each way, keeping only x and 1/rms for backward.

For x [..., D] (any float dtype), weight w [D], per row r (float32 statistics):

    rstd[r] = 1 / sqrt(mean_j x[r, j]^2 + eps)        n = x * rstd
    "llama" (LlamaRMSNorm, Mistral, Qwen2, Qwen3):  y = w * n.to(x.dtype)    y dtype = promote(w, x)
    "gemma" (GemmaRMSNorm):                         y = (n * (1 + w)).to(x.dtype)

which is how the transformers modules compute it. They do it in about six elementwise kernels and
autograd keeps a float32 copy of x and the rounded n for backward: 6 bytes per element in bf16,
per norm, two norms per decoder layer. This op keeps x itself (for the input norm that is the
residual stream, which is alive anyway) and rstd (4 bytes per row), and recomputes n in backward:

    dn = dy * w  ("llama")  or  dy * (1 + w)  ("gemma"),  float32
    dx = rstd * (dn - n * mean_j(dn * n))
    dw = sum_rows dy * n.to(x.dtype)  ("llama")  or  sum_rows dy * n  ("gemma"); only when w requires
         grad (a PyTorch reduction; the pruning passes keep weights frozen)

``rms_norm_reference`` is the same math in plain PyTorch: the tests' reference and the CPU path.
``patch_rms_norms(model)`` swaps the forward of every RMSNorm module of a model whose output it
reproduces (checked numerically on a probe input, so an unknown variant is left alone).
"""
from __future__ import annotations

import contextlib
import types
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .utils import LAUNCH_OPTIONS, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - the PyTorch path covers every call
    triton = None
    tl = None

__all__ = ["RMS_NORM_MODES", "patch_rms_norms", "rms_norm", "rms_norm_reference", "rms_norm_status"]

RMS_NORM_MODES = ("llama", "gemma")

# Tests set this to True: outputs the kernels must fully overwrite are filled with NaN first.
POISON_OUTPUTS = False

# One row per program, the whole row in registers: wider rows fall back to PyTorch.
_MAX_BLOCK_D = 1 << 16


# --------------------------------------------------------------------------------------------------
# Triton kernels: one row per program
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, D, x_stride, y_stride, eps,
                             GEMMA: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        x_raw = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0)
        x = x_raw.to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        n = x * rstd
        if GEMMA:
            y = n * (1.0 + w)
        else:
            # n rounded to x's dtype first, then the product rounded once: torch's `w * n.to(dtype)`
            y = w * n.to(x_raw.dtype).to(tl.float32)
        tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, D, dy_stride, x_stride, dx_stride,
                             GEMMA: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        x = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_stride + cols, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        if GEMMA:
            dn = dy * (1.0 + w)
        else:
            dn = dy * w
        c = tl.sum(dn * n, axis=0) / D
        dx = rstd * (dn - n * c)
        tl.store(dx_ptr + row * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _launch_config(D: int) -> Tuple[int, int]:
    block = triton.next_power_of_2(D)
    warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, warps


def _fwd_triton(x2: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool, out_dtype: torch.dtype):
    R, D = x2.shape
    y = torch.empty((R, D), dtype=out_dtype, device=x2.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x2.device)
    if POISON_OUTPUTS:
        y.fill_(float("nan"))
        rstd.fill_(float("nan"))
    if R:
        block, warps = _launch_config(D)
        _rms_norm_fwd_kernel[(R,)](x2, w, y, rstd, D, x2.stride(0), y.stride(0), float(eps),
                                   GEMMA=gemma, BLOCK_D=block, num_warps=warps, **LAUNCH_OPTIONS)
    return y, rstd


def _bwd_triton(dy2: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, gemma: bool):
    R, D = x2.shape
    dx = torch.empty((R, D), dtype=x2.dtype, device=x2.device)
    if POISON_OUTPUTS:
        dx.fill_(float("nan"))
    if R:
        block, warps = _launch_config(D)
        _rms_norm_bwd_kernel[(R,)](dy2, x2, w, rstd, dx, D, dy2.stride(0), x2.stride(0), dx.stride(0),
                                   GEMMA=gemma, BLOCK_D=block, num_warps=warps, **LAUNCH_OPTIONS)
    return dx


# --------------------------------------------------------------------------------------------------
# PyTorch reference (same math; the CPU path and the tests' reference)
# --------------------------------------------------------------------------------------------------
def _rstd_torch(x: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 (or float64 for float64 x) 1/rms per row, shape [..., 1]."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: str = "llama") -> torch.Tensor:
    """y [..., D] exactly as the transformers modules compute it (differentiable, keeps what autograd
    keeps). float64 inputs give a float64 reference."""
    _check_mode(mode)
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    n = x32 * _rstd_torch(x, eps)
    if mode == "gemma":
        return (n * (1.0 + weight.to(n.dtype))).to(x.dtype)
    return weight * n.to(x.dtype)


def _fwd_torch(x2, w, eps, gemma, out_dtype):
    rstd = _rstd_torch(x2, eps)
    n = x2.to(rstd.dtype) * rstd
    y = (n * (1.0 + w.to(n.dtype))) if gemma else (w * n.to(x2.dtype))
    return y.to(out_dtype), rstd.squeeze(-1)


def _normalized(x2, rstd):
    return x2.to(rstd.dtype) * rstd.unsqueeze(-1)


def _bwd_torch(dy2, x2, w, rstd, gemma):
    n = _normalized(x2, rstd)
    wf = w.to(n.dtype)
    dn = dy2.to(n.dtype) * ((1.0 + wf) if gemma else wf)
    c = (dn * n).mean(-1, keepdim=True)
    return (rstd.unsqueeze(-1) * (dn - n * c)).to(x2.dtype)


# --------------------------------------------------------------------------------------------------
# autograd.Function and the function users import
# --------------------------------------------------------------------------------------------------
def _check_mode(mode: str) -> None:
    if mode not in RMS_NORM_MODES:
        raise ValueError(f"mode must be one of {RMS_NORM_MODES}, got {mode!r}")


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """t as [rows, D] with a unit last stride (a view when it already has one)."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, gemma, backend):
        D = x.shape[-1]
        x2 = _rows(x, D)
        w = _rows(weight.detach(), D)[0]
        out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
        if backend == "auto":
            triton_ok = use_triton(x2, w) and triton.next_power_of_2(max(D, 1)) <= _MAX_BLOCK_D
        else:
            triton_ok = backend == "triton"
        if triton_ok:
            y, rstd = _fwd_triton(x2, w, eps, gemma, out_dtype)
        else:
            y, rstd = _fwd_torch(x2, w, eps, gemma, out_dtype)
        ctx.save_for_backward(x2, weight, rstd)  # x2 is x itself (a view) unless x had a strided last dim
        ctx.gemma, ctx.triton_ok, ctx.shape = gemma, triton_ok, x.shape
        return y.view(*x.shape[:-1], D)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        D = x2.shape[-1]
        dy2 = _rows(dy, D)
        w = _rows(weight.detach(), D)[0]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (_bwd_triton(dy2, x2, w, rstd, ctx.gemma) if ctx.triton_ok
                  else _bwd_torch(dy2, x2, w, rstd, ctx.gemma))
            dx = dx.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            n = _normalized(x2, rstd)
            if not ctx.gemma:
                n = n.to(x2.dtype)
            dw = (dy2.to(torch.float32 if dy2.dtype != torch.float64 else dy2.dtype) * n).sum(0).to(weight.dtype)
        return dx, dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, mode: str = "llama",
             backend: str = "auto") -> torch.Tensor:
    """RMSNorm of the last dim of x [..., D] with weight [D] (see the module docstring for ``mode``).

    Differentiable in x and weight; keeps only x and a float32 [rows] vector for backward.
    backend: "auto" (the Triton kernels on CUDA or under TRITON_INTERPRET=1, else PyTorch),
    "triton" or "torch"."""
    _check_mode(mode)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and (triton is None or triton.next_power_of_2(max(x.shape[-1], 1)) > _MAX_BLOCK_D):
        raise RuntimeError("backend='triton' needs the triton package and rows of at most 65536")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"x ({x.device}) and weight ({weight.device}) must be on one device")
    return _RMSNormFunction.apply(x, weight, float(eps), mode == "gemma", backend)


# --------------------------------------------------------------------------------------------------
# Swapping a model's RMSNorm modules
# --------------------------------------------------------------------------------------------------
def _norm_eps(module: nn.Module) -> Optional[float]:
    for name in ("variance_epsilon", "eps"):
        v = getattr(module, name, None)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def _probe_mode(module: nn.Module, eps: float) -> Optional[str]:
    """The mode whose PyTorch reference reproduces ``module`` on a random probe input and a random
    weight (swapped in functionally, the module is not touched), or None. The random weight tells
    the modes apart where the module's own (e.g. all-ones) weight would not."""
    w = module.weight
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = (torch.randn(3, w.shape[0], generator=gen) * 3.0).to(device=w.device, dtype=w.dtype)
    w_probe = (torch.randn(w.shape[0], generator=gen) * 0.5 + 1.0).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        try:
            want = torch.func.functional_call(module, {"weight": w_probe}, (probe,))
        except Exception:  # noqa: BLE001 - a module the probe cannot call is simply not swapped
            return None
        for mode in RMS_NORM_MODES:
            got = rms_norm_reference(probe, w_probe, eps, mode)
            if got.dtype == want.dtype and got.shape == want.shape and torch.allclose(
                    got.float(), want.float(), rtol=2e-2, atol=2e-2):
                return mode
    return None


def rms_norm_status(model: nn.Module) -> Tuple[List[Tuple[nn.Module, str, float]], Dict[str, str]]:
    """(module, mode, eps) for every submodule named like an RMSNorm, with a [D] weight and an eps,
    whose output one of the modes reproduces; and, for each norm class left alone, why. Anything else
    (a norm without weight, a variant such as a scaled or offset norm of another form, a module that
    ``kernels.kernelize`` gave a forward of its own) keeps its own forward."""
    found, seen, left = [], {}, {}
    for mod in model.modules():
        cls = type(mod).__name__
        if not cls.endswith("RMSNorm"):
            continue
        if "forward" in mod.__dict__:
            left[cls] = "has a forward of its own (e.g. kernels.kernelize): kept"
            continue
        w = getattr(mod, "weight", None)
        eps = _norm_eps(mod)
        if not isinstance(w, torch.Tensor) or w.dim() != 1:
            left[cls] = "no [D] weight"
            continue
        if eps is None:
            left[cls] = "no eps attribute (variance_epsilon or eps)"
            continue
        if w.device.type == "meta":
            left[cls] = "weights on the meta device"
            continue
        key = (type(mod), w.dtype, w.device, eps)
        if key not in seen:  # one probe per class, dtype, device and eps (modules of a class agree)
            seen[key] = _probe_mode(mod, eps)
        if seen[key] is not None:
            found.append((mod, seen[key], eps))
        else:
            left[cls] = f"output is none of the forms {', '.join(RMS_NORM_MODES)} (probe differs)"
    return found, left


def find_rms_norms(model: nn.Module) -> List[Tuple[nn.Module, str, float]]:
    """(module, mode, eps) for every RMSNorm that ``rms_norm`` reproduces (``rms_norm_status``)."""
    return rms_norm_status(model)[0]


def _forward_for(mode: str, eps: float, backend: str):
    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, eps, mode, backend)
    return forward


@contextlib.contextmanager
def patch_rms_norms(model: nn.Module, backend: str = "auto",
                    norms: Optional[List[Tuple[nn.Module, str, float]]] = None) -> Iterator[int]:
    """Within the block, every RMSNorm of ``model`` that ``find_rms_norms`` recognizes (or the given
    ``norms``, its earlier answer, so a training loop probes once) runs ``rms_norm`` with
    ``backend``; yields how many were swapped. Their own forwards come back afterwards."""
    patched = []
    try:
        for mod, mode, eps in (find_rms_norms(model) if norms is None else norms):
            mod.forward = types.MethodType(_forward_for(mode, eps, backend), mod)
            patched.append(mod)
        yield len(patched)
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)
