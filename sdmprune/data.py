"""Calibration and evaluation data.

A source (``--calib`` / ``--ppl`` / ``--eval-ppl``) is one of:

- ``c4``, ``wikitext2``: Hugging Face datasets (need network; offline they fail with one clear error);
  any other ``owner/name`` is tried as a hub dataset with a ``text`` column;
- a local ``.txt`` file (one long text), ``.jsonl`` / ``.json`` / ``.parquet`` file (documents, the
  ``text`` field or the one named by ``text_field``), or a directory of such files (each ``.txt`` file
  one document); local files are read and checked when the source is resolved (UTF-8 text without
  control bytes, valid JSON with the text field in every record), before any model is loaded;
- a ``.pt`` file of token ids ``[n, L]`` (exact reproducibility: used as is);
- ``self``: sequences sampled from the unpruned model itself, starting from BOS, seeded (data-free,
  always works offline).

Calibration windows follow the paper: documents longer than L tokens, one random window of each
(seeded); a single long text (or too few long documents) gives random windows of the text.

Held-out evaluation text sampled from the model (``self``) is one function of the run's seed
(``eval_text_seed``), so ``prune``, ``eval`` and ``finetune`` with the same seed evaluate on the same
text; it never equals the calibration sample of that seed.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from .errors import InputError, require_extra

HUB_DATASETS = {
    # name -> (load_dataset args, kwargs per split, text field)
    "c4": (("allenai/c4",), {
        "train": dict(data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"),
        "test": dict(data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"),
    }, "text"),
    "wikitext2": (("Salesforce/wikitext", "wikitext-2-raw-v1"), {
        "train": dict(split="train"), "test": dict(split="test"),
    }, "text"),
}
ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wikitext2-raw": "wikitext2"}
TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")
DOC_SUFFIXES = (".jsonl", ".json", ".parquet")
# the held-out 'self' evaluation text of a run with seed s is sampled with seed s + EVAL_SEED_OFFSET
EVAL_SEED_OFFSET = 1000
# control bytes (other than tab, newlines, form feed) allowed per million bytes of a text file
CONTROL_BYTES_PER_MILLION = 1000
_CONTROL_BYTES = bytes(b for b in range(32) if chr(b) not in "\t\n\r\f")


def eval_text_seed(seed: int) -> int:
    """The sampling seed of the held-out 'self' evaluation text of a run with ``seed`` (never the
    calibration seed, so the evaluation text is not the calibration sample)."""
    return int(seed) + EVAL_SEED_OFFSET


@dataclass
class SourceSpec:
    """A validated data source. ``kind``: self | tokens | text | docs | dir | hub."""

    raw: str
    kind: str
    path: Optional[str] = None
    hub_name: Optional[str] = None
    info: dict = field(default_factory=dict)
    text_field: str = "text"
    texts: Optional[List[str]] = None  # local text/docs sources: read and checked by resolve_source
    is_documents: bool = False
    tokens: Optional[torch.Tensor] = None  # a .pt source: its token ids, read and checked by resolve_source

    def describe(self) -> str:
        if self.kind == "self":
            return "self: sequences sampled from the unpruned model (BOS start, seeded)"
        if self.kind == "hub":
            return f"hub dataset {self.hub_name}"
        return f"{self.kind} {self.path}"


def network_ok(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") == "1" or os.environ.get("HF_DATASETS_OFFLINE", "0") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_source(src: str, what: str = "data", text_field: str = "text") -> SourceSpec:
    """Validate ``src`` before any model is loaded: a local text or document source is read and checked
    here (one InputError line for anything that is not text, not valid JSON, or lacks ``text_field``)."""
    if src is None or str(src).strip() == "":
        raise InputError(f"empty {what} source")
    src = str(src)
    if src == "self":
        return SourceSpec(src, "self")
    path = os.path.expanduser(src)
    if os.path.isdir(path):
        files = _dir_files(path)
        if not files:
            raise InputError(f"{what} directory {src!r} has no .txt/.jsonl/.parquet files")
        spec = SourceSpec(src, "dir", path=path, text_field=text_field)
        docs = []
        for f in files:
            docs.extend([read_text_file(f, what)] if f.lower().endswith(TEXT_SUFFIXES)
                        else _read_docs_file(f, what, text_field))
        spec.texts, spec.is_documents = docs, True
        return spec
    if os.path.isfile(path):
        low = path.lower()
        if low.endswith(".pt"):
            return SourceSpec(src, "tokens", path=path, tokens=load_token_file(path))
        if low.endswith(DOC_SUFFIXES):
            spec = SourceSpec(src, "docs", path=path, text_field=text_field)
            spec.texts, spec.is_documents = _read_docs_file(path, what, text_field), True
            if not spec.texts:
                raise InputError(f"{what} file {src!r} holds no text")
            return spec
        spec = SourceSpec(src, "text", path=path)
        spec.texts, spec.is_documents = [read_text_file(path, what)], False
        return spec
    looks_like_path = src.startswith((".", "/", "~")) or os.sep in src and not _looks_like_hub_id(src) \
        or src.lower().endswith((".pt",) + TEXT_SUFFIXES + DOC_SUFFIXES)
    if looks_like_path:
        raise InputError(f"{what} file {src!r} does not exist")
    name = ALIASES.get(src.lower(), src.lower())
    known = name in HUB_DATASETS
    if not network_ok():
        if known:
            raise InputError(f"{what} source {src!r} is a Hugging Face dataset and there is no network; "
                             "use a local file (.txt/.jsonl/.parquet/.pt) or 'self'")
        raise InputError(f"unknown {what} source {src!r}: not a local file, not 'self', and without network "
                         "it cannot be fetched as a Hugging Face dataset (known: c4, wikitext2)")
    return SourceSpec(src, "hub", hub_name=name if known else src)


def _looks_like_hub_id(src: str) -> bool:
    parts = src.split("/")
    return len(parts) == 2 and all(parts) and not src.startswith((".", "/", "~"))


def _dir_files(path: str) -> List[str]:
    out = []
    for root, _, names in os.walk(path):
        for n in sorted(names):
            if n.lower().endswith(TEXT_SUFFIXES + DOC_SUFFIXES):
                out.append(os.path.join(root, n))
    return sorted(out)


def read_text_file(path: str, what: str = "data") -> str:
    """The file's text; InputError when it is not UTF-8 or holds control bytes (a binary file)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputError(f"{what} file {path!r} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} file {path!r} does not look like text: it is not UTF-8 (byte {exc.start})") from None
    control = len(raw) - len(raw.translate(None, _CONTROL_BYTES))
    if b"\0" in raw or control * 1_000_000 > CONTROL_BYTES_PER_MILLION * max(1, len(raw)):
        raise InputError(f"{what} file {path!r} does not look like text: it holds NUL or control bytes")
    return text


