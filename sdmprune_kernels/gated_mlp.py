"""Gated MLP whose backward gives dX and accumulates Taylor channel importance instead of weight grads.

    Y = down(act(gate(X)) * up(X) [* mask])        X [..., d], weights W_gate/W_up [I, d], W_down [d, I]

Backward (dY given): dH = dY W_down [* mask], dU = dH * act(G), dG = dH * U * act'(G),
dX = dG W_gate + dU W_up, and the importance is added into a float32 score per channel:
``importance="weight"`` (SDMPrune): ``accumulate_taylor_scores_`` adds the per-sample weight Taylor
scores; ``importance="activation"`` (HFPrune): ``accumulate_activation_scores_`` adds
sum_t |H * dL/dH| at the down_proj input H = act(G) * U [* mask], from the H and dH this backward
forms anyway. Weights get no gradient (they must have requires_grad=False). The activation act(G)
is recomputed in backward from the saved gate output instead of being kept, and backward runs in
token chunks of whole samples, so its [T, I] temporaries are [chunk, I]. Under activation checkpointing with
``checkpoint_context_fn`` only X is saved: backward recomputes G and U chunk by chunk, and the
checkpoint's recompute of the layer can skip the MLP entirely (see ``checkpoint_context_fn``).
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .activation_taylor import accumulate_activation_scores_
from .taylor_importance import accumulate_taylor_scores_
from .utils import LAUNCH_OPTIONS, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - the PyTorch path covers every call
    triton = None
    tl = None

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")

# Tests set this to True: outputs the elementwise kernels must fully overwrite are filled with NaN first.
POISON_OUTPUTS = False

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


# -------------------------------------------------------------------- fused elementwise part
# Between the matmuls the MLP is elementwise over [T, I], the widest tensors of a layer. In PyTorch
# that is one kernel per step (act, * u, * mask; in backward * mask, act, dU, H, * U, act'), each a
# full read and write of [T, I] in bf16: about 16 bytes per element forward and 40 backward with a
# channel mask. The two kernels below read G, U (and dH) once and write H (and dU, dG) once: 6 and
# 12 bytes per element. Float32 math inside, one rounding per output (PyTorch rounds after every
# step, so the two paths differ by an ulp or two). Exact-erf GELU keeps the PyTorch path.
TRITON_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "relu": 2}
_EW_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr):
        """(act(g), act'(g)) in float32. ACT: 0 silu, 1 gelu_tanh, 2 relu."""
        if ACT == 0:
            s = tl.sigmoid(g)
            a = g * s
            da = s * (1.0 + g * (1.0 - s))
        elif ACT == 1:
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            s = tl.sigmoid(2.0 * z)  # = 0.5 * (1 + tanh(z))
            t = 2.0 * s - 1.0
            a = g * s
            da = s + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        else:
            pos = g > 0.0
            a = tl.where(pos, g, 0.0)
            da = tl.where(pos, 1.0, 0.0)
        return a, da

    @triton.jit
    def _gated_act_fwd_kernel(g_ptr, u_ptr, m_ptr, h_ptr, N, I, ACT: tl.constexpr, HAS_MASK: tl.constexpr,
                              BLOCK: tl.constexpr):
        """h = act(g) * u [* mask[col]] over N contiguous elements of [rows, I]."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, ACT)
        h = a * u
        if HAS_MASK:
            h = h * tl.load(m_ptr + offs % I, mask=ok, other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _gated_act_bwd_kernel(g_ptr, u_ptr, dh_ptr, m_ptr, h_ptr, dup_ptr, dg_ptr, N, I, ACT: tl.constexpr,
                              HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
        """From dH (the gradient of act(g) * u * mask): dU = dH m act(g), dG = dH m u act'(g) and
        H = act(g) u m. dg_ptr may be dh_ptr (each element is read before it is written)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, ACT)
        h = a * u
        if HAS_MASK:
            m = tl.load(m_ptr + offs % I, mask=ok, other=0.0).to(tl.float32)
            dh = dh * m
            h = h * m
        tl.store(dup_ptr + offs, (dh * a).to(dup_ptr.dtype.element_ty), mask=ok)
        tl.store(dg_ptr + offs, (dh * u * da).to(dg_ptr.dtype.element_ty), mask=ok)
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=ok)


