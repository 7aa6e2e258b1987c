"""Model adapters: where the gated MLPs, the decoder body, the final norm and the LM head are.

A family is supported by one small adapter, not by ``if model_type == ...`` in the pipeline.
Every LLaMA-family model in transformers (llama, mistral, qwen2, qwen3, gemma, ...) keeps its
decoder layers in ``model.model.layers`` and its MLP as ``layer.mlp`` with ``gate_proj``,
``up_proj``, ``down_proj`` and ``act_fn``; ``LlamaFamilyAdapter`` covers all of them. Models with a
fused gate/up projection (phi3) or no gated MLP (gpt2, opt) are rejected with a clear error.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional

import torch
from torch import nn

from .errors import InputError, SdmpruneError


class UnsupportedModelError(SdmpruneError, ValueError):
    """The model has no gated MLP that sdmprune knows how to prune."""


# Activations whose derivative the importance op implements (config.hidden_act names).
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "relu")


def canonical_activation(name: str) -> str:
    """Map a config.hidden_act name to one of: "silu", "gelu", "gelu_tanh", "relu"."""
    name = (name or "").lower()
    if name in ("silu", "swish"):
        return "silu"
    if name == "gelu":
        return "gelu"
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return "gelu_tanh"
    if name == "relu":
        return "relu"
    raise UnsupportedModelError(
        f"activation {name!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
    )


@dataclass
class GatedMLP:
    """One prunable MLP: ``down(act(gate(x)) * up(x))``; channel c = row c of gate/up, column c of down."""

    index: int  # decoder layer index
    module: nn.Module  # the MLP module (its forward is what the importance engine patches)
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    activation: str  # canonical name, see canonical_activation

    @property
    def width(self) -> int:
        return self.gate.out_features

    @property
    def hidden_size(self) -> int:
        return self.gate.in_features


def base_linear(module: nn.Module) -> Optional[nn.Linear]:
    """The nn.Linear itself, or the base layer of a wrapper around one (peft LoRA); else None."""
    if isinstance(module, nn.Linear):
        return module
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Linear) else None


class LlamaFamilyAdapter:
    """Adapter for decoder-only models laid out like LlamaForCausalLM."""

    mlp_names = ("gate_proj", "up_proj", "down_proj")

    def matches(self, model: nn.Module) -> bool:
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        if layers is None or len(layers) == 0:
            return False
        mlp = getattr(layers[0], "mlp", None)
        return mlp is not None and all(base_linear(getattr(mlp, n, None)) is not None for n in self.mlp_names)

    def body(self, model: nn.Module) -> nn.Module:
        """The decoder stack whose output is the final (normed) hidden state [B, L, d]."""
        return model.model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.get_output_embeddings()

    def mlp_input_of_down(self, layer: nn.Module) -> nn.Module:
        """The module whose input is H (the gated activation) in ``layer``: where channel masks act. Read
        at call time, so under peft it is the LoRA wrapper (the mask then reaches the LoRA branch too)."""
        return layer.mlp.down_proj

    # Families whose decoder layer ends in ``residual + mlp(x)``: nothing after the MLP saves tensors
    # for backward, so a checkpoint recompute may skip the MLP (kernels.gated_mlp.checkpoint_context_fn).
    residual_after_mlp_types = ("llama", "mistral", "qwen2", "qwen3", "gemma")

    def mlp_output_feeds_residual_only(self, model: nn.Module) -> bool:
        """True when each decoder layer adds the MLP output straight to the residual stream (no
        post-MLP norm, scaling or dropout), checked by model type and by the layer's submodules."""
        if getattr(model.config, "model_type", None) not in self.residual_after_mlp_types:
            return False
        layer = self.decoder_layers(model)[0]
        names = {n for n, _ in layer.named_children()}
        return not any("post_feedforward" in n or "post_mlp" in n or "dropout" in n for n in names)

    # config attributes that map h @ W^T to the model's logits: (name, how the logits use it)
    LOGIT_MAPS = (("logits_scaling", "divide"), ("logit_scale", "multiply"))
    # ...and ones the LM-head losses cannot reproduce (the model is refused, naming the attribute)
    UNSUPPORTED_LOGIT_MAPS = ("final_logit_softcapping",)

    def logit_scale(self, model: nn.Module) -> float:
        """s in ``logits = s * (h @ W^T)`` for this model (1.0 for plain logits), read from its config:
        Granite divides by ``logits_scaling``, Cohere multiplies by ``logit_scale``. Every LM-head loss of
        the package feeds ``s * h`` to the head. A map the losses cannot reproduce (softcapping) raises
        UnsupportedModelError naming the config attribute."""
        config = model.config
        for name in self.UNSUPPORTED_LOGIT_MAPS:
            if getattr(config, name, None):
                raise UnsupportedModelError(
                    f"model type {getattr(config, 'model_type', '?')!r} maps its logits through {name}="
                    f"{getattr(config, name)} (a softcap), which sdmprune's LM-head losses do not reproduce")
        scale = 1.0
        for name, how in self.LOGIT_MAPS:
            value = getattr(config, name, None)
            if value is None or isinstance(value, bool):
                continue
            value = float(value)
            if not value or value != value:
                raise UnsupportedModelError(f"config.{name} = {value} cannot scale the logits")
            scale = scale / value if how == "divide" else scale * value
        return scale

    def head_input(self, model: nn.Module, hidden):
        """The final hidden states as the LM head's loss must see them: ``logit_scale * h``, so that
        ``head_input @ W^T`` are the model's own logits (h itself when the logits are plain)."""
        scale = self.logit_scale(model)
        return hidden if scale == 1.0 else hidden * scale

    def gated_mlps(self, model: nn.Module) -> List[GatedMLP]:
        config = model.config
        self.logit_scale(model)  # a model whose logits the losses cannot reproduce is refused before any work
        act = canonical_activation(getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", ""))
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            mlp = layer.mlp
            # the base nn.Linear of each projection (a peft LoRA wrapper is looked through)
            gate, up, down = (base_linear(getattr(mlp, n, None)) for n in self.mlp_names)
            if gate is None or up is None or down is None:  # e.g. mixture-of-experts layers after dense ones
                raise UnsupportedModelError(f"layer {i}: its MLP ({type(mlp).__name__}) is not a gated MLP with "
                                            "gate_proj/up_proj/down_proj linear layers")
            if gate.out_features != up.out_features or down.in_features != gate.out_features:
                raise UnsupportedModelError(f"layer {i}: gate/up/down widths disagree")
            out.append(GatedMLP(i, mlp, gate, up, down, act))
        for m in out:
            check_mlp_computes_gated_form(m)
        return out


# MLP classes probed so far: class -> None (computes the gated form) or the reason it does not
_MLP_PROBES: Dict[type, Optional[str]] = {}


def check_mlp_computes_gated_form(m: GatedMLP) -> None:
    """Refuse an MLP whose forward is not ``down(act(gate(x)) * up(x))`` (extra per-channel scales, another
    activation than the config names, ...): the importance engines and slicing assume that form. Probed
    once per MLP class on two random tokens with the layer's own weights; skipped while the weights are
    not materialized (meta device, FSDP shards), where the class is probed on its next real call."""
    cls = type(m.module)
    if cls not in _MLP_PROBES:
        w = m.gate.weight
        if w.device.type == "meta" or type(w.data).__name__ == "DTensor":
            return
        from sdmprune.kernels.gated_mlp import apply_activation

        mlp = m.module
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, 2, m.hidden_size, generator=g).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            got = mlp(x).float()
            want = mlp.down_proj(apply_activation(m.activation, mlp.gate_proj(x)) * mlp.up_proj(x)).float()
        tol = 1e-4 if w.dtype == torch.float32 else 3e-2
        close = got.shape == want.shape and bool(((got - want).abs() <= tol * (1 + want.abs())).all())
        _MLP_PROBES[cls] = None if close else (
            f"the MLP of this model ({cls.__name__}) does not compute down(act(gate(x)) * up(x)) with the "
            f"configured activation {m.activation!r}; sdmprune prunes only that form")
    if _MLP_PROBES[cls] is not None:
        raise UnsupportedModelError(_MLP_PROBES[cls])


