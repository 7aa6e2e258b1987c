"""Torch-Pruning with sdmprune's channel choices (``pip install 'sdmprune[torch-pruning]'``)::

    from sdmprune import PruneConfig, score_channels
    from sdmprune.integrations.torch_pruning import ChannelImportance, mlp_pruner

    result = score_channels(model, calib, PruneConfig(width=1024))   # the model is left as it was
    pruner = mlp_pruner(model, ChannelImportance(model, result), width=1024)
    pruner.step()        # the channels prune_model keeps; config.intermediate_size follows

``ChannelImportance`` is a torch-pruning ``Importance``: for the group of an MLP's channels (rooted at
up_proj or gate_proj output channels) it returns sdmprune's ranking; any other group goes to
``fallback`` (another importance, e.g. torch-pruning's own Taylor) or is left alone (None).

``mlp_pruner`` builds torch-pruning's ``BasePruner`` with what a LLaMA needs, each measured on
torch-pruning 1.6.1 with a tiny Llama:

- building the attention groups of a LLaMA does not finish, so every linear layer other than the MLPs'
  (attention, the LM head) is ignored and only the MLP groups are built;
- torch-pruning keeps ``int(I * (1 - ratio))`` channels, and ratio ``(I - W) / I`` keeps W - 1 for about a
  sixth of the widths: the ratio passed is ``1 - (W + 1/2) / I``, whose kept count is W for every W;
- the width comes from ``sdmprune.widths.plan_width`` (a width or a ratio of all parameters, ``round_to``
  rounding it down as ``--round-to`` does); torch-pruning's own rounding is not used;
- ``global_pruning=True`` gives every layer its own width, which a Hugging Face config cannot hold: refused;
- the dependency graph is traced through autograd, so a model whose weights are all frozen traces to
  nothing and is silently not pruned: the trace runs with every weight requiring grad, and the flags
  (and the modules' train/eval modes the trace changes) are given back, after ``step()`` as well (torch-pruning
  makes new Parameters, which require grad);
- a score vector whose length is not the layer's width is one ``InputError`` line;
- torch-pruning leaves ``config.intermediate_size`` as it was, so ``from_pretrained`` of the saved
  folder fails: ``step()`` writes the new width into the config (``sync_config_widths_``, the rule
  ``prune_model_`` uses; call it yourself after a pruner built another way).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn

from ..errors import InputError, SdmpruneError, require_extra

require_extra("torch_pruning", "sdmprune.integrations.torch_pruning")

import torch_pruning as tp  # noqa: E402

from ..models import find_gated_mlps, get_adapter  # noqa: E402
from ..scoring.selection import channel_order  # noqa: E402
from ..slicing import sync_config_widths_  # noqa: E402
from ..widths import plan_width  # noqa: E402

__all__ = ["ChannelImportance", "MLPPruner", "mlp_pruner", "sync_config_widths_"]


class ChannelImportance(tp.importance.Importance):
    """sdmprune's channel ranking as a torch-pruning importance.

    ``scores``: a ``PruneResult`` (from ``score_channels`` or ``prune_model``'s selection) or
    ``{layer index: [I] scores}`` (higher = keep, e.g. ``TaylorImportance.scores()``), for the model as it
    is now. For the group of layer i's MLP channels it returns float32 [n] (n = the group's channels,
    torch-pruning's ``root_idxs``): each channel's rank in sdmprune's order (``channel_order``: score
    descending, ties to the lower index; a PruneResult's kept channels first), so torch-pruning keeps exactly
    ``top_channels(scores, k)`` for every k, and a PruneResult's own ``keep`` at its width. Ranks, not
    the scores themselves: torch-pruning breaks ties arbitrarily. Compare them only within a layer
    (``mlp_pruner`` prunes layer by layer). Groups of other layers, and every other group, go to
    ``fallback`` (or get None: torch-pruning then leaves them alone)."""

    def __init__(self, model: nn.Module, scores, fallback: Optional[tp.importance.Importance] = None):
        keep = None
        if hasattr(scores, "scores") and hasattr(scores, "keep"):  # a PruneResult or a scoring Selection
            scores, keep = scores.scores, scores.keep
        if not isinstance(scores, Mapping):
            raise InputError("scores must be a PruneResult or a {layer index: [I] scores} mapping, got "
                             f"{type(scores).__name__}")
        mlps = {m.index: m for m in find_gated_mlps(model)}
        unknown = sorted(set(scores) - set(mlps))
        if unknown:
            raise InputError(f"scores name layers {unknown} that have no gated MLP (the model has layers "
                             f"0..{len(mlps) - 1})")
        self.fallback = fallback
        self._ranks: Dict[int, torch.Tensor] = {}
        self._owner: Dict[nn.Module, int] = {}
        self._gates: Dict[int, nn.Linear] = {}
        for i, s in scores.items():
            s = torch.as_tensor(s)
            width = mlps[i].width
            if s.dim() != 1 or s.numel() != width:
                raise InputError(f"scores of layer {i} have shape {tuple(s.shape)}; its MLP has {width} channels")
            order = channel_order(s)
            if keep is not None and i in keep:
                kept = torch.zeros(width, dtype=torch.bool)
                kept[torch.as_tensor(keep[i]).long()] = True
                order = torch.cat([order[kept[order]], order[~kept[order]]])
            rank = torch.empty(width, dtype=torch.float32)
            rank[order] = torch.arange(width - 1, -1, -1, dtype=torch.float32)
            self._ranks[i] = rank
            self._owner[mlps[i].gate] = self._owner[mlps[i].up] = i
            self._gates[i] = mlps[i].gate

    @property
    def layers(self):
        """The layer indices this importance scores."""
        return sorted(self._ranks)

    def layer_of(self, group) -> Optional[int]:
        """The layer whose MLP channels ``group`` prunes (its gate or up projection loses output
        channels), or None."""
        for dep, _ in group:
            # handlers are bound methods: compare with ==, never with ``is``
            if dep.handler == tp.prune_linear_out_channels and dep.target.module in self._owner:
                return self._owner[dep.target.module]
        return None

    def __call__(self, group) -> Optional[torch.Tensor]:
        layer = self.layer_of(group)
        if layer is None:
            return None if self.fallback is None else self.fallback(group)
        rank = self._ranks[layer]
        width = self._gates[layer].out_features  # torch-pruning slices the modules it was built on
        if width != rank.numel():
            raise InputError(f"layer {layer} has {width} MLP channels now but was scored with {rank.numel()}: "
                             "score the model as it is before pruning it")
        return rank[torch.as_tensor(group[0].root_idxs, dtype=torch.long)]


def _exact_ratio(width: int, original: int) -> float:
    """The ratio whose kept count in torch-pruning, ``int(I * (1 - ratio))``, is ``width``: I * (1 - ratio)
    = width + 1/2 sits half a channel away from both neighbours, so float rounding cannot move it."""
    ratio = 1.0 - (width + 0.5) / original
    if int(original * (1 - ratio)) != width:  # pragma: no cover - would need a float error of half a channel
        raise SdmpruneError(f"no pruning ratio keeps {width} of {original} channels")
    return ratio


class MLPPruner(tp.pruner.BasePruner):
    """torch-pruning's BasePruner over the MLP groups only (built by ``mlp_pruner``). After the last step
    every MLP is ``width`` wide (else SdmpruneError), the weights' requires_grad flags are the ones they
    had before, and the config holds the new width."""

    def __init__(self, *args, sdmprune_width: int, sdmprune_grad_flags: Dict[str, bool], **kwargs):
        self.width = sdmprune_width
        self._grad_flags = sdmprune_grad_flags
        super().__init__(*args, **kwargs)

    def step(self, interactive: bool = False):
        if interactive:
            return self._then_finish(super().step(interactive=True))
        super().step(interactive=False)
        self._finish()
        return None

    def _then_finish(self, groups):
        yield from groups
        self._finish()

    def _finish(self) -> None:
        for name, p in self.model.named_parameters():
            if name in self._grad_flags:
                p.requires_grad_(self._grad_flags[name])
        widths = sync_config_widths_(self.model)
        if self.current_step >= self.iterative_steps and set(widths.values()) != {self.width}:
            raise SdmpruneError(f"torch-pruning left MLP widths {sorted(set(widths.values()))}, not {self.width} "
                                "(did the importance return None for some MLP group?)")


# BasePruner arguments mlp_pruner decides itself
_OWNED = ("pruning_ratio", "pruning_ratio_dict", "ch_sparsity", "ch_sparsity_dict", "round_to", "global_pruning",
          "max_pruning_ratio")


def mlp_pruner(model: nn.Module, importance, *, width: Optional[int] = None, ratio: Optional[float] = None,
               round_to: Optional[int] = None, example_inputs: Optional[torch.Tensor] = None,
               ignored_layers=(), global_pruning: bool = False, **pruner_kwargs) -> MLPPruner:
    """A torch-pruning pruner that prunes every gated MLP of ``model`` to one width (module docstring for
    what it absorbs); ``pruner.step()`` prunes in place.

    ``importance``: any torch-pruning importance (``ChannelImportance`` for sdmprune's choices). Give one of
    ``width`` (kept channels per layer) and ``ratio`` (fraction of all parameters removed), as for
    ``prune_model``; ``round_to`` rounds the width down to a multiple. ``example_inputs``: token ids [1, L]
    for the trace (default 8 tokens). ``ignored_layers`` are added to the ones ignored here; the rest of
    ``pruner_kwargs`` go to torch-pruning's BasePruner (``iterative_steps``, ``forward_fn``, ...)."""
    if global_pruning:
        raise InputError("global_pruning=True ranks all layers together and gives each its own width, which a "
                         "Hugging Face config (one intermediate_size) cannot hold; mlp_pruner prunes layer by layer")
    owned = sorted(set(pruner_kwargs) & set(_OWNED))
    if owned:
        raise InputError(f"mlp_pruner sets {', '.join(owned)} itself from width/ratio/round_to")
    plan = plan_width(model, ratio, width, round_to)
    mlps = find_gated_mlps(model)
    if isinstance(importance, ChannelImportance) and importance.fallback is None:
        missing = sorted(set(m.index for m in mlps) - set(importance.layers))
        if missing:
            raise InputError(f"the importance has no scores for layers {missing} and no fallback: those MLPs "
                             "would keep every channel")
    mlp_linears = {lin for m in mlps for lin in (m.gate, m.up, m.down)}
    # only the MLP groups: every other linear layer (attention, whose groups do not finish building, and
    # the LM head) is a root torch-pruning must not expand
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in mlp_linears] + list(ignored_layers)
    head = get_adapter(model).lm_head(model)
    if example_inputs is None:
        vocab = head.weight.shape[0]
        example_inputs = (torch.arange(8) % vocab).unsqueeze(0).to(head.weight.device)
    pruner_kwargs.setdefault("forward_fn", lambda m, x: m(input_ids=x, use_cache=False).logits)
    if "unwrapped_parameters" not in pruner_kwargs:
        # the norms' weights are per hidden feature (dim 0); said here, torch-pruning does not warn about them
        pruner_kwargs["unwrapped_parameters"] = [(p, 0) for p in _parameters_outside(model, (nn.Linear, nn.Embedding))
                                                 if p.dim() == 1]
    names = {p: n for n, p in model.named_parameters()}
    grad_flags = {names[p]: p.requires_grad for p in names}
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p in names:
            p.requires_grad_(True)  # the trace follows autograd: a frozen model would trace to nothing
        with torch.enable_grad():
            pruner = MLPPruner(model, example_inputs, importance, global_pruning=False,
                               pruning_ratio=_exact_ratio(plan.width, plan.original_width),
                               ignored_layers=ignored, sdmprune_width=plan.width, sdmprune_grad_flags=grad_flags,
                               **pruner_kwargs)
    finally:
        for p in names:
            p.requires_grad_(grad_flags[names[p]])
        for m, flag in modes:
            m.training = flag
    return pruner


def _parameters_outside(model: nn.Module, kinds) -> list:
    """Parameters of ``model`` that no module of the types ``kinds`` holds."""
    owned = {id(p) for m in model.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)}
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in owned and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
