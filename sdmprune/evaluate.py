"""Evaluation: perplexity (the usual protocol) and lm-eval-harness tasks; the ``sdmprune eval`` command.

Perplexity: the whole tokenized test text in non-overlapping windows of ``seq_len`` (a trailing
partial window is dropped), exp(mean NLL over all predicted tokens, ``seq_len - 1`` per window).
The NLL comes from the fused LM-head loss (final hidden states x LM-head weight, chunked over
tokens and vocabulary; Triton on CUDA, its PyTorch reference elsewhere): no [tokens, vocab] logits
tensor. ``backend="logits"`` uses the model's own logits instead (fine for small vocabularies).
The result is a float carrying how it was computed (``.backend``, ``.tokens``, ``.windows``).
Held-out 'self' text is sampled with the seed rule of ``sdmprune.data.eval_text_seed``.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import InputError, one_line, require_extra


class Perplexity(float):
    """A perplexity value (a float) with ``nll`` (mean), ``tokens`` (predicted), ``windows``,
    ``seq_len`` and ``backend`` ("fused-triton", "fused-torch" or "logits")."""

    def __new__(cls, value, **info):
        obj = super().__new__(cls, value)
        obj.__dict__.update(info)
        return obj

    def to_dict(self) -> dict:
        return {"perplexity": float(self), **self.__dict__}


def _fused_loss():
    try:
        from sdmprune.kernels.fused_linear_distill_loss import fused_linear_distill_loss
    except ModuleNotFoundError:
        return None
    return fused_linear_distill_loss


def perplexity_windows(n_tokens: int, seq_len: int, max_windows: Optional[int] = None) -> int:
    """How many windows of ``seq_len`` a perplexity over ``n_tokens`` tokens takes (at most
    ``max_windows``); InputError when the text is shorter than one window."""
    n = int(n_tokens) // int(seq_len)
    if max_windows:
        n = min(n, int(max_windows))
    if n < 1:
        raise InputError(f"evaluation text has {n_tokens} tokens, shorter than one window of {seq_len}")
    return n


@torch.no_grad()
def evaluate_perplexity(model, tokens_or_text, tokenizer=None, seq_len: int = 2048, batch_size: int = 1,
                        device=None, max_windows: Optional[int] = None, backend: str = "auto",
                        progress: bool = False) -> Perplexity:
    """Perplexity of ``model`` on a token stream (1-D LongTensor, or [n, L] flattened) or a text.

    backend: "auto" (fused loss: Triton on CUDA, torch elsewhere), "triton", "torch", or "logits".
    max_windows: at most this many windows (None: all). progress: a bar over the windows on stderr.
    Raises InputError when the text is shorter than one window.
    """
    from tqdm.auto import tqdm

    from .models import get_adapter
    from .scoring.objectives import head_states

    if max_windows is not None and int(max_windows) < 1:
        raise InputError(f"max_windows {max_windows} must be at least 1 (None: every window)")
    if int(batch_size) < 1 or int(seq_len) < 2:
        raise InputError(f"batch_size {batch_size} must be at least 1 and seq_len {seq_len} at least 2")

    if isinstance(tokens_or_text, str):
        if tokenizer is None:
            raise InputError("evaluating a text needs a tokenizer")
        ids = tokenizer(tokens_or_text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        tokens = torch.tensor(ids, dtype=torch.long)
    else:
        tokens = torch.as_tensor(tokens_or_text).long().reshape(-1)
    n = perplexity_windows(tokens.numel(), seq_len, max_windows)
    windows = tokens[: n * seq_len].view(n, seq_len)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    fused = _fused_loss() if backend != "logits" else None
    if backend in ("triton", "torch") and fused is None:
        raise InputError("the fused loss kernel module is not available")
    if fused is None:
        used = "logits"
    elif backend == "auto":
        used = "fused-triton" if dev.type == "cuda" else "fused-torch"
    else:
        used = f"fused-{backend}"
    adapter = get_adapter(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    count = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc="perplexity", unit="window", dynamic_ncols=True, disable=not progress, file=sys.stderr)
    try:
        for start in range(0, n, batch_size):
            x = windows[start:start + batch_size].to(dev)
            b = x.shape[0]
            labels = torch.full_like(x, -100)
            labels[:, :-1] = x[:, 1:]
            rows = b * (seq_len - 1)
            if used == "logits":
                logits = model(input_ids=x, use_cache=False).logits
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                      ignore_index=-100, reduction="sum")
            else:
                h = head_states(model, x, adapter=adapter)
                w = adapter.lm_head(model).weight
                mean = fused(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), None, alpha=0.0,
                             backend=used.split("-", 1)[1])
                nll = mean.double() * rows
            total_nll += float(nll)
            count += rows
            bar.update(b)
    finally:
        bar.close()
        model.train(was_training)
    mean_nll = total_nll / count
    return Perplexity(math.exp(mean_nll), nll=mean_nll, tokens=count, windows=n, seq_len=seq_len,
                      backend=used, seconds=round(time.perf_counter() - t0, 3))


def perplexity_on_source(model, tokenizer, src, seq_len: int, max_windows: Optional[int] = None,
                         batch_size: int = 1, seed: int = 0, tokens: Optional[torch.Tensor] = None,
                         progress: bool = False):
    """(Perplexity, tokens, description) on a data source (see sdmprune.data); ``seed``: the run's seed
    (decides 'self' text). Pass ``tokens`` to reuse a stream."""
    from .data import eval_token_stream

    desc = {}
    if tokens is None:
        budget = max_windows * seq_len if max_windows else None
        tokens, desc = eval_token_stream(src, tokenizer, model=model, max_tokens=budget, seed=seed, seq_len=seq_len)
    ppl = evaluate_perplexity(model, tokens, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows,
                              progress=progress)
    return ppl, tokens, desc


# the zero-shot set pruning papers (SDMPrune, LLM-Pruner) report: `--tasks paper` (needs the hub)
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def resolve_tasks(spec: str, include_path: Optional[str] = None):
    """(task names or YAML paths, lm-eval TaskManager) for ``--tasks`` (comma list; ``paper`` = PAPER_TASKS)
    and ``--include-path`` (a folder of local task YAMLs). One InputError line for lm-eval missing, a
    missing or unreadable task YAML, a missing folder, a name lm-eval does not know, or, without network,
    a hub dataset a task reads that is not in the local cache. Reading the task index takes lm-eval a
    few seconds; it is done before any model is loaded."""
    require_extra("lm_eval", "--tasks")
    names = []
    for t in (x.strip() for x in spec.split(",")):
        if t:
            names.extend(PAPER_TASKS if t == "paper" else [t])
    if not names:
        raise InputError("--tasks: no task named")
    if include_path is not None and not os.path.isdir(os.path.expanduser(include_path)):
        raise InputError(f"--include-path {include_path!r} is not a folder")
    for t in names:  # task files first: reading lm-eval's task index takes seconds
        if t.endswith((".yaml", ".yml")):
            if not os.path.isfile(os.path.expanduser(t)):
                raise InputError(f"--tasks: task file {t!r} does not exist")
            _task_file_config(t, f"--tasks: task file {t!r}")
    manager = _task_manager(os.path.abspath(os.path.expanduser(include_path)) if include_path else None)
    known = set(manager.all_tasks)
    for t in names:
        if not t.endswith((".yaml", ".yml")) and t not in known:
            raise InputError(f"--tasks: lm-eval knows no task, group or tag {t!r}"
                             + (_unreadable_task_file(include_path) if include_path
                                else " (local task folders: --include-path DIR)"))
    _check_task_datasets_reachable(manager, names)
    return names, manager


def _task_file_config(path: str, what: str) -> dict:
    """A task YAML as lm-eval reads it (includes merged, ``!function`` tags left unresolved); one
    InputError line naming the file and the place for one it cannot read."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(os.path.expanduser(path), resolve_func=False)
    except Exception as exc:  # noqa: BLE001 - yaml errors, a missing include, a cycle: one line
        raise InputError(f"{what} is not a readable lm-eval task: {type(exc).__name__}: {one_line(exc)}") from None
    if not (cfg.get("task") or cfg.get("group")):
        raise InputError(f"{what} is not an lm-eval task: it has neither a 'task' nor a 'group' key")
    return cfg


