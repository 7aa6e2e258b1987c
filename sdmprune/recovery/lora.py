"""LoRA set-up for recovery: which modules get adapters, injecting them, and leaving a plain model after
the merge. The official recipe's defaults: r 8, alpha 16, dropout 0.05 on all seven linear modules."""
from __future__ import annotations

import warnings
from typing import Dict, List

from torch import nn

from ..errors import InputError, require_extra

LORA_TARGETS = {
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def lora_targets(spec: str) -> List[str]:
    if spec in LORA_TARGETS:
        return list(LORA_TARGETS[spec])
    names = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not names:
        raise InputError(f"--targets: no module names in {spec!r}")
    if "lm_head" in names or "embed_tokens" in names:
        raise InputError("--targets: LoRA on lm_head/embed_tokens is not supported (the fused loss reads the head weight)")
    return names


def check_lora_targets(model, spec: str) -> List[str]:
    """The module names ``--targets`` asks for, each of which ``model`` has (a built model, or one on the
    meta device from its config, so this runs before any weight is loaded); InputError naming the others."""
    targets = lora_targets(spec)
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
                        - {"lm_head"})
        raise InputError(f"--targets: the model has no module named {', '.join(missing)} (its linear modules: "
                         f"{', '.join(linear)})")
    return targets


def apply_lora(model, cfg):
    """Inject LoRA adapters (``cfg``: lora_r, lora_alpha, lora_dropout, targets) into ``model``; returns the
    peft model around it."""
    require_extra("peft", "LoRA adapters")
    from peft import LoraConfig, get_peft_model

    targets = check_lora_targets(model, cfg.targets)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing``: a warning the user cannot act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        return get_peft_model(model, lcfg)


def unwrap_peft_attrs(model) -> None:
    """Drop the bookkeeping get_peft_model leaves on the wrapped model, so it saves as a plain model."""
    # get_peft_model leaves bookkeeping on the wrapped model; a plain save must not carry it.
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def base_storage_pointers(model) -> Dict[str, int]:
    """{name: data_ptr} of every non-LoRA parameter (to prove no base weight was copied); names as
    in the plain model (peft's ``.base_layer`` removed)."""
    return {n.replace(".base_layer", ""): p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}


