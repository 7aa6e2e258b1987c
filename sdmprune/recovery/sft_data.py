"""Recovery data: instruction records or plain text -> tokenized records -> packed training rows.

A *record* is one training example: ``input_ids`` and ``labels`` of the same length, ``labels`` -100
where no loss is taken (the prompt of an instruction record). A *row* is what the model sees: one
sequence of ``seq_len`` tokens holding one or more records back to back (packing) plus padding.

Records never attend to each other inside a packed row: position ids restart at 0 for every record,
and transformers (5.x, sdpa/eager/flash) builds a block-diagonal causal mask from the restarts when
the model is called with ``attention_mask=None`` and ``use_cache=False`` (with a cache it does not:
the caller must pass ``use_cache=False``; tests/test_recover.py checks a packed record's logits
against the record alone). Targets are shifted *inside* each record, so the last token of a record
never predicts the first token of the next one. Padding has target -100 and ``kl_mask`` False.

Sources (``load_records``):
  * ``*.jsonl`` / ``*.json`` / ``*.parquet``: instruction records, either ``instruction`` (+ optional
    ``input``) with ``output`` (or ``response``), or ``messages`` (a chat: role/content dicts). They
    are rendered with the tokenizer's chat template when it has one, else with an Alpaca-style
    prompt; the loss is on the response tokens (every assistant turn) and the EOS token only.
  * any other file (``.txt``, ``.raw``): plain text, loss on every token; the token stream is cut
    into records of ``seq_len`` tokens.
  * ``self``: sequences sampled from the unpruned model (``sdmprune.data.sample_from_model``), loss
    on every token.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..data import read_text_file
from ..errors import InputError, require_extra

IGNORE_INDEX = -100
INSTRUCTION_SUFFIXES = (".jsonl", ".json", ".parquet")
RESPONSE_KEYS = ("output", "response", "completion", "answer")

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Record:
    """One example: token ids and per-token labels (same length; -100 = no loss on that token)."""

    input_ids: List[int]
    labels: List[int]


@dataclass
class Rows:
    """Training rows [R, L]: ``input_ids`` and ``position_ids`` (restarting per record), ``targets``
    already shifted (target of token t = label of token t+1 in the same record, else -100) and
    ``kl_mask`` (True on every real, non-padding token)."""

    input_ids: torch.Tensor  # [R, L] int64
    position_ids: torch.Tensor  # [R, L] int64
    targets: torch.Tensor  # [R, L] int64, -100 = no CE
    kl_mask: torch.Tensor  # [R, L] bool, False on padding
    description: Dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


# ----------------------------------------------------------------------------------------------
# reading sources


def _read_instruction_file(path: Path) -> List[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        require_extra("pyarrow", f"{path}: reading parquet")
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise InputError(f"data file {str(path)!r} is not a readable parquet file ({type(exc).__name__})") from None
    text = read_text_file(str(path), "data")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from exc
        if not all(isinstance(r, dict) for r in data):
            raise InputError(f"{path}: expected a list of objects")
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"data file {str(path)!r}: line {n} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{n}: expected a JSON object per line")
        records.append(obj)
    return records


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _to_messages(obj: dict, where: str) -> List[dict]:
    """A record as a chat; raises InputError when it has no response."""
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise InputError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        if not any(m["role"] == "assistant" and str(m["content"]).strip() for m in msgs):
            raise InputError(f"{where}: record has no assistant response")
        return msgs
    instruction = obj.get("instruction", obj.get("prompt"))
    if instruction is None:
        raise InputError(f"{where}: record has neither 'messages' nor 'instruction' (keys: {sorted(obj)})")
    response = next((obj[k] for k in RESPONSE_KEYS if k in obj), None)
    if response is None or not str(response).strip():
        raise InputError(f"{where}: record has no response ('output' or 'response' missing or empty)")
    user = str(instruction)
    if obj.get("input"):
        user = f"{user}\n\n{obj['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": str(response)}]


def _render_segments(messages: List[dict], tokenizer) -> List[tuple]:
    """[(text, is_response)] whose concatenation is the whole rendered conversation."""
    if _has_chat_template(tokenizer):
        segments, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                # A template that rewrites earlier turns: fall back to the last turn only.
                prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
                full = tokenizer.apply_chat_template(messages, tokenize=False)
                return [(prompt, False), (full[len(prompt):], True)]
            segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        return segments
    # No chat template: Alpaca-style prompt, one user turn -> one response.
    user = "\n\n".join(str(m["content"]) for m in messages if m["role"] != "assistant")
    response = next(str(m["content"]) for m in reversed(messages) if m["role"] == "assistant")
    return [(ALPACA_PROMPT.format(instruction=user), False), (response, True)]


def _tokenize_segments(segments: List[tuple], tokenizer) -> Record:
    ids: List[int] = []
    labels: List[int] = []
    for k, (text, is_response) in enumerate(segments):
        if not text:
            continue
        t = tokenizer(text, add_special_tokens=(k == 0 and not _has_chat_template(tokenizer)))["input_ids"]
        ids += t
        labels += t if is_response else [IGNORE_INDEX] * len(t)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        # The model learns to stop: EOS after the response carries a label.
        ids.append(eos)
        labels.append(eos)
    return Record(ids, labels)


def check_source(src) -> None:
    """Validate a data source without a tokenizer (cheap; raises InputError): the file exists, is not
    empty, and every instruction record has a response."""
    if str(src) == "self":
        return
    path = Path(os.path.expanduser(str(src)))
    if not path.is_file():
        raise InputError(f"data {src}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"data {src}: file is empty")
    if path.suffix.lower() in INSTRUCTION_SUFFIXES:
        raw = _read_instruction_file(path)
        if not raw:
            raise InputError(f"data {src}: no records")
        for n, obj in enumerate(raw, 1):
            _to_messages(obj, f"{path} record {n}")
    elif not read_text_file(str(path), "data").strip():
        raise InputError(f"data {src}: file has no text")


def instruction_records(path: Path, tokenizer) -> List[Record]:
    """Tokenized instruction records (loss on response tokens + EOS)."""
    raw = _read_instruction_file(path)
    if not raw:
        raise InputError(f"{path}: no records")
    return [_tokenize_segments(_render_segments(_to_messages(obj, f"{path} record {n}"), tokenizer), tokenizer)
            for n, obj in enumerate(raw, 1)]


def text_records(text: str, tokenizer, seq_len: int, *, where: str = "text") -> List[Record]:
    """Plain text as a token stream cut into records of ``seq_len`` tokens (loss on every token)."""
    lines = [ln for ln in text.split("\n")]
    ids: List[int] = []
    bos = tokenizer.bos_token_id
    if bos is not None:
        ids.append(bos)
    # Tokenize in blocks of lines: one call over a multi-MB string is slow and memory hungry.
    block = 2000
    for i in range(0, len(lines), block):
        chunk = "\n".join(lines[i:i + block])
        if i + block < len(lines):
            chunk += "\n"
        ids += tokenizer(chunk, add_special_tokens=False)["input_ids"]
    if len(ids) < 2 + (bos is not None):
        raise InputError(f"{where}: no text (fewer than 2 tokens)")
    return [Record(ids[i:i + seq_len], ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)
            if len(ids[i:i + seq_len]) >= 2]


def load_records(src, tokenizer, seq_len: int, *, self_model=None, self_samples: int = 32,
                 self_length: int = 256, seed: int = 0) -> tuple:
    """(records, description) for a data source: a path (instruction or text file) or ``"self"``.

    ``self_model`` is the unpruned model to sample from when ``src == "self"`` (a callable returning
    the model is accepted too, so that nothing is loaded unless needed)."""
    if str(src) == "self":
        if self_model is None:
            raise InputError("--data self needs the unpruned model to sample from (pass --teacher, or recover before slicing)")
        from ..data import sample_from_model

        m = self_model() if callable(self_model) and not isinstance(self_model, torch.nn.Module) else self_model
        length = min(seq_len, self_length)
        seqs = sample_from_model(m, tokenizer, self_samples, length, seed=seed)
        records = [Record(row.tolist(), row.tolist()) for row in seqs]
        return records, {"source": "self", "kind": "text sampled from the unpruned model (loss on all tokens)",
                         "samples": self_samples, "sample_len": length, "seed": seed}
    path = Path(os.path.expanduser(str(src)))
    if not path.exists():
        raise InputError(f"data {src}: no such file")
    if path.is_dir():
        raise InputError(f"data {src}: is a directory (give a .jsonl/.json/.parquet or a text file)")
    if path.stat().st_size == 0:
        raise InputError(f"data {src}: file is empty")
    if path.suffix.lower() in INSTRUCTION_SUFFIXES:
        records = instruction_records(path, tokenizer)
        kind = "instruction records (loss on responses)"
    else:
        text = read_text_file(str(path), "data")
        if not text.strip():
            raise InputError(f"data {src}: file has no text")
        records = text_records(text, tokenizer, seq_len, where=f"data {src}")
        kind = "plain text (loss on all tokens)"
    return records, {"source": str(path), "kind": kind, "records": len(records)}


# ----------------------------------------------------------------------------------------------
# packing


def _shifted(record: Record) -> List[int]:
    """Targets of a record: label of the next token inside the record; the last token has none."""
    return record.labels[1:] + [IGNORE_INDEX]


def build_rows(records: Sequence[Record], seq_len: int, *, pad_id: int, packing: bool = True) -> Rows:
    """Pack (or pad) records into rows of exactly ``seq_len`` tokens.

    Records longer than ``seq_len`` are truncated; with packing, records are placed greedily in
    order (first fit into the current row, else a new row). Without packing each record is a row.
    Padding: token ``pad_id``, its own position run starting at 0, target -100, kl_mask False."""
    if not records:
        raise InputError("no training records")
    rows_ids, rows_pos, rows_tgt, rows_kl = [], [], [], []
    cur_ids, cur_pos, cur_tgt, cur_kl = [], [], [], []
    truncated = 0

    def flush():
        nonlocal cur_ids, cur_pos, cur_tgt, cur_kl
        if not cur_ids:
            return
        pad = seq_len - len(cur_ids)
        rows_ids.append(cur_ids + [pad_id] * pad)
        rows_pos.append(cur_pos + list(range(pad)))
        rows_tgt.append(cur_tgt + [IGNORE_INDEX] * pad)
        rows_kl.append(cur_kl + [False] * pad)
        cur_ids, cur_pos, cur_tgt, cur_kl = [], [], [], []

    for r in records:
        if len(r.input_ids) > seq_len:
            truncated += 1
            r = Record(r.input_ids[:seq_len], r.labels[:seq_len])
        if not packing or len(cur_ids) + len(r.input_ids) > seq_len:
            flush()
        cur_ids += r.input_ids
        cur_pos += list(range(len(r.input_ids)))
        cur_tgt += _shifted(r)
        cur_kl += [True] * len(r.input_ids)
    flush()
    rows = Rows(
        torch.tensor(rows_ids, dtype=torch.long),
        torch.tensor(rows_pos, dtype=torch.long),
        torch.tensor(rows_tgt, dtype=torch.long),
        torch.tensor(rows_kl, dtype=torch.bool),
    )
    n_loss = int((rows.targets != IGNORE_INDEX).sum())
    if n_loss == 0:
        raise InputError("the data has no token to take a loss on (every response empty or truncated away)")
    rows.description = {"records": len(records), "rows": len(rows), "seq_len": seq_len, "packing": packing,
                        "truncated_records": truncated, "loss_tokens": n_loss,
                        "tokens": int(rows.kl_mask.sum())}
    return rows