def _fusable(act: str, backend: str, *tensors: torch.Tensor) -> bool:
    """Whether the Triton elementwise kernels take this call: a supported activation, the triton
    backend (or auto on CUDA / under the interpreter) and contiguous [rows, I] operands."""
    if act not in TRITON_ACTIVATIONS or backend == "torch" or triton is None:
        return False
    ts = [t for t in tensors if t is not None]
    return use_triton(*ts) and all(t.is_contiguous() for t in ts)


def gated_activation_forward(g: torch.Tensor, u: torch.Tensor, act: str, mask: Optional[torch.Tensor] = None,
                             backend: str = "auto") -> torch.Tensor:
    """H = act(g) * u [* mask] for g, u [rows, I] (mask [I]); Triton when ``_fusable``, else PyTorch."""
    if not _fusable(act, backend, g, u, mask):
        return _masked(apply_activation(act, g) * u, mask)
    h = torch.empty_like(g)
    if POISON_OUTPUTS:
        h.fill_(float("nan"))
    N = g.numel()
    if N:
        _gated_act_fwd_kernel[(triton.cdiv(N, _EW_BLOCK),)](
            g, u, g if mask is None else mask, h, N, g.shape[-1], ACT=TRITON_ACTIVATIONS[act],
            HAS_MASK=mask is not None, BLOCK=_EW_BLOCK, num_warps=4, **LAUNCH_OPTIONS)
    return h


def gated_activation_backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, act: str,
                              mask: Optional[torch.Tensor] = None, backend: str = "auto",
                              keep_dh: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dU, dG, H) for H = act(g) * u [* mask] given dH = dL/dH, all [rows, I]. dh is scratch: its
    buffer is overwritten (the Triton path writes dG over it) unless ``keep_dh`` (dG then gets a
    buffer of its own, one more [rows, I] tensor)."""
    if not _fusable(act, backend, g, u, dh, mask):
        dhm = _masked(dh, mask)
        a = apply_activation(act, g)
        d_up = dhm * a
        h = _masked(a.mul_(u), mask)  # a's buffer becomes h
        dhu = dhm * u if (keep_dh and dhm is dh) else dhm.mul_(u)
        d_gate = activation_backward(act, dhu, g)
        return d_up, d_gate, h
    d_up, h = torch.empty_like(g), torch.empty_like(g)
    d_gate = torch.empty_like(g) if keep_dh else dh
    if POISON_OUTPUTS:
        d_up.fill_(float("nan"))
        h.fill_(float("nan"))
        if keep_dh:
            d_gate.fill_(float("nan"))
    N = g.numel()
    if N:
        _gated_act_bwd_kernel[(triton.cdiv(N, _EW_BLOCK),)](
            g, u, dh, g if mask is None else mask, h, d_up, d_gate, N, g.shape[-1],
            ACT=TRITON_ACTIVATIONS[act], HAS_MASK=mask is not None, BLOCK=_EW_BLOCK, num_warps=4, **LAUNCH_OPTIONS)
    return d_up, d_gate, h


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


# -------------------------------------------------------------------- checkpoint cooperation
# Under activation checkpointing a decoder layer runs twice: the original forward (whose saved
# tensors are dropped) and the recompute in backward (whose saved tensors are used). Inside a region
# run with ``checkpoint_context_fn(skip_output_in_recompute=True)`` the MLP saves only its input x in
# both passes (torch.utils.checkpoint requires the same saved tensors) and the recompute does no MLP
# work at all: in a LLaMA-style layer the MLP output only feeds the residual add, which saves nothing,
# so it returns zeros there. Backward then computes the gate/up outputs chunk by chunk from x. Net:
# the down projection's recompute (a third of the MLP forward) is skipped and no [T, I] activation of
# a layer is ever held whole.
_mode = threading.local()


@contextlib.contextmanager
def _region(mode: Tuple[str, bool]):
    prev = getattr(_mode, "value", None)
    _mode.value = mode
    try:
        yield
    finally:
        _mode.value = prev


def checkpoint_context_fn(skip_output_in_recompute: bool = True) -> Callable[[], Tuple]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (or HF's
    ``gradient_checkpointing_kwargs``). With ``skip_output_in_recompute`` (default),
    ``gated_mlp_with_importance(save="auto")`` inside the checkpointed region saves only its input and
    the recompute runs no MLP matmul. That is only correct when nothing after the MLP inside the region
    saves tensors for backward (the LLaMA/Mistral/Qwen layer ends in ``residual + mlp(x)``); a post-MLP
    norm (Gemma 2/3) would read the zeros, so pass False there (the MLP then saves its activations)."""

    def context_fn():
        return _region(("forward", skip_output_in_recompute)), _region(("recompute", skip_output_in_recompute))

    return context_fn


