"""Slice pruned MLP channels out of a model, in place.

Channel c of a gated MLP is row c of gate_proj / up_proj (and of their biases) and column c of
down_proj. ``prune_mlp_`` keeps the channels ``keep`` of one MLP by compacting those rows and columns
inside the weights' own storages (``sdmprune.ops.gather_rows_`` / ``gather_cols_``): the only extra
memory is the ops' bounded scratch (8 MiB by default), never a second copy of a matrix.

Memory afterwards (``reclaim``):
  * ``"none"`` (default): each weight becomes a view over the front of its old storage. Peak memory
    while slicing = model + scratch; the tail of each storage stays allocated (the model does not
    shrink in memory) until the tensors are dropped, e.g. after ``save_pruned`` and a reload.
  * ``"resize"``: after each matrix, ``untyped_storage().resize_(view bytes)`` returns the tail.
    torch implements that resize as allocate-new + copy + free-old (CPU and CUDA alike: there is no
    in-place shrink in either allocator), so the transient peak is model + one pruned matrix, and
    the caching allocator on CUDA keeps the freed blocks reserved (``torch.cuda.empty_cache()``).
    Storages that cannot be resized (memory-mapped, or a view not at offset 0) are cloned instead.

Configs: Hugging Face configs hold one ``intermediate_size`` for every layer, so uniform widths set it
and the model saves/loads with plain ``from_pretrained``. Non-uniform widths raise ``InputError``
unless ``allow_nonuniform=True``; then ``config.sdmprune_intermediate_sizes`` lists the width of every
layer and ``config.intermediate_size`` is set to the largest, so a plain ``from_pretrained`` fails
loudly with a shape mismatch instead of loading garbage; ``sdmprune.storage.save.load_pruned`` loads it.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .errors import InputError
from .models import GatedMLP, find_gated_mlps
from .ops import gather_cols_, gather_rows_

__all__ = ["prune_mlp_", "prune_model_", "sync_config_widths_", "reclaim_memory", "normalize_keep"]

KeepLike = Union[torch.Tensor, Sequence[int]]


def normalize_keep(keep: KeepLike, width: int, where: str = "") -> torch.Tensor:
    """``keep`` as a sorted, duplicate-free CPU int64 tensor of channels in [0, width); InputError otherwise."""
    where = f"{where}: " if where else ""
    t = torch.as_tensor(keep)
    if t.numel() == 0:
        raise InputError(f"{where}keep is empty: at least one channel must be kept")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise InputError(f"{where}keep must hold integer channel indices, got dtype {t.dtype}")
    t = t.detach().to("cpu", torch.int64).reshape(-1) if t.dim() <= 1 else None
    if t is None:
        raise InputError(f"{where}keep must be 1-D")
    t = torch.sort(t).values
    if int(t[0]) < 0 or int(t[-1]) >= width:
        raise InputError(f"{where}keep has channel indices outside [0, {width}) (min {int(t[0])}, max {int(t[-1])})")
    if t.numel() > 1 and bool((t[1:] == t[:-1]).any()):
        dup = int(t[1:][t[1:] == t[:-1]][0])
        raise InputError(f"{where}keep has duplicate channel {dup}")
    return t


def _as_gated(mlp: Union[GatedMLP, nn.Module]) -> GatedMLP:
    if isinstance(mlp, GatedMLP):
        return mlp
    parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in parts):
        raise InputError("prune_mlp_ expects a GatedMLP or a module with gate_proj/up_proj/down_proj nn.Linear")
    return GatedMLP(-1, mlp, parts[0], parts[1], parts[2], "silu")


def _reclaim(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a right-sized storage (see the module docstring for the cost)."""
    nbytes = t.numel() * t.element_size()
    st = t.untyped_storage()
    if st.nbytes() == nbytes:
        return t
    if t.storage_offset() == 0 and t.is_contiguous():
        try:
            st.resize_(nbytes)
            return t
        except RuntimeError:  # not resizable (e.g. memory-mapped): fall back to a right-sized copy
            pass
    return t.clone()


def _set(param: nn.Parameter, value: torch.Tensor, reclaim: str) -> None:
    param.data = _reclaim(value) if reclaim == "resize" else value


def _check_device(g: GatedMLP) -> None:
    for lin in (g.gate, g.up, g.down):
        if lin.weight.device.type == "meta":
            raise InputError("cannot slice weights on the meta device (offloaded model): load them first")


@torch.no_grad()
def _slice(g: GatedMLP, keep: torch.Tensor, reclaim: str, scratch_bytes: Optional[int]) -> int:
    k = keep.numel()
    for lin in (g.gate, g.up):
        idx = keep.to(lin.weight.device)
        _set(lin.weight, gather_rows_(lin.weight.data, idx, scratch_bytes), reclaim)
        if lin.bias is not None:
            b = lin.bias.data
            _set(lin.bias, gather_rows_(b.view(-1, 1), idx, scratch_bytes).view(k), reclaim)
        lin.out_features = k
    idx = keep.to(g.down.weight.device)
    _set(g.down.weight, gather_cols_(g.down.weight.data, idx, scratch_bytes), reclaim)
    g.down.in_features = k
    return k


