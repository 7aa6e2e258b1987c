"""Compensation after channel selection: refit the kept ``down_proj`` columns in closed form.

Once a method has chosen the kept channels S of an MLP, its output loses the pruned columns' share.
The refit replaces the kept columns W[:, S] of ``down_proj`` (W: [d, I]) by the least-squares fit of
the full-width output on calibration activations, regularised toward the kept weights themselves::

    W' = (W G[:, S] + lam W[:, S]) (G_SS + lam I)^-1,   G = A^T A,   lam = strength * mean(diag G_SS)

A [tokens, I] = act(gate x) * up x is the FULL-WIDTH down_proj input. strength -> 0 is plain least
squares, strength -> inf returns the kept weights unchanged. Shrinking toward the kept weights, not
toward zero, is what keeps the fit from overfitting the calibration domain (a ridge toward zero
lost on text never calibrated on; see the README's --refit section).

``refit_down_proj_`` runs layer by layer, in order. The hidden states of the calibration windows
stay in host memory and go through one decoder layer at a time on ``device``, with the pruned
channels masked (models.ChannelMasks) and every earlier layer already refit, so each layer is fit on
the inputs the pruned model will give it. Per layer: one pass accumulates G over the fit windows
and H over the held-out windows (the last quarter of the calibration samples, never in G); the
Grams are summed over ranks; the strength is chosen from ``STRENGTHS`` by the held-out
reconstruction error, a quadratic form in W' with H (no further pass); W' is written into W[:, S]
in place (the model stays full width, the pruned columns untouched, until slicing); a second pass
computes the layer's output for the next layer.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .errors import InputError, SdmpruneError
from .models import ChannelMasks, find_gated_mlps, get_adapter
from .scale import distributed as dist
from .scoring.passes import progress_bar, seconds_since, tick, tokens_to

__all__ = ["REFITS", "STRENGTHS", "refit_down_proj_", "split_windows", "NormalEquations", "HeldOut",
           "choose_strength", "kept_columns"]

REFITS = ("none", "ls")
# candidate strengths, relative to mean diag(G_SS); inf = the kept weights as they are (never worse
# than no refit on the held-out windows)
STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)
HELD_OUT_FRACTION = 0.25
# columns of H per matmul when forming tr(W H W^T) (bounds its float64 temporaries)
QUADRATIC_CHUNK = 4096


def split_windows(n: int) -> Tuple[List[int], List[int]]:
    """(fit windows, held-out windows) of ``n`` calibration samples: the last quarter (at least one)
    is held out to choose the strength and is never part of G."""
    if n < 2:
        raise InputError("--refit ls holds out calibration windows to choose its strength: it needs at least "
                         f"2 calibration samples (got {n})")
    held = max(1, round(n * HELD_OUT_FRACTION))
    return list(range(n - held)), list(range(n - held, n))


def gram_dtype(device: torch.device) -> torch.dtype:
    """Grams accumulate in float64 on the CPU and in float32 on a GPU (half the memory, fast matmuls);
    the solve is float64 on either."""
    return torch.float64 if device.type == "cpu" else torch.float32


@dataclass
class NormalEquations:
    """One layer's refit problem in float64: ``kept`` = W[:, S] [d, k], ``target`` = W G[:, S] [d, k],
    ``gram`` = G_SS [k, k] and ``scale`` = mean diag(G_SS), the unit of the strength."""

    kept: torch.Tensor
    target: torch.Tensor
    gram: torch.Tensor
    scale: float

    @classmethod
    def of(cls, weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> "NormalEquations":
        """From down_proj's weight [d, I], the fit Gram G [I, I] and the kept channels (int64)."""
        w = weight.detach().to(torch.float64)
        keep = keep.to(w.device)
        g_cols = gram[:, keep].to(device=w.device, dtype=torch.float64)  # G[:, S]
        g_kept = g_cols[keep]  # G_SS
        return cls(w[:, keep], w @ g_cols, g_kept, float(g_kept.diagonal().mean()))

    def solve(self, strength: float) -> torch.Tensor:
        """W' [d, k] float64 for ``strength`` (inf, or a Gram without signal: the kept weights)."""
        if math.isinf(strength) or not self.scale > 0:
            return self.kept.clone()
        lam = strength * self.scale
        system = self.gram.clone()
        system.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info):  # G_SS is positive semi-definite, so G_SS + lam I with lam > 0 is not singular
            raise SdmpruneError(f"the refit system is not positive definite (strength {strength}); "
                                "the calibration activations are degenerate")
        return torch.cholesky_solve((self.target + lam * self.kept).T.contiguous(), factor).T