ADAPTERS = [LlamaFamilyAdapter()]


def get_adapter(model: nn.Module) -> LlamaFamilyAdapter:
    """The adapter for ``model``; raises UnsupportedModelError with the model type when none fits."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    mtype = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise UnsupportedModelError(
        f"model type {mtype!r} has no gated MLP (gate_proj/up_proj/down_proj under model.model.layers[i].mlp); "
        "sdmprune prunes LLaMA-family models (llama, mistral, qwen2, qwen3, gemma, ...)"
    )


def find_gated_mlps(model: nn.Module) -> List[GatedMLP]:
    """Every gated MLP of ``model`` in layer order."""
    return get_adapter(model).gated_mlps(model)


def mlp_widths(model: nn.Module) -> Dict[int, int]:
    """{layer index: current MLP width}."""
    return {m.index: m.width for m in find_gated_mlps(model)}


def set_activation_checkpointing(model: nn.Module, enabled: bool, context_fn: Optional[Callable] = None) -> bool:
    """Turn (non-reentrant) activation checkpointing on or off under either transformers naming
    (``activation_checkpointing_*`` in newer 5.x, ``gradient_checkpointing_*`` before). Returns
    whether it was on before (then it is left as it was). Non-reentrant: the recomputed forward needs
    no input requiring grad. ``context_fn`` goes to torch.utils.checkpoint (e.g.
    ``kernels.gated_mlp.checkpoint_context_fn``)."""
    new_api = hasattr(model, "activation_checkpointing_enable")
    was = bool(getattr(model, "is_activation_checkpointing" if new_api else "is_gradient_checkpointing", False))
    if enabled and not was:
        kwargs = {"use_reentrant": False}
        if context_fn is not None:
            kwargs["context_fn"] = context_fn
        if new_api:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif was and not enabled:
        (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
    return was


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """The mode of a gradient pass that scores channels: every module in eval mode, so no dropout acts
    (attention, residual or MLP dropout that a config may set), except the decoder layers' own flag,
    which activation checkpointing reads. Restores every module's mode afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    for layer in get_adapter(model).decoder_layers(model):
        layer.training = True  # the layer itself only: its children stay in eval mode
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