def _record_text(row, path: str, where: str, text_field: str):
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise InputError(f"{path}: {where} is a {type(row).__name__}, not a record with a {text_field!r} field")
    if text_field not in row:
        fields = ", ".join(list(row)[:8]) or "none"
        raise InputError(f"{path}: {where} has no {text_field!r} field (fields: {fields}); name the text field "
                         "with --text-field")
    text = row[text_field]
    if text is not None and not isinstance(text, str):
        raise InputError(f"{path}: {where}: field {text_field!r} is a {type(text).__name__}, not text")
    return text


def _read_docs_file(path: str, what: str = "data", text_field: str = "text") -> List[str]:
    """The documents of a .jsonl / .json / .parquet file (field ``text_field``); InputError for a file
    that is not valid, or a record without the field."""
    low = path.lower()
    if low.endswith(".parquet"):
        require_extra("pyarrow", "reading .parquet files")
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise InputError(f"{what} file {path!r} is not a readable parquet file ({type(exc).__name__})") from None
        if text_field not in table.column_names:
            raise InputError(f"{path}: no {text_field!r} column (columns: {', '.join(table.column_names)}); name "
                             "the text column with --text-field")
        return [t for t in table.column(text_field).to_pylist() if t]
    text = read_text_file(path, what)
    docs = []
    if low.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{what} file {path!r} is not valid JSON: {exc}") from None
        rows = data if isinstance(data, list) else [data]
        for i, row in enumerate(rows):
            t = _record_text(row, path, f"record {i + 1}", text_field)
            if t:
                docs.append(t)
        return docs
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{what} file {path!r}: line {n} is not valid JSON ({exc.msg})") from None
        t = _record_text(row, path, f"line {n}", text_field)
        if t:
            docs.append(t)
    return docs


