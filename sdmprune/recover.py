"""Recovery fine-tuning after pruning: LoRA or full, plain causal-LM loss or self-distillation.

Two entry points share one training loop (``_Trainer``):

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
  masked (a forward pre-hook on each ``down_proj`` multiplies its input by the 0/1 channel mask,
  so it acts on the LoRA branch too) plus LoRA adapters; the teacher is the same weights with the
  mask hooks off and ``disable_adapter()``, under no_grad. The LM head and final norm are shared,
  the teacher contributes only its final hidden states. Peak memory = one model + adapters +
  optimizer state + activations. At the end the adapters are merged into the base weights in
  place (``merge_and_unload``) and the hooks removed; slicing the merged model to ``keep`` then
  equals the masked student with adapters.

Loss (every path): ``kernels.fused_linear_distill_loss`` on the final hidden states, never the
logits: ``(1 - alpha) * CE + alpha * KL(softmax(z_t / T) || softmax(z_s))``; plain CE without a
teacher. Over a step of several micro-batches (grad accumulation) CE is a mean over all the step's
loss tokens and KL a mean over all its real tokens (token-weighted, as HF Trainer's
``num_items_in_batch``), so the split into micro-batches does not change the gradient.
Padding never counts (target -100, kl_mask False); packed records never see each other
(sdmprune.sft_data). The official recipe (DESIGN section 6) is the default: LoRA r 8, alpha 16,
dropout 0.05 on q/k/v/o/gate/up/down, AdamW lr 1e-4 with cosine decay and no warm-up, weight decay
0.05, 2 epochs, 16 sequences per optimizer step, packed to 4096 tokens (capped at the model's
positions), bf16 on GPU (float32 on CPU).

Checkpoints (every ``save_every`` steps, and when interrupted) go to ``<out_dir>.checkpoint/state.pt``
(written to a temp file and renamed): trainable weights, optimizer, scheduler, step (= the data
cursor: the order of rows is a pure function of seed and epoch) and RNG states. ``--resume``
continues from it to the same final weights as an uninterrupted run; the directory is removed once
the output is written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .errors import InputError
from .models import find_gated_mlps, find_layer_ops, fused_layer_ops, get_adapter, set_activation_checkpointing
from .save import package_versions
from .sft_data import IGNORE_INDEX, Rows, build_rows, check_source, load_records

LORA_TARGETS = {
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
DEFAULT_SEQ_LEN = 4096
EFFECTIVE_BATCH = 16
CHECKPOINT_FILE = "state.pt"
REPORT_FILE = "sdmprune.json"

# Backend of the fused loss ("auto": Triton on CUDA, PyTorch on CPU unless TRITON_INTERPRET=1).
# Tests of the training loop pin "torch": the interpreter is for the kernel's own tests.
LOSS_BACKEND = "auto"

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
    offload_activations: bool = False  # checkpointed layer inputs in pinned host memory (sdmprune.activation_offload)
    self_samples: int = 64  # --data self: sequences sampled from the unpruned model
    progress: bool = True
    stop_after: Optional[int] = None  # stop after this many steps as if interrupted (tests; checkpoint kept)

    def micro_and_accum(self):
        accum = self.grad_accum if self.grad_accum is not None else max(1, EFFECTIVE_BATCH // max(1, self.batch_size))
        return int(self.batch_size), int(accum)

    def recipe(self) -> dict:
        # options that change neither the math nor the data order: a run may resume with them changed
        skip = {"resume", "overwrite", "progress", "stop_after", "device", "offload_activations"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


class Interrupted(RuntimeError):
    """Training stopped early on purpose (``stop_after``); the checkpoint is kept for --resume."""


# ------------------------------------------------------------------------------------------------
# validation


def _validate(cfg: FinetuneConfig) -> None:
    if cfg.method not in ("lora", "full"):
        raise InputError(f"method must be 'lora' or 'full', got {cfg.method!r}")
    checks = [
        (cfg.lora_r >= 1, f"--lora-r must be >= 1, got {cfg.lora_r}"),
        (cfg.lora_alpha > 0, f"--lora-alpha must be > 0, got {cfg.lora_alpha}"),
        (0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}"),
        (0 <= cfg.alpha <= 1, f"--alpha must be in [0, 1], got {cfg.alpha}"),
        (cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}"),
        (cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}"),
        (cfg.max_steps is None or cfg.max_steps >= 1, f"--max-steps must be >= 1, got {cfg.max_steps}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.grad_accum is None or cfg.grad_accum >= 1, f"--grad-accum must be >= 1, got {cfg.grad_accum}"),
        (cfg.seq_len is None or cfg.seq_len >= 2, f"--seq-len must be >= 2, got {cfg.seq_len}"),
        (cfg.save_every >= 0, f"--save-every must be >= 0, got {cfg.save_every}"),
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
    _lora_targets(cfg.targets)


def _lora_targets(spec: str) -> List[str]:
    if spec in LORA_TARGETS:
        return list(LORA_TARGETS[spec])
    names = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not names:
        raise InputError(f"--targets: no module names in {spec!r}")
    if "lm_head" in names or "embed_tokens" in names:
        raise InputError("--targets: LoRA on lm_head/embed_tokens is not supported (the fused loss reads the head weight)")
    return names


def _max_positions(model_or_config) -> Optional[int]:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "max_position_embeddings", None)


def resolve_seq_len(cfg: FinetuneConfig, model) -> int:  # model or config
    """cfg.seq_len, or min(4096, max positions); past the model's positions is an InputError."""
    max_pos = _max_positions(model)
    if cfg.seq_len is None:
        return min(DEFAULT_SEQ_LEN, max_pos) if max_pos else DEFAULT_SEQ_LEN
    if max_pos and cfg.seq_len > max_pos:
        raise InputError(f"--seq-len {cfg.seq_len} is past the model's {max_pos} positions (max_position_embeddings)")
    return int(cfg.seq_len)