def _unreadable_task_file(include_path: str) -> str:
    """A note on the first YAML in ``include_path`` that lm-eval skips because it cannot read it."""
    for dirpath, _, files in sorted(os.walk(os.path.expanduser(include_path))):
        for n in sorted(files):
            if n.endswith(".yaml"):
                path = os.path.join(dirpath, n)
                try:
                    _task_file_config(path, path)
                except InputError as exc:
                    return f" (lm-eval skips what it cannot read in --include-path: {exc})"
    return ""


# dataset builders that read local files (dataset_path: json with data_files, ...), offline by nature
LOCAL_DATASET_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")


def _task_datasets(manager, names) -> list:
    """(task, hub dataset "path" or "path name") of every task behind ``names`` (tasks, groups, tags and
    task YAML paths, groups and tags expanded) whose data comes from the Hugging Face hub."""
    from lm_eval.tasks._index import Kind

    out, seen = [], set()

    def task_cfg(name, cfg):
        path = cfg.get("dataset_path")
        if not isinstance(path, str) or path in LOCAL_DATASET_BUILDERS or os.path.exists(os.path.expanduser(path)):
            return
        name_ = cfg.get("dataset_name")
        out.append((name, path + (f" {name_}" if name_ else "")))

    def visit(item):
        if isinstance(item, dict):  # an inline task of a group
            if isinstance(item.get("task"), str) and "group" not in item:
                task_cfg(item["task"], item)
            return
        if item in seen:
            return
        seen.add(item)
        if str(item).endswith((".yaml", ".yml")):
            cfg = _task_file_config(item, f"--tasks: task file {item!r}")
            if cfg.get("group"):
                for member in cfg.get("task") or ():
                    visit(member)
            else:
                task_cfg(cfg["task"], cfg)
            return
        entry = manager.task_index.get(item)
        if entry is None:
            return
        if entry.kind == Kind.TAG:
            for member in sorted(entry.tags):
                visit(member)
        elif entry.kind == Kind.GROUP:
            members = (entry.cfg or {}).get("task") or ()
            for member in members if isinstance(members, list) else [members]:
                visit(member)
        elif entry.cfg:
            task_cfg(item, entry.cfg)

    for n in names:
        visit(n)
    return out


