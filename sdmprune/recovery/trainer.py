"""The recovery training loop: optimizer steps over packed rows with the fused LM-head loss.

``Trainer(model, adapter, rows, cfg, total_steps, teacher_fn=..., work=...)`` runs ``total_steps``
optimizer steps of ``cfg.micro_and_accum()`` micro-batches each. Loss: ``kernels.fused_linear_distill_loss``
on the final hidden states, never the logits: ``(1 - alpha) * CE + alpha * KL(softmax(z_t / T) ||
softmax(z_s))``, plain CE without a teacher. Over a step of several micro-batches CE is a mean over all
the step's loss tokens and KL a mean over all its real tokens (token-weighted, as HF Trainer's
``num_items_in_batch``), so the split into micro-batches does not change the gradient. Padding never
counts (target -100, kl_mask False). AdamW with cosine decay to 0 and no warm-up; norms and biases get
no weight decay.

The data order is a pure function of (seed, epoch), so the step number is the whole data cursor. With a
work folder (``sdmprune.storage.paths.WorkDir``) the trainer checkpoints every ``cfg.save_every`` steps and
when interrupted (sdmprune.storage.run_state: trainable weights, optimizer, scheduler, step, RNG), and a resume
refuses a checkpoint of other options, data, weights, dtype or device kind.

Teachers (``teacher_fn(input_ids, position_ids) -> (h_t, W_t or None)`` under no_grad):
``self_teacher`` (the same weights with adapters disabled and channel masks off: no second copy) and
``separate_teacher`` (another model).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Callable, List, Optional

import torch

from ..errors import InputError
from ..models import find_layer_ops, fused_layer_ops, get_adapter
from ..scoring.objectives import head_loss, head_states
from ..storage.paths import WorkDir
from ..storage.run_state import RunState, weights_digest
from .sft_data import IGNORE_INDEX, Rows

# Backend of the fused loss ("auto": Triton on CUDA, PyTorch on CPU unless TRITON_INTERPRET=1).
# Tests of the training loop pin "torch": the interpreter is for the kernel's own tests.
LOSS_BACKEND = "auto"
CHECKPOINT_FILE = "sdmprune-finetune-state.pt"


class Interrupted(RuntimeError):
    """Training stopped early on purpose (``stop_after``); the checkpoint is kept for --resume."""


class Trainer:
    """Optimizer steps over packed rows with the fused loss; optional teacher; checkpoints.

    ``model``: the HF model whose body/head the student runs (LoRA layers injected into it, or all
    parameters trainable). ``teacher_fn(input_ids, position_ids) -> (h_t [b, L, d], W_t or None)``
    under no_grad, or None for plain CE."""

    def __init__(self, model, adapter, rows: Rows, cfg, total_steps: int, *,
                 teacher_fn: Optional[Callable] = None, work: Optional[WorkDir] = None, desc: str = "finetune"):
        self.model, self.rows, self.cfg = model, rows, cfg
        self.adapter = adapter
        self.head = adapter.lm_head(model)
        self.device = self.head.weight.device
        self.teacher_fn = teacher_fn
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
        # the norms and the rotary embedding run sdmprune's kernels during a step (models.fused_layer_ops;
        # the norms keep input and 1/rms instead of float32 copies: about 8 KiB less per token and layer
        # at d = 2048 without checkpointing); probed once here, not every step
        self.layer_ops = find_layer_ops(model)
        # Triton on the GPU; on the CPU the PyTorch forms (the interpreter is for the kernels' own tests)
        self.layer_backend = "auto" if self.device.type == "cuda" else "torch"
        self.state = RunState(work, CHECKPOINT_FILE, self.fingerprint()) if work is not None else None

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
        """What decides the trained weights, for resume: the settings (``finetune_settings``), then the
        data, the steps, the trainable parameters and the model's weights."""
        fp = finetune_settings(self.cfg, self.head.weight.dtype, self.device.type)
        fp.update({"data": self.rows.description, "steps": self.total, "trainable": [n for n, _ in self.params],
                   "weights": weights_digest(self.model)})
        return fp

    # ---- checkpoints
    def save_checkpoint(self) -> None:
        if self.state is None:
            return
        self.state.save({
            "step": self.step, "cursor": self.cursor(self.step),
            "trainable": {n: p.detach().cpu().clone() for n, p in self.params},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "history": self.history, "tokens": self.tokens, "elapsed": self.elapsed,
        })

    def load_checkpoint(self) -> bool:
        """Continue from the work folder's checkpoint (False when there is none); see RunState.load."""
        state = None if self.state is None else self.state.load()
        if state is None:
            return False
        named = dict(self.params)
        with torch.no_grad():
            for n, t in state["trainable"].items():
                named[n].copy_(t)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state["history"]
        self.tokens, self.elapsed = state["tokens"], state["elapsed"]
        return True

    # ---- one optimizer step
    def _hidden(self, ids, pos):
        # use_cache=False matters: with a cache, transformers ignores the position-id restarts and
        # packed records would attend to each other.
        return head_states(self.model, ids, position_ids=pos, adapter=self.adapter)  # the model's own logit scale

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
            loss, ce, kl = head_loss(
                h, self.head.weight, "distill" if distill else "ce", tgt[sel].to(self.device), h_t,
                teacher_weight=w_t, alpha=(w_kl / scale) if distill else 0.0, temperature=cfg.temperature,
                mask=klm[sel].to(self.device) if distill else None, return_parts=True, backend=LOSS_BACKEND)
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
        from ..scale.activation_offload import maybe_offload_checkpoint_inputs

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
               "losses": self.history, "layer_ops": self.layer_ops.report()}
        if self.activation_offload is not None:
            out["activation_offload"] = dict(self.activation_offload)
        if self.device.type == "cuda":
            out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out


