"""Random-weight models of the published shapes for the GPU and CPU benchmarks (speed and memory do not
depend on the weights' values): one config builder and one in-place builder for every benchmark."""
from __future__ import annotations

from typing import Optional

import torch


def hf_config(shape_name: str, smoke: Optional[dict] = None, max_positions: int = 131072):
    """A LlamaConfig of a built-in shape (sdmprune.memory.BUILTIN_SHAPES, e.g. llama-3.2-1b), or of the
    ``smoke`` sizes when ``shape_name == "smoke"``."""
    from transformers import LlamaConfig

    if shape_name == "smoke":
        return LlamaConfig(max_position_embeddings=256, **(smoke or {}))
    from sdmprune.memory import BUILTIN_SHAPES

    if shape_name not in BUILTIN_SHAPES:
        raise SystemExit(f"unknown shape {shape_name!r} (one of: smoke, {', '.join(BUILTIN_SHAPES)})")
    s = BUILTIN_SHAPES[shape_name]
    return LlamaConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                       num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                       num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim, vocab_size=s.vocab_size,
                       tie_word_embeddings=s.tie_word_embeddings, max_position_embeddings=max_positions,
                       rope_theta=500000.0)


def build_random_model(config, device, dtype, seed=0):
    """A random model built on ``device`` without a host copy: meta init, to_empty, then init in place
    (norm weights 1, matrices N(0, 0.02)); eval mode."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    rebuild_rotary(model, config, device)
    model.tie_weights()
    return model.eval()


def rebuild_rotary(model, config, device) -> None:
    """Non-persistent buffers are not in the state dict and stay uninitialized after a meta build or
    to_empty: rebuild the rotary embedding (tiny) on ``device``."""
    rot = model.model.rotary_emb
    model.model.rotary_emb = type(rot)(config=config).to(device)
