"""Taylor importance over calibration batches: the engines of the gradient methods.

``taylor_selection(run, objective)`` is the scoring call of the registry entries:

- ``"sdmprune"``: stage 1 = CE Taylor on the original model, keep the top ``stage1_keep`` of each
  layer; stage 2 = the same weights with the stage-1 channels masked (the student) distilled from
  the final hidden states stage 1 computed on the SAME windows (the teacher cache), loss
  ``(1 - alpha) CE + alpha KL(softmax(z_t / T) || softmax(z_s))``; keep the top ``width`` of the
  survivors;
- ``"taylor"``: stage 1 only, keep the top ``width``;
- ``"hfprune"``: one stage, label-free: loss = each sample's mean over its positions of the entropy of
  the model's own next-token distribution; score = ``sum_t |H[t, c] * dL/dH[t, c]|`` at the input H
  of every down_proj (activation Taylor, the abs per token element); keep the top ``width``.

Engines: ``fused`` (Triton Taylor accumulation in the MLP backward + fused LM-head loss), ``torch``
(the same lean design in PyTorch: one weight copy, hidden states x LM head, chunked loss) and
``reference`` (the naive loop of the official code: a second, sliced copy for the stage-2 student,
full logits, autograd weight gradients, one sample per backward). All select the same channels on the
same data up to float ties. The model is never sliced here: selections are in the original numbering.

A batch loss is the SUM of per-sample losses (the Taylor abs is per sample): with equal window
lengths that is the batch-mean loss times B. Under torch.distributed every rank takes a disjoint
shard of the samples, and the float32 scores are all-reduced before any ranking.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..scale import distributed as dist
from ..errors import InputError
from .selection import ScoringRun, Selection, top_channels
from ..models import find_gated_mlps, find_layer_ops, fused_layer_ops, get_adapter, scoring_mode, set_activation_checkpointing
from .passes import causal_labels, progress_bar, seconds_since, tick, tokens_to

# Test hook: called as hook(stage, batches_done_in_stage) after every calibration batch (after any
# checkpoint write). Tests raise from it to simulate an interruption.
_after_batch_hook: Optional[Callable[[int, int], None]] = None


def resolve_engine(engine: str, device: torch.device, method) -> tuple:
    """(engine, backend) of a gradient ``method`` on ``device``: "auto" is fused on CUDA else torch; fused
    needs Triton; the engine must be one the method runs on."""
    from sdmprune.kernels.utils import interpreter_enabled, triton_available

    if engine == "auto":
        engine = "fused" if device.type == "cuda" and triton_available() else "torch"
    if engine not in method.engines:
        raise InputError(f"--engine {engine!r} does not run method {method.name!r} (engines: "
                         f"{', '.join(method.engines)})")
    if engine == "fused":
        if not triton_available() or not (device.type == "cuda" or interpreter_enabled()):
            raise InputError("--engine fused needs Triton and a CUDA GPU (or TRITON_INTERPRET=1); use --engine torch")
        return engine, "triton"
    return engine, "torch"


def stage1_width(cfg, plan) -> int:
    """Channels stage 1 keeps: ``stage1_keep`` of the width. Fewer than the target width would leave
    stage 2 nothing to choose (and the report a setting that did not hold): an InputError, raised before
    any pass (taylor_selection, and prune's checks)."""
    width = int(cfg.stage1_keep * plan.original_width)
    if width < plan.width:
        least = math.ceil(plan.width / plan.original_width * 1000) / 1000
        while int(least * plan.original_width) < plan.width:  # float rounding in the product above
            least = round(least + 0.001, 3)
        raise InputError(f"--stage1-keep {cfg.stage1_keep} keeps {width} of {plan.original_width} channels in stage "
                         f"1, fewer than the target width {plan.width}: stage 2 would choose nothing; give at least "
                         f"{least:g} (1 lets stage 2 choose among all channels)")
    return width


OBJECTIVES = ("sdmprune", "taylor", "hfprune")
# a second stage against the original model's outputs (the cached teacher states)
DISTILLING = ("sdmprune",)
# scored at every down_proj input H (sum_t |H * dL/dH|), weights frozen; the others score the weights
ACTIVATION_SCORED = ("hfprune",)


def taylor_selection(run: ScoringRun, objective: str) -> Selection:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective in DISTILLING:
        stage1_width(run.config, run.plan)  # before any pass
    if run.engine == "reference":
        if objective in ACTIVATION_SCORED:
            return _reference_hfprune(run)
        return _reference_taylor(run, objective in DISTILLING)
    return _lean_taylor(run, objective)


@contextmanager
def gradient_pass(model, checkpointing: bool, backend: str = "auto", offload_activations: bool = False,
                  stats: Optional[dict] = None):
    """Scoring mode (models.scoring_mode: no dropout, whatever the config says) with optional gradient
    checkpointing; restores modes, checkpointing, use_cache and the norms afterwards. Where the MLP output only feeds
    the residual add, the checkpoint's recompute skips the MLP and the importance op saves only the
    MLP input (kernels.gated_mlp.checkpoint_context_fn): less recompute and no [T, I] activations
    kept. The RMSNorms and the rotary embedding run sdmprune's kernels (``backend``;
    models.fused_layer_ops): one pass each way, and the norms keep x and 1/rms for backward instead
    of a float32 copy of x. ``offload_activations``: the checkpointed layer inputs wait in pinned
    host memory (sdmprune.scale.activation_offload; its counters go to ``stats["activation_offload"]``).
    Which layer ops were swapped, and why others were not, goes to ``stats["layer_ops"]``."""
    from sdmprune.kernels.gated_mlp import checkpoint_context_fn

    from ..scale.activation_offload import maybe_offload_checkpoint_inputs

    use_cache = getattr(model.config, "use_cache", None)
    context_fn = checkpoint_context_fn(get_adapter(model).mlp_output_feeds_residual_only(model))
    was_gc = set_activation_checkpointing(model, True, context_fn=context_fn) if checkpointing else None
    model.config.use_cache = False
    ops = find_layer_ops(model)
    if stats is not None:
        stats["layer_ops"] = ops.report()
    try:
        with scoring_mode(model), fused_layer_ops(model, backend, ops), \
                maybe_offload_checkpoint_inputs(model, offload_activations) as offload:
            yield
        if offload is not None and stats is not None:
            stats["activation_offload"] = dict(offload.stats)
    finally:
        if checkpointing and not was_gc:
            set_activation_checkpointing(model, False)
        if use_cache is not None:
            model.config.use_cache = use_cache


def pinned_host_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A page-locked host tensor of exactly the asked size. torch's pinned allocator rounds every request
    up to a power of two (a 9 GiB teacher cache would pin 16 GiB), so ordinary host memory is allocated
    and registered with CUDA instead; without CUDA it is ordinary memory. Release it with
    ``release_pinned``."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes and torch.cuda.is_available():
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
        if int(getattr(err, "value", err)) != 0:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        t._sdmprune_registered = True  # read by release_pinned
    return t


def release_pinned(t: Optional[torch.Tensor]) -> None:
    if t is not None and getattr(t, "_sdmprune_registered", False):
        torch.cuda.synchronize()  # no copy may still read it
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        t._sdmprune_registered = False


class TeacherCache:
    """Final hidden states of stage 1, one [L, d] row per local sample, in the model dtype: in host
    memory (pinned on CUDA, exactly the asked size), or in a file (torch.from_file, shared mmap) when it
    is larger than ``host_cache_limit_gb`` or when the run checkpoints.

    A file is created only by a fresh stage 1. A resumed run reads the file its checkpoint was written
    with and refuses one that is missing or has another size: cached states are never re-created
    empty under a run that has already filled them."""

    def __init__(self, n: int, L: int, d: int, dtype: torch.dtype, path: Optional[str] = None,
                 pin: bool = False, resuming: bool = False):
        self.path = path
        nbytes = n * L * d * torch.finfo(dtype).bits // 8
        if path is not None:
            if resuming:
                size = os.path.getsize(path) if os.path.exists(path) else None
                if size != nbytes:
                    raise InputError(f"--resume: the teacher cache {path!r} is "
                                     f"{'missing' if size is None else f'{size} bytes'}, not the {nbytes} bytes of "
                                     "this run; drop --resume to start over")
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as fh:
                    fh.truncate(nbytes)
            self.data = torch.from_file(path, shared=True, size=n * L * d, dtype=dtype).view(n, L, d)
        elif pin:
            self.data = pinned_host_empty((n, L, d), dtype)
        else:
            self.data = torch.empty(n, L, d, dtype=dtype)

    def put(self, start: int, h: torch.Tensor) -> None:
        # Into pinned memory the device-to-host copy is queued on the stream instead of waiting for
        # the forward to finish, so the loss and backward launch behind it; stage 2's reads are
        # host-to-device copies on the same stream, hence ordered after it. A file-backed cache is
        # pageable memory: the copy is synchronous there.
        self.data[start:start + h.shape[0]].copy_(h, non_blocking=self.data.is_pinned())

    def get(self, start: int, b: int, device) -> torch.Tensor:
        return self.data[start:start + b].to(device, non_blocking=True)

    def close(self) -> None:
        release_pinned(self.data)
        self.data = None


# --------------------------------------------------------------------- lean engines (fused/torch)
def _lean_taylor(run: ScoringRun, objective: str) -> Selection:
    """Every stage of ``objective`` with one weight copy; resumable through ``run.state``."""
    from .importance import TaylorImportance
    from .objectives import head_loss, head_states

    two_stage = objective in DISTILLING
    model, tokens, cfg, plan, stats = run.model, run.tokens, run.config, run.plan, run.stats
    adapter = get_adapter(model)
    weight = adapter.lm_head(model).weight
    device = weight.device
    idx = dist.shard_indices(tokens.shape[0])
    B = cfg.batch_size
    batches = [idx[i:i + B] for i in range(0, len(idx), B)]
    L, d = tokens.shape[1], weight.shape[1]
    state = run.state.load() if (run.state is not None and run.resume) else None
    if run.state is not None and not run.resume:
        run.state.discard()  # a fresh start rewrites the teacher cache: an old checkpoint must not survive it

    teacher, scratch_dir = None, None
    if two_stage:
        nbytes = len(idx) * L * d * torch.finfo(weight.dtype).bits // 8
        path = None
        if run.state is not None:
            path = str(run.state.file(f"sdmprune-teacher-rank{dist.rank()}.bin"))
        elif nbytes > cfg.host_cache_limit_gb * 2**30:
            scratch_dir = tempfile.mkdtemp(prefix="sdmprune-teacher-", dir=cfg.cache_dir)
            path = os.path.join(scratch_dir, f"teacher-rank{dist.rank()}.bin")
        teacher = TeacherCache(len(idx), L, d, weight.dtype, path, pin=device.type == "cuda" and path is None,
                               resuming=state is not None)
        stats["teacher_cache"] = {"bytes": nbytes, "where": path or "host memory"}

    s1 = keep1 = None

    def checkpoint(stage_no, done, imp, force=False):
        if run.state is not None and (force or done % cfg.checkpoint_every == 0):
            run.state.save({"stage": stage_no, "cursor": done, "importance": imp.state_dict(),
                            "stage1_scores": s1, "stage1_keep": keep1})

    def run_stage(stage_no, desc, cursor, imp, batch_loss):
        """One pass over this rank's batches from ``cursor``: forward, ``batch_loss(bi, x, h)`` (mean
        per sample), backward of its sum over samples, progress, checkpoint, timing."""
        t0 = time.perf_counter()
        bar = progress_bar(len(idx) * L, desc, cfg.progress)
        bar.update(sum(len(b) for b in batches[:cursor]) * L)
        for bi in range(cursor, len(batches)):
            x = tokens_to(tokens[batches[bi]], device)
            # scaled to the model's own logits; cached teacher states are then scaled too
            h = head_states(model, x, adapter=adapter)
            (batch_loss(bi, x, h) * x.shape[0]).backward()  # sum of per-sample mean losses
            tick(bar, x.numel(), device)
            checkpoint(stage_no, bi + 1, imp)
            if _after_batch_hook is not None:
                _after_batch_hook(stage_no, bi + 1)
        bar.close()
        stats["time_s"][f"stage{stage_no}"] = seconds_since(t0, device)

    def ce_loss(bi, x, h):
        if teacher is not None:
            teacher.put(bi * B, h.detach())
        return head_loss(h.reshape(-1, d), weight, "ce", causal_labels(x).reshape(-1), backend=run.backend,
                         token_chunk=cfg.loss_token_chunk)

    def entropy_loss(bi, x, h):
        # every window is one sample of equal length: the mean over the batch's rows times B (the
        # caller) is the sum of the per-sample means over their positions
        return head_loss(h.reshape(-1, d), weight, "entropy", backend=run.backend, token_chunk=cfg.loss_token_chunk)

    def distill_loss(bi, x, h):
        ht = teacher.get(bi * B, x.shape[0], device)
        return head_loss(h.reshape(-1, d), weight, "distill", causal_labels(x).reshape(-1), ht.reshape(-1, d),
                         alpha=cfg.alpha, temperature=cfg.temperature, backend=run.backend,
                         token_chunk=cfg.loss_token_chunk)

    try:
        kind = "activation" if objective in ACTIVATION_SCORED else "weight"
        with gradient_pass(model, cfg.gradient_checkpointing, run.backend, cfg.offload_activations, stats), \
                TaylorImportance(model, backend=run.backend, kind=kind) as imp:
            stage, cursor = 1, 0
            if state is not None:
                stage, cursor = state["stage"], state["cursor"]
                s1, keep1 = state["stage1_scores"], state["stage1_keep"]
                imp.load_state_dict(state["importance"])
                stats["resumed_from"] = {"stage": stage, "batch": cursor}
            if stage == 1:
                desc = {"sdmprune": "stage 1/2: CE Taylor", "taylor": "taylor: CE",
                        "hfprune": "hfprune: entropy Taylor at H"}[objective]
                run_stage(1, desc, cursor, imp, entropy_loss if objective == "hfprune" else ce_loss)
                s1 = dist.all_reduce_scores_({k: v.float() for k, v in imp.scores().items()})
                s1 = {k: v.cpu() for k, v in s1.items()}
                if not two_stage:
                    return Selection(keep={k: top_channels(v, plan.width) for k, v in s1.items()}, scores=s1,
                                     stage1_scores=s1)
                keep1 = {k: top_channels(v, stage1_width(cfg, plan)) for k, v in s1.items()}
                imp.reset()
                stage, cursor = 2, 0
                checkpoint(2, 0, imp, force=True)
            # stage 2: the masked student against the cached teacher hidden states
            imp.set_channel_mask(_bool_masks(keep1, plan.original_width))
            run_stage(2, "stage 2/2: self-distillation Taylor", cursor, imp, distill_loss)
            imp.set_channel_mask(None)
            s2 = dist.all_reduce_scores_({k: v.float() for k, v in imp.scores().items()})
    finally:
        if teacher is not None:
            teacher.close()
        if scratch_dir is not None:
            shutil.rmtree(scratch_dir, ignore_errors=True)
    return _second_stage_selection(s1, keep1, {k: v.cpu() for k, v in s2.items()}, plan)


def _bool_masks(keep: Dict[int, torch.Tensor], width: int) -> Dict[int, torch.Tensor]:
    masks = {}
    for k, kk in keep.items():
        m = torch.zeros(width, dtype=torch.bool)
        m[kk] = True
        masks[k] = m
    return masks


def _second_stage_selection(s1, keep1, s2_original_numbering, plan) -> Selection:
    """Stage-2 scores of the stage-1 survivors (others -inf) and the top ``width`` of them."""
    final, keep = {}, {}
    for k, v in s2_original_numbering.items():
        full = torch.full((plan.original_width,), float("-inf"))
        full[keep1[k]] = v[keep1[k]]
        final[k] = full
        keep[k] = top_channels(full, plan.width)
    return Selection(keep=keep, scores=final, stage1_keep=keep1, stage1_scores=s1)


# ------------------------------------------------------------------------------ reference engine
def _sliced_copy(model, keep: Dict[int, torch.Tensor]):
    """A deep copy of ``model`` whose MLPs are sliced to ``keep`` with index_select (the naive way: the
    copy holds new tensors)."""
    from torch import nn

    student = copy.deepcopy(model)
    for m in find_gated_mlps(student):
        k = keep[m.index].to(m.gate.weight.device)
        for lin, dim in ((m.gate, 0), (m.up, 0), (m.down, 1)):
            lin.weight = nn.Parameter(lin.weight.detach().index_select(dim, k).clone(), requires_grad=False)
            if lin.bias is not None and dim == 0:
                lin.bias = nn.Parameter(lin.bias.detach().index_select(0, k).clone(), requires_grad=False)
        m.gate.out_features = m.up.out_features = m.down.in_features = k.numel()
    student.config.intermediate_size = int(next(iter(keep.values())).numel())
    return student


def _reference_taylor(run: ScoringRun, two_stage: bool) -> Selection:
    """The naive loop: one sample per backward, full float32 logits, autograd weight gradients,
    NaiveTaylorImportance; stage 2 with the original model as the teacher and a physically sliced copy
    as the student."""
    from .importance import NaiveTaylorImportance

    model, tokens, cfg, plan, stats = run.model, run.tokens, run.config, run.plan, run.stats
    device = next(model.parameters()).device
    idx = dist.shard_indices(tokens.shape[0])
    L = tokens.shape[1]
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        bar = progress_bar(len(idx) * L, "stage 1: CE Taylor (reference)", cfg.progress)
        with NaiveTaylorImportance(model) as imp:
            for i in idx:
                x = tokens[i:i + 1].to(device)
                logits = model(input_ids=x, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[0, :-1], x[0, 1:])
                loss.backward()
                imp.accumulate()
                tick(bar, L, device)
            s1 = {k: v.cpu() for k, v in dist.all_reduce_scores_(imp.scores()).items()}
        bar.close()
        stats["time_s"]["stage1"] = seconds_since(t0, device)
        if not two_stage:
            return Selection(keep={k: top_channels(v, plan.width) for k, v in s1.items()}, scores=s1,
                             stage1_scores=s1)
        keep1 = {k: top_channels(v, stage1_width(cfg, plan)) for k, v in s1.items()}
        t0 = time.perf_counter()
        student = _sliced_copy(model, keep1)
        T = cfg.temperature
        bar = progress_bar(len(idx) * L, "stage 2: self-distillation Taylor (reference)", cfg.progress)
        with NaiveTaylorImportance(student) as imp:
            for i in idx:
                x = tokens[i:i + 1].to(device)
                with torch.no_grad():
                    zt = model(input_ids=x, use_cache=False).logits.float()[0]
                zs = student(input_ids=x, use_cache=False).logits.float()[0]
                ce = F.cross_entropy(zs[:-1], x[0, 1:])
                kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt / T, -1), log_target=True,
                              reduction="sum") / zs.shape[0]
                ((1 - cfg.alpha) * ce + cfg.alpha * kl).backward()
                imp.accumulate()
                tick(bar, L, device)
            sliced = {k: v.cpu() for k, v in dist.all_reduce_scores_(imp.scores()).items()}
        bar.close()
        del student
        stats["time_s"]["stage2"] = seconds_since(t0, device)
    finally:
        model.train(was_training)
    # the sliced student's channel j is original channel keep1[j]
    s2 = {}
    for k, v in sliced.items():
        full = torch.zeros(plan.original_width)
        full[keep1[k]] = v
        s2[k] = full
    return _second_stage_selection(s1, keep1, s2, plan)


