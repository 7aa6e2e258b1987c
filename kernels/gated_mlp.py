"""Gated MLP whose backward gives dX and accumulates Taylor channel importance instead of weight grads.

    Y = down(act(gate(X)) * up(X) [* mask])        X [..., d], weights W_gate/W_up [I, d], W_down [d, I]

Backward (dY given): dH = dY W_down [* mask], dU = dH * act(G), dG = dH * U * act'(G),
dX = dG W_gate + dU W_up, and ``accumulate_taylor_scores_`` adds the per-sample channel scores.
Weights get no gradient (they must have requires_grad=False). The activation act(G) is recomputed
in backward from the saved gate output instead of being kept.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .taylor_importance import accumulate_taylor_scores_

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def apply_activation(name: str, g: torch.Tensor) -> torch.Tensor:
    """act(g) as the HF modules compute it (same dtype as g)."""
    if name == "silu":
        return F.silu(g)
    if name == "gelu":
        return F.gelu(g)
    if name == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    if name == "relu":
        return F.relu(g)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_grad(name: str, g: torch.Tensor) -> torch.Tensor:
    """act'(g) in closed form, computed in float32 (or wider): the reference for activation_backward."""
    g = g.to(torch.promote_types(g.dtype, torch.float32))
    if name == "silu":
        s = torch.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(g * _INV_SQRT_2)) + g * torch.exp(-0.5 * g * g) * _INV_SQRT_2PI
    if name == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g))
        return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * g * g)
    if name == "relu":
        return (g > 0).to(g.dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_backward(name: str, grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad * act'(g) with the fused ATen kernels autograd itself uses (fp32 math inside, g's dtype out)."""
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, g)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, g, approximate="none")
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, g, approximate="tanh")
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, g, 0)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def _check_not_meta(*tensors):
    for t in tensors:
        if t is not None and t.device.type == "meta":
            raise RuntimeError(
                "gated_mlp_with_importance: an MLP weight is on the 'meta' device. Offload hooks "
                "(accelerate) materialize weights around forward only; the importance backward needs the "
                "real weights, so load the MLP weights onto a device (or stream them in for backward)."
            )


def _masked(h: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return h if mask is None else h * mask


class _GatedMLPImportance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, b_gate, w_up, b_up, w_down, b_down, mask, act, scores, seg_offsets,
                token_mask, backend, accumulate_if):
        _check_not_meta(w_gate, w_up, w_down, b_gate, b_up, b_down)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        g = F.linear(x2, w_gate, b_gate)
        u = F.linear(x2, w_up, b_up)
        h = _masked(apply_activation(act, g) * u, mask)
        y = F.linear(h, w_down, b_down)
        # saved: x, g, u (act(g) and h are recomputed); weights are saved tensors so that FSDP2 can
        # re-gather them for backward.
        ctx.save_for_backward(x2, g, u, w_gate, w_up, w_down, mask)
        # non-tensor state lives on ctx: under non-reentrant checkpointing the recompute replaces the
        # saved tensors only, so these stay the values of the original forward.
        ctx.act, ctx.scores, ctx.seg_offsets, ctx.token_mask = act, scores, seg_offsets, token_mask
        ctx.backend, ctx.accumulate_if, ctx.shape = backend, accumulate_if, shape
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, g, u, w_gate, w_up, w_down, mask = ctx.saved_tensors
        _check_not_meta(w_gate, w_up, w_down)
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != g.dtype:
            dy2 = dy2.to(g.dtype)
        dh = _masked(dy2 @ w_down.to(dy2.dtype), mask)          # [T, I]
        a = apply_activation(ctx.act, g)
        d_up = dh * a
        h = _masked(a.mul_(u), mask)                          # a's buffer becomes h
        d_gate = activation_backward(ctx.act, dh.mul_(u), g)  # dh's buffer becomes dA
        del dh
        dx = d_gate @ w_gate.to(d_gate.dtype)
        dx.addmm_(d_up, w_up.to(d_up.dtype))
        scores = ctx.scores
        if scores is not None and (ctx.accumulate_if is None or ctx.accumulate_if()):
            accumulate_taylor_scores_(scores, x2, d_gate, d_up, h, dy2, w_gate, w_up, w_down,
                                      ctx.seg_offsets, ctx.token_mask, backend=ctx.backend)
        dx = dx.reshape(ctx.shape).to(x2.dtype)
        return (dx,) + (None,) * 13


def _segments(x: torch.Tensor, seg_offsets: Optional[torch.Tensor]) -> torch.Tensor:
    """Default segments: each row of a [B, L, d] input (or one segment of a 2-D input)."""
    if seg_offsets is not None:
        return seg_offsets
    T = x.numel() // x.shape[-1]
    n_rows = x.shape[0] if x.dim() == 3 else 1
    step = T // n_rows
    return torch.arange(0, n_rows + 1, device=x.device, dtype=torch.int64) * step


def gated_mlp_with_importance(x: torch.Tensor, gate, up, down, activation: str,
                              scores: Optional[torch.Tensor] = None, seg_offsets: Optional[torch.Tensor] = None,
                              channel_mask: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None,
                              backend: str = "auto",
                              accumulate_if: Optional[Callable[[], bool]] = None) -> torch.Tensor:
    """``down(act(gate(x)) * up(x) [* channel_mask])`` with a backward that accumulates importance.

    x: [..., d] (a [B, L, d] input makes each batch row one sample). gate, up: nn.Linear d -> I (or
    (weight, bias) pairs); down: nn.Linear I -> d. activation: "silu", "gelu" (exact), "gelu_tanh",
    "relu". scores: float32 [I] on the weights' device, updated in place by every backward (None:
    backward gives dX only). seg_offsets: int [S+1] sample boundaries over the flattened tokens
    (default: batch rows). channel_mask: [I] bool/float multiplying H (pruned channels = 0).
    token_mask: bool [T] (flattened), False rows are excluded from the scores (padding).
    accumulate_if: called when backward runs; a False answer skips the accumulation.

    Differentiated: x only. Every weight and bias must have requires_grad=False (weights get no
    gradient); biases take part in forward but not in the importance.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    wb = []
    for name, lin in (("gate", gate), ("up", up), ("down", down)):
        w, b = (lin.weight, lin.bias) if hasattr(lin, "weight") else lin
        if torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)):
            raise RuntimeError(
                f"gated_mlp_with_importance: the {name} projection's parameters require grad; it produces no "
                "weight gradients, so freeze them (requires_grad_(False)) first"
            )
        wb += [w, b]
    w_gate, b_gate, w_up, b_up, w_down, b_down = wb
    _check_not_meta(w_gate, w_up, w_down, b_gate, b_up, b_down)
    mask = None
    if channel_mask is not None:
        if channel_mask.shape != (w_gate.shape[0],):
            raise ValueError(f"channel_mask must have shape ({w_gate.shape[0]},), got {tuple(channel_mask.shape)}")
        mask = channel_mask.to(device=x.device, dtype=x.dtype)
    if not (torch.is_grad_enabled() and x.requires_grad):
        # nothing to differentiate: the plain forward, nothing saved
        a = apply_activation(activation, F.linear(x, w_gate, b_gate))
        return F.linear(_masked(a * F.linear(x, w_up, b_up), mask), w_down, b_down)
    if token_mask is not None:
        token_mask = token_mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        if token_mask.numel() != x.numel() // x.shape[-1]:
            raise ValueError(f"token_mask has {token_mask.numel()} entries for {x.numel() // x.shape[-1]} tokens")
    if scores is not None:
        seg_offsets = _segments(x, seg_offsets)
    return _GatedMLPImportance.apply(x, w_gate, b_gate, w_up, b_up, w_down, b_down, mask, activation, scores,
                                     seg_offsets, token_mask, backend, accumulate_if)
