"""The shapes every pruning method shares: what a method is handed (``ScoringRun``), what it returns
(``Selection``), and the one rule for turning scores into kept channels (``top_channels``).

The engines (sdmprune.scoring.taylor, sdmprune.scoring.baselines) and the registry
(sdmprune.scoring.registry) import these; this module imports none of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from ..errors import SdmpruneError

__all__ = ["ScoringRun", "Selection", "channel_order", "top_channels", "selection_from_scores"]


@dataclass
class Selection:
    """What a method chose. ``keep``: {layer: sorted int64 kept channels}; ``scores``: {layer: float32 [I]}
    the scores the final choice ranked (channels an earlier stage removed are -inf); ``stage1_*`` for
    two-stage methods. All in the original channel numbering, on the CPU."""

    keep: Dict[int, torch.Tensor]
    scores: Dict[int, torch.Tensor]
    stage1_keep: Optional[Dict[int, torch.Tensor]] = None
    stage1_scores: Optional[Dict[int, torch.Tensor]] = None


@dataclass
class ScoringRun:
    """Everything a method's ``select`` may use. ``engine``/``backend``: the resolved engine of a gradient
    method ("fused"/"torch"/"reference", backend "triton"/"torch"; "none" otherwise); ``state``: the resume
    state (sdmprune.storage.run_state.RunState) or None; ``resume``: continue from it; ``stats``: the run's stats
    dict, where methods record timings."""

    model: torch.nn.Module
    tokens: Optional[torch.Tensor]
    config: Any
    plan: Any
    device: torch.device
    engine: str = "none"
    backend: str = "none"
    state: Any = None
    resume: bool = False
    stats: dict = field(default_factory=dict)



def channel_order(scores: torch.Tensor) -> torch.Tensor:
    """Every channel index [I] (int64, CPU), the best first: scores descending, ties to the lower index.
    The one ranking rule of the package: ``top_channels`` keeps its first ``k``."""
    s = scores.detach().float().cpu()
    if torch.isnan(s).any():
        raise SdmpruneError("channel scores contain NaN (the loss or the model produced non-finite values)")
    return torch.argsort(s, descending=True, stable=True)


def top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, sorted ascending (ties: the lower index wins)."""
    return channel_order(scores)[:k].sort().values


def selection_from_scores(scores: Dict[int, torch.Tensor], width: int) -> Selection:
    """Keep the top ``width`` channels of every layer's scores."""
    scores = {k: v.detach().float().cpu() for k, v in scores.items()}
    return Selection(keep={k: top_channels(v, width) for k, v in scores.items()}, scores=scores)