class LayerOps(NamedTuple):
    """What ``fused_layer_ops`` swaps: (module, mode, eps) per recognized RMSNorm
    (kernels.rms_norm.rms_norm_status) and the python module whose rotary it replaces, or None
    (kernels.rotary.rotary_status); ``why``: what each probe said, for the report."""

    norms: list
    rotary: Optional[Any]
    why: Optional[dict] = None

    def report(self) -> dict:
        """Which of the fused layer ops apply to this model, and why the others do not (JSON-ready)."""
        why = self.why or {}
        return {"rms_norm": {"applied": len(self.norms), "left_alone": dict(why.get("rms_norm", {}))},
                "rotary": {"applied": self.rotary is not None, "why": why.get("rotary", "")}}

    def summary(self) -> str:
        return describe_layer_ops(self.report())


def describe_layer_ops(report: dict) -> str:
    """One line from ``LayerOps.report()``: which fused layer ops applied, and why the others did not."""
    norms, rotary = report["rms_norm"], report["rotary"]
    left = norms["left_alone"]
    text = f"fused layer ops: rms_norm on {norms['applied']} norms" + (
        "" if not left else " (left alone: " + "; ".join(f"{k}: {v}" for k, v in sorted(left.items())) + ")")
    return text + (f"; rotary {rotary['why']}" if rotary["applied"] else f"; rotary not applied: {rotary['why']}")


def layer_ops_incomplete(report: dict) -> bool:
    """Whether a probe left a norm class or the rotary with the model's own code."""
    return bool(report["rms_norm"]["left_alone"]) or not report["rotary"]["applied"]


def find_layer_ops(model: nn.Module) -> LayerOps:
    """Probe the model's norms and rotary once (a training loop reuses the answer every step)."""
    from sdmprune.kernels.rms_norm import rms_norm_status
    from sdmprune.kernels.rotary import rotary_status

    norms, norms_left = rms_norm_status(model)
    rotary, rotary_why = rotary_status(model)
    return LayerOps(norms, rotary, {"rms_norm": norms_left, "rotary": rotary_why})