def _dataset_cached(dataset: str) -> bool:
    """Whether a hub dataset ("path" or "path name") has a copy in the local Hugging Face caches."""
    from huggingface_hub import constants

    path = dataset.split(" ", 1)[0]
    hub = os.path.join(constants.HF_HUB_CACHE, "datasets--" + path.replace("/", "--"))
    try:
        import datasets

        processed = os.path.join(datasets.config.HF_DATASETS_CACHE, path.replace("/", "___"))
    except ImportError:
        processed = None
    return os.path.isdir(hub) or (processed is not None and os.path.isdir(processed))


def _check_task_datasets_reachable(manager, names) -> None:
    """Without network (sdmprune.data's check: no waiting for the hub's retries), every hub dataset the
    tasks read must be in the local cache; otherwise one line saying which task needs which dataset."""
    from .data import network_ok

    if network_ok():
        return
    missing = [(t, d) for t, d in _task_datasets(manager, names) if not _dataset_cached(d)]
    if missing:
        listed = ", ".join(f"{t} needs {d}" for t, d in missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise InputError(f"--tasks: no network to reach the Hugging Face hub, and these datasets are not in the "
                         f"local cache: {listed}; run once with network to cache them (then HF_DATASETS_OFFLINE=1 "
                         "runs offline), or give local tasks: --include-path DIR with task YAMLs whose "
                         "dataset_path is json and data_files local files")


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: Optional[str]):
    """lm-eval's task index (it reads thousands of YAML files: once per folder and process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def evaluate_tasks(model, tokenizer, tasks, batch_size: int = 1, limit=None, num_fewshot: Optional[int] = None,
                   task_manager=None) -> dict:
    """lm-eval-harness ``tasks`` on the loaded model (``lm_eval.simple_evaluate`` with an HFLM wrapper):
    lm-eval's results, per task its metrics and their stderr (``acc,none``, ``acc_stderr,none``...)."""
    require_extra("lm_eval", "--tasks")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                  task_manager=task_manager)
    return out.get("results", {})