def _check_out_dir(out_dir: Path, cfg: FinetuneConfig) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not cfg.overwrite:
        raise InputError(f"output {out_dir} exists and is not empty (pass --overwrite to replace it)")


def checkpoint_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / (out_dir.name + ".checkpoint")


def _model_dir_report(spec) -> Optional[dict]:
    """The sdmprune.json of a model directory (written by save_pruned / finetune), if any."""
    if spec is None or not isinstance(spec, (str, os.PathLike)):
        return None
    p = Path(os.path.expanduser(str(spec)))
    f = p / REPORT_FILE if p.is_dir() else None
    if f is None or not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return {"unreadable": str(f)}


# ------------------------------------------------------------------------------------------------
# channel masks (one-copy student)


class ChannelMasks:
    """0/1 channel masks on the input of every ``down_proj`` (= H), switchable on/off.

    Registered on whatever module sits at ``layer.mlp.down_proj`` at install time: under peft that
    is the LoRA wrapper, so the base matmul and the LoRA branch both see the masked H."""

    def __init__(self, model, keep: Dict[int, torch.Tensor]):
        # Built before LoRA injection (find_gated_mlps wants plain nn.Linear); install() after it.
        self.on = True
        self.handles = []
        self.layers = get_adapter(model).decoder_layers(model)
        self.masks = {}
        for m in find_gated_mlps(model):
            if m.index not in keep:
                continue
            idx = torch.as_tensor(keep[m.index], dtype=torch.long)
            if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= m.width:
                raise InputError(f"layer {m.index}: kept channel indices must be in [0, {m.width}) and not empty")
            dev, dt = m.down.weight.device, m.down.weight.dtype
            mask = torch.zeros(m.width, dtype=dt, device=dev)
            mask[idx.to(dev)] = 1
            self.masks[m.index] = mask

    def install(self) -> "ChannelMasks":
        """Hook the modules now at layer.mlp.down_proj (the LoRA wrappers once peft injected them)."""
        self.remove()
        for i, mask in self.masks.items():
            self.handles.append(self.layers[i].mlp.down_proj.register_forward_pre_hook(self._hook(mask)))
        return self

    def _hook(self, mask):
        def hook(module, args):
            if not self.on:
                return None
            return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])
        return hook

    @contextlib.contextmanager
    def off(self):
        prev, self.on = self.on, False
        try:
            yield
        finally:
            self.on = prev

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def base_storage_pointers(model) -> Dict[str, int]:
    """{name: data_ptr} of every non-LoRA parameter (to prove no base weight was copied); names as
    in the plain model (peft's ``.base_layer`` removed)."""
    return {n.replace(".base_layer", ""): p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}


