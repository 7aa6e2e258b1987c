"""Save a pruned model so that Hugging Face loads it as is, atomically.

``save_pruned`` writes, into a temporary directory beside ``out_dir`` that is renamed into place only
when everything is written: the safetensors weights and ``config.json`` (``save_pretrained``), the
tokenizer files (when given) and ``sdmprune.json`` (the pruning report). An exception at any point
leaves no ``out_dir`` (and an existing one untouched); an existing ``out_dir`` is replaced only when it
is an earlier output of the package (``sdmprune.storage.paths``, the ownership rule).

Uniform widths load with plain ``AutoModelForCausalLM.from_pretrained(out_dir)``. Non-uniform widths
(``prune_model_(..., allow_nonuniform=True)``) carry ``sdmprune_intermediate_sizes`` in config.json and
load with ``load_pruned(out_dir)``.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import InputError
from .paths import REPORT_NAME, WRITTEN_BY, atomic_output_dir, atomic_write_file, check_output_file, write_json_atomic

__all__ = ["save_pruned", "load_pruned", "save_scores", "REPORT_NAME"]

PathLike = Union[str, os.PathLike]


def save_pruned(model: nn.Module, tokenizer: Any, out_dir: PathLike, report: dict, overwrite: bool = False,
                inputs: Sequence[Optional[PathLike]] = (), also: Optional[Callable[[Path], None]] = None) -> Path:
    """Write the pruned model (safetensors + config), the tokenizer (if not None) and ``sdmprune.json``.

    Atomic (see ``sdmprune.storage.paths.atomic_output_dir``); InputError for an existing output that is not an
    earlier output of the package, or one that is without ``overwrite``; ``inputs``: paths the output may
    not replace (the input model...). ``also(folder)``: writes further files into the output (the
    temporary folder, before the report is written, so it may add to ``report``); the manifest lists
    them like every other file. Returns the output directory.
    """
    if not isinstance(report, dict):
        raise InputError(f"report must be a dict, got {type(report).__name__}")
    for p in model.parameters():
        if p.device.type == "meta":
            raise InputError("cannot save a model with weights on the meta device (offloaded): load them first")
    out = Path(out_dir).expanduser().absolute()
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if also is not None:
            also(tmp)
        write_json_atomic(tmp / REPORT_NAME, report)
        (tmp / "README.md").write_text(model_card(report, out.name), encoding="utf-8")
    return out


def model_card(report: dict, name: str) -> str:
    """A Hugging Face model card (README.md) from a prune report: base model, method and settings,
    calibration data, widths, parameter counts, the perplexity measured in the run, how to load it."""
    cfg = report.get("config") or {}
    plan = report.get("plan") or {}
    method = report.get("method", "sdmprune")
    base = str(report.get("model", "")) or None
    hub_base = base if base and base.count("/") == 1 and not os.path.exists(base) else None
    lines = ["---", "library_name: transformers", "tags:", "- pruned", "- sdmprune"]
    if method != "sdmprune":
        lines.append(f"- {method}")
    if hub_base:
        lines.append(f"base_model: {hub_base}")
    lines += ["---", "", f"# {name}", "",
              f"{base or 'A model'} with its MLPs pruned by sdmprune, "
              f"method `{method}`: every layer keeps the same number of MLP channels, so plain `transformers` "
              "loads it.", ""]
    if plan:
        lines += ["| | before | after |", "|---|---|---|",
                  f"| parameters | {plan.get('params_before', 0):,} | {plan.get('params_after', 0):,} |",
                  f"| MLP width | {plan.get('original_width')} | {plan.get('width')} |", "",
                  f"{plan.get('achieved_ratio', 0):.2%} of all parameters removed"
                  + (f" (asked: {plan['requested_ratio']:.2%})" if plan.get("requested_ratio") else "") + "."]
        if plan.get("rounding"):
            r = plan["rounding"]
            lines.append(f"Width rounded down to a multiple of {r['multiple']} (was {r['width_before']}).")
        lines.append("")
    settings = {k: cfg[k] for k in ("alpha", "temperature", "stage1_keep", "batch_size", "seed", "engine")
                if k in cfg and cfg[k] is not None}
    if settings:
        lines += ["**Settings:** " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".", ""]
    calib = report.get("calibration")
    if calib:
        lines += [f"**Calibration:** {calib.get('samples')} windows of {calib.get('seq_len')} tokens from "
                  f"`{calib.get('source')}` ({calib.get('mode', '')}, seed {calib.get('seed')}).", ""]
    ev = report.get("eval")
    if ev and "after" in ev:
        data = ev.get("data") or {}
        lines += [f"**Perplexity** on `{data.get('source', '?')}` ({ev['after'].get('windows')} windows of "
                  f"{ev['after'].get('seq_len')} tokens, measured in the run): "
                  f"{ev['before']['perplexity']:.3f} before pruning"
                  + (f", {ev['pruned']['perplexity']:.3f} after pruning, {ev['after']['perplexity']:.3f} after recovery."
                     if "pruned" in ev else f", {ev['after']['perplexity']:.3f} after."), ""]
    refit = (report.get("stats") or {}).get("refit")
    if refit:
        lines += [refit_summary(refit), ""]
    if (report.get("stats") or {}).get("recover"):
        lines += [f"Recovered with {report['stats']['recover'].get('steps')} steps of LoRA (merged) before slicing.",
                  ""]
    lines += ["## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
              f"`{REPORT_NAME}` in this folder holds the whole report: kept channel indices per layer, timings, "
              "peak memory and package versions" + (f" ({', '.join(f'{k} {v}' for k, v in report['versions'].items())})"
                                                     if report.get("versions") else "") + ".", ""]
    return "\n".join(lines)


def refit_summary(refit: dict) -> str:
    """One line on the refit of the kept down_proj columns (sdmprune.compensation's report)."""
    chosen = [v["strength"] for v in refit.get("layers", {}).values()]
    counts = ", ".join(f"{s} in {chosen.count(s)} layers" for s in sorted(set(chosen), key=float))
    loss = refit.get("held_out_loss") or {}
    return (f"**Refit:** the kept `down_proj` columns were refit in closed form (least squares toward the kept "
            f"weights) on {refit.get('fit_windows')} calibration windows; strength {refit.get('strength')}"
            + (f" ({counts}; relative to the mean diagonal of the Gram)" if counts else "")
            + (f"; reconstruction loss on {refit.get('held_out_windows')} held-out windows (relative, mean over "
               f"layers) {loss['before']:.4f} before, {loss['after']:.4f} after." if loss else "."))


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on ``meta`` (buffers stay real, e.g. rotary inv_freq)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _read_state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        if not (path / name).exists():
            raise InputError(f"{str(path)!r}: missing weights file {name}")
        state.update(load_file(str(path / name)))
    return state


def load_pruned(path: PathLike, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu"):
    """Load a model saved by ``save_pruned``, uniform or not; returns it in eval mode.

    Uniform widths: plain ``AutoModelForCausalLM.from_pretrained``. Non-uniform
    (``config.sdmprune_intermediate_sizes``): the model is built with parameters on meta, every MLP is
    given its layer's width, and the safetensors weights are assigned (tied weights re-tied).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path).expanduser()
    if not (path / "config.json").exists():
        raise InputError(f"{str(path)!r} has no config.json: not a saved model directory")
    config = AutoConfig.from_pretrained(path)
    widths = getattr(config, "sdmprune_intermediate_sizes", None)
    if not widths:
        kw = {"dtype": dtype} if dtype is not None else {}
        return AutoModelForCausalLM.from_pretrained(path, **kw).to(device).eval()

    from ..models import find_gated_mlps

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    mlps = find_gated_mlps(model)
    if len(mlps) != len(widths):
        raise InputError(f"config lists {len(widths)} MLP widths but the model has {len(mlps)} layers")
    for g, width in zip(mlps, widths):
        for lin, shape in ((g.gate, (width, g.hidden_size)), (g.up, (width, g.hidden_size)),
                           (g.down, (g.down.out_features, width))):
            lin.weight = nn.Parameter(torch.empty(shape, device="meta", dtype=lin.weight.dtype))
        for lin in (g.gate, g.up):
            if lin.bias is not None:
                lin.bias = nn.Parameter(torch.empty(width, device="meta", dtype=lin.bias.dtype))
            lin.out_features = width
        g.down.in_features = width
    state = _read_state_dict(path)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise InputError(f"{str(path)!r}: unexpected weights {result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise InputError(f"{str(path)!r}: weights missing from the checkpoint: {missing[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def save_scores(path: PathLike, result, overwrite: bool = False) -> None:
    """safetensors of a PruneResult: scores.{l}, keep.{l} (final) and stage1.scores.{l}, stage1.keep.{l};
    atomic, marked as the package's (so ``overwrite`` may replace it later)."""
    from safetensors.torch import save_file

    path = check_output_file(path, overwrite, flag="--save-scores")
    tensors = {}  # copies: a one-stage method's stage-1 scores are its final scores (one tensor)
    for k in result.keep:
        tensors[f"scores.{k}"] = result.scores[k].detach().float().clone()
        tensors[f"keep.{k}"] = result.keep[k].detach().long().clone()
        if result.stage1_scores is not None:
            tensors[f"stage1.scores.{k}"] = result.stage1_scores[k].detach().float().clone()
        if result.stage1_keep is not None:
            tensors[f"stage1.keep.{k}"] = result.stage1_keep[k].detach().long().clone()
    meta = {"method": str(result.stats.get("method", "")), "width": str(result.width), WRITTEN_BY: "sdmprune prune"}
    with atomic_write_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def package_versions() -> dict:
    """Versions of python and the packages a report should record (those installed)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("sdmprune", "torch", "transformers", "triton", "safetensors", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
