"""Rotary position embedding of LLaMA-family models (the rotate-half form) in one Triton pass each way.

For q [B, H, L, D] (any strides; D even), k [B, Hk, L, D] and cos, sin [B or 1, L, D]:

    q_embed = q * cos + rotate_half(q) * sin,     rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

i.e. with halves x = (x1, x2): out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 (the same for k), which is
transformers' ``apply_rotary_pos_emb``. Backward (dout given; cos and sin get no gradient):

    dx1 = d1 c1 + d2 s2,      dx2 = d2 c2 - d1 s1

transformers computes this in about six elementwise kernels per tensor each way (two products, a
negation, a concatenation, a sum), each rounded to the model dtype. Here one program per (sample,
position) reads every head of q and k once and writes them once, float32 math, one rounding.
Nothing is kept for backward but cos and sin (which the model holds anyway).

``rotary_reference`` is the PyTorch form (the tests' reference and the CPU path).
``patch_rotary(model)`` swaps the ``apply_rotary_pos_emb`` of the model's attention module for this
op while a block runs, where a probe shows the two agree (so a variant, e.g. partial or interleaved
rotary, keeps its own).
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Iterator, Tuple

import torch
from torch import nn

from .utils import LAUNCH_OPTIONS, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - the PyTorch path covers every call
    triton = None
    tl = None

__all__ = ["apply_rotary", "find_rotary", "patch_rotary", "rotary_reference", "rotary_status"]

# Tests set this to True: outputs the kernel must fully overwrite are filled with NaN first.
POISON_OUTPUTS = False


if triton is not None:

    @triton.jit
    def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, L, H, HALF,
                       sxb, sxh, sxl, sxd, sob, soh, sol, sod, scb, scl, scd, ssb, ssl, ssd,
                       BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """One (sample b, position l): every head of x [B, H, L, D] rotated (or back-rotated)."""
        pid = tl.program_id(0).to(tl.int64)
        b = pid // L
        pos = pid % L
        hs = tl.arange(0, BLOCK_H)
        js = tl.arange(0, BLOCK_HALF)
        jm = js < HALF
        m = (hs[:, None] < H) & jm[None, :]
        c1 = tl.load(cos_ptr + b * scb + pos * scl + js * scd, mask=jm, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + b * scb + pos * scl + (js + HALF) * scd, mask=jm, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + b * ssb + pos * ssl + js * ssd, mask=jm, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + b * ssb + pos * ssl + (js + HALF) * ssd, mask=jm, other=0.0).to(tl.float32)[None, :]
        xb = x_ptr + b * sxb + pos * sxl + hs[:, None] * sxh
        x1 = tl.load(xb + js[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xb + (js[None, :] + HALF) * sxd, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        ob = out_ptr + b * sob + pos * sol + hs[:, None] * soh
        tl.store(ob + js[None, :] * sod, o1.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(ob + (js[None, :] + HALF) * sod, o2.to(out_ptr.dtype.element_ty), mask=m)


def _rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x [B, H, L, D], cos/sin expanded to [B, L, D]: the rotated x, same strides as x."""
    B, H, L, D = x.shape
    out = torch.empty_like(x)  # keeps x's (transposed) layout, as the PyTorch ops do
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    if out.numel():
        half = D // 2
        _rotary_kernel[(B * L,)](x, out, cos, sin, L, H, half, *x.stride(), *out.stride(), *cos.stride(),
                                 *sin.stride(), BACKWARD=backward, BLOCK_H=triton.next_power_of_2(H),
                                 BLOCK_HALF=triton.next_power_of_2(half), num_warps=4, **LAUNCH_OPTIONS)
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x [B, H, L, D], cos/sin [B or 1, L, D] (differentiable)."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def _rotary_torch(x, cos, sin, backward):
    c, s = cos.unsqueeze(1).to(torch.float32), sin.unsqueeze(1).to(torch.float32)
    x32 = x.to(torch.float32)
    half = x.shape[-1] // 2
    if backward:  # dx = d * cos + rotate_half^T(d * sin), rotate_half^T(y) = cat(y2, -y1)
        ys = x32 * s
        out = x32 * c + torch.cat((ys[..., half:], -ys[..., :half]), dim=-1)
    else:
        out = x32 * c + _rotate_half(x32) * s
    return out.to(x.dtype)


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, use_kernel):
        B, L = q.shape[0], q.shape[2]
        cos_b, sin_b = cos.expand(B, L, -1), sin.expand(B, L, -1)
        run = _rotary_triton if use_kernel else _rotary_torch
        q_out = run(q, cos_b, sin_b, False)
        k_out = run(k, cos_b, sin_b, False)
        ctx.save_for_backward(cos_b, sin_b)
        ctx.use_kernel = use_kernel
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos_b, sin_b = ctx.saved_tensors
        run = _rotary_triton if ctx.use_kernel else _rotary_torch
        gq = run(dq, cos_b, sin_b, True) if (dq is not None and ctx.needs_input_grad[0]) else None
        gk = run(dk, cos_b, sin_b, True) if (dk is not None and ctx.needs_input_grad[1]) else None
        return gq, gk, None, None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(q_embed, k_embed) for q [B, H, L, D] and k [B, Hk, L, D] (unsqueeze_dim=1; or [B, L, H, D]
    with unsqueeze_dim=2) and cos, sin [B or 1, L, D]; the signature of transformers'
    ``apply_rotary_pos_emb``. Differentiable in q and k. backend: "auto" (Triton on CUDA or under
    TRITON_INTERPRET=1), "triton" or "torch"."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ([B, H, L, D]) or 2 ([B, L, H, D]), got {unsqueeze_dim}")
    if unsqueeze_dim == 2:  # [B, L, H, D] views as [B, H, L, D]; outputs viewed back
        qo, ko = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 1, backend)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must be [B, H, L, D] with one even D, got {tuple(q.shape)} and {tuple(k.shape)}")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[-2:] != (q.shape[2], q.shape[3]):
        raise ValueError(f"cos and sin must be [B or 1, L, D] = [., {q.shape[2]}, {q.shape[3]}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if backend == "auto":
        use_kernel = use_triton(q, k, cos, sin)
    else:
        use_kernel = backend == "triton"
        if use_kernel and triton is None:
            raise RuntimeError("backend='triton' needs the triton package")
    return _RotaryFunction.apply(q, k, cos, sin, use_kernel)


# --------------------------------------------------------------------------------------------------
# Swapping a model's apply_rotary_pos_emb
# --------------------------------------------------------------------------------------------------
_EXPECTED_PARAMS = ["q", "k", "cos", "sin", "unsqueeze_dim"]


def _first_attention(model: nn.Module):
    layers = getattr(getattr(model, "model", None), "layers", None)
    return getattr(layers[0], "self_attn", None) if layers is not None and len(layers) else None


def _hub_kernel_function(fn) -> bool:
    """Whether ``fn`` is a function that Hugging Face's ``kernels`` package turned into a module
    (``@use_kernel_forward_from_hub`` on a function, transformers >= 5.25): callable like the function,
    but its signature is ``(*args, **kwargs)``."""
    return isinstance(fn, nn.Module) and isinstance(getattr(type(fn), "kernel_layer_name", None), str)


def _kernelized_by_user(attn: nn.Module, fn) -> bool:
    """Whether ``kernels.kernelize`` gave this attention module its own rotary kernel (the per-model
    wrapper of ``@use_kernelized_func`` then has a forward of its own): that choice is the user's."""
    wrappers = getattr(attn, "__dict__", {}).get("_kernel_funcs")
    if not isinstance(wrappers, dict):
        return False
    return any(isinstance(w, nn.Module) and "forward" in w.__dict__ for w in wrappers.values())


def _attention_module(model: nn.Module):
    """The python module defining the model's attention class, when it has an apply_rotary_pos_emb
    of transformers' signature (or a hub-kernel wrapper of one); else None."""
    return rotary_status(model, probe=False)[0]


def _probe(fn, head_dim: int, device, dtype) -> bool:
    """Whether ``fn`` computes the rotate-half rotary (checked against ``rotary_reference``), called as
    the attention calls it (q, k, cos, sin) and with ``unsqueeze_dim=2`` on [B, L, H, D] inputs."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    q, k, cos, sin = r(2, 3, 5, head_dim), r(2, 1, 5, head_dim), r(1, 5, head_dim), r(1, 5, head_dim)
    tol = dict(rtol=2e-2, atol=2e-2)
    want_q, want_k = rotary_reference(q, cos, sin).float(), rotary_reference(k, cos, sin).float()
    try:
        with torch.no_grad():
            qe, ke = fn(q, k, cos, sin)
            qt, kt = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    except Exception:  # noqa: BLE001 - a function the probe cannot call is simply not swapped
        return False
    return (qe.shape == q.shape and ke.shape == k.shape and qt.shape == q.transpose(1, 2).shape
            and torch.allclose(qe.float(), want_q, **tol) and torch.allclose(ke.float(), want_k, **tol)
            and torch.allclose(qt.transpose(1, 2).float(), want_q, **tol)
            and torch.allclose(kt.transpose(1, 2).float(), want_k, **tol))


def rotary_status(model: nn.Module, probe: bool = True) -> Tuple[object, str]:
    """(the python module whose ``apply_rotary_pos_emb`` ``patch_rotary`` would replace, or None; why).

    The attention forward calls its module's global ``apply_rotary_pos_emb`` by name, so replacing
    that global is what reaches it, whether it is a plain function of transformers' signature or a
    hub-kernel wrapper of one. It is left alone when the attention lies elsewhere, the function has
    another signature, ``kernels.kernelize`` gave the model a rotary kernel, or (``probe``) its output
    on random inputs differs from the rotate-half rotary (partial, interleaved or scaled forms)."""
    attn = _first_attention(model)
    if attn is None:
        return None, "no model.layers[0].self_attn"
    name = type(attn).__module__
    mod = sys.modules.get(name)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None or not callable(fn):
        return None, f"{name} defines no apply_rotary_pos_emb"
    wrapped = _hub_kernel_function(fn)
    if not wrapped:
        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            params = None
        if params != _EXPECTED_PARAMS:
            return None, f"{name}.apply_rotary_pos_emb takes {params}, not {_EXPECTED_PARAMS}"
    if _kernelized_by_user(attn, fn):
        return None, "kernels.kernelize gave the attention a rotary kernel of its own (kept)"
    how = " (through its hub-kernel wrapper)" if wrapped else ""
    if not probe:
        return mod, f"{name}.apply_rotary_pos_emb{how}"
    head_dim = getattr(attn, "head_dim", None)
    p = next(model.parameters(), None)
    if not (isinstance(head_dim, int) and head_dim % 2 == 0):
        return None, f"head_dim {head_dim!r} is not an even integer"
    if p is None or p.device.type == "meta":
        return None, "the model has no materialized weights to probe with"
    if not _probe(fn, head_dim, p.device, p.dtype):
        return None, f"{name}.apply_rotary_pos_emb is not the rotate-half rotary (probe differs)"
    return mod, f"replaces {name}.apply_rotary_pos_emb{how}"


def find_rotary(model: nn.Module):
    """The python module whose ``apply_rotary_pos_emb`` the model's attention calls, when that
    function has transformers' signature and a probe shows it is the rotate-half rotary; else None
    (``rotary_status`` says why)."""
    return rotary_status(model)[0]


_FIND = object()


@contextlib.contextmanager
def patch_rotary(model: nn.Module, backend: str = "auto", module=_FIND) -> Iterator[bool]:
    """Within the block, the model's attention calls ``apply_rotary`` (``backend``) instead of its
    module's ``apply_rotary_pos_emb``, where ``find_rotary`` accepts it (or ``module``, its earlier
    answer, so a training loop probes once); yields whether it was swapped. The module attribute is
    process-wide: other models of the same family in this process use it too while the block runs
    (the same math)."""
    mod = find_rotary(model) if module is _FIND else module
    original = getattr(mod, "apply_rotary_pos_emb", None) if mod is not None else None

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        return apply_rotary(q, k, cos, sin, unsqueeze_dim, backend)

    if original is not None:
        mod.apply_rotary_pos_emb = apply_rotary_pos_emb
    try:
        yield original is not None
    finally:
        if original is not None:
            mod.apply_rotary_pos_emb = original