# ------------------------------------------------------------------------------------------------
# LoRA


def _apply_lora(model, cfg: FinetuneConfig):
    from peft import LoraConfig, get_peft_model

    targets = _lora_targets(cfg.targets)
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise InputError(f"--targets: the model has no module named {', '.join(missing)}")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def _unwrap_peft_attrs(model) -> None:
    # get_peft_model leaves bookkeeping on the wrapped model; a plain save must not carry it.
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            del model.__dict__[attr]


# ------------------------------------------------------------------------------------------------
# the training loop


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _fused_loss():
    from .kernels.fused_linear_distill_loss import fused_linear_distill_loss

    return fused_linear_distill_loss


class _Trainer:
    """Optimizer steps over packed rows with the fused loss; optional teacher; checkpoints.

    ``model``: the HF model whose body/head the student runs (LoRA layers injected into it, or all
    parameters trainable). ``teacher_fn(input_ids, position_ids) -> (h_t [b, L, d], W_t or None)``
    under no_grad, or None for plain CE."""

    def __init__(self, model, adapter, rows: Rows, cfg: FinetuneConfig, total_steps: int, *,
                 teacher_fn: Optional[Callable] = None, ckpt_dir: Optional[Path] = None, desc: str = "finetune"):
        self.model, self.rows, self.cfg = model, rows, cfg
        self.body = adapter.body(model)
        self.head = adapter.lm_head(model)
        self.device = self.head.weight.device
        self.teacher_fn = teacher_fn
        self.ckpt_dir = ckpt_dir
        self.desc = desc
        self.micro, self.accum = cfg.micro_and_accum()
        self.eff = self.micro * self.accum
        self.steps_per_epoch = max(1, math.ceil(len(rows) / self.eff))
        self.total = int(total_steps)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise InputError("nothing to train: no parameter requires grad")
        decay = [p for n, p in self.params if p.ndim >= 2]
        no_decay = [p for n, p in self.params if p.ndim < 2]  # norms and biases: no weight decay
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        total = self.total
        # Cosine decay to 0 over all steps, no warm-up (HF get_cosine_schedule_with_warmup(0, total)).
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))))
        self.step = 0
        self.history: List[dict] = []
        self.tokens = 0
        self.elapsed = 0.0
        self.activation_offload: Optional[dict] = None  # its counters, with cfg.offload_activations
        self.fused = _fused_loss()
        # the norms and the rotary embedding run sdmprune's kernels during a step (models.fused_layer_ops;
        # the norms keep input and 1/rms instead of float32 copies: about 8 KiB less per token and layer
        # at d = 2048 without checkpointing); probed once here, not every step
        self.layer_ops = find_layer_ops(model)
        # Triton on the GPU; on the CPU the PyTorch forms (the interpreter is for the kernels' own tests)
        self.layer_backend = "auto" if self.device.type == "cuda" else "torch"

    # data order: a pure function of (seed, epoch), so the step number is the whole data cursor
    def rows_for_step(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.rows), generator=g)
        return perm[i * self.eff:(i + 1) * self.eff]

    def cursor(self, step: int) -> dict:
        epoch, i = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": i, "steps_per_epoch": self.steps_per_epoch}

    def fingerprint(self) -> dict:
        # Options that do not change the trained weights may differ on resume.
        free = {"save_every", "eval_ppl", "eval_windows", "eval_seq_len", "merge"}
        recipe = {k: v for k, v in self.cfg.recipe().items() if k not in free}
        return {"recipe": recipe, "data": self.rows.description, "total_steps": self.total,
                "trainable": [n for n, _ in self.params]}

    # ---- checkpoints
    def save_checkpoint(self) -> None:
        if self.ckpt_dir is None:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step, "cursor": self.cursor(self.step), "fingerprint": self.fingerprint(),
            "trainable": {n: p.detach().cpu().clone() for n, p in self.params},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "rng": _rng_state(self.device), "history": self.history, "tokens": self.tokens,
            "elapsed": self.elapsed,
        }
        tmp = self.ckpt_dir / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_dir / CHECKPOINT_FILE)  # atomic: a crash leaves the previous one

    def load_checkpoint(self) -> bool:
        f = None if self.ckpt_dir is None else self.ckpt_dir / CHECKPOINT_FILE
        if f is None or not f.is_file():
            return False
        state = torch.load(f, map_location="cpu", weights_only=False)
        if state["fingerprint"] != self.fingerprint():
            raise InputError(f"--resume: the checkpoint in {self.ckpt_dir} was made with other options or data "
                             "(rerun with the same ones, or delete it to start over)")
        named = dict(self.params)
        with torch.no_grad():
            for n, t in state["trainable"].items():
                named[n].copy_(t)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state["history"]
        self.tokens, self.elapsed = state["tokens"], state["elapsed"]
        _set_rng_state(state["rng"], self.device)
        return True

    # ---- one optimizer step
    def _hidden(self, ids, pos):
        # use_cache=False matters: with a cache, transformers ignores the position-id restarts and
        # packed records would attend to each other.
        return self.body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state

    def accumulate(self, idx: torch.Tensor) -> tuple:
        """Forward + backward of the rows ``idx`` (one optimizer step's worth) into .grad; returns
        floats (loss, ce, kl) of the whole step: CE mean over its loss tokens, KL mean over its
        real tokens, loss = (1 - alpha) * CE + alpha * KL (plain CE without a teacher)."""
        cfg, rows = self.cfg, self.rows
        distill = self.teacher_fn is not None
        alpha = float(cfg.alpha) if distill else 0.0
        n_ce = int((rows.targets[idx] != IGNORE_INDEX).sum())
        n_kl = int(rows.kl_mask[idx].sum()) if distill else 0
        loss_sum = ce_sum = kl_sum = 0.0
        for mb in idx.split(self.micro):
            tgt, klm = rows.targets[mb].reshape(-1), rows.kl_mask[mb].reshape(-1)
            m_ce = int((tgt != IGNORE_INDEX).sum())
            m_kl = int(klm.sum()) if distill else 0
            # Token weighting across micro-batches: weights of this micro-batch's CE and KL means.
            w_ce = (1.0 - alpha) * m_ce / n_ce if n_ce else 0.0
            w_kl = alpha * m_kl / n_kl if n_kl else 0.0
            scale = w_ce + w_kl
            if scale == 0.0:
                continue
            ids = rows.input_ids[mb].to(self.device, non_blocking=True)
            pos = rows.position_ids[mb].to(self.device, non_blocking=True)
            # Only rows with a CE target (or a KL term) go through the LM head: prompt tokens of
            # instruction data cost no head GEMM in plain-CE training.
            sel = (tgt != IGNORE_INDEX) | klm if distill else (tgt != IGNORE_INDEX)
            sel_dev = sel.to(self.device)
            h_t = w_t = None
            if distill:
                h_t, w_t = self.teacher_fn(ids, pos)
                h_t = h_t.reshape(-1, h_t.shape[-1])[sel_dev]
            h = self._hidden(ids, pos)
            h = h.reshape(-1, h.shape[-1])[sel_dev]
            loss, ce, kl = self.fused(
                h, self.head.weight, tgt[sel].to(self.device), h_t, teacher_weight=w_t,
                alpha=(w_kl / scale) if distill else 0.0, temperature=cfg.temperature,
                kl_mask=klm[sel].to(self.device) if distill else None, return_parts=True, backend=LOSS_BACKEND)
            (loss * scale).backward()
            loss_sum += float(loss.detach()) * scale
            ce_sum += float(ce) * (m_ce / n_ce if n_ce else 0.0)
            kl_sum += float(kl) * (m_kl / n_kl if n_kl else 0.0)
        return loss_sum, ce_sum, kl_sum

    def train_step(self) -> dict:
        idx = self.rows_for_step(self.step)
        distill = self.teacher_fn is not None
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with fused_layer_ops(self.model, self.layer_backend, self.layer_ops):
            loss_sum, ce_sum, kl_sum = self.accumulate(idx)
        cfg, rows = self.cfg, self.rows
        grad_norm = None
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.params], cfg.max_grad_norm))
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.step += 1
        tokens = int(rows.kl_mask[idx].sum())
        self.tokens += tokens
        rec = {"step": self.step, "loss": loss_sum, "ce": ce_sum, "lr": lr, "tokens": tokens}
        if distill:
            rec["kl"] = kl_sum
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        self.history.append(rec)
        return rec

    def run(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total, initial=self.step, desc=self.desc, unit="step", dynamic_ncols=True,
                   disable=not cfg.progress, file=sys.stderr)
        from .activation_offload import maybe_offload_checkpoint_inputs

        try:
            with maybe_offload_checkpoint_inputs(self.model, cfg.offload_activations) as off:
                if off is not None:
                    self.activation_offload = off.stats  # the live counters
                self._steps(bar)
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise
        finally:
            bar.close()

    def _steps(self, bar) -> None:
        cfg = self.cfg
        while self.step < self.total:
            t0 = time.perf_counter()
            rec = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.elapsed += dt
            rec["seconds"] = round(dt, 4)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens'] / max(dt, 1e-9):.0f}")
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total:
                self.save_checkpoint()
            if cfg.stop_after is not None and self.step >= cfg.stop_after and self.step < self.total:
                self.save_checkpoint()
                raise Interrupted(f"stopped after {self.step} steps (stop_after)")

    def stats(self) -> dict:
        losses = [h["loss"] for h in self.history]
        out = {"steps": self.step, "total_steps": self.total, "micro_batch": self.micro,
               "grad_accum": self.accum, "effective_batch": self.eff, "tokens": self.tokens,
               "seconds": round(self.elapsed, 3),
               "tokens_per_s": round(self.tokens / self.elapsed, 2) if self.elapsed else None,
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "losses": self.history}
        if self.activation_offload is not None:
            out["activation_offload"] = dict(self.activation_offload)
        if self.device.type == "cuda":
            out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out