# Bytes of [chunk, I] temporaries a backward chunk may hold (the chunk is rounded to whole samples).
BACKWARD_CHUNK_BYTES = 256 * 2**20


def backward_chunks(T: int, bounds: Optional[List[int]], max_tokens: int) -> List[Tuple[int, int, int, int]]:
    """[(t0, t1, s0, s1)]: token ranges covering [0, T), each cut only at sample boundaries and
    holding the whole samples s0..s1-1 (at least one sample per range, so a sample longer than
    max_tokens is one range). bounds: sorted host offsets [S+1] or None (no samples: any cut)."""
    max_tokens = max(1, int(max_tokens))
    if bounds is None:
        return [(t, min(T, t + max_tokens), 0, 0) for t in range(0, T, max_tokens)] or [(0, 0, 0, 0)]
    ends_at = sorted({b for b in bounds if 0 < b < T} | {T})
    ranges, t0 = [], 0
    while t0 < T:
        ends = [c for c in ends_at if c > t0]
        fit = [c for c in ends if c - t0 <= max_tokens]
        t1 = fit[-1] if fit else ends[0]
        inside = [i for i in range(len(bounds) - 1) if bounds[i] >= t0 and bounds[i + 1] <= t1]
        ranges.append((t0, t1, inside[0], inside[-1] + 1) if inside else (t0, t1, 0, 0))
        t0 = t1
    return ranges