@dataclass
class HeldOut:
    """What the held-out windows say about a candidate W' (float64): ``cross`` = W H[:, S] [d, k],
    ``gram`` = H_SS [k, k] and ``total`` = tr(W H W^T) = ||A_h W^T||^2, with H = A_h^T A_h the Gram of the
    held-out activations A_h."""

    cross: torch.Tensor
    gram: torch.Tensor
    total: float

    @classmethod
    def of(cls, weight: torch.Tensor, held_gram: torch.Tensor, keep: torch.Tensor) -> "HeldOut":
        w = weight.detach().to(torch.float64)
        keep = keep.to(w.device)
        h_cols = held_gram[:, keep].to(device=w.device, dtype=torch.float64)
        total = 0.0
        for j in range(0, held_gram.shape[1], QUADRATIC_CHUNK):  # tr(W H W^T) in column chunks of H
            cols = held_gram[:, j:j + QUADRATIC_CHUNK].to(torch.float64)
            total += float(((w @ cols) * w[:, j:j + QUADRATIC_CHUNK]).sum())
        return cls(w @ h_cols, h_cols[keep], total)

    def loss(self, refit: torch.Tensor) -> float:
        """||A_h W^T - A_h[:, S] W'^T||^2 / ||A_h W^T||^2 for W' [d, k] float64: the quadratic form
        tr(W H W^T) - 2 tr(W' (W H[:, S])^T) + tr(W' H_SS W'^T), relative (0 where A_h W^T is 0)."""
        err = self.total - 2 * float((refit * self.cross).sum()) + float(((refit @ self.gram) * refit).sum())
        return err / self.total if self.total > 0 else 0.0


def choose_strength(eq: NormalEquations, held: HeldOut, strengths: Sequence[float],
                    fixed: bool = False) -> Tuple[float, torch.Tensor, Dict[float, float]]:
    """(chosen strength, its W' [d, k] float64, {strength: held-out loss}) over the candidates
    ``strengths`` and inf (the kept weights as they are): the one with the least held-out loss, ties
    to the larger strength (the closer to the kept weights). ``fixed``: ``strengths`` is one strength,
    used whatever its held-out loss (inf is still measured: the loss before the refit)."""
    losses: Dict[float, float] = {}
    best, best_w = None, None
    for s in sorted(set(strengths) | {math.inf}, reverse=True):
        cand = eq.solve(s)
        losses[s] = held.loss(cand)
        if (s == strengths[0]) if fixed else (best is None or losses[s] < losses[best]):
            best, best_w = s, cand
        del cand
    return best, best_w, losses


