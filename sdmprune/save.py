"""Save a pruned model so that Hugging Face loads it as is, atomically.

``save_pruned`` writes, into a temporary directory beside ``out_dir`` that is renamed into place only
when everything is written: the safetensors weights and ``config.json`` (``save_pretrained``), the
tokenizer files (when given) and ``sdmprune.json`` (the pruning report). An exception at any point
leaves no ``out_dir`` (and an existing one untouched). ``atomic_output_dir`` is the reusable part.

Uniform widths load with plain ``AutoModelForCausalLM.from_pretrained(out_dir)``. Non-uniform widths
(``prune_model_(..., allow_nonuniform=True)``) carry ``sdmprune_intermediate_sizes`` in config.json and
load with ``load_pruned(out_dir)``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from .errors import InputError

__all__ = ["save_pruned", "load_pruned", "atomic_output_dir", "write_json_atomic", "REPORT_NAME"]

REPORT_NAME = "sdmprune.json"
PathLike = Union[str, os.PathLike]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output directory {str(out)!r} exists and is not empty (pass overwrite=True / --overwrite)")


@contextlib.contextmanager
def atomic_output_dir(out_dir: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; on success it becomes ``out_dir``.

    Refuses (InputError, before anything is written) an existing non-empty ``out_dir`` unless
    ``overwrite``, and a path that is a file. On an exception in the body the temporary directory is
    removed and ``out_dir`` is left as it was. On success an existing ``out_dir`` is moved aside,
    the temporary directory renamed to ``out_dir`` (same filesystem: atomic), then the old one removed.
    """
    out = Path(out_dir).expanduser().absolute()
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _check_target(out, overwrite)  # someone may have filled it meanwhile
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "d")
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old / "d", out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if hasattr(obj, "tolist") and getattr(obj, "ndim", 0) > 0:  # numpy arrays
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file in the same dir, fsync, rename).

    Tensors/numpy values become lists or numbers, paths and dtypes strings; NaN/inf are written as
    null-free JSON strings "NaN"/"Infinity"/"-Infinity" so that strict readers accept the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fix(o):
        if isinstance(o, float) and not math.isfinite(o):
            return "NaN" if math.isnan(o) else ("Infinity" if o > 0 else "-Infinity")
        if isinstance(o, dict):
            return {str(k): fix(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [fix(v) for v in o]
        return o

    text = json.dumps(fix(json.loads(json.dumps(obj, default=_jsonable))), indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_pruned(model: nn.Module, tokenizer: Any, out_dir: PathLike, report: dict, overwrite: bool = False) -> Path:
    """Write the pruned model (safetensors + config), the tokenizer (if not None) and ``sdmprune.json``.

    Atomic (see ``atomic_output_dir``); InputError for a non-empty ``out_dir`` unless ``overwrite``.
    Returns the output directory.
    """
    if not isinstance(report, dict):
        raise InputError(f"report must be a dict, got {type(report).__name__}")
    for p in model.parameters():
        if p.device.type == "meta":
            raise InputError("cannot save a model with weights on the meta device (offloaded): load them first")
    out = Path(out_dir).expanduser().absolute()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / REPORT_NAME, report)
    return out


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

    from .models import find_gated_mlps

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