class _GatedMLPImportance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, b_gate, w_up, b_up, w_down, b_down, mask, act, scores, seg_offsets,
                seg_bounds, token_mask, backend, accumulate_if, save_input_only, skip_compute, token_chunk,
                importance):
        _check_not_meta(w_gate, w_up, w_down, b_gate, b_up, b_down)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if skip_compute:
            # checkpoint recompute of a layer whose MLP output only feeds the residual add: the output
            # is never read, only the saved tensors below are
            y = x2.new_zeros(x2.shape[0], w_down.shape[0])
            g = u = None
        else:
            g = F.linear(x2, w_gate, b_gate)
            u = F.linear(x2, w_up, b_up)
            h = gated_activation_forward(g, u, act, mask, backend)
            y = F.linear(h, w_down, b_down)
            del h
        if save_input_only:
            g = u = None
        # saved: x (+ g, u unless save_input_only; act(g) and h are recomputed); weights and biases are
        # saved tensors so that FSDP2 can re-gather them for backward.
        ctx.save_for_backward(x2, g, u, w_gate, b_gate, w_up, b_up, w_down, mask)
        # non-tensor state lives on ctx: under non-reentrant checkpointing the recompute replaces the
        # saved tensors only, so these stay the values of the original forward.
        ctx.act, ctx.scores, ctx.seg_offsets, ctx.seg_bounds = act, scores, seg_offsets, seg_bounds
        ctx.token_mask, ctx.backend, ctx.accumulate_if, ctx.shape = token_mask, backend, accumulate_if, shape
        ctx.token_chunk, ctx.importance = token_chunk, importance
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, g, u, w_gate, b_gate, w_up, b_up, w_down, mask = ctx.saved_tensors
        _check_not_meta(w_gate, w_up, w_down)
        dy2 = dy.reshape(-1, dy.shape[-1])
        cdt = x2.dtype if g is None else g.dtype
        if dy2.dtype != cdt:
            dy2 = dy2.to(cdt)
        T = x2.shape[0]
        scores = ctx.scores
        if scores is not None and not (ctx.accumulate_if is None or ctx.accumulate_if()):
            scores = None
        seg, bounds = ctx.seg_offsets, None
        activation = ctx.importance == "activation"
        keep = ctx.token_mask
        if scores is not None:
            bounds = ctx.seg_bounds
            if bounds is None:
                bounds = [int(v) for v in seg.tolist()]  # explicit device offsets: one sync
            if any(b1 < b0 for b0, b1 in zip(bounds, bounds[1:])):
                bounds = [0, T]  # unsorted offsets: one range, the kernel handles any order
                if activation:
                    keep = _inside_segments(seg.to(x2.device), T, keep)
        dx = torch.empty(T, x2.shape[1], dtype=cdt, device=x2.device)
        for t0, t1, s0, s1 in backward_chunks(T, bounds, ctx.token_chunk):
            xc, dyc = x2[t0:t1], dy2[t0:t1]
            if g is None:
                gc, uc = F.linear(xc, w_gate, b_gate), F.linear(xc, w_up, b_up)
            else:
                gc, uc = g[t0:t1], u[t0:t1]
            # dU, dG (over dH's buffer, unless the activation importance still reads dH) and
            # H = act(G) * U [* mask] for the importance, [C, I] each
            dh = dyc @ w_down.to(cdt)
            d_up, d_gate, h = gated_activation_backward(gc, uc, dh, ctx.act, mask, ctx.backend,
                                                        keep_dh=activation and scores is not None)
            torch.matmul(d_gate, w_gate.to(cdt), out=dx[t0:t1])
            dx[t0:t1].addmm_(d_up, w_up.to(cdt))
            if scores is not None and s1 > s0:
                if activation:
                    # the tokens of the whole samples s0..s1-1, [bounds[s0], bounds[s1]) (unsorted
                    # offsets are one range [0, T) here, their tokens selected by ``keep``)
                    a, b = bounds[s0] - t0, bounds[s1] - t0
                    tm = None if keep is None else keep[t0 + a:t0 + b]
                    accumulate_activation_scores_(scores, h[a:b], dh[a:b], tm, backend=ctx.backend)
                else:
                    if (t0, t1) == (0, T):
                        seg_c = seg
                    else:
                        seg_c = seg[s0:s1 + 1] - t0
                    tm = None if ctx.token_mask is None else ctx.token_mask[t0:t1]
                    accumulate_taylor_scores_(scores, xc, d_gate, d_up, h, dyc, w_gate, w_up, w_down,
                                              seg_c, tm, backend=ctx.backend)
            del gc, uc, h, d_gate, d_up, dh
        dx = dx.reshape(ctx.shape).to(x2.dtype)
        return (dx,) + (None,) * 18