@torch.no_grad()
def kept_columns(model, keep: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """{layer: down_proj.weight[:, keep] copied to host memory}: taken before a refit, they let a later
    recovery's teacher stay the unpruned model (``ChannelMasks(..., unrefit_columns=...)``)."""
    return {m.index: m.down.weight[:, torch.as_tensor(keep[m.index]).to(m.down.weight.device)].cpu()
            for m in find_gated_mlps(model) if m.index in keep}


class _Captured(Exception):
    """Stops the forward once the first decoder layer's inputs are caught."""


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def _first_layer_inputs(model, tokens, batches):
    """The hidden states entering decoder layer 0 for every batch (host memory, model dtype) and the
    layer's other arguments per batch shape (rotary cos/sin, mask: they depend on the shape only, since
    calibration windows are unpadded)."""
    layers = get_adapter(model).decoder_layers(model)
    embed_device = model.get_input_embeddings().weight.device
    caught = {}

    def catch(module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs["hidden_states"]
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True, prepend=True)
    stream, layer_kwargs = [], {}
    try:
        for batch in batches:
            try:
                get_adapter(model).body(model)(input_ids=tokens_to(tokens[batch], embed_device), use_cache=False)
            except _Captured:
                pass
            stream.append(caught["hidden"].detach().cpu())
            layer_kwargs.setdefault(tuple(caught["hidden"].shape[:2]), _to(caught["kwargs"], "cpu"))
    finally:
        handle.remove()
    return stream, layer_kwargs


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def refit_down_proj_(model, tokens: torch.Tensor, keep: Dict[int, torch.Tensor], *, device=None,
                     batch_size: int = 1, strength: Optional[float] = None, state=None, resume: bool = False,
                     progress: bool = True) -> dict:
    """Refit the kept down_proj columns of every gated MLP of ``model`` in place (see the module docstring).

    tokens: calibration ids [n, L] (n >= 2; the last quarter is held out); keep: {layer: kept channels}
    in the current numbering. device: where the layers run (default: the model's); a layer kept
    elsewhere (--offload, --shard: host memory) is moved there for its turn and back. Under a process
    group each rank takes its share of the fit and held-out windows and the Grams are summed before the
    solve. strength: None chooses per layer on the held-out windows; a number is used for every layer.
    state: a RunState (sdmprune.storage.run_state) for per-layer resume; resume=True continues from it.
    Returns the report: the strength chosen per layer and the held-out loss before/after."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    mlps = find_gated_mlps(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    fit, held = split_windows(tokens.shape[0])
    rank, ranks = dist.rank(), dist.world_size()
    # (windows, held out?): this rank's share of each part; a batch never mixes the two
    batches = [(part[i:i + batch_size], is_held) for part, is_held in ((fit[rank::ranks], False),
                                                                      (held[rank::ranks], True))
               for i in range(0, len(part), batch_size)]
    strengths = STRENGTHS if strength is None else (float(strength),)
    report = {"refit": "ls", "strength": "chosen per layer on the held-out windows" if strength is None
              else f"fixed {strength}", "candidates": [str(s) for s in strengths], "fit_windows": len(fit),
              "held_out_windows": len(held), "gram_dtype": str(gram_dtype(device)).replace("torch.", ""),
              "layers": {}}
    done = _restore_(state, mlps, keep, report) if (state is not None and resume) else set()
    if state is not None and not resume:
        state.discard()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    bar = progress_bar((2 * len(mlps) - 1) * sum(len(b) for b, _ in batches) * tokens.shape[1],
                       "refit: down_proj", progress)
    try:
        with ChannelMasks(model, keep):
            stream, layer_kwargs = _first_layer_inputs(model, tokens, [b for b, _ in batches])
            for m in mlps:
                layer = layers[m.index]
                home = next(layer.parameters()).device
                layer.to(device)
                kwargs = {shape: _to(kw, device) for shape, kw in layer_kwargs.items()}

                def run_layer(j):
                    x = tokens_to(stream[j], device)
                    return _layer_output(layer(x, **kwargs[tuple(x.shape[:2])]))

                if m.index not in done and m.index in keep:
                    grams = _grams(layer, adapter, m, batches, run_layer, device, bar)
                    report["layers"][str(m.index)] = _solve_layer_(m, grams, keep[m.index], strengths)
                    _save_(state, keep, report, m)
                if m is not mlps[-1]:
                    for j in range(len(batches)):  # this layer's output: the next layer's input
                        stream[j] = run_layer(j).cpu()
                        tick(bar, stream[j].shape[0] * stream[j].shape[1], device)
                layer.to(home)
    finally:
        bar.close()
        model.train(was_training)
    refit = list(report["layers"].values())
    if refit:
        report["held_out_loss"] = {k: sum(v["held_out_loss"][k] for v in refit) / len(refit)
                                   for k in ("before", "after")}
    report["time_s"] = seconds_since(t0, device)
    return report


def _grams(layer, adapter, m, batches, run_layer, device, bar) -> Dict[str, torch.Tensor]:
    """{"fit": G, "held": H} [I, I] of the full-width down_proj inputs over this rank's batches, summed
    over ranks."""
    dtype = gram_dtype(device)
    grams = {part: torch.zeros(m.width, m.width, dtype=dtype, device=device) for part in ("fit", "held")}
    target = ["fit"]

    def accumulate(module, args):
        a = args[0].reshape(-1, args[0].shape[-1]).to(dtype)
        grams[target[0]].addmm_(a.T, a)

    # prepend: runs before the channel mask's hook, so it sees every channel
    handle = adapter.mlp_input_of_down(layer).register_forward_pre_hook(accumulate, prepend=True)
    try:
        for j, (_, is_held) in enumerate(batches):
            target[0] = "held" if is_held else "fit"
            x = run_layer(j)
            tick(bar, x.shape[0] * x.shape[1], device)
    finally:
        handle.remove()
    grams = dist.all_reduce_sum_(grams)
    for part, g in grams.items():
        # the diagonal decides: |G_ij| <= sqrt(G_ii G_jj), and an inf or NaN activation reaches its G_ii
        # (checking all of G would allocate I x I temporaries)
        if not bool(torch.isfinite(g.diagonal()).all()):
            raise SdmpruneError(f"layer {m.index}: the Gram of the down_proj inputs on the "
                                f"{'held-out' if part == 'held' else 'fit'} calibration windows is not finite "
                                "(the model gives inf/NaN MLP activations on them); the refit cannot run")
    return grams


def _solve_layer_(m, grams, keep: torch.Tensor, strengths) -> dict:
    """Choose the strength, write W' into down_proj.weight[:, S] (in place) and describe it."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    weight = m.down.weight
    # each Gram is dropped once its parts are taken: the candidates are solved without the I x I matrices
    eq = NormalEquations.of(weight, grams.pop("fit"), keep)
    held = HeldOut.of(weight, grams.pop("held"), keep)
    chosen, refit, losses = choose_strength(eq, held, strengths, fixed=len(strengths) == 1)
    weight.data[:, keep.to(weight.device)] = refit.to(weight.dtype)
    return {"strength": str(chosen), "held_out_loss": {"before": losses[math.inf], "after": losses[chosen]},
            "candidates": {str(s): v for s, v in sorted(losses.items())}}


def _state_file(state, index: int):
    return state.file(f"sdmprune-refit-layer{index}-rank{dist.rank()}.pt")


def _save_(state, keep, report, m) -> None:
    """After layer ``m``: its refit columns (one file per layer) and then the state naming it done."""
    if state is None:
        return
    from .storage.paths import atomic_write_file

    cols = m.down.weight.detach()[:, torch.as_tensor(keep[m.index]).to(m.down.weight.device)].cpu()
    with atomic_write_file(_state_file(state, m.index)) as tmp:
        torch.save(cols, tmp)
    state.save({"refit_layers": dict(report["layers"])})


def _restore_(state, mlps, keep, report) -> set:
    """Write the saved columns of the layers an interrupted run finished; returns their indices."""
    saved = state.load()
    if saved is None:
        return set()
    done = set()
    for m in mlps:
        if str(m.index) not in saved["refit_layers"]:
            continue
        cols = torch.load(_state_file(state, m.index), map_location="cpu", weights_only=True)
        m.down.weight.data[:, torch.as_tensor(keep[m.index]).to(m.down.weight.device)] = cols.to(m.down.weight.device)
        report["layers"][str(m.index)] = saved["refit_layers"][str(m.index)]
        done.add(m.index)
    report["resumed_layers"] = len(done)
    return done