@contextlib.contextmanager
def fused_layer_ops(model: nn.Module, backend: str = "auto", ops: Optional[LayerOps] = None) -> Iterator[None]:
    """While the block runs, the model's RMSNorms and rotary embedding go through sdmprune's kernels
    (sdmprune_kernels/rms_norm.py, sdmprune_kernels/rotary.py: one pass each way, no float32 copies kept), where a
    probe shows they compute what the model's own code does. ``ops``: an earlier
    ``find_layer_ops(model)`` answer (default: probe now)."""
    from sdmprune.kernels.rms_norm import patch_rms_norms
    from sdmprune.kernels.rotary import patch_rotary

    ops = find_layer_ops(model) if ops is None else ops
    with patch_rms_norms(model, backend, ops.norms), patch_rotary(model, backend, ops.rotary):
        yield


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, a tied LM head counted once (storages are deduplicated)."""
    seen = set()
    total = 0
    for p in model.parameters():
        key = (p.data_ptr(), p.numel()) if p.device.type != "meta" else id(p)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total


def meta_model_from_config(config, trust_remote_code: bool = False) -> nn.Module:
    """Build ``config``'s causal-LM on the meta device (no memory, no weights) for planning and checks."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # transformers 5.0 builds a tied head untied on the meta device (later releases tie it): tie it, so
    # a tied head is counted once, as in the loaded model
    if getattr(model, "tie_weights", None) is not None:
        model.tie_weights()
    return model


class ChannelMasks:
    """0/1 channel masks on H, the input of every ``down_proj``: the one mask hook of the package (the
    reference importance engine's stage-2 student and the one-copy recovery use it), switchable off.

    ``keep``: {layer index: kept channel indices} in the current numbering. Built on the plain model
    (find_gated_mlps wants nn.Linear MLPs); ``install()`` hooks whatever module then sits at the
    adapter's ``mlp_input_of_down`` (a LoRA wrapper once peft injected it).

    ``unrefit_columns``: {layer: down_proj.weight[:, keep] before a refit (sdmprune.compensation)}. With
    the masks off the layer then computes with these columns, so "masks off" stays the unpruned model
    (the recovery teacher) while the masked student uses the refit ones; one [d, k] difference per
    layer is held for it."""

    def __init__(self, model: nn.Module, keep: Dict[int, "torch.Tensor"],
                 unrefit_columns: Optional[Dict[int, "torch.Tensor"]] = None):
        self.on = True
        self.handles = []
        self.adapter = get_adapter(model)
        self.layers = self.adapter.decoder_layers(model)
        self.masks = {}
        self.unrefit = {}  # layer -> (kept channels, unrefit - refit columns [d, k])
        for m in find_gated_mlps(model):
            if m.index not in keep:
                continue
            idx = torch.as_tensor(keep[m.index], dtype=torch.long)
            if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= m.width:
                raise InputError(f"layer {m.index}: kept channel indices must be in [0, {m.width}) and not empty")
            dev, dt = m.down.weight.device, m.down.weight.dtype
            mask = torch.zeros(m.width, dtype=dt, device=dev)
            mask[idx.to(dev)] = 1
            self.masks[m.index] = mask
            if unrefit_columns is not None and m.index in unrefit_columns:
                with torch.no_grad():
                    idx = idx.to(dev)
                    self.unrefit[m.index] = (idx, unrefit_columns[m.index].to(dev, dt) - m.down.weight[:, idx])

    def install(self) -> "ChannelMasks":
        self.remove()
        for i, mask in self.masks.items():
            target = self.adapter.mlp_input_of_down(self.layers[i])
            self.handles.append(target.register_forward_pre_hook(self._hook(mask)))
            if i in self.unrefit:
                self.handles.append(target.register_forward_hook(self._unrefit_hook(*self.unrefit[i])))
        return self

    def _unrefit_hook(self, idx, delta):
        def hook(module, args, output):
            if self.on:
                return None
            x = args[0]
            return output + x.index_select(-1, idx.to(x.device)) @ delta.to(device=x.device, dtype=x.dtype).T
        return hook

    def _hook(self, mask):
        def hook(module, args):
            if not self.on:
                return None
            return (args[0] * mask.to(device=args[0].device, dtype=args[0].dtype),) + tuple(args[1:])
        return hook

    @contextlib.contextmanager
    def off(self):
        prev, self.on = self.on, False
        try:
            yield
        finally:
            self.on = prev

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "ChannelMasks":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()
