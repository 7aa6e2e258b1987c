"""Importance engines: first-order Taylor channel scores of every gated MLP.

``TaylorImportance`` (the fused engine, drops into any training-style loop)::

    with TaylorImportance(model) as imp:        # patches every gated MLP's forward
        loss = ...; loss.backward()              # any loss; each batch row is one sample
    scores = imp.scores()                        # {layer index: float32 [I]}

Two kinds of score, both float32, accumulated by the MLP backward:

* ``kind="weight"`` (SDMPrune): per sample s and channel c, ``score[c] += sum_j |S_s[c, j]| / d``
  with ``S_s = g_up*W_up + g_gate*W_gate + (g_down*W_down)^T``, the abs per sample. The backward
  forms the weight-gradient tiles in registers (``sdmprune.kernels.taylor_importance``).
* ``kind="activation"`` (HFPrune): ``score[c] += sum_t |H[t, c] * dL/dH[t, c]|`` at the input H of
  down_proj (the gated activation), the abs per token element
  (``sdmprune.kernels.activation_taylor``).

No weight gradient and no I x d matrix is ever held, and the model weights stay frozen.

``NaiveTaylorImportance`` is the reference: real weight gradients, one sample per backward, an
I x d float32 matrix per layer. Tests and benchmarks compare the two.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from ..errors import InputError
from ..models import ChannelMasks, GatedMLP, find_gated_mlps



def _mlp_params(m: GatedMLP) -> List[nn.Parameter]:
    return [p for lin in (m.gate, m.up, m.down) for p in lin.parameters(recurse=False)]


def _check_masks(mlps: List[GatedMLP], masks) -> Dict[int, torch.Tensor]:
    """Validate {layer index: bool [I]} channel masks; returns them as bool tensors."""
    if masks is None:
        return {}
    by_index = {m.index: m for m in mlps}
    out = {}
    for idx, mask in masks.items():
        if idx not in by_index:
            raise InputError(f"channel mask given for layer {idx}, which has no gated MLP")
        width = by_index[idx].width
        mask = torch.as_tensor(mask)
        if mask.shape != (width,):
            raise InputError(f"channel mask of layer {idx} has shape {tuple(mask.shape)}, expected ({width},)")
        out[idx] = mask.to(torch.bool)
    return out


class _Layer:
    """Per-MLP state of TaylorImportance."""

    def __init__(self, mlp: GatedMLP):
        self.mlp = mlp
        self.scores: Optional[torch.Tensor] = None
        self.mask: Optional[torch.Tensor] = None  # bool [I] on the weights' device
        self.attr: Optional[str] = None  # the patched attribute ("forward", or "_old_forward" under accelerate)
        self.had_instance_attr = False
        self.saved_attr = None

    def device(self) -> torch.device:
        return self.mlp.gate.weight.device

    def ensure_scores(self, device: torch.device) -> torch.Tensor:
        if self.scores is None:
            self.scores = torch.zeros(self.mlp.width, dtype=torch.float32, device=device)
        return self.scores


class TaylorImportance:
    """Fused per-sample Taylor channel importance of every gated MLP of ``model``.

    Use as a context manager. On enter it:

    * replaces each MLP's ``forward`` on the instance (``_old_forward`` when accelerate hooks wrap
      it) by ``sdmprune.kernels.gated_mlp.gated_mlp_with_importance``, reading the weights at call
      time (works with FSDP2-sharded layers);
    * freezes parameters: ``freeze="all"`` (default) sets ``requires_grad=False`` on every parameter,
      ``freeze="mlp"`` only on the gate/up/down parameters (others that still require grad get
      ordinary ``.grad``s). The original flags are restored on exit;
    * calls ``model.enable_input_require_grads()`` (HF models) so that gradients reach the
      activations although no weight requires grad, and removes that hook on exit.

    A batch row of the MLP input [B, L, d] is one sample: the abs is per row. Give the attention
    mask with ``set_attention_mask`` to exclude padding tokens (padding whose loss terms are
    masked has zero gradient anyway). Whether a backward accumulates is decided when it runs
    (``paused()`` / ``accumulate``). The channel mask is read at forward time; with reentrant
    checkpointing the forward is re-run during backward, so do not change masks between a forward
    and its backward.

    ``kind`` chooses what is scored (float32 [I] per layer, on the device of the layer's weights):

    * ``"weight"`` (default, SDMPrune): per sample, the weight Taylor products of channel c's rows
      of W_gate / W_up and column of W_down, abs per sample, mean over the hidden dim d;
    * ``"activation"`` (HFPrune): sum over tokens of |H * dL/dH| at the down_proj input H, abs per
      token element (sample boundaries only decide which tokens count; padding is dropped).
    """

    def __init__(self, model: nn.Module, backend: str = "auto", channel_mask: Optional[Dict[int, torch.Tensor]] = None,
                 freeze: str = "all", kind: str = "weight"):
        if backend not in ("auto", "triton", "torch"):
            raise InputError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        if freeze not in ("all", "mlp"):
            raise InputError(f"freeze must be 'all' or 'mlp', got {freeze!r}")
        from ..kernels.gated_mlp import IMPORTANCE_KINDS  # lazily: importing sdmprune does not load Triton

        if kind not in IMPORTANCE_KINDS:
            raise InputError(f"kind must be one of {IMPORTANCE_KINDS}, got {kind!r}")
        self.model = model
        self.backend = backend
        self.freeze = freeze
        self.kind = kind
        self.accumulate = True
        self._mlps = find_gated_mlps(model)
        self._layers: Dict[int, _Layer] = {m.index: _Layer(m) for m in self._mlps}
        self._pending_masks = _check_masks(self._mlps, channel_mask)
        self._token_mask: Optional[torch.Tensor] = None
        self._saved_flags: Optional[List] = None
        self._enabled_input_grads = False
        self._active = False
        self.samples = 0  # samples (segments) seen by the first layer's backward

    # ----------------------------------------------------------------------------------- context
    def __enter__(self) -> "TaylorImportance":
        if self._active:
            raise InputError("TaylorImportance is already active")
        params = self.model.parameters() if self.freeze == "all" else (p for m in self._mlps for p in _mlp_params(m))
        self._saved_flags = [(p, p.requires_grad) for p in params]
        try:
            for p, _ in self._saved_flags:
                p.requires_grad_(False)
            if self.freeze == "mlp" and any(p.requires_grad for p in self.model.parameters()):
                warnings.warn("TaylorImportance(freeze='mlp'): parameters outside the MLPs require grad and will "
                              "receive .grad tensors", stacklevel=2)
            self._enable_input_grads()
            for layer in self._layers.values():
                self._patch(layer)
            self._active = True
            self.set_channel_mask(self._pending_masks or None)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for layer in self._layers.values():
            self._unpatch(layer)
        if self._enabled_input_grads:
            self.model.disable_input_require_grads()
            self._enabled_input_grads = False
        for p, flag in self._saved_flags or ():
            p.requires_grad_(flag)
        self._saved_flags = None
        self._active = False

    def _enable_input_grads(self) -> None:
        # HF keeps its hooks in _require_grads_hooks; if one is there (PEFT, checkpointing) leave it be.
        if hasattr(self.model, "enable_input_require_grads") and not getattr(self.model, "_require_grads_hooks", None):
            self.model.enable_input_require_grads()
            self._enabled_input_grads = True

    def _patch(self, layer: _Layer) -> None:
        from ..kernels.gated_mlp import gated_mlp_with_importance

        module = layer.mlp.module
        # accelerate's hooks replace forward by a wrapper that calls _old_forward around the weight copy-in
        attr = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
        layer.attr = attr
        layer.had_instance_attr = attr in module.__dict__
        layer.saved_attr = module.__dict__.get(attr)
        mlp, engine = layer.mlp, self

        def forward(x, *args, **kwargs):
            if args or kwargs:
                raise TypeError(f"patched MLP of layer {mlp.index} takes only the hidden states")
            scores = None
            token_mask = None
            if torch.is_grad_enabled() and x.requires_grad:
                scores = layer.ensure_scores(mlp.gate.weight.device)
                if x.dim() != 3:
                    raise InputError(f"MLP input of layer {mlp.index} must be [B, L, d], got {tuple(x.shape)}")
                B, L = x.shape[0], x.shape[1]  # samples = batch rows, the op's default segments
                if engine._token_mask is not None:
                    if tuple(engine._token_mask.shape) != (B, L):
                        raise InputError(f"attention mask has shape {tuple(engine._token_mask.shape)} but the MLP "
                                         f"input of layer {mlp.index} is [{B}, {L}, d]")
                    token_mask = engine._token_mask.to(x.device).reshape(-1)
            count = (lambda: engine._count(B)) if (scores is not None and mlp.index == engine._first) else None
            return gated_mlp_with_importance(
                x, mlp.gate, mlp.up, mlp.down, mlp.activation, scores=scores,
                channel_mask=layer.mask, token_mask=token_mask, backend=engine.backend,
                accumulate_if=count or engine._accumulating, importance=engine.kind)

        setattr(module, attr, forward)

    def _unpatch(self, layer: _Layer) -> None:
        if layer.attr is None:
            return
        module = layer.mlp.module
        if layer.had_instance_attr:
            setattr(module, layer.attr, layer.saved_attr)
        elif layer.attr in module.__dict__:
            delattr(module, layer.attr)
        layer.attr, layer.saved_attr = None, None

    @property
    def _first(self) -> int:
        return self._mlps[0].index

    def _accumulating(self) -> bool:
        return self.accumulate

    def _count(self, n: int) -> bool:
        if self.accumulate:
            self.samples += n
        return self.accumulate

    # -------------------------------------------------------------------------------- controls
    @contextlib.contextmanager
    def paused(self):
        """Backward passes run inside this block give dX but accumulate nothing."""
        prev, self.accumulate = self.accumulate, False
        try:
            yield self
        finally:
            self.accumulate = prev

    def set_channel_mask(self, masks: Optional[Dict[int, torch.Tensor]]) -> None:
        """Channel masks {layer index: bool [I]} (True = kept) applied to H; None = unmasked model.

        Layers missing from the dict are unmasked.
        """
        masks = _check_masks(self._mlps, masks)
        self._pending_masks = masks
        for idx, layer in self._layers.items():
            m = masks.get(idx)
            layer.mask = None if m is None else m.to(layer.device() if layer.device().type != "meta" else "cpu")

    def set_attention_mask(self, mask: Optional[torch.Tensor]) -> None:
        """Attention mask [B, L] of the coming batch (1 = real token, 0 = padding); None = every token.

        Padding tokens are dropped from the scores. It stays in force until changed.
        """
        self._token_mask = None if mask is None else torch.as_tensor(mask).to(torch.bool)
        if self._token_mask is not None and self._token_mask.dim() != 2:
            raise InputError(f"attention mask must be [B, L], got {tuple(self._token_mask.shape)}")

    def reset(self) -> None:
        """Zero every score and the sample count."""
        for layer in self._layers.values():
            if layer.scores is not None:
                layer.scores.zero_()
        self.samples = 0

    # ---------------------------------------------------------------------------------- results
    def scores(self) -> Dict[int, torch.Tensor]:
        """{layer index: float32 [I]} copies of the accumulated channel scores (zeros before any backward)."""
        out = {}
        for idx, layer in self._layers.items():
            if layer.scores is not None:
                out[idx] = layer.scores.detach().clone()
            else:
                dev = layer.device() if layer.device().type != "meta" else torch.device("cpu")
                out[idx] = torch.zeros(layer.mlp.width, dtype=torch.float32, device=dev)
        return out

    def state_dict(self) -> dict:
        """Scores on the CPU, the sample count and the score kind, for resumable runs."""
        return {"scores": {i: s.cpu() for i, s in self.scores().items()}, "samples": self.samples,
                "kind": self.kind}

    def load_state_dict(self, state: dict) -> None:
        # scores of one kind must never be resumed as the other (a state without "kind" predates
        # the activation kind, so it holds weight scores)
        kind = state.get("kind", "weight")
        if kind != self.kind:
            raise InputError(f"state holds {kind!r} scores, this engine accumulates {self.kind!r} scores")
        scores = state["scores"]
        if set(scores) != set(self._layers):
            raise InputError(f"state has layers {sorted(scores)}, the model has {sorted(self._layers)}")
        for idx, layer in self._layers.items():
            s = torch.as_tensor(scores[idx])
            if s.shape != (layer.mlp.width,):
                raise InputError(f"state scores of layer {idx} have shape {tuple(s.shape)}, "
                                 f"expected ({layer.mlp.width},)")
            dev = layer.device() if layer.device().type != "meta" else torch.device("cpu")
            layer.ensure_scores(dev).copy_(s.to(torch.float32))
        self.samples = int(state.get("samples", 0))


class NaiveTaylorImportance:
    """Reference engine: real weight gradients, an I x d float32 importance matrix per layer.

    Inside the context the gate/up/down weights require grad (every other parameter is frozen; flags
    are restored on exit). After each single-sample backward call ``accumulate()``: it adds
    ``|g_up*W_up + g_gate*W_gate + (g_down*W_down)^T|`` into the layer's matrix and clears the grads.
    A channel mask is applied to H through the package's mask hook on down_proj (models.ChannelMasks;
    the module code is not touched). ``scores()`` = the matrix's mean over d.
    """

    def __init__(self, model: nn.Module, channel_mask: Optional[Dict[int, torch.Tensor]] = None):
        self.model = model
        self._mlps = find_gated_mlps(model)
        self._masks = _check_masks(self._mlps, channel_mask)
        self._importance: Dict[int, torch.Tensor] = {}
        self._saved_flags = None
        self._hooks: Optional[ChannelMasks] = None
        self.samples = 0

    def __enter__(self) -> "NaiveTaylorImportance":
        self._saved_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._saved_flags:
            p.requires_grad_(False)
        for m in self._mlps:
            for lin in (m.gate, m.up, m.down):
                lin.weight.requires_grad_(True)
                lin.weight.grad = None
        if self._masks:
            keep = {i: m.nonzero().reshape(-1) for i, m in self._masks.items()}
            self._hooks = ChannelMasks(self.model, keep).install()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        for m in self._mlps:
            for lin in (m.gate, m.up, m.down):
                lin.weight.grad = None
        for p, flag in self._saved_flags or ():
            p.requires_grad_(flag)
        self._saved_flags = None

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add |S| of the current weight gradients (one sample's) and clear the gradients."""
        for m in self._mlps:
            wg, wu, wd = m.gate.weight, m.up.weight, m.down.weight
            if wg.grad is None or wu.grad is None or wd.grad is None:
                raise InputError(f"layer {m.index} has no weight gradients: call backward() before accumulate()")
            S = wu.grad.float() * wu.float() + wg.grad.float() * wg.float() + (wd.grad.float() * wd.float()).t()
            if m.index not in self._importance:
                self._importance[m.index] = torch.zeros_like(S)
            self._importance[m.index] += S.abs()
            for w in (wg, wu, wd):
                w.grad = None
        self.samples += 1

    def scores(self) -> Dict[int, torch.Tensor]:
        """{layer index: float32 [I]} = mean over d of the accumulated |S|."""
        out = {}
        for m in self._mlps:
            imp = self._importance.get(m.index)
            out[m.index] = (imp.mean(dim=1) if imp is not None
                            else torch.zeros(m.width, dtype=torch.float32, device=m.gate.weight.device))
        return out

    def reset(self) -> None:
        self._importance.clear()
        self.samples = 0
