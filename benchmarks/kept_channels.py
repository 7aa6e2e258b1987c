"""Comparing two selections of kept MLP channels, for the benchmarks that check an engine or a mode
against another (fused vs reference, offloaded vs resident, a plain re-statement of an official loop)."""
from __future__ import annotations


def _as_set(channels) -> set:
    return set(channels.tolist()) if hasattr(channels, "tolist") else set(channels)


def kept_iou(got: dict, ref: dict) -> dict:
    """{str(layer): |got & ref| / |got | ref|} over ``ref``'s layers; each value of ``got`` / ``ref`` is
    the kept channels of a layer (a tensor, list or set of channel indices)."""
    out = {}
    for layer, want in ref.items():
        a, b = _as_set(got[layer]), _as_set(want)
        out[str(layer)] = len(a & b) / len(a | b)
    return out