def prune_mlp_(mlp: Union[GatedMLP, nn.Module], keep: KeepLike, reclaim: str = "none",
               scratch_bytes: Optional[int] = None) -> int:
    """Keep channels ``keep`` (any order; sorted here) of one gated MLP, in place; returns the new width.

    Does not touch the model config (``prune_model_`` does). ``reclaim``: "none" or "resize" (module doc).
    """
    if reclaim not in ("none", "resize"):
        raise InputError(f"reclaim must be 'none' or 'resize', got {reclaim!r}")
    g = _as_gated(mlp)
    _check_device(g)
    return _slice(g, normalize_keep(keep, g.width, f"layer {g.index}" if g.index >= 0 else ""), reclaim,
                  scratch_bytes)


def prune_model_(model: nn.Module, keep: Mapping[int, KeepLike], allow_nonuniform: bool = False,
                 reclaim: str = "none", scratch_bytes: Optional[int] = None) -> Dict[int, int]:
    """Slice every gated MLP of ``model`` to the channels ``keep[layer]``, in place; returns {layer: width}.

    Layers absent from ``keep`` keep all their channels. Every ``keep`` is checked before anything is
    modified, so an InputError leaves the model untouched. Sets ``config.intermediate_size`` (uniform
    widths) or ``config.sdmprune_intermediate_sizes`` (``allow_nonuniform=True``; see the module doc).
    """
    if reclaim not in ("none", "resize"):
        raise InputError(f"reclaim must be 'none' or 'resize', got {reclaim!r}")
    mlps = {g.index: g for g in find_gated_mlps(model)}
    unknown = sorted(set(int(i) for i in keep) - set(mlps))
    if unknown:
        raise InputError(f"keep names layers {unknown} that do not exist (the model has {len(mlps)} MLP layers)")
    plan = {int(i): normalize_keep(v, mlps[int(i)].width, f"layer {int(i)}") for i, v in keep.items()}
    widths = {i: (plan[i].numel() if i in plan else g.width) for i, g in mlps.items()}
    _check_widths_fit_config(widths, allow_nonuniform)
    for g in mlps.values():
        _check_device(g)
    for i, g in mlps.items():
        if i in plan and plan[i].numel() != g.width:
            _slice(g, plan[i], reclaim, scratch_bytes)
    _write_config_widths(getattr(model, "config", None), widths)
    return widths


def sync_config_widths_(model: nn.Module, allow_nonuniform: bool = False) -> Dict[int, int]:
    """Write the MLP widths the model has now into its config, as ``prune_model_`` does after slicing;
    returns {layer: width}. For a model another tool sliced (torch-pruning leaves
    ``config.intermediate_size`` as it was, so ``from_pretrained`` of the saved folder fails). Non-uniform
    widths: InputError unless ``allow_nonuniform`` (module docstring)."""
    widths = {g.index: g.width for g in find_gated_mlps(model)}
    _check_widths_fit_config(widths, allow_nonuniform)
    _write_config_widths(getattr(model, "config", None), widths)
    return widths


def _check_widths_fit_config(widths: Dict[int, int], allow_nonuniform: bool) -> None:
    if len(set(widths.values())) > 1 and not allow_nonuniform:
        raise InputError(
            f"non-uniform MLP widths {sorted(set(widths.values()))}: Hugging Face configs hold one "
            "intermediate_size for all layers; pass allow_nonuniform=True to save them in sdmprune's own "
            "format (config.sdmprune_intermediate_sizes, loaded with sdmprune.storage.save.load_pruned)"
        )


def _write_config_widths(config, widths: Dict[int, int]) -> None:
    if config is None:
        return
    ordered = [widths[i] for i in sorted(widths)]
    if len(set(ordered)) == 1:
        config.intermediate_size = ordered[0]
        if hasattr(config, "sdmprune_intermediate_sizes"):
            delattr(config, "sdmprune_intermediate_sizes")
    else:
        config.intermediate_size = max(ordered)
        config.sdmprune_intermediate_sizes = ordered


def reclaim_memory(model: nn.Module) -> int:
    """Right-size the storages of every MLP weight sliced with reclaim="none"; returns bytes released.

    One matrix at a time, so the transient peak is one matrix (see the module docstring).
    """
    freed = 0
    with torch.no_grad():
        for g in find_gated_mlps(model):
            for lin in (g.gate, g.up, g.down):
                for p in (lin.weight, lin.bias):
                    if p is None:
                        continue
                    before = p.untyped_storage().nbytes()
                    p.data = _reclaim(p.data)
                    freed += before - p.untyped_storage().nbytes()
    return freed
