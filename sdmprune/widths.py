"""Ratio -> MLP width: how many channels every layer keeps.

"Ratio" is the fraction of ALL model parameters removed (embeddings and LM head included, a tied
head counted once), with one uniform width for every layer (plain ``from_pretrained`` needs a single
``intermediate_size``). Removing one channel from every layer removes ``L * (3 d + b)`` parameters,
b = 2 when gate/up carry biases (a down_proj bias is per output feature, not per channel). The
number of channels removed per layer is ``round(ratio * P / (L * (3 d + b)))``: on Llama-3.2-1B
(P = 1,235,814,400, d = 2048, L = 16, I = 8192) that gives 5678 / 4421 / 3163 for 20 / 30 / 40 %.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from .errors import InputError
from .models import count_parameters, find_gated_mlps


@dataclass
class WidthPlan:
    """The target width and what it removes. ``rounding`` describes what --round-to changed (or None)."""

    width: int  # target MLP width of every layer
    original_width: int
    num_layers: int
    params_per_channel: int  # parameters one channel holds in one layer (3 d + biases)
    params_before: int
    params_after: int
    requested_ratio: Optional[float]
    achieved_ratio: float  # (params_before - params_after) / params_before
    rounding: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)


def mlp_geometry(model: nn.Module):
    """(uniform width I, hidden d, layers L, params per channel per layer) of ``model`` (may be on meta)."""
    mlps = find_gated_mlps(model)
    widths = {m.width for m in mlps}
    if len(widths) != 1:
        raise InputError(f"MLP widths differ between layers ({sorted(widths)}); sdmprune needs a uniform width")
    m = mlps[0]
    per_channel = 3 * m.hidden_size + (m.gate.bias is not None) + (m.up.bias is not None)
    return widths.pop(), m.hidden_size, len(mlps), per_channel


def channels_for_ratio(ratio: float, total_params: int, params_per_channel: int, num_layers: int) -> int:
    """Channels removed per layer for ``ratio`` of ``total_params`` (nearest integer)."""
    return int(round(ratio * total_params / (params_per_channel * num_layers)))


def max_ratio(total_params: int, width: int, params_per_channel: int, num_layers: int) -> float:
    """The largest removable fraction: every layer keeps one channel."""
    return (width - 1) * params_per_channel * num_layers / total_params


def width_for_ratio(ratio: float, *, total_params: int, hidden_size: int, num_layers: int,
                    intermediate_size: int, mlp_bias: bool = False) -> int:
    """Uniform width that removes ``ratio`` of ``total_params`` (pure arithmetic; see module docstring)."""
    per_channel = 3 * hidden_size + (2 if mlp_bias else 0)
    return intermediate_size - channels_for_ratio(ratio, total_params, per_channel, num_layers)


def plan_width(model: nn.Module, ratio: Optional[float] = None, width: Optional[int] = None,
               round_to: Optional[int] = None) -> WidthPlan:
    """The target width for ``model`` (real or on the meta device) from a ratio or an explicit width.

    Raises InputError when both or neither are given, the ratio is outside (0, max removable], the
    width is outside [1, I], or rounding would leave no channel.
    """
    if (ratio is None) == (width is None):
        raise InputError("give exactly one of ratio and width")
    I, d, L, per_channel = mlp_geometry(model)
    P = count_parameters(model)
    if ratio is not None:
        ratio = float(ratio)
        top = max_ratio(P, I, per_channel, L)
        if not (0.0 < ratio <= top):
            raise InputError(
                f"ratio {ratio:g} is outside (0, {top:.4f}]: the MLPs hold at most {top:.2%} of the "
                f"{P:,} parameters that can be removed while keeping one channel per layer"
            )
        removed = channels_for_ratio(ratio, P, per_channel, L)
        if removed < 1:
            raise InputError(f"ratio {ratio:g} removes less than one channel per layer (one channel = "
                             f"{per_channel * L / P:.2e} of the parameters)")
        target = I - removed
    else:
        target = int(width)
        if target != width or not (1 <= target <= I):
            raise InputError(f"width {width} is outside [1, {I}] (the current MLP width)")
        if target == I:
            raise InputError(f"width {width} is the current MLP width: it removes nothing (give a smaller width)")
    rounding = None
    if round_to:
        m = int(round_to)
        if m < 1:
            raise InputError(f"round-to must be a positive integer, got {round_to}")
        rounded = (target // m) * m
        if rounded < 1:
            raise InputError(f"rounding width {target} down to a multiple of {m} leaves no channel")
        rounding = {"multiple": m, "width_before": target, "width_after": rounded,
                    "extra_channels_removed_per_layer": target - rounded}
        target = rounded
    after = P - (I - target) * per_channel * L
    return WidthPlan(width=target, original_width=I, num_layers=L, params_per_channel=per_channel,
                     params_before=P, params_after=after, requested_ratio=ratio,
                     achieved_ratio=(P - after) / P, rounding=rounding)

