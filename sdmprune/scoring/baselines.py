"""One-shot baselines: magnitude, random and wanda-sp channel scores (the registry entries of the same
names keep the top ``width`` of them)."""
from __future__ import annotations

import time
from typing import Dict

import torch

from ..scale import distributed as dist
from .selection import ScoringRun
from ..models import find_gated_mlps, get_adapter
from .passes import progress_bar, seconds_since, tick, tokens_to


def baseline_scores(kind: str, run: ScoringRun) -> Dict[int, torch.Tensor]:
    """{layer: float32 [I]} on the CPU for ``kind`` in magnitude / random / wanda-sp.

    magnitude: ||W_gate[c]|| + ||W_up[c]|| + ||W_down[:, c]||; random: uniform, seeded by ``config.seed``;
    wanda-sp: sum_j |W_down[j, c]| * ||H[:, c]||_2 with H the down_proj input over all calibration tokens."""
    model, cfg = run.model, run.config
    mlps = find_gated_mlps(model)
    device = mlps[0].down.weight.device
    t0 = time.perf_counter()
    if kind == "magnitude":
        out = {m.index: (m.gate.weight.float().norm(dim=1) + m.up.weight.float().norm(dim=1)
                         + m.down.weight.float().norm(dim=0)).cpu() for m in mlps}
    elif kind == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        out = {m.index: torch.rand(m.width, generator=g) for m in mlps}
    elif kind == "wanda-sp":
        out = _wanda_sp(model, run.tokens, cfg, mlps, device)
    else:
        raise ValueError(kind)
    run.stats["time_s"]["stage1"] = seconds_since(t0, device)
    return out


def _wanda_sp(model, tokens, cfg, mlps, device) -> Dict[int, torch.Tensor]:
    sq = {m.index: torch.zeros(m.width, dtype=torch.float32, device=m.down.weight.device) for m in mlps}

    def hook_for(i):
        def hook(module, args):
            h = args[0].detach().float()
            sq[i] += h.reshape(-1, h.shape[-1]).pow(2).sum(0)
        return hook

    hooks = [m.down.register_forward_pre_hook(hook_for(m.index)) for m in mlps]
    idx = dist.shard_indices(tokens.shape[0])
    was_training = model.training
    model.eval()
    try:
        bar = progress_bar(len(idx) * tokens.shape[1], "wanda-sp: activation norms", cfg.progress)
        with torch.no_grad():
            for i in range(0, len(idx), cfg.batch_size):
                x = tokens_to(tokens[idx[i:i + cfg.batch_size]], device)
                get_adapter(model).body(model)(input_ids=x, use_cache=False)
                tick(bar, x.numel(), device)
        bar.close()
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    sq = dist.all_reduce_scores_(sq)  # sums of squares add across ranks; the sqrt comes after
    return {m.index: (m.down.weight.float().abs().sum(0) * sq[m.index].sqrt()).cpu() for m in mlps}