def finetune_settings(cfg, dtype: torch.dtype, device_type: str) -> dict:
    """The part of a fine-tune's resume fingerprint that the arguments decide: the recipe (options that
    change neither the math nor the data order may differ), the dtype and the device kind; ``finetune
    --resume`` compares it before any weight is loaded (``RunState.check_settings``)."""
    # the dtype as resolved is compared, not as asked ("auto", or None in the Python API, is bf16 or fp32)
    free = {"save_every", "eval_ppl", "eval_windows", "eval_seq_len", "merge", "dtype"}
    fp = {f"--{k.replace('_', '-')}": v for k, v in cfg.recipe().items() if k not in free}
    fp.update({"dtype": str(dtype).replace("torch.", ""), "device": device_type})
    return fp


def total_steps(cfg, n_rows: int, steps: Optional[int] = None) -> int:
    if steps is not None:
        return int(steps)
    if cfg.max_steps:
        return int(cfg.max_steps)
    micro, accum = cfg.micro_and_accum()
    return max(1, math.ceil(cfg.epochs * math.ceil(n_rows / (micro * accum))))


def self_teacher(model, peft_model, adapter, masks=None):
    """Teacher = the same weights, adapters disabled (and channel masks off): no second copy."""

    def teacher(ids, pos):
        was_training = model.training
        model.eval()  # no dropout in the teacher pass
        try:
            with torch.no_grad(), peft_model.disable_adapter(), (masks.off() if masks else contextlib.nullcontext()):
                h = head_states(model, ids, position_ids=pos, adapter=adapter)
        finally:
            model.train(was_training)
        return h, None  # None: the LM head is shared

    return teacher


def separate_teacher(teacher_model):
    adapter = get_adapter(teacher_model)
    w_t = adapter.lm_head(teacher_model).weight

    def teacher(ids, pos):
        with torch.no_grad():
            h = head_states(teacher_model, ids.to(w_t.device), position_ids=pos.to(w_t.device), adapter=adapter)
        return h.to(ids.device), w_t

    return teacher