def _reference_hfprune(run: ScoringRun) -> Selection:
    """HFPrune's official loop: one sample per backward, the model's full float32 logits, loss = the
    mean over positions of the entropy of softmax(logits); autograd keeps the gradient of every
    down_proj input H, and ``score[c] += sum_t |H[t, c] * dL/dH[t, c]|`` (float32, where the official
    code holds bf16)."""
    model, tokens, cfg, plan, stats = run.model, run.tokens, run.config, run.plan, run.stats
    mlps = find_gated_mlps(model)
    device = next(model.parameters()).device
    idx = dist.shard_indices(tokens.shape[0])
    L = tokens.shape[1]
    scores = {m.index: torch.zeros(m.width, dtype=torch.float32, device=device) for m in mlps}
    inputs = {}

    def keep_input(i):
        def hook(module, args):
            args[0].retain_grad()
            inputs[i] = args[0]
        return hook

    saved = [(p, p.requires_grad) for p in model.parameters()]
    hooks = [m.down.register_forward_pre_hook(keep_input(m.index)) for m in mlps]
    was_training = model.training
    model.eval()
    # gradients reach H although every weight is frozen (a hook the caller installed is left alone)
    enabled_here = not getattr(model, "_require_grads_hooks", None)
    if enabled_here:
        model.enable_input_require_grads()
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        t0 = time.perf_counter()
        bar = progress_bar(len(idx) * L, "hfprune: entropy Taylor at H (reference)", cfg.progress)
        for i in idx:
            x = tokens[i:i + 1].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()[0]
            logp = F.log_softmax(logits, -1)
            (-(logp.exp() * logp).sum(-1).mean()).backward()
            with torch.no_grad():
                for k, h in inputs.items():
                    scores[k] += (h.float() * h.grad.float()).abs().reshape(-1, h.shape[-1]).sum(0)
            inputs.clear()
            tick(bar, L, device)
        bar.close()
        stats["time_s"]["stage1"] = seconds_since(t0, device)
    finally:
        for h in hooks:
            h.remove()
        if enabled_here:
            model.disable_input_require_grads()
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)
    s = {k: v.cpu() for k, v in dist.all_reduce_scores_(scores).items()}
    return Selection(keep={k: top_channels(v, plan.width) for k, v in s.items()}, scores=s, stage1_scores=s)
