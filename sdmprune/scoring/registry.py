"""Pruning methods: one registry, every method one entry of one shape.

An entry (``Method``) says what the method needs and holds one scoring call::

    select(run: ScoringRun) -> Selection      # keep / scores per layer, in the ORIGINAL channel numbering

``ScoringRun`` is what the pipeline hands every method: the model, the calibration tokens [n, L] (or
None), the ``PruneConfig``, the width plan and where and how the gradient passes run. A ``Selection``
holds the kept channels of every gated MLP, the scores the final choice ranked and, for two-stage
methods, the stage-1 keep and scores.

Built-in entries:

=========== =============== ========= ==========================================================
method      calibration     gradient  what it scores
=========== =============== ========= ==========================================================
sdmprune    yes             yes       stage 1 CE Taylor, stage 2 self-distillation Taylor (sdmprune.scoring.taylor)
taylor      yes             yes       CE Taylor, one stage (LLM-Pruner style)
hfprune     yes             yes       label-free: sum_t |H[t, c] * dL/dH[t, c]| at each down_proj input H,
                                      L = each sample's mean entropy of its own next-token distribution
wanda-sp    yes             no        sum_j |W_down[j, c]| * ||H[:, c]||_2 over the calibration tokens
magnitude   no              no        ||W_gate[c]|| + ||W_up[c]|| + ||W_down[:, c]||
random      no              no        seeded uniform scores
=========== =============== ========= ==========================================================

Users add their own with ``register_method(name, score_fn, needs_calibration=True)``;
``score_fn(model, calib_tokens, config)`` returns one float tensor [I] per gated MLP in layer order
(higher = keep). The pipeline then plans the width, keeps the top channels, slices and reports exactly
as for a built-in method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import InputError, SdmpruneError, user_code_error
from ..models import find_gated_mlps
from .selection import ScoringRun, Selection, selection_from_scores, top_channels

__all__ = ["Method", "ScoringRun", "Selection", "register_method", "unregister_method", "get_method",
           "available_methods", "top_channels", "selection_from_scores"]

# engines of the gradient methods; "auto" resolves to "fused" on CUDA, else "torch"
ENGINES = ("auto", "fused", "torch", "reference")


@dataclass(frozen=True)
class Method:
    """One registry entry. ``gradient``: the method runs gradient passes, so the engine choice, batching,
    checkpointing, resume, ``--max-memory``, ``--shard``, ``--offload`` and ``--offload-activations``
    apply to it; ``engines``: the engines it runs on; ``resumable``: the engines that checkpoint."""

    name: str
    select: Callable[[ScoringRun], Selection]
    needs_calibration: bool = True
    gradient: bool = False
    engines: Tuple[str, ...] = ()
    resumable: Tuple[str, ...] = ()
    description: str = ""
    builtin: bool = False


_REGISTRY: Dict[str, Method] = {}


def _add(method: Method) -> None:
    if not isinstance(method.name, str) or not method.name.strip() or method.name != method.name.strip():
        raise InputError(f"a method name must be a non-empty string without surrounding spaces, got {method.name!r}")
    if method.name in _REGISTRY:
        raise InputError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method


def register_method(name: str, score_fn: Callable, *, needs_calibration: bool = True) -> None:
    """Register ``score_fn(model, calib_tokens, config) -> list of float tensors [I]`` (one per gated MLP
    in layer order, higher = keep) as method ``name``. ``needs_calibration=False``: the method runs
    without calibration tokens (``calib_tokens`` is then None)."""
    if not callable(score_fn):
        raise InputError(f"register_method({name!r}, ...): score_fn must be callable")

    def select(run: ScoringRun) -> Selection:
        try:
            scores = score_fn(run.model, run.tokens, run.config)
        except SdmpruneError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code failing is one line naming it, exit code 2
            raise user_code_error(f"method {name!r} ({_defined_in(score_fn)})", exc, _source_file(score_fn)) from exc
        return selection_from_scores(_layer_scores(name, run.model, scores), run.plan.width)

    _add(Method(name, select, needs_calibration=bool(needs_calibration), description=f"registered: {score_fn!r}"))


def _source_file(fn) -> Optional[str]:
    """The file that defines ``fn`` (a function or a callable object), or None."""
    import inspect

    for obj in (fn, type(fn)):
        try:
            return inspect.getsourcefile(obj)
        except TypeError:
            continue
    return None


def _defined_in(fn) -> str:
    where = _source_file(fn)
    return f"{getattr(fn, '__qualname__', type(fn).__qualname__)} in {where}" if where else repr(fn)


def unregister_method(name: str) -> None:
    """Remove a method registered with ``register_method`` (built-in methods stay)."""
    method = _REGISTRY.get(name)
    if method is None:
        raise InputError(f"no method named {name!r} is registered")
    if method.builtin:
        raise InputError(f"{name!r} is a built-in method")
    del _REGISTRY[name]


def get_method(name: str) -> Method:
    """The registry entry ``name``; InputError naming the known methods otherwise."""
    method = _REGISTRY.get(name)
    if method is None:
        raise InputError(f"unknown method {name!r} (one of {', '.join(available_methods())}; "
                         "register your own with sdmprune.register_method or --plugin)")
    return method


def available_methods() -> List[str]:
    return list(_REGISTRY)


def _layer_scores(name: str, model, scores: Any) -> Dict[int, torch.Tensor]:
    """Check a registered method's return value: one float tensor [I] per gated MLP, in layer order."""
    mlps = find_gated_mlps(model)
    if not isinstance(scores, (list, tuple)):
        raise SdmpruneError(f"method {name!r} returned {type(scores).__name__}; it must return a list of float "
                            f"tensors, one score tensor per gated MLP ({len(mlps)})")
    if len(scores) != len(mlps):
        raise SdmpruneError(f"method {name!r} returned {len(scores)} tensors; it must return one score tensor per "
                            f"gated MLP ({len(mlps)})")
    out = {}
    for m, s in zip(mlps, scores):
        s = torch.as_tensor(s)
        if s.shape != (m.width,) or not (s.is_floating_point()):
            raise SdmpruneError(f"method {name!r}: layer {m.index} scores have shape {tuple(s.shape)} and dtype "
                                f"{s.dtype}; expected a float tensor of shape ({m.width},)")
        if torch.isnan(s).any():
            raise SdmpruneError(f"method {name!r}: layer {m.index} scores contain NaN")
        out[m.index] = s.detach().float().cpu()
    return out