def _inside_segments(seg: torch.Tensor, T: int, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """bool [T]: tokens inside some segment [seg[i], seg[i+1]) (and kept by token_mask), for offsets
    in any order. A token is counted once even if segments overlap: the activation score is per token."""
    seg = seg.to(torch.int64).clamp(0, T)
    starts, ends = seg[:-1], seg[1:]
    nonempty = (ends > starts).to(torch.int64)
    edges = torch.zeros(T + 1, dtype=torch.int64, device=seg.device)
    edges.index_add_(0, starts, nonempty).index_add_(0, ends, -nonempty)
    inside = edges.cumsum(0)[:T] > 0
    return inside if token_mask is None else inside & token_mask


def _segments(x: torch.Tensor, seg_offsets: Optional[torch.Tensor]):
    """(offsets tensor [S+1], host offsets or None). Default: each row of a [B, L, d] input (or one
    segment of a 2-D input), known on the host; explicit CPU offsets are read here, explicit device
    offsets only if backward needs them (one sync)."""
    if seg_offsets is not None:
        host = [int(v) for v in seg_offsets.tolist()] if seg_offsets.device.type == "cpu" else None
        return seg_offsets, host
    T = x.numel() // x.shape[-1]
    n_rows = x.shape[0] if x.dim() == 3 else 1
    step = T // n_rows
    return torch.arange(0, n_rows + 1, device=x.device, dtype=torch.int64) * step, [i * step for i in range(n_rows + 1)]


SAVE_MODES = ("auto", "activations", "input")
IMPORTANCE_KINDS = ("weight", "activation")


def gated_mlp_with_importance(x: torch.Tensor, gate, up, down, activation: str,
                              scores: Optional[torch.Tensor] = None, seg_offsets: Optional[torch.Tensor] = None,
                              channel_mask: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None,
                              backend: str = "auto",
                              accumulate_if: Optional[Callable[[], bool]] = None,
                              save: str = "auto", backward_chunk: Optional[int] = None,
                              importance: str = "weight") -> torch.Tensor:
    """``down(act(gate(x)) * up(x) [* channel_mask])`` with a backward that accumulates importance.

    x: [..., d] (a [B, L, d] input makes each batch row one sample). gate, up: nn.Linear d -> I (or
    (weight, bias) pairs); down: nn.Linear I -> d. activation: "silu", "gelu" (exact), "gelu_tanh",
    "relu". scores: float32 [I] on the weights' device, updated in place by every backward (None:
    backward gives dX only). seg_offsets: int [S+1] sample boundaries over the flattened tokens
    (default: batch rows); tokens outside every sample are left out of the scores.
    channel_mask: [I] bool/float multiplying H (pruned channels = 0).
    token_mask: bool [T] (flattened), False rows are excluded from the scores (padding).
    importance: what backward adds into ``scores[c]`` (float32):
      "weight" (SDMPrune): per sample s, sum_j |S_s[c, j]| / d with S_s the weight Taylor product of
      channel c's rows of W_gate, W_up and column of W_down (``accumulate_taylor_scores_``);
      "activation" (HFPrune): sum over tokens of |H[t, c] * dL/dH[t, c]| at the down_proj input
      H = act(G) * U [* mask] (``accumulate_activation_scores_``; the abs is per token, so the
      sample boundaries only decide which tokens count).
    accumulate_if: called when backward runs; a False answer skips the accumulation.
    save: "activations" keeps x and the gate/up outputs [T, I] for backward; "input" keeps x only and
    backward recomputes gate/up (two more matmuls, no [T, I] saved); "auto" is "input" inside a layer
    checkpointed with ``checkpoint_context_fn(skip_output_in_recompute=True)`` (whose recompute then
    does no MLP work, so the gate/up matmuls still run once per pass), else "activations". backward_chunk: tokens per backward chunk
    (rounded to whole samples; None: [chunk, I] temporaries of at most BACKWARD_CHUNK_BYTES).

    Differentiated: x only. Every weight and bias must have requires_grad=False (weights get no
    gradient); biases take part in forward but not in the importance.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if save not in SAVE_MODES:
        raise ValueError(f"save must be one of {SAVE_MODES}, got {save!r}")
    if backward_chunk is not None and int(backward_chunk) < 1:
        raise ValueError(f"backward_chunk must be a positive number of tokens, got {backward_chunk}")
    if importance not in IMPORTANCE_KINDS:
        raise ValueError(f"importance must be one of {IMPORTANCE_KINDS}, got {importance!r}")
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
    seg_bounds = None
    if scores is not None:
        seg_offsets, seg_bounds = _segments(x, seg_offsets)
    phase, skipping = getattr(_mode, "value", None) or (None, False)
    # the original forward and the recompute must save the same tensors (torch.utils.checkpoint
    # checks), so both follow the region's skip setting
    save_input_only = save == "input" or (save == "auto" and skipping)
    skip_compute = save_input_only and skipping and phase == "recompute"
    if backward_chunk is None:
        # [chunk, I] temporaries of backward: dH/dA, act/H, dU (+ the recomputed gate/up outputs,
        # + dG apart from dH for the activation importance)
        n_tmp = (5 if save_input_only else 3) + (importance == "activation" and scores is not None)
        per_token = n_tmp * w_gate.shape[0] * x.element_size()
        backward_chunk = max(1, BACKWARD_CHUNK_BYTES // per_token)
    return _GatedMLPImportance.apply(x, w_gate, b_gate, w_up, b_up, w_down, b_down, mask, activation, scores,
                                     seg_offsets, seg_bounds, token_mask, backend, accumulate_if, save_input_only,
                                     skip_compute, int(backward_chunk), importance)