def load_documents(spec: SourceSpec, split: str = "train") -> Tuple[List[str], bool]:
    """(texts, is_documents): one long text (False) or a list of documents (True)."""
    if spec.texts is not None:
        return spec.texts, spec.is_documents
    if spec.kind == "hub":
        return _load_hub(spec, split)
    raise ValueError(spec.kind)


def _load_hub(spec: SourceSpec, split: str):
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover
        raise InputError("the 'datasets' package is needed for hub datasets: pip install datasets") from exc
    try:
        if spec.hub_name in HUB_DATASETS:
            args, per_split, col = HUB_DATASETS[spec.hub_name]
            ds = load_dataset(*args, **per_split["test" if split == "test" else "train"])
        else:
            ds = load_dataset(spec.hub_name, split=split if split == "train" else "test")
            col = "text"
    except Exception as exc:  # network, missing split, ... -> one clear line
        raise InputError(f"could not load dataset {spec.raw!r} from the Hugging Face hub: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    texts = ds[col]
    if spec.hub_name == "wikitext2":  # the usual protocol: the split is one text joined by blank lines
        return ["\n\n".join(texts)], False
    return [t for t in texts if t], True


def check_token_ids(tokens: torch.Tensor, vocab: Optional[int], what: str) -> None:
    """InputError unless every id in ``tokens`` is inside the model's vocabulary [0, vocab) (``what``
    names the tokens in the message; ``vocab`` None: not known, nothing to check)."""
    if vocab is None or tokens.numel() == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= int(vocab):
        raise InputError(f"{what}: token ids must be in [0, {int(vocab)}), the model's vocabulary; "
                         f"they span [{low}, {high}]")


def is_text(spec: SourceSpec) -> bool:
    """Whether the source must be tokenized (text, documents, a hub dataset), not token ids or 'self'."""
    return spec.kind not in ("self", "tokens")


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise InputError("this data source is text and the model has no tokenizer; use a .pt token file or 'self'")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(src, tokenizer, n: int, seq_len: int, seed: int = 0, model=None,
                        batch_size: int = 8) -> Tuple[torch.Tensor, dict]:
    """``n`` calibration windows of ``seq_len`` tokens ([n, seq_len] int64) and a description dict."""
    spec = src if isinstance(src, SourceSpec) else resolve_source(src, "calibration")
    if n < 1 or seq_len < 2:
        raise InputError(f"need at least 1 sample of at least 2 tokens (got {n} x {seq_len})")
    desc = {"source": spec.raw, "kind": spec.kind, "samples": n, "seq_len": seq_len, "seed": seed}
    if spec.kind == "self":
        if model is None:
            raise InputError("calibration source 'self' needs the model")
        toks = sample_from_model(model, tokenizer, n, seq_len, seed=seed, batch_size=batch_size)
        desc["mode"] = "sampled from the unpruned model (multinomial, T=1, BOS start)"
        return toks, desc
    if spec.kind == "tokens":
        toks = spec.tokens if spec.tokens is not None else load_token_file(spec.path)
        if toks.dim() != 2:
            raise InputError(f"{spec.raw}: calibration token file must hold a [n, L] tensor, got {tuple(toks.shape)}")
        if toks.shape[0] < n or toks.shape[1] < seq_len:
            raise InputError(f"{spec.raw} holds {toks.shape[0]} x {toks.shape[1]} tokens; "
                             f"{n} samples x {seq_len} tokens were asked")
        desc["mode"] = "token file, first n rows / seq_len columns"
        return toks[:n, :seq_len].contiguous(), desc
    texts, is_docs = load_documents(spec, "train")
    g = torch.Generator().manual_seed(seed)
    if is_docs:
        order = torch.randperm(len(texts), generator=g).tolist()
        windows = []
        for i in order:
            ids = _tokenize(tokenizer, texts[i])
            if ids.numel() > seq_len:
                start = int(torch.randint(0, ids.numel() - seq_len, (1,), generator=g))
                windows.append(ids[start:start + seq_len])
                if len(windows) == n:
                    break
        if len(windows) == n:
            desc["mode"] = f"documents longer than {seq_len} tokens, one random window each (seeded)"
            return torch.stack(windows), desc
        # too few long documents: fall back to random windows of their concatenation
        texts = ["\n\n".join(texts)]
        desc["mode_note"] = f"only {len(windows)} documents longer than {seq_len} tokens; using the concatenation"
    ids = _tokenize(tokenizer, texts[0])
    if ids.numel() < seq_len:
        raise InputError(f"calibration text {spec.raw!r} has {ids.numel()} tokens, shorter than one "
                         f"window of {seq_len}")
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=g)
    desc["mode"] = "random windows of one long text (seeded)"
    desc["text_tokens"] = int(ids.numel())
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()]), desc