# ------------------------------------------------------------------------------------ built-ins
def _taylor_select(objective: str):
    def select(run: ScoringRun) -> Selection:
        from .taylor import taylor_selection

        return taylor_selection(run, objective)

    return select


def _baseline_select(kind: str):
    def select(run: ScoringRun) -> Selection:
        from .baselines import baseline_scores

        return selection_from_scores(baseline_scores(kind, run), run.plan.width)

    return select


for _m in (
    Method("sdmprune", _taylor_select("sdmprune"), needs_calibration=True, gradient=True,
           engines=("fused", "torch", "reference"), resumable=("fused", "torch"), builtin=True,
           description="two-stage self-distillation Taylor (CE, then (1-alpha) CE + alpha KL against the original)"),
    Method("taylor", _taylor_select("taylor"), needs_calibration=True, gradient=True,
           engines=("fused", "torch", "reference"), resumable=("fused", "torch"), builtin=True,
           description="one-stage CE Taylor"),
    Method("hfprune", _taylor_select("hfprune"), needs_calibration=True, gradient=True,
           engines=("fused", "torch", "reference"), resumable=("fused", "torch"), builtin=True,
           description="label-free: activation Taylor sum_t |H * dL/dH| of each sample's mean entropy"),
    Method("wanda-sp", _baseline_select("wanda-sp"), needs_calibration=True, builtin=True,
           description="sum_j |W_down[j, c]| * ||H[:, c]||_2 over the calibration tokens"),
    Method("magnitude", _baseline_select("magnitude"), needs_calibration=False, builtin=True,
           description="||W_gate[c]|| + ||W_up[c]|| + ||W_down[:, c]||"),
    Method("random", _baseline_select("random"), needs_calibration=False, builtin=True,
           description="seeded uniform scores"),
):
    _add(_m)
del _m


def gradient_method_names() -> Sequence[str]:
    """The registered methods that run gradient passes (for messages)."""
    return [n for n, m in _REGISTRY.items() if m.gradient]