def _total_steps(cfg: FinetuneConfig, n_rows: int, steps: Optional[int] = None) -> int:
    if steps is not None:
        return int(steps)
    if cfg.max_steps:
        return int(cfg.max_steps)
    micro, accum = cfg.micro_and_accum()
    return max(1, math.ceil(cfg.epochs * math.ceil(n_rows / (micro * accum))))


def _self_teacher(model, peft_model, adapter, masks: Optional[ChannelMasks] = None):
    """Teacher = the same weights, adapters disabled (and channel masks off): no second copy."""
    body = adapter.body(model)

    def teacher(ids, pos):
        was_training = model.training
        model.eval()  # no dropout in the teacher pass
        try:
            with torch.no_grad(), peft_model.disable_adapter(), (masks.off() if masks else contextlib.nullcontext()):
                h = body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        finally:
            model.train(was_training)
        return h, None  # None: the LM head is shared

    return teacher


def _separate_teacher(teacher_model):
    adapter = get_adapter(teacher_model)
    body, w_t = adapter.body(teacher_model), adapter.lm_head(teacher_model).weight

    def teacher(ids, pos):
        with torch.no_grad():
            h = body(input_ids=ids.to(w_t.device), position_ids=pos.to(w_t.device), use_cache=False).last_hidden_state
        return h.to(ids.device), w_t

    return teacher