def eval_token_stream(src, tokenizer, model=None, max_tokens: Optional[int] = None,
                      seed: int = 0, seq_len: int = 2048) -> Tuple[torch.Tensor, dict]:
    """A 1-D token stream for perplexity (the test split / the file joined) and a description dict.

    For ``self`` the text is sampled from the model with ``eval_text_seed(seed)`` (``seed``: the run's
    seed), as ``max_tokens // seq_len`` sequences of ``seq_len`` (``max_tokens`` required).
    """
    spec = src if isinstance(src, SourceSpec) else resolve_source(src, "evaluation")
    desc = {"source": spec.raw, "kind": spec.kind}
    if spec.kind == "self":
        if model is None or not max_tokens:
            raise InputError("evaluation on 'self' needs the model and a token budget")
        n = max(1, max_tokens // seq_len)
        toks = sample_from_model(model, tokenizer, n, seq_len, seed=eval_text_seed(seed))
        desc["mode"] = f"held-out text sampled from the unpruned model (seed {eval_text_seed(seed)})"
        return toks.reshape(-1), desc
    if spec.kind == "tokens":
        toks = (spec.tokens if spec.tokens is not None else load_token_file(spec.path)).reshape(-1)
    else:
        texts, is_docs = load_documents(spec, "test")
        toks = _tokenize(tokenizer, "\n\n".join(texts))
    if max_tokens:
        toks = toks[:max_tokens]
        desc["max_tokens"] = int(max_tokens)
    return toks, desc


def load_token_file(path: str) -> torch.Tensor:
    """A tensor of token ids saved with torch.save (int64)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a torch tensor file ({type(exc).__name__})") from exc
    if isinstance(obj, dict) and "input_ids" in obj:
        obj = obj["input_ids"]
    if not torch.is_tensor(obj) or obj.is_floating_point() or obj.is_complex():
        raise InputError(f"{path}: expected an integer tensor of token ids")
    return obj.long()


@torch.no_grad()
def sample_from_model(model, tokenizer, n: int, seq_len: int, seed: int = 0, batch_size: int = 8,
                      temperature: float = 1.0) -> torch.Tensor:
    """``n`` sequences of ``seq_len`` tokens sampled from ``model`` ([n, seq_len] int64, on CPU).

    Each starts with the BOS token (tokenizer's, else the config's, else EOS) and continues by plain
    multinomial sampling at ``temperature`` through ``model.generate`` (KV cache; no top-k/top-p, no
    repetition penalty, and no stop at EOS, so every row has ``seq_len`` tokens). The sampling RNG is
    seeded with ``seed`` inside a forked RNG state: the same seed gives the same tokens, and the
    caller's global RNG is left as it was.
    """
    from transformers import GenerationConfig

    bos = None
    for obj, attr in ((tokenizer, "bos_token_id"), (model.config, "bos_token_id"),
                      (tokenizer, "eos_token_id"), (model.config, "eos_token_id")):
        val = getattr(obj, attr, None) if obj is not None else None
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        if val is not None:
            bos = int(val)
            break
    if bos is None:
        raise InputError("cannot sample 'self' data: the model has no BOS/EOS token id")
    device = next(model.parameters()).device
    config = GenerationConfig(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0,
                              repetition_penalty=1.0, max_new_tokens=seq_len - 1, min_new_tokens=0,
                              eos_token_id=[], pad_token_id=bos, use_cache=True)  # []: never stop at EOS
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                seq = torch.full((b, 1), bos, dtype=torch.long, device=device)
                if seq_len > 1:
                    seq = model.generate(input_ids=seq, attention_mask=torch.ones_like(seq),
                                         generation_config=config)
                out.append(seq.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
