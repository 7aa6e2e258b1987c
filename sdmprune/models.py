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

from torch import nn

from .errors import SdmpruneError


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

    def gated_mlps(self, model: nn.Module) -> List[GatedMLP]:
        config = model.config
        if getattr(config, "final_logit_softcapping", None):
            raise UnsupportedModelError(
                "models with final_logit_softcapping (gemma2-style) are not supported: the fused "
                "LM-head loss assumes plain logits"
            )
        act = canonical_activation(getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", ""))
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            mlp = layer.mlp
            # the base nn.Linear of each projection (a peft LoRA wrapper is looked through)
            gate, up, down = (base_linear(getattr(mlp, n)) for n in self.mlp_names)
            if gate.out_features != up.out_features or down.in_features != gate.out_features:
                raise UnsupportedModelError(f"layer {i}: gate/up/down widths disagree")
            out.append(GatedMLP(i, mlp, gate, up, down, act))
        return out


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


class LayerOps(NamedTuple):
    """What ``fused_layer_ops`` swaps: (module, mode, eps) per recognized RMSNorm
    (kernels.rms_norm.find_rms_norms) and the python module whose rotary it replaces, or None
    (kernels.rotary.find_rotary)."""

    norms: list
    rotary: Optional[Any]


def find_layer_ops(model: nn.Module) -> LayerOps:
    """Probe the model's norms and rotary once (a training loop reuses the answer every step)."""
    from sdmprune.kernels.rms_norm import find_rms_norms
    from sdmprune.kernels.rotary import find_rotary

    return LayerOps(find_rms_norms(model), find_rotary(model))


@contextlib.contextmanager
def fused_layer_ops(model: nn.Module, backend: str = "auto", ops: Optional[LayerOps] = None) -> Iterator[None]:
    """While the block runs, the model's RMSNorms and rotary embedding go through sdmprune's kernels
    (kernels/rms_norm.py, kernels/rotary.py: one pass each way, no float32 copies kept), where a
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