# ------------------------------------------------------------------------------------------------
# one-copy recovery before slicing (the pipeline's --recover-steps)


def recover_masked_(model, keep: Dict[int, torch.Tensor], tokenizer=None, data="self", steps: int = 100,
                    cfg: Optional[FinetuneConfig] = None, *, config=None) -> dict:
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
    """
    if cfg is None and config is not None:
        cfg = config if isinstance(config, FinetuneConfig) else getattr(config, "recover_config", None)
        if cfg is None:
            cfg = FinetuneConfig(seed=getattr(config, "seed", 0), progress=getattr(config, "progress", True))
    cfg = cfg or FinetuneConfig()
    if steps is None or int(steps) < 1:
        raise InputError(f"recovery steps must be >= 1, got {steps}")
    _validate_lora_only(cfg)
    seq_len = resolve_seq_len(cfg, model)
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
    masks = ChannelMasks(model, keep)
    peft_model = _apply_lora(model, cfg)
    masks.install()
    during = None
    try:
        if cfg.gradient_checkpointing:
            set_activation_checkpointing(model, True)
        teacher = _self_teacher(model, peft_model, adapter, masks) if cfg.alpha > 0 else None
        trainer = _Trainer(model, adapter, rows, cfg, int(steps), teacher_fn=teacher, desc="recover")
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
    _unwrap_peft_attrs(model)
    for n, p in model.named_parameters():
        p.requires_grad_(requires.get(n, p.requires_grad))
    model.eval()
    after = base_storage_pointers(model)
    stats.update({
        "method": "lora+mask (one copy)", "distill": cfg.alpha > 0, "alpha": cfg.alpha,
        "temperature": cfg.temperature, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout, "targets": _lora_targets(cfg.targets), "lr": cfg.lr,
        "seq_len": seq_len, "data": rows.description, "merged": True,
        "base_storage_unchanged": before == after and (during is None or {k: during[k] for k in before} == before),
        "wall_seconds": round(time.perf_counter() - t0, 3),
    })
    return stats


def _validate_lora_only(cfg: FinetuneConfig) -> None:
    c = FinetuneConfig(**{**asdict(cfg), "method": "lora", "teacher": None, "distill": False, "merge": False})
    _validate(c)


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
    from .loading import default_dtype, load_model, resolve_device, resolve_model

    cfg = cfg or FinetuneConfig()
    _validate(cfg)
    out_dir = Path(os.path.expanduser(str(out_dir)))
    if not cfg.resume:
        _check_out_dir(out_dir, cfg)
    elif out_dir.exists() and any(out_dir.iterdir()) and not cfg.overwrite:
        raise InputError(f"output {out_dir} is already complete (nothing to resume; --overwrite to redo)")
    device = resolve_device(cfg.device)
    dtype = default_dtype(cfg.dtype, device)

    # 1. cheap validation before loading weights
    is_module = isinstance(model_or_path, nn.Module)
    model_spec = None if is_module else str(model_or_path)
    src = None if is_module else resolve_model(model_spec)
    base_report = _model_dir_report(model_spec)
    if cfg.distill and teacher is None and cfg.teacher is None:
        if base_report is not None:
            raise InputError(f"--distill: {model_spec} is a pruned model (it has {REPORT_FILE}); "
                             "pass --teacher ORIG (the unpruned model) to distill from")
        if cfg.method == "full":
            raise InputError("--distill --full needs --teacher ORIG (a frozen copy of the original weights)")
    t_src = resolve_model(str(cfg.teacher)) if (cfg.distill and teacher is None and cfg.teacher) else None
    if t_src is not None and src is not None:
        sc, tc = src.config, t_src.config
        _check_teacher_shapes(sc, tc)
    if src is not None:
        resolve_seq_len(cfg, src.config)
    check_source(data)

    # 2. model, tokenizer, sequence length
    t_load = time.perf_counter()
    if is_module:
        model = model_or_path
        if tokenizer is None:
            raise InputError("finetune(model, ...) with a model object needs tokenizer=")
        model.to(device)
    else:
        model, tok = load_model(model_spec, dtype=dtype, device=device, source=src, need_tokenizer=tokenizer is None)
        tokenizer = tokenizer or tok
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
        peft_model = _apply_lora(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    teacher_fn = None
    if cfg.distill:
        teacher_fn = _separate_teacher(teacher_model) if teacher_model is not None else _self_teacher(model, peft_model, adapter)
    total = _total_steps(cfg, len(rows))
    ckpt = checkpoint_dir(out_dir)
    trainer = _Trainer(model, adapter, rows, cfg, total, teacher_fn=teacher_fn, ckpt_dir=ckpt)
    resumed_from = None
    if cfg.resume:
        if trainer.load_checkpoint():
            resumed_from = trainer.step
            print(f"sdmprune finetune: resuming at step {trainer.step}/{total} from {ckpt}", file=sys.stderr)
        else:
            print(f"sdmprune finetune: no checkpoint at {ckpt}; starting from the beginning", file=sys.stderr)

    # 5. evaluate, train, evaluate
    evals, eval_tokens = {}, None
    if cfg.eval_ppl and resumed_from is None:
        with (peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()):
            evals["before"], eval_tokens = _eval(model, adapter, tokenizer, cfg)
    trainer.run()
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    model.eval()
    if cfg.eval_ppl:
        evals["after"], _ = _eval(model, adapter, tokenizer, cfg, eval_tokens)
    stats = trainer.stats()

    # 6. write atomically
    report = {
        "kind": "finetune", "method": cfg.method, "distill": cfg.distill,
        "base_model": model_spec or getattr(model.config, "_name_or_path", None),
        "teacher": (cfg.teacher if teacher is None else "<object>") if cfg.distill else None,
        "teacher_kind": (("separate model" if teacher_model is not None else "self (adapters disabled)")
                         if cfg.distill else None),
        "recipe": {**cfg.recipe(), "seq_len": seq_len, "dtype": dtype,
                   "targets_resolved": _lora_targets(cfg.targets) if cfg.method == "lora" else "all parameters"},
        "data": rows.description, "resumed_from_step": resumed_from,
        "training": stats, "timings": {"load_and_data_seconds": round(load_seconds, 3), "train_seconds": stats["seconds"]},
        "eval_ppl": evals or None,
        "device": str(device), "versions": package_versions(), "pruned_from": base_report,
    }
    _write_output(model, peft_model, tokenizer, out_dir, report, cfg)
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)
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
    from .evaluate import evaluate_perplexity

    ppl = evaluate_perplexity(model, tokens, seq_len=seq_len, max_windows=max_windows, backend=LOSS_BACKEND)
    return {"perplexity": float(ppl), "nll": ppl.nll, "windows": ppl.windows, "seq_len": seq_len, "tokens": ppl.tokens}


def _eval(model, adapter, tokenizer, cfg: FinetuneConfig, tokens=None) -> tuple:
    from .data import eval_token_stream

    if tokens is None:
        tokens, desc = eval_token_stream(cfg.eval_ppl, tokenizer, model=model, max_tokens=cfg.eval_windows * cfg.eval_seq_len,
                                         seq_len=cfg.eval_seq_len)
    out = perplexity(model, tokens, cfg.eval_seq_len, cfg.eval_windows)
    out["source"] = str(cfg.eval_ppl)
    return out, tokens


def _write_output(model, peft_model, tokenizer, out_dir: Path, report: dict, cfg: FinetuneConfig) -> None:
    from .loading import drop_gguf_quantizer
    from .save import atomic_output_dir, write_json_atomic

    drop_gguf_quantizer(model)

    with atomic_output_dir(out_dir, overwrite=cfg.overwrite) as tmp:
        tmp = Path(tmp)
        if peft_model is not None:
            peft_model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            report["output"] = {"adapter": str(out_dir)}
            if cfg.merge:
                merged = peft_model.merge_and_unload()
                _unwrap_peft_attrs(merged)
                merged.save_pretrained(str(tmp / "merged"))
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp / "merged"))
                report["output"]["merged"] = str(out_dir / "merged")
                write_json_atomic(str(tmp / "merged" / REPORT_FILE), report)
        else:
            model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            report["output"] = {"model": str(out_dir)}
        write_json_atomic(str(tmp / REPORT_FILE), report)


# ------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    p.add_argument("model", help="the (pruned) model: HF dir or id, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--data", required=True, help="jsonl/json/parquet instruction records, a text file, or 'self'")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--lora", action="store_true", help="LoRA adapters (default)")
    p.add_argument("--full", action="store_true", help="full fine-tuning of every parameter")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--targets", default=d.targets, help="all | mlp | attn | comma list (q_proj,v_proj,...)")
    p.add_argument("--distill", action="store_true", help="add KL(teacher || student) to the loss")
    p.add_argument("--teacher", default=None, help="the unpruned model to distill from (needed for a pruned model)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="weight of the KL term (default %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="on the teacher logits")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 16 // batch size)")
    p.add_argument("--seq-len", type=int, default=None, help="packed sequence length (default min(4096, max positions))")
    p.add_argument("--no-packing", action="store_true", help="one record per sequence (padded)")
    p.add_argument("--eval-ppl", default=None, help="perplexity on this source before and after")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows)
    p.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len)
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every K steps")
    p.add_argument("--merge", action="store_true", help="also write OUT/merged (adapters merged, plain model)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--offload-activations", action="store_true",
                   help="with --gradient-checkpointing: keep the checkpointed layer inputs in pinned host memory "
                        "between forward and backward (longer sequences or larger batches in the same memory)")
    p.add_argument("--self-samples", type=int, default=d.self_samples, help="--data self: sequences to sample")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> FinetuneConfig:
    if args.lora and args.full:
        raise InputError("--lora and --full exclude each other")
    return FinetuneConfig(
        method="full" if args.full else "lora", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, targets=args.targets, distill=args.distill, teacher=args.teacher,
        alpha=args.alpha, temperature=args.temperature, epochs=args.epochs, max_steps=args.max_steps,
        lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        packing=not args.no_packing, eval_ppl=args.eval_ppl, eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len, resume=args.resume, merge=args.merge, device=args.device,
        dtype=args.dtype, seed=args.seed, overwrite=args.overwrite, save_every=args.save_every,
        gradient_checkpointing=args.gradient_checkpointing, offload_activations=args.offload_activations,
        self_samples=args.self_samples,
        progress=not args.no_progress)


def run(args) -> int:
    cfg = config_from_args(args)
    report = finetune(args.model, args.data, args.out, cfg)
    tr = report["training"]
    line = (f"finetune: {tr['steps']} steps, {tr['tokens']} tokens, loss {tr['first_loss']:.4f} -> "
            f"{tr['last_loss']:.4f}, {tr['seconds']:.1f} s -> {args.out}")
    if report.get("eval_ppl"):
        e = report["eval_ppl"]
        line += f"; ppl {e.get('before', {}).get('perplexity', '?')} -> {e.get('after', {}).get('perplexity', '?')}"
    print(line)
    return 0
