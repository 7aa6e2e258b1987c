"""FSDP2 sharding of the decoder layers for a prune (``--shard fsdp``).

Each GPU holds 1/N of every decoder layer plus, while a layer runs, that layer gathered whole
(FSDP2 prefetches the next one). All parameters are frozen: gradients flow through activations
only and there is no gradient reduction; the package all-reduces its own float32 scores.

Two details make the importance op see full weights in both directions:

* FSDP2 re-gathers a layer for backward only when the layer's output requires grad. With frozen
  weights the first layer's input would not, so ``enable_input_require_grads`` makes the embedding
  output require grad (every later activation then does too).
* The pipeline calls the decoder body and reads the LM-head weight directly (the fused loss never
  forms logits), i.e. outside the root module's forward. The root (embedding, final norm, LM head:
  small next to the layers) is therefore wrapped, initialized as the root, and kept gathered for the
  whole prune (``reshard_after_forward=False``, no reshard after backward).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..errors import InputError
from ..models import get_adapter


def require_process_group() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(
            "--shard fsdp needs an initialized process group: launch with torchrun "
            "(torchrun --nproc_per_node N -m sdmprune prune ... --shard fsdp) or call "
            "torch.distributed.init_process_group before prune_model"
        )


def shard_device() -> torch.device:
    """The device FSDP2 shards live on: the current GPU under NCCL, the CPU under gloo."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` was wrapped by shard_model (FSDP2)."""
    return bool(getattr(model, "_sdmprune_sharded", False))


def shard_model(model: nn.Module, mesh=None) -> nn.Module:
    """Wrap every decoder layer with FSDP2 ``fully_shard``, then the root; freeze every parameter.

    In place (FSDP2 changes the classes of the wrapped modules); returns ``model``. Needs an
    initialized process group (InputError otherwise). The model must already be on its device
    (``cuda`` with NCCL, ``cpu`` with gloo).
    """
    require_process_group()
    if is_sharded(model):
        return model
    from torch.distributed.fsdp import fully_shard

    adapter = get_adapter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    kw = {} if mesh is None else {"mesh": mesh}
    for layer in adapter.decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)
    # Initialize the root now (FSDP2 does it lazily in the root's forward, which the pipeline never
    # calls): otherwise each layer becomes its own root and keeps its weights gathered.
    state = model._get_fsdp_state()
    state._lazy_init()
    model.set_reshard_after_backward(False, recurse=False)
    model.unshard()  # embedding / norm / LM head stay whole for the body call and the fused loss
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    else:  # plain nn.Module: same effect by hand
        emb = model.get_input_embeddings()
        emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    model._sdmprune_sharded = True
    return model


def sharded_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this rank holds (local shards + unsharded root parameters)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def gather_full_state_dict(model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The full (unsharded) state dict on rank 0 in host memory; None on other ranks.

    Collective: every rank must call it.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None


def unshard_model_(model: nn.Module, device="cpu") -> nn.Module:
    """Undo shard_model in place: every rank gets plain full parameters on ``device`` (CPU by default),
    the FSDP2 hooks and classes removed. Collective: every rank must call it. Gathers one layer at a
    time, so the GPU never holds more than the sharded model plus one layer."""
    if not is_sharded(model):
        return model
    from torch.distributed.fsdp import FSDPModule

    adapter = get_adapter(model)
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    full: Dict[int, torch.Tensor] = {}  # id(unsharded param) -> host copy; keeps tied weights tied
    owners = []  # (module, attribute name, id of the unsharded param)
    layers = list(adapter.decoder_layers(model))
    in_layers = {id(m) for layer in layers for m in layer.modules()}

    def collect(modules):
        for sub in modules:
            for name, p in list(sub._parameters.items()):
                if p is None:
                    continue
                if isinstance(p, _dtensor_type()):
                    raise RuntimeError(f"parameter {name} of {type(sub).__name__} is still sharded")
                if id(p) not in full:
                    full[id(p)] = p.detach().to(device, copy=True)
                owners.append((sub, name, id(p)))

    for layer in layers:
        layer.unshard()
        collect(layer.modules())
        layer.reshard()
    model.unshard()  # the root is kept gathered by shard_model; unshard() again is a no-op then
    collect(m for m in model.modules() if id(m) not in in_layers)
    for mod in fsdp_modules:
        state = mod._get_fsdp_state()
        handles = [getattr(state, "_pre_forward_hook_handle", None), getattr(state, "_post_forward_hook_handle", None)]
        group = getattr(state, "_fsdp_param_group", None)
        if group is not None:  # state-dict hooks that would turn the plain parameters back into shards
            handles += list(getattr(group, "_module_to_pre_save_state_dict_hook_handle", {}).values())
            handles += list(getattr(group, "_module_to_pre_load_state_dict_hook_handle", {}).values())
        for h in handles:
            if h is not None:
                h.remove()
        mod.__class__ = next(b for b in type(mod).__bases__ if b is not FSDPModule)
    params: Dict[int, nn.Parameter] = {}
    for sub, name, key in owners:
        if key not in params:
            params[key] = nn.Parameter(full[key], requires_grad=False)
        sub._parameters[name] = params[key]
    with torch.no_grad():
        for sub in model.modules():
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = b.to(device)
    model._sdmprune_sharded = False
    return model


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor
