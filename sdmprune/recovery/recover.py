"""Recovery fine-tuning after pruning: LoRA or full, plain causal-LM loss or self-distillation.

Two entry points share one training loop (``sdmprune.recovery.trainer.Trainer``; LoRA set-up in
``sdmprune.recovery.lora``):

* ``finetune(model_or_path, data, out_dir, cfg)`` / ``sdmprune finetune``: fine-tune a (pruned)
  model and write a PEFT adapter dir (LoRA; ``--merge`` adds ``DIR/merged``, a plain model dir) or a
  plain model dir (``--full``). With ``--distill --teacher ORIG`` the teacher is a second model in
  memory: its weights (the unpruned size: ~1.25x a 20 %-pruned student), no gradients, no optimizer
  state, plus one no-grad forward per micro-batch (~+1/3 of the step time of a LoRA step). Its
  final hidden states and its own LM head go to the fused loss, so no logits of either model are
  ever materialized. ``--distill`` without ``--teacher`` on an *unpruned* model (LoRA only) uses
  the model itself with its adapters disabled as the teacher (no second copy).
* ``recover_masked_(model, keep, tokenizer, data, steps, cfg)``: the one-copy path the pruning
  pipeline runs before slicing. The student is the original weights with the pruned channels
  masked (the package's channel mask hook on each ``down_proj``, models.ChannelMasks, so it acts on
  the LoRA branch too) plus LoRA adapters; the teacher is the same weights with the mask off and
  ``disable_adapter()``, under no_grad. The LM head and final norm are shared, the teacher
  contributes only its final hidden states. Peak memory = one model + adapters + optimizer state +
  activations. At the end the adapters are merged into the base weights in place
  (``merge_and_unload``) and the hooks removed; slicing the merged model to ``keep`` then equals the
  masked student with adapters.

The official recipe is the default: LoRA r 8, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down, AdamW
lr 1e-4 with cosine decay and no warm-up, weight decay 0.05, 2 epochs, 16 sequences per optimizer
step, packed to 4096 tokens (capped at the model's positions), bf16 on GPU (float32 on CPU). Packed
records never see each other (sdmprune.recovery.sft_data).

Checkpoints (every ``save_every`` steps, and when interrupted) go to the work folder
``<out_dir>.checkpoint/`` (sdmprune.storage.run_state): ``--resume`` continues from it to the same final
weights as an uninterrupted run and refuses one made with other options, data, weights, dtype or
device kind; the run's files there are removed once the output is written.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..errors import InputError
from .lora import apply_lora, base_storage_pointers, check_lora_targets, lora_targets, unwrap_peft_attrs
from ..models import ChannelMasks, get_adapter, set_activation_checkpointing
from ..storage.paths import REPORT_NAME, WorkDir, atomic_output_dir, check_output_dir, write_json_atomic
from ..storage.save import package_versions
from .sft_data import Rows, build_rows, check_source, load_records
from .trainer import Interrupted, Trainer, self_teacher, separate_teacher, total_steps  # noqa: F401

DEFAULT_SEQ_LEN = 4096
EFFECTIVE_BATCH = 16

# Test hook: called as hook(model) in recover_masked_ after training, before the merge (masks and
# adapters still on), so tests can record the masked student's outputs.
_before_merge_hook: Optional[Callable] = None


@dataclass
class FinetuneConfig:
    """Options of ``finetune`` / ``sdmprune finetune`` (defaults = the official recipe)."""

    method: str = "lora"  # "lora" | "full"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    targets: str = "all"  # all | mlp | attn | comma list of module names (q_proj,v_proj,...)
    distill: bool = False
    teacher: Optional[str] = None  # the unpruned model (path/id/alias) for --distill on a sliced model
    alpha: float = 0.5  # weight of the KL term
    temperature: float = 1.0  # on the teacher logits only
    epochs: float = 2.0
    max_steps: Optional[int] = None  # overrides epochs
    lr: float = 1e-4
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0  # HF Trainer's default clipping; 0 = off
    batch_size: int = 1  # sequences per micro-batch
    grad_accum: Optional[int] = None  # None: 16 // batch_size (effective batch 16 sequences)
    seq_len: Optional[int] = None  # None: min(4096, model max positions); larger than that is an error
    packing: bool = True
    eval_ppl: Optional[str] = None  # evaluate perplexity on this source before and after
    eval_windows: int = 32
    eval_seq_len: int = 512
    resume: bool = False
    merge: bool = False
    device: Optional[str] = None
    dtype: Optional[str] = None  # None: bf16 on GPU, fp32 on CPU
    seed: int = 0
    overwrite: bool = False
    save_every: int = 100  # checkpoint every K optimizer steps (0 = only when interrupted)
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # checkpointed layer inputs in pinned host memory (sdmprune.scale.activation_offload)
    self_samples: int = 64  # --data self: sequences sampled from the unpruned model
    progress: bool = True
    stop_after: Optional[int] = None  # stop after this many steps as if interrupted (tests; checkpoint kept)
    trust_remote_code: bool = False  # run a model folder's own code (auto_map); only when asked

    def micro_and_accum(self):
        accum = self.grad_accum if self.grad_accum is not None else max(1, EFFECTIVE_BATCH // max(1, self.batch_size))
        return int(self.batch_size), int(accum)

    def recipe(self) -> dict:
        # options that change neither the math nor the data order: a run may resume with them changed
        skip = {"resume", "overwrite", "progress", "stop_after", "device", "offload_activations", "trust_remote_code"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


# ------------------------------------------------------------------------------------------------
# validation


# the FinetuneConfig fields ``prune --recover-steps`` sets, as its command line names them
RECOVERY_FLAGS = {"lr": "--recover-lr", "seq_len": "--recover-seq-len"}


def _validate(cfg: FinetuneConfig, flags: Optional[Dict[str, str]] = None) -> None:
    """InputError for any option out of range, named as the command line names it (``flags``: field ->
    flag where that is not ``--field-name``, e.g. RECOVERY_FLAGS)."""
    def flag(name):
        return (flags or {}).get(name, f"--{name.replace('_', '-')}")

    if cfg.method not in ("lora", "full"):
        raise InputError(f"method must be 'lora' or 'full', got {cfg.method!r}")
    for name in ("lora_dropout", "alpha", "temperature", "epochs", "lr", "weight_decay", "max_grad_norm"):
        value = float(getattr(cfg, name))
        if not math.isfinite(value):
            raise InputError(f"{flag(name)} {value} is not a finite number")
    checks = [
        (cfg.lora_r >= 1, f"{flag('lora_r')} must be >= 1, got {cfg.lora_r}"),
        (cfg.lora_alpha > 0, f"{flag('lora_alpha')} must be > 0, got {cfg.lora_alpha}"),
        (0 <= cfg.lora_dropout < 1, f"{flag('lora_dropout')} must be in [0, 1), got {cfg.lora_dropout}"),
        (0 <= cfg.alpha <= 1, f"{flag('alpha')} must be in [0, 1], got {cfg.alpha}"),
        (cfg.temperature > 0, f"{flag('temperature')} must be > 0, got {cfg.temperature}"),
        (cfg.epochs > 0, f"{flag('epochs')} must be > 0, got {cfg.epochs}"),
        (cfg.max_steps is None or cfg.max_steps >= 1, f"{flag('max_steps')} must be >= 1, got {cfg.max_steps}"),
        (cfg.lr > 0, f"{flag('lr')} must be > 0, got {cfg.lr}"),
        (cfg.weight_decay >= 0, f"{flag('weight_decay')} must be >= 0, got {cfg.weight_decay}"),
        (cfg.batch_size >= 1, f"{flag('batch_size')} must be >= 1, got {cfg.batch_size}"),
        (cfg.grad_accum is None or cfg.grad_accum >= 1, f"{flag('grad_accum')} must be >= 1, got {cfg.grad_accum}"),
        (cfg.seq_len is None or cfg.seq_len >= 2, f"{flag('seq_len')} must be >= 2, got {cfg.seq_len}"),
        (cfg.save_every >= 0, f"{flag('save_every')} must be >= 0, got {cfg.save_every}"),
        (cfg.eval_windows >= 1, f"{flag('eval_windows')} must be at least 1, got {cfg.eval_windows}"),
        (cfg.eval_seq_len >= 2, f"{flag('eval_seq_len')} must be >= 2, got {cfg.eval_seq_len}"),
        (cfg.self_samples >= 1, f"{flag('self_samples')} must be >= 1, got {cfg.self_samples}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    if cfg.teacher and not cfg.distill:
        raise InputError("--teacher is only used with --distill")
    if cfg.offload_activations and not cfg.gradient_checkpointing:
        raise InputError("--offload-activations moves the checkpointed layer inputs: it needs --gradient-checkpointing")
    if cfg.merge and cfg.method == "full":
        raise InputError("--merge applies to LoRA adapters; --full already writes a plain model dir")
    lora_targets(cfg.targets)


def resolve_seq_len(cfg: FinetuneConfig, model, flag: str = "--seq-len") -> int:  # model or config
    """cfg.seq_len, or min(4096, max positions); past the model's positions is an InputError naming ``flag``."""
    from ..loading import check_positions

    config = getattr(model, "config", model)
    max_pos = getattr(config, "max_position_embeddings", None)
    if cfg.seq_len is None:
        return min(DEFAULT_SEQ_LEN, max_pos) if max_pos else DEFAULT_SEQ_LEN
    check_positions(config, cfg.seq_len, flag)
    return int(cfg.seq_len)


def checkpoint_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / (out_dir.name + ".checkpoint")


def _model_dir_report(spec) -> Optional[dict]:
    """The sdmprune.json of a model directory (written by save_pruned / finetune), if any."""
    if spec is None or not isinstance(spec, (str, os.PathLike)):
        return None
    p = Path(os.path.expanduser(str(spec)))
    f = p / REPORT_NAME if p.is_dir() else None
    if f is None or not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return {"unreadable": str(f)}


# ------------------------------------------------------------------------------------------------
# one-copy recovery before slicing (the pipeline's --recover-steps)


def recover_masked_(model, keep: Dict[int, torch.Tensor], tokenizer=None, data="self", steps: int = 100,
                    cfg: Optional[FinetuneConfig] = None, *, config=None, unrefit_columns=None) -> dict:
    """Distilled LoRA recovery of the masked student on ONE copy of the weights, merged in place.

    model: the unpruned HF model (not sliced yet; any dtype/device); keep: {layer: LongTensor of
    kept channel indices into the current width}; tokenizer: needed for a text/instruction source;
    data: a source (path, ``"self"``), calibration tokens (LongTensor [n, L], loss on every
    token) or prebuilt ``sft_data.Rows``; steps: optimizer steps; cfg: LoRA/optimizer/loss options
    (FinetuneConfig; ``alpha`` 0 = plain CE; ``method``/``distill``/``teacher`` are ignored: the
    teacher is always the unmasked model). ``config=`` accepts the pipeline's PruneConfig instead:
    its ``recover_config`` (a FinetuneConfig, else the defaults with its seed) is used.
    Student: weights with the pruned channels masked + LoRA; teacher: same weights, mask off,
    adapters disabled, no_grad. After training the adapters are merged into the base weights
    in place and the mask hooks removed, so ``prune_model_(model, keep)`` then gives the recovered
    pruned model. No base weight storage is copied. Returns stats (steps, losses, tokens, timings).
    ``unrefit_columns``: after a refit of the kept down_proj columns (sdmprune.compensation), the columns
    they replaced ({layer: [d, k]}), so the teacher is still the unpruned model (models.ChannelMasks).
    """
    if cfg is None and config is not None:
        cfg = config if isinstance(config, FinetuneConfig) else getattr(config, "recover_config", None)
        if cfg is None:
            cfg = FinetuneConfig(seed=getattr(config, "seed", 0), progress=getattr(config, "progress", True))
    cfg = cfg or FinetuneConfig()
    if steps is None or int(steps) < 1:
        raise InputError(f"recovery steps must be >= 1, got {steps}")
    check_recovery_config(cfg)
    seq_len = resolve_seq_len(cfg, model, RECOVERY_FLAGS["seq_len"])
    if isinstance(data, Rows):
        rows = data
    elif torch.is_tensor(data):
        from .sft_data import Record

        toks = data.long().reshape(-1, data.shape[-1]) if data.ndim > 1 else data.long().reshape(1, -1)
        records = [Record(r.tolist(), r.tolist()) for r in toks]
        rows = build_rows(records, min(seq_len, toks.shape[1]), pad_id=_pad_id(tokenizer, model), packing=cfg.packing)
        rows.description["data"] = {"source": "calibration tokens", "shape": list(toks.shape)}
    else:
        if tokenizer is None and str(data) != "self":
            raise InputError(f"recovery data {data!r} is text: pass the tokenizer")
        # "self" samples from the model now: no hooks, no adapters yet, i.e. the unpruned model.
        records, ddesc = load_records(data, tokenizer, seq_len, self_model=model, self_samples=cfg.self_samples,
                                      seed=cfg.seed)
        rows = build_rows(records, seq_len, pad_id=_pad_id(tokenizer, model), packing=cfg.packing)
        rows.description["data"] = ddesc
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    before = base_storage_pointers(model)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    masks = ChannelMasks(model, keep, unrefit_columns)
    peft_model = apply_lora(model, cfg)
    masks.install()
    during = None
    try:
        if cfg.gradient_checkpointing:
            set_activation_checkpointing(model, True)
        teacher = self_teacher(model, peft_model, adapter, masks) if cfg.alpha > 0 else None
        trainer = Trainer(model, adapter, rows, cfg, int(steps), teacher_fn=teacher, desc="recover")
        during = base_storage_pointers(model)
        trainer.run()
        stats = trainer.stats()
        model.eval()
        if _before_merge_hook is not None:
            _before_merge_hook(model)  # the trained masked student, adapters on (tests)
    finally:
        masks.remove()
        if cfg.gradient_checkpointing:
            set_activation_checkpointing(model, False)
    merged = peft_model.merge_and_unload()  # adds B @ A * scale into the base weights in place
    assert merged is model
    unwrap_peft_attrs(model)
    for n, p in model.named_parameters():
        p.requires_grad_(requires.get(n, p.requires_grad))
    model.eval()
    after = base_storage_pointers(model)
    stats.update({
        "method": "lora+mask (one copy)", "distill": cfg.alpha > 0, "alpha": cfg.alpha,
        "temperature": cfg.temperature, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout, "targets": lora_targets(cfg.targets), "lr": cfg.lr,
        "seq_len": seq_len, "data": rows.description, "merged": True,
        "base_storage_unchanged": before == after and (during is None or {k: during[k] for k in before} == before),
        "wall_seconds": round(time.perf_counter() - t0, 3),
    })
    return stats


def check_recovery_config(cfg: FinetuneConfig) -> None:
    """The checks of the options of a recovery before slicing (``prune --recover-steps``), named as prune's
    command line names them; the options that recovery does not use (method, teacher, merge) are not checked."""
    c = FinetuneConfig(**{**asdict(cfg), "method": "lora", "teacher": None, "distill": False, "merge": False})
    _validate(c, RECOVERY_FLAGS)


def _pad_id(tokenizer, model=None) -> int:
    """Padding token id (its value never matters: padding has no loss and attends only to itself)."""
    for obj in (tokenizer, getattr(model, "config", None)):
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            v = getattr(obj, attr, None) if obj is not None else None
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
    return 0


# ------------------------------------------------------------------------------------------------
# finetune


def finetune(model_or_path, data, out_dir, cfg: Optional[FinetuneConfig] = None, *, tokenizer=None,
             teacher=None) -> dict:
    """Fine-tune a (pruned) model on ``data`` and write it to ``out_dir``; returns the report dict.

    model_or_path: a model spec (HF dir or id, .gguf, alias) or an HF model (then pass
    ``tokenizer``); data: a jsonl/json/parquet instruction file, a text file, or ``"self"``;
    teacher: optional teacher model object (else ``cfg.teacher`` is loaded when ``cfg.distill``).
    LoRA (default): out_dir is a PEFT adapter dir (``PeftModel.from_pretrained(base, out_dir)``),
    plus ``out_dir/merged`` (plain model dir) with ``cfg.merge``; full: out_dir is a plain model
    dir. Each holds sdmprune.json (recipe, data, steps, losses, timings). Written atomically;
    nothing is written when the input is bad (InputError).

    Memory: --distill --teacher ORIG keeps a second, unpruned model (no grads, no optimizer state)
    beside the student; recover_masked_ (pipeline --recover-steps) avoids it by recovering before
    slicing on one copy.
    """
    from ..data import resolve_source
    from ..loading import (check_positions, check_sources_against_model, default_dtype, load_model, parse_dtype,
                           resolve_device, resolve_model)
    from ..models import meta_model_from_config
    from ..storage.run_state import RunState
    from .trainer import CHECKPOINT_FILE, finetune_settings

    cfg = cfg or FinetuneConfig()
    _validate(cfg)
    is_module = isinstance(model_or_path, nn.Module)
    model_spec = None if is_module else str(model_or_path)
    inputs = [model_spec, cfg.teacher, None if str(data) == "self" else str(data)]
    out_dir = Path(os.path.abspath(os.path.expanduser(str(out_dir)))) if str(out_dir).strip() else out_dir
    if cfg.resume and Path(out_dir).is_dir() and any(Path(out_dir).iterdir()) and not cfg.overwrite:
        raise InputError(f"output {out_dir} is already complete (nothing to resume; --overwrite to redo)")
    out_dir = check_output_dir(out_dir, cfg.overwrite, inputs=inputs)
    work = WorkDir(checkpoint_dir(out_dir), given=False)
    device = resolve_device(cfg.device)
    dtype = default_dtype(cfg.dtype, device)

    # 1. cheap validation before loading weights
    src = None if is_module else resolve_model(model_spec, trust_remote_code=cfg.trust_remote_code)
    base_report = _model_dir_report(model_spec)
    if cfg.distill and teacher is None and cfg.teacher is None:
        if base_report is not None:
            raise InputError(f"--distill: {model_spec} is a pruned model (it has {REPORT_NAME}); "
                             "pass --teacher ORIG (the unpruned model) to distill from")
        if cfg.method == "full":
            raise InputError("--distill --full needs --teacher ORIG (a frozen copy of the original weights)")
    t_src = (resolve_model(str(cfg.teacher), trust_remote_code=cfg.trust_remote_code)
             if (cfg.distill and teacher is None and cfg.teacher) else None)
    if t_src is not None and src is not None:
        sc, tc = src.config, t_src.config
        _check_teacher_shapes(sc, tc)
    check_source(data)
    if str(data) == "self" and base_report is not None and not (cfg.distill and (teacher is not None or cfg.teacher)):
        raise InputError(f"--data self samples from the unpruned model, and {model_spec} is a pruned model (it has "
                         f"{REPORT_NAME}): pass --distill --teacher ORIG, or give a data file")
    eval_spec = resolve_source(cfg.eval_ppl, "evaluation") if cfg.eval_ppl else None
    if src is not None:
        resolve_seq_len(cfg, src.config)
        if eval_spec is not None:
            check_positions(src.config, cfg.eval_seq_len, "--eval-seq-len")
        if cfg.method == "lora":
            check_lora_targets(meta_model_from_config(src.config, cfg.trust_remote_code), cfg.targets)
        tokenizer = check_sources_against_model(src, [("--eval-ppl", eval_spec)],
                                                [f"--data {str(data)!r} is text"] if str(data) != "self" else (),
                                                tokenizer=tokenizer)
        if cfg.resume:  # the settings now; the weights and data digests once they are loaded (Trainer)
            settings = finetune_settings(cfg, parse_dtype(dtype), device.type)
            if not RunState(work, CHECKPOINT_FILE, settings).check_settings():
                print(f"sdmprune finetune: --resume: no checkpoint in {work.path}; starting from the beginning",
                      file=sys.stderr)

    # 2. model, tokenizer, sequence length
    t_load = time.perf_counter()
    if is_module:
        model = model_or_path
        if tokenizer is None:
            raise InputError("finetune(model, ...) with a model object needs tokenizer=")
        model.to(device)
    else:
        model, tokenizer = load_model(model_spec, dtype=dtype, device=device, source=src, tokenizer=tokenizer)
    seq_len = resolve_seq_len(cfg, model)
    if teacher is not None:
        _check_teacher_shapes(model.config, teacher.config)

    # 3. data (all data errors happen here, before anything is written)
    teacher_model = teacher
    if cfg.distill and teacher_model is None and t_src is not None:
        teacher_model, _ = load_model(str(cfg.teacher), dtype=dtype, device=device, source=t_src)
    if teacher_model is not None:
        for p in teacher_model.parameters():
            p.requires_grad_(False)
        teacher_model.eval()
    self_src = teacher_model if teacher_model is not None else (model if base_report is None else None)
    records, ddesc = load_records(data, tokenizer, seq_len, self_model=self_src, self_samples=cfg.self_samples,
                                  seed=cfg.seed)
    rows = build_rows(records, seq_len, pad_id=_pad_id(tokenizer, model), packing=cfg.packing)
    rows.description["data"] = ddesc
    load_seconds = time.perf_counter() - t_load

    # 4. trainable setup
    torch.manual_seed(cfg.seed)
    adapter = get_adapter(model)  # before LoRA injection (the adapter matches plain nn.Linear MLPs)
    peft_model = None
    if cfg.method == "lora":
        peft_model = apply_lora(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    teacher_fn = None
    if cfg.distill:
        teacher_fn = separate_teacher(teacher_model) if teacher_model is not None else self_teacher(model, peft_model, adapter)
    total = total_steps(cfg, len(rows))
    trainer = Trainer(model, adapter, rows, cfg, total, teacher_fn=teacher_fn, work=work)
    ckpt = work.path
    resumed_from = None
    if cfg.resume:
        if trainer.load_checkpoint():
            resumed_from = trainer.step
            print(f"sdmprune finetune: resuming at step {trainer.step}/{total} from {ckpt}", file=sys.stderr)
        elif is_module:  # a model given as an object: its settings were not compared before
            print(f"sdmprune finetune: --resume: no checkpoint in {ckpt}; starting from the beginning", file=sys.stderr)
    else:
        trainer.state.discard()  # a fresh start: an earlier run's checkpoint is not resumed later by mistake

    # 5. evaluate, train, evaluate
    evals, eval_tokens = {}, None
    if cfg.eval_ppl and resumed_from is None:
        with (peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()):
            evals["before"], eval_tokens = _eval(model, adapter, tokenizer, cfg, source=eval_spec)
    trainer.run()
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    model.eval()
    if cfg.eval_ppl:
        evals["after"], _ = _eval(model, adapter, tokenizer, cfg, eval_tokens, source=eval_spec)
    stats = trainer.stats()

    # 6. write atomically
    report = {
        "kind": "finetune", "method": cfg.method, "distill": cfg.distill,
        "base_model": model_spec or getattr(model.config, "_name_or_path", None),
        "teacher": (cfg.teacher if teacher is None else "<object>") if cfg.distill else None,
        "teacher_kind": (("separate model" if teacher_model is not None else "self (adapters disabled)")
                         if cfg.distill else None),
        "recipe": {**cfg.recipe(), "seq_len": seq_len, "dtype": dtype,
                   "targets_resolved": lora_targets(cfg.targets) if cfg.method == "lora" else "all parameters"},
        "data": rows.description, "resumed_from_step": resumed_from,
        "training": stats, "timings": {"load_and_data_seconds": round(load_seconds, 3), "train_seconds": stats["seconds"]},
        "eval_ppl": evals or None,
        "device": str(device), "versions": package_versions(), "pruned_from": base_report,
    }
    _write_output(model, peft_model, tokenizer, out_dir, report, cfg, inputs)
    trainer.state.cleanup()
    return report


def _check_teacher_shapes(sc, tc) -> None:
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if getattr(sc, key, None) != getattr(tc, key, None):
            raise InputError(f"--teacher does not match the model: {key} {getattr(tc, key, None)} vs {getattr(sc, key, None)}")
    if getattr(tc, "intermediate_size", 0) < getattr(sc, "intermediate_size", 0):
        raise InputError("--teacher is narrower than the model (teacher = the unpruned original)")


def perplexity(model, tokens: torch.Tensor, seq_len: int, max_windows: Optional[int] = None) -> dict:
    """Perplexity over consecutive windows of ``tokens`` (1-D), through the fused CE
    (sdmprune.evaluate.evaluate_perplexity; it also runs on a LoRA-wrapped model)."""
    from ..evaluate import evaluate_perplexity
    from .trainer import LOSS_BACKEND  # read at call time: tests pin it

    ppl = evaluate_perplexity(model, tokens, seq_len=seq_len, max_windows=max_windows, backend=LOSS_BACKEND)
    return {"perplexity": float(ppl), "nll": ppl.nll, "windows": ppl.windows, "seq_len": seq_len, "tokens": ppl.tokens}


def _eval(model, adapter, tokenizer, cfg: FinetuneConfig, tokens=None, source=None) -> tuple:
    """(perplexity dict, tokens) on ``source`` (the checked cfg.eval_ppl), or on ``tokens`` again."""
    from ..data import eval_token_stream

    if tokens is None:
        tokens, desc = eval_token_stream(source if source is not None else cfg.eval_ppl, tokenizer, model=model,
                                         seed=cfg.seed,
                                         max_tokens=cfg.eval_windows * cfg.eval_seq_len,
                                         seq_len=cfg.eval_seq_len)
    out = perplexity(model, tokens, cfg.eval_seq_len, cfg.eval_windows)
    out["source"] = str(cfg.eval_ppl)
    return out, tokens


def _write_output(model, peft_model, tokenizer, out_dir: Path, report: dict, cfg: FinetuneConfig,
                  inputs: Sequence) -> None:
    from ..loading import drop_gguf_quantizer

    drop_gguf_quantizer(model)

    with atomic_output_dir(out_dir, overwrite=cfg.overwrite, inputs=inputs) as tmp:
        tmp = Path(tmp)
        if peft_model is not None:
            peft_model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            report["output"] = {"adapter": str(out_dir)}
            if cfg.merge:
                merged = peft_model.merge_and_unload()
                unwrap_peft_attrs(merged)
                merged.save_pretrained(str(tmp / "merged"))
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp / "merged"))
                report["output"]["merged"] = str(out_dir / "merged")
                write_json_atomic(str(tmp / "merged" / REPORT_NAME), report)
        else:
            model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            report["output"] = {"model": str(out_dir)}
        write_json_atomic(str(tmp / REPORT_NAME), report)


