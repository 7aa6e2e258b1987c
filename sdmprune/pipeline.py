"""The pruning pipeline: calibration tokens -> channel scores -> kept channels -> sliced model.

``prune_model(model, calib_tokens, PruneConfig(...))`` runs one method (DESIGN section 1):

- ``sdmprune``: stage 1 = CE Taylor on the original model, keep the top ``stage1_keep`` of each
  layer; stage 2 = the same weights with the stage-1 channels masked (student) distilled from the
  final hidden states stage 1 computed on the SAME windows (teacher cache), loss
  ``(1 - alpha) CE + alpha KL``; keep the top ``width`` of the survivors.
- ``taylor``: stage 1 only (LLM-Pruner style CE Taylor), keep the top ``width``.
- ``magnitude`` / ``random`` / ``wanda-sp``: one-shot baselines.

Engines for the gradient methods: ``fused`` (Triton Taylor accumulation + fused LM-head loss),
``torch`` (the same lean design in PyTorch: one weight copy, hidden states x LM head, chunked loss),
``reference`` (the naive loop of the official code: a deep-copied teacher, the student physically
sliced, full logits, autograd weight gradients, one sample per backward). ``auto`` = fused on CUDA,
else torch. All three select the same channels on the same data up to float ties.

A batch loss is the SUM of per-sample losses (the Taylor abs is per sample): with equal window
lengths that is the batch-mean loss times B. Under torch.distributed every rank takes a disjoint
shard of the samples, and the float32 scores are all-reduced before any ranking.

Scale-out options of the same path (issue #10), for sdmprune/taylor with the fused or torch engine:
``shard="fsdp"`` wraps the decoder layers with FSDP2 over the initialized process group (each rank
holds 1/N of the layers; the pruned model comes back unsharded, full weights on the CPU, on every
rank); ``offload="cpu"`` keeps the decoder layers in host memory and streams them through two
buffers on ``offload_device`` (sdmprune.offload; the model comes back on the CPU).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from . import distributed as dist
from .errors import InputError, SdmpruneError
from .models import count_parameters, find_gated_mlps, fused_layer_ops, get_adapter, set_activation_checkpointing
from .plan import WidthPlan, plan_width
from .save import package_versions

METHODS = ("sdmprune", "taylor", "magnitude", "random", "wanda-sp")
ENGINES = ("auto", "fused", "torch", "reference")
GRADIENT_METHODS = ("sdmprune", "taylor")

# Test hook: called as hook(stage, batches_done_in_stage) after every calibration batch (after any
# checkpoint write). Tests raise from it to simulate an interruption.
_after_batch_hook: Optional[Callable[[int, int], None]] = None


@dataclass
class PruneConfig:
    """What to prune and how. Give exactly one of ``ratio`` (fraction of ALL parameters removed)
    and ``width`` (MLP width kept in every layer)."""

    ratio: Optional[float] = None
    width: Optional[int] = None
    alpha: float = 0.4
    temperature: float = 0.2
    stage1_keep: float = 0.975
    method: str = "sdmprune"
    engine: str = "auto"
    batch_size: int = 1
    gradient_checkpointing: bool = True
    loss_token_chunk: Optional[int] = None  # rows per chunk of the fused loss (None: a 768 MiB scratch plan)
    seed: int = 0
    round_to: Optional[int] = None
    checkpoint_every: int = 16  # batches between resume checkpoints (when a checkpoint_dir is given)
    cache_dir: Optional[str] = None  # where a large teacher cache goes (default: a temp dir)
    host_cache_limit_gb: float = 16.0  # teacher caches larger than this go to disk
    progress: bool = True
    # recovery after selection, on the masked model (sdmprune.recover hooks in here); off by default
    recover_steps: int = 0
    recover_data: Any = None
    recover_config: Any = None  # sdmprune.recover.FinetuneConfig (None = its defaults)
    # scale-out (sdmprune.sharding / sdmprune.offload); both need method sdmprune/taylor, engine fused/torch
    shard: Optional[str] = None  # "fsdp": FSDP2-shard the decoder layers (needs an initialized process group)
    offload: Optional[str] = None  # "cpu": decoder layers in host memory, streamed to offload_device
    offload_device: Optional[str] = None  # where offloaded layers run (None: cuda if available, else cpu)
    # checkpointed layer inputs in pinned host memory between forward and backward (sdmprune.activation_offload)
    offload_activations: bool = False

    def validate(self) -> "PruneConfig":
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r} (one of {', '.join(METHODS)})")
        if self.engine not in ENGINES:
            raise InputError(f"unknown engine {self.engine!r} (one of {', '.join(ENGINES)})")
        if (self.ratio is None) == (self.width is None):
            raise InputError("give exactly one of ratio and width")
        if self.ratio is not None and not (0.0 < float(self.ratio) < 1.0):
            raise InputError(f"ratio {self.ratio} is outside (0, 1)")
        if self.width is not None and int(self.width) < 1:
            raise InputError(f"width {self.width} must be at least 1")
        if not (0.0 <= self.alpha <= 1.0):
            raise InputError(f"alpha {self.alpha} is outside [0, 1]")
        if not self.temperature > 0:
            raise InputError(f"temperature {self.temperature} must be positive")
        if not (0.0 < self.stage1_keep <= 1.0):
            raise InputError(f"stage1_keep {self.stage1_keep} is outside (0, 1]")
        if self.batch_size < 1:
            raise InputError(f"batch size {self.batch_size} must be at least 1")
        if self.round_to is not None and int(self.round_to) < 1:
            raise InputError(f"round_to {self.round_to} must be a positive integer")
        if self.checkpoint_every < 1:
            raise InputError("checkpoint_every must be at least 1")
        if self.loss_token_chunk is not None and int(self.loss_token_chunk) < 1:
            raise InputError(f"loss_token_chunk {self.loss_token_chunk} must be a positive integer")
        if self.shard not in (None, "fsdp"):
            raise InputError(f"shard {self.shard!r} is not supported (supported: fsdp)")
        if self.offload not in (None, "cpu"):
            raise InputError(f"offload {self.offload!r} is not supported (supported: cpu)")
        if self.shard or self.offload:
            flag = "--shard fsdp" if self.shard else "--offload cpu"
            if self.method not in GRADIENT_METHODS or self.engine == "reference":
                raise InputError(f"{flag} applies to the methods sdmprune/taylor with the fused or torch engine")
            if self.shard and self.offload:
                raise InputError("--shard fsdp and --offload cpu cannot be combined")
            if self.recover_steps:
                raise InputError(f"recovery (recover_steps) does not run under {flag}; recover the saved model")
        if self.recover_steps:
            if int(self.recover_steps) < 0:
                raise InputError(f"recover_steps {self.recover_steps} must be >= 0")
            if self.recover_data is None:
                raise InputError("recover_steps needs recover_data (a data source, calibration tokens or rows)")
            if self.engine == "reference":
                # the reference engine slices the student after stage 1, so the one-copy recovery would
                # distill from the stage-1 model instead of the original
                raise InputError("recover_steps does not run with engine 'reference' (use fused or torch)")
        if self.offload_activations:
            if self.method not in GRADIENT_METHODS or self.engine == "reference":
                raise InputError("--offload-activations applies to the methods sdmprune/taylor with the fused or "
                                 "torch engine")
            if not self.gradient_checkpointing:
                raise InputError("--offload-activations moves the checkpointed layer inputs: it needs gradient "
                                 "checkpointing (drop --no-gradient-checkpointing)")
        if self.offload:
            from .offload import check_offload

            check_offload(self.offload, offload_device(self))
        elif self.offload_device is not None:
            raise InputError("offload_device is only used with offload='cpu'")
        return self

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("recover_data", "recover_config"):
            v = getattr(self, k)
            d[k] = v if v is None or isinstance(v, str) else type(v).__name__
        return d


@dataclass
class PruneResult:
    """keep / scores: {layer: ...} in the ORIGINAL channel index space. ``scores`` are the scores the
    final selection ranked (stage 2 for sdmprune; channels removed in stage 1 are -inf);
    ``stage1_scores`` / ``stage1_keep`` are set for sdmprune and taylor."""

    keep: Dict[int, torch.Tensor]
    scores: Dict[int, torch.Tensor]
    plan: WidthPlan
    stage1_keep: Optional[Dict[int, torch.Tensor]] = None
    stage1_scores: Optional[Dict[int, torch.Tensor]] = None
    stats: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.plan.width


# ------------------------------------------------------------------------------------ helpers
def top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, sorted ascending (ties: the lower index wins)."""
    s = scores.detach().float().cpu()
    if torch.isnan(s).any():
        raise SdmpruneError("channel scores contain NaN (the loss or the model produced non-finite values)")
    order = torch.argsort(s, descending=True, stable=True)[:k]
    return order.sort().values


def resolve_engine(engine: str, device: torch.device) -> tuple:
    """(engine, backend) after "auto": fused on CUDA else torch; fused needs Triton."""
    from sdmprune.kernels.utils import interpreter_enabled, triton_available

    if engine == "auto":
        engine = "fused" if device.type == "cuda" and triton_available() else "torch"
    if engine == "fused":
        if not triton_available() or not (device.type == "cuda" or interpreter_enabled()):
            raise InputError("engine 'fused' needs Triton and a CUDA GPU (or TRITON_INTERPRET=1); use --engine torch")
        return engine, "triton"
    return engine, "torch"


def _labels(x: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels: input_ids shifted left, the last position of every sample ignored."""
    labels = torch.full_like(x, -100)
    labels[:, :-1] = x[:, 1:]
    return labels


def _tokens_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Token ids to ``device`` without stalling the host: a copy from pageable memory waits for all GPU
    work queued before it; one from pinned memory is queued like a kernel (torch's pinned-memory
    allocator keeps the buffer until the copy has run)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return {"peak_memory_bytes": int(rss), "peak_memory_kind": "process max RSS (ru_maxrss)"}


def _progress(total: int, desc: str, enabled: bool, device: torch.device):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True, leave=True,
                disable=not (enabled and dist.is_main_process()), file=sys.stderr)


def _tick(bar, ntok: int, device: torch.device) -> None:
    bar.update(ntok)
    if device.type == "cuda" and not bar.disable:
        bar.set_postfix(peak=f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}GiB", refresh=False)


def _seconds_since(t0: float, device: torch.device) -> float:
    """Wall seconds since ``t0`` once the device has finished the work queued so far: the fused
    loop never waits on the GPU, so without the sync a stage timer would stop while its last
    batches are still running."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


@contextmanager
def _gradient_pass(model, checkpointing: bool, backend: str = "auto", offload_activations: bool = False,
                   stats: Optional[dict] = None):
    """Training mode (LLaMA-family models have no dropout) with optional gradient checkpointing;
    restores mode, checkpointing, use_cache and the norms afterwards. Where the MLP output only feeds
    the residual add, the checkpoint's recompute skips the MLP and the importance op saves only the
    MLP input (kernels.gated_mlp.checkpoint_context_fn): less recompute and no [T, I] activations
    kept. The RMSNorms and the rotary embedding run sdmprune's kernels (``backend``;
    models.fused_layer_ops): one pass each way, and the norms keep x and 1/rms for backward instead
    of a float32 copy of x. ``offload_activations``: the checkpointed layer inputs wait in pinned
    host memory (sdmprune.activation_offload; its counters go to ``stats["activation_offload"]``)."""
    from sdmprune.kernels.gated_mlp import checkpoint_context_fn

    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    context_fn = checkpoint_context_fn(get_adapter(model).mlp_output_feeds_residual_only(model))
    was_gc = set_activation_checkpointing(model, True, context_fn=context_fn) if checkpointing else None
    model.config.use_cache = False
    model.train()
    try:
        with fused_layer_ops(model, backend), _maybe_offload_activations(model, offload_activations, stats):
            yield
    finally:
        model.train(was_training)
        if checkpointing and not was_gc:
            set_activation_checkpointing(model, False)
        if use_cache is not None:
            model.config.use_cache = use_cache


@contextmanager
def _maybe_offload_activations(model, enabled: bool, stats: Optional[dict]):
    from .activation_offload import maybe_offload_checkpoint_inputs

    with maybe_offload_checkpoint_inputs(model, enabled) as offload:
        yield
    if offload is not None and stats is not None:
        stats["activation_offload"] = dict(offload.stats)


class _TeacherCache:
    """Final hidden states of stage 1, one [L, d] row per local sample, in the model dtype:
    host memory, or a file (torch.from_file, shared mmap) when large or when resuming."""

    def __init__(self, n: int, L: int, d: int, dtype: torch.dtype, path: Optional[str] = None,
                 pin: bool = False):
        self.path = path
        if path is not None:
            nbytes = n * L * d * torch.finfo(dtype).bits // 8
            if not os.path.exists(path) or os.path.getsize(path) != nbytes:
                with open(path, "wb") as fh:
                    fh.truncate(nbytes)
            self.data = torch.from_file(path, shared=True, size=n * L * d, dtype=dtype).view(n, L, d)
        else:
            self.data = torch.empty(n, L, d, dtype=dtype, pin_memory=pin)

    def put(self, start: int, h: torch.Tensor) -> None:
        # Into pinned memory the device-to-host copy is queued on the stream instead of waiting for
        # the forward to finish, so the loss and backward launch behind it; stage 2's reads are
        # host-to-device copies on the same stream, hence ordered after it. A file-backed cache is
        # pageable memory: the copy is synchronous there.
        self.data[start:start + h.shape[0]].copy_(h, non_blocking=self.data.is_pinned())

    def get(self, start: int, b: int, device) -> torch.Tensor:
        return self.data[start:start + b].to(device, non_blocking=True)


class _Checkpoint:
    """Per-rank resume state (scores, stage, cursor, RNG, stage-1 result) written atomically."""

    def __init__(self, directory: str, fingerprint: str):
        self.dir = directory
        self.fingerprint = fingerprint
        os.makedirs(directory, exist_ok=True)
        r = dist.rank()
        self.state_path = os.path.join(directory, f"state-rank{r}.pt")
        self.teacher_path = os.path.join(directory, f"teacher-rank{r}.bin")

    def load(self) -> Optional[dict]:
        if not os.path.exists(self.state_path):
            return None
        state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            raise InputError(f"checkpoint in {self.dir} belongs to a different run (model, data or settings "
                             "differ); remove it or drop --resume")
        return state

    def save(self, state: dict) -> None:
        state = dict(state, fingerprint=self.fingerprint, rng=_rng_state())
        tmp = self.state_path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)


def _rng_state() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never start CUDA on a CPU run
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: Optional[dict]) -> None:
    if not state:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fingerprint(model, tokens: Optional[torch.Tensor], cfg: PruneConfig, engine: str) -> str:
    h = hashlib.sha256()
    keys = ("ratio", "width", "alpha", "temperature", "stage1_keep", "method", "batch_size", "seed", "round_to")
    h.update(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True).encode())
    h.update(engine.encode())
    h.update(json.dumps({m.index: m.width for m in find_gated_mlps(model)}).encode())
    h.update(str(dist.world_size()).encode())
    if tokens is not None:
        h.update(str(tuple(tokens.shape)).encode())
        h.update(tokens.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_tokens(tokens, model, needed: bool) -> Optional[torch.Tensor]:
    if tokens is None:
        if needed:
            raise InputError("this method needs calibration tokens")
        return None
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise InputError(f"calibration tokens must be [n, L] with n >= 1, L >= 2; got {tuple(tokens.shape)}")
    if tokens.is_floating_point():
        raise InputError("calibration tokens must be integer token ids")
    vocab = get_adapter(model).lm_head(model).weight.shape[0]
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise InputError(f"calibration token ids must be in [0, {vocab})")
    return tokens.long().cpu()


def offload_device(cfg: PruneConfig) -> torch.device:
    """The device offloaded layers stream to: ``cfg.offload_device``, else cuda if available, else cpu."""
    if cfg.offload_device is not None:
        try:
            return torch.device(cfg.offload_device)
        except RuntimeError:
            raise InputError(f"unknown device {cfg.offload_device!r}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shard_device() -> torch.device:
    """The device FSDP2 shards live on: the current GPU under NCCL, the CPU under gloo."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------- lean engines (fused/torch)
def _lean_taylor(model, tokens, cfg: PruneConfig, plan: WidthPlan, stage1_width: int, backend: str,
                 ckpt: Optional[_Checkpoint], resume: bool, stats: dict):
    """(stage1_scores, stage1_keep or None, final scores [orig space], keep) with one weight copy."""
    from sdmprune.kernels.fused_linear_distill_loss import fused_linear_distill_loss

    from .importance import TaylorImportance

    adapter = get_adapter(model)
    body = adapter.body(model)
    weight = adapter.lm_head(model).weight
    device = weight.device
    two_stage = cfg.method == "sdmprune"
    idx = dist.shard_indices(tokens.shape[0])
    B = cfg.batch_size
    batches = [idx[i:i + B] for i in range(0, len(idx), B)]
    L = tokens.shape[1]
    d = weight.shape[1]

    state = ckpt.load() if (ckpt is not None and resume) else None
    stage, cursor = 1, 0
    s1 = keep1 = None
    teacher = None
    if two_stage:
        nbytes = len(idx) * L * d * torch.finfo(weight.dtype).bits // 8
        path = None
        if ckpt is not None:
            path = ckpt.teacher_path
        elif nbytes > cfg.host_cache_limit_gb * 2**30:
            cache_dir = cfg.cache_dir or tempfile.mkdtemp(prefix="sdmprune-teacher-")
            os.makedirs(cache_dir, exist_ok=True)
            path = os.path.join(cache_dir, f"teacher-rank{dist.rank()}.bin")
        teacher = _TeacherCache(len(idx), L, d, weight.dtype, path, pin=device.type == "cuda" and path is None)
        stats["teacher_cache"] = {"bytes": nbytes, "where": path or "host memory"}

    def maybe_save(stage_no, done, imp, force=False):
        if ckpt is None:
            return
        if force or done % cfg.checkpoint_every == 0:
            ckpt.save({"stage": stage_no, "cursor": done, "importance": imp.state_dict(),
                       "stage1_scores": s1, "stage1_keep": keep1})

    def run_stage(stage_no, desc, cursor, imp, batch_loss):
        """One pass over this rank's batches from ``cursor``: forward, ``batch_loss(bi, x, h)``
        (mean per sample), backward of its sum over samples, progress, checkpoint, timing."""
        t0 = time.perf_counter()
        bar = _progress(len(idx) * L, desc, cfg.progress, device)
        bar.update(sum(len(b) for b in batches[:cursor]) * L)
        for bi in range(cursor, len(batches)):
            x = _tokens_to(tokens[batches[bi]], device)
            h = body(input_ids=x, use_cache=False).last_hidden_state
            (batch_loss(bi, x, h) * x.shape[0]).backward()  # sum of per-sample mean losses
            _tick(bar, x.numel(), device)
            maybe_save(stage_no, bi + 1, imp)
            if _after_batch_hook is not None:
                _after_batch_hook(stage_no, bi + 1)
        bar.close()
        stats["time_s"][f"stage{stage_no}"] = _seconds_since(t0, device)

    def ce_loss(bi, x, h):
        if teacher is not None:
            teacher.put(bi * B, h.detach())
        return fused_linear_distill_loss(h.reshape(-1, d), weight, _labels(x).reshape(-1), None,
                                         alpha=0.0, backend=backend, token_chunk=cfg.loss_token_chunk)

    def distill_loss(bi, x, h):
        ht = teacher.get(bi * B, x.shape[0], device)
        return fused_linear_distill_loss(h.reshape(-1, d), weight, _labels(x).reshape(-1), ht.reshape(-1, d),
                                         alpha=cfg.alpha, temperature=cfg.temperature, backend=backend,
                                         token_chunk=cfg.loss_token_chunk)

    with _gradient_pass(model, cfg.gradient_checkpointing, backend, cfg.offload_activations, stats), \
            TaylorImportance(model, backend=backend) as imp:
        if state is not None:
            stage, cursor = state["stage"], state["cursor"]
            s1, keep1 = state["stage1_scores"], state["stage1_keep"]
            imp.load_state_dict(state["importance"])
            _set_rng_state(state.get("rng"))
            stats["resumed_from"] = {"stage": stage, "batch": cursor}
        if stage == 1:
            run_stage(1, "stage 1/2: CE Taylor" if two_stage else "taylor: CE", cursor, imp, ce_loss)
            s1 = dist.all_reduce_scores_({k: v.float() for k, v in imp.scores().items()})
            s1 = {k: v.cpu() for k, v in s1.items()}
            if not two_stage:
                keep = {k: top_channels(v, plan.width) for k, v in s1.items()}
                return s1, None, s1, keep
            keep1 = {k: top_channels(v, stage1_width) for k, v in s1.items()}
            imp.reset()
            stage, cursor = 2, 0
            maybe_save(2, 0, imp, force=True)
        # stage 2: the masked student against the cached teacher hidden states
        masks = {}
        for k, kk in keep1.items():
            m = torch.zeros(plan.original_width, dtype=torch.bool)
            m[kk] = True
            masks[k] = m
        imp.set_channel_mask(masks)
        run_stage(2, "stage 2/2: self-distillation Taylor", cursor, imp, distill_loss)
        imp.set_channel_mask(None)
        s2 = dist.all_reduce_scores_({k: v.float() for k, v in imp.scores().items()})
    final, keep = {}, {}
    for k, v in s2.items():
        full = torch.full((plan.original_width,), float("-inf"))
        full[keep1[k]] = v.cpu()[keep1[k]]
        final[k] = full
        keep[k] = top_channels(full, plan.width)
    return s1, keep1, final, keep


# ------------------------------------------------------------------------------ reference engine
def _slice_copy_(model, keep: Dict[int, torch.Tensor]) -> None:
    """Physically slice the MLPs with index_select copies (the naive way: new tensors)."""
    from torch import nn

    for m in find_gated_mlps(model):
        k = keep[m.index].to(m.gate.weight.device)
        for lin, dim in ((m.gate, 0), (m.up, 0), (m.down, 1)):
            lin.weight = nn.Parameter(lin.weight.detach().index_select(dim, k).clone(), requires_grad=False)
            if lin.bias is not None and dim == 0:
                lin.bias = nn.Parameter(lin.bias.detach().index_select(0, k).clone(), requires_grad=False)
        m.gate.out_features = m.up.out_features = m.down.in_features = k.numel()
    model.config.intermediate_size = int(next(iter(keep.values())).numel())


def _reference_taylor(model, tokens, cfg: PruneConfig, plan: WidthPlan, stage1_width: int, stats: dict):
    """The naive loop: one sample per backward, full float32 logits, autograd weight gradients,
    NaiveTaylorImportance; stage 2 with a deep-copied teacher and a physically sliced student.
    Returns (..., sliced_to) where sliced_to is the stage-1 keep the model is now sliced to."""
    from .importance import NaiveTaylorImportance

    device = next(model.parameters()).device
    idx = dist.shard_indices(tokens.shape[0])
    L = tokens.shape[1]
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        bar = _progress(len(idx) * L, "stage 1: CE Taylor (reference)", cfg.progress, device)
        with NaiveTaylorImportance(model) as imp:
            for i in idx:
                x = tokens[i:i + 1].to(device)
                logits = model(input_ids=x, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[0, :-1], x[0, 1:])
                loss.backward()
                imp.accumulate()
                _tick(bar, L, device)
            s1 = {k: v.cpu() for k, v in dist.all_reduce_scores_(imp.scores()).items()}
        bar.close()
        stats["time_s"]["stage1"] = _seconds_since(t0, device)
        if cfg.method == "taylor":
            return s1, None, s1, {k: top_channels(v, plan.width) for k, v in s1.items()}, None
        keep1 = {k: top_channels(v, stage1_width) for k, v in s1.items()}
        t0 = time.perf_counter()
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        _slice_copy_(model, keep1)
        T = cfg.temperature
        bar = _progress(len(idx) * L, "stage 2: self-distillation Taylor (reference)", cfg.progress, device)
        with NaiveTaylorImportance(model) as imp:
            for i in idx:
                x = tokens[i:i + 1].to(device)
                with torch.no_grad():
                    zt = teacher(input_ids=x, use_cache=False).logits.float()[0]
                zs = model(input_ids=x, use_cache=False).logits.float()[0]
                ce = F.cross_entropy(zs[:-1], x[0, 1:])
                kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt / T, -1), log_target=True,
                              reduction="sum") / zs.shape[0]
                ((1 - cfg.alpha) * ce + cfg.alpha * kl).backward()
                imp.accumulate()
                _tick(bar, L, device)
            s2 = {k: v.cpu() for k, v in dist.all_reduce_scores_(imp.scores()).items()}
        bar.close()
        del teacher
        stats["time_s"]["stage2"] = _seconds_since(t0, device)
    finally:
        model.train(was_training)
    final, keep = {}, {}
    for k, v in s2.items():
        full = torch.full((plan.original_width,), float("-inf"))
        full[keep1[k]] = v  # the sliced student's channel j is original channel keep1[j]
        final[k] = full
        keep[k] = top_channels(full, plan.width)
    return s1, keep1, final, keep, keep1


# ------------------------------------------------------------------------------------ baselines
def _baseline_scores(model, tokens, cfg: PruneConfig, stats: dict) -> Dict[int, torch.Tensor]:
    mlps = find_gated_mlps(model)
    device = mlps[0].down.weight.device
    t0 = time.perf_counter()
    if cfg.method == "magnitude":
        out = {m.index: (m.gate.weight.float().norm(dim=1) + m.up.weight.float().norm(dim=1)
                         + m.down.weight.float().norm(dim=0)).cpu() for m in mlps}
    elif cfg.method == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        out = {m.index: torch.rand(m.width, generator=g) for m in mlps}
    else:  # wanda-sp: sum_j |W_down[j, c]| * ||H[:, c]||_2 over all calibration tokens
        sq = {m.index: torch.zeros(m.width, dtype=torch.float32, device=m.down.weight.device) for m in mlps}

        def hook_for(i):
            def hook(module, args):
                h = args[0].detach().float()
                sq[i] += h.reshape(-1, h.shape[-1]).pow(2).sum(0)
            return hook

        hooks = [m.down.register_forward_pre_hook(hook_for(m.index)) for m in mlps]
        idx = dist.shard_indices(tokens.shape[0])
        was_training = model.training
        model.eval()
        try:
            bar = _progress(len(idx) * tokens.shape[1], "wanda-sp: activation norms", cfg.progress, device)
            with torch.no_grad():
                for i in range(0, len(idx), cfg.batch_size):
                    x = _tokens_to(tokens[idx[i:i + cfg.batch_size]], device)
                    get_adapter(model).body(model)(input_ids=x, use_cache=False)
                    _tick(bar, x.numel(), device)
            bar.close()
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        sq = dist.all_reduce_scores_(sq)  # sums of squares add across ranks; the sqrt comes after
        out = {m.index: (m.down.weight.float().abs().sum(0) * sq[m.index].sqrt()).cpu() for m in mlps}
    stats["time_s"]["stage1"] = _seconds_since(t0, device)
    return out


# ------------------------------------------------------------------------------------ scale-out
@contextmanager
def _scale_out(model, cfg: PruneConfig, device: torch.device, stats: dict):
    """Around the scoring passes: FSDP2-shard (``cfg.shard``) or stream (``cfg.offload``) the decoder
    layers; afterwards the model is plain again (full weights on the CPU), ready for slicing. A no-op
    without either option."""
    if cfg.shard == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        from .sharding import shard_model, sharded_bytes, unshard_model_

        # the mesh follows the process group's backend (the default mesh would pick CUDA whenever a
        # GPU exists, even under gloo with --device cpu)
        shard_model(model, mesh=init_device_mesh(device.type, (dist.world_size(),)))
        stats["sharded_param_bytes_per_rank"] = sharded_bytes(model)
        try:
            yield
        finally:
            stats.update(_peak_memory(device))  # the scoring peak, before the layers are gathered for slicing
            unshard_model_(model)  # collective: every rank gathers full weights on the CPU
    elif cfg.offload == "cpu":
        from .offload import stream_layers

        layers = get_adapter(model).decoder_layers(model)
        home = next(layers[0].parameters()).device
        streamer = stream_layers(model, device)
        try:
            yield
        finally:
            stats["offload_stats"] = dict(streamer.stats)
            stats.update(_peak_memory(device))
            streamer.remove()  # layers back on their host copies, the rest where it was
            if home.type != "cpu":  # the layers started on a device: put them back there
                for layer in layers:
                    layer.to(home)
    else:
        yield


# ------------------------------------------------------------------------------------ the entry
def prune_model(model, calib_tokens: Optional[torch.Tensor], cfg: Optional[PruneConfig] = None, *,
                checkpoint_dir: Optional[str] = None, resume: bool = False, tokenizer=None,
                **overrides) -> PruneResult:
    """Score, select and slice the MLP channels of ``model`` in place; see the module docstring.

    calib_tokens: LongTensor [n, L] (may be None for magnitude/random). ``overrides`` are PruneConfig
    fields. checkpoint_dir: write resume state every ``cfg.checkpoint_every`` batches (lean engines);
    resume=True continues from it to the same result as an uninterrupted run. tokenizer: only used by
    the optional recovery step (``cfg.recover_steps``).
    """
    from .slicing import prune_model_

    cfg = copy.copy(cfg) if cfg is not None else PruneConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown PruneConfig field {k!r}")
        setattr(cfg, k, v)
    cfg.validate()
    if cfg.shard == "fsdp":
        from .sharding import _require_process_group

        _require_process_group()  # InputError before any work
    plan = plan_width(model, cfg.ratio, cfg.width, cfg.round_to)
    tokens = _check_tokens(calib_tokens, model, needed=cfg.method in GRADIENT_METHODS + ("wanda-sp",))
    if tokens is not None:
        dist.shard_indices(tokens.shape[0])  # more ranks than samples: InputError before anything is written
    if cfg.shard == "fsdp":
        device = _shard_device()
    elif cfg.offload == "cpu":
        device = offload_device(cfg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = next(model.parameters()).device
    engine, backend = resolve_engine(cfg.engine, device) if cfg.method in GRADIENT_METHODS else ("none", "none")
    if engine == "reference" and checkpoint_dir is not None:
        raise InputError("the reference engine does not checkpoint; use engine 'torch' or 'fused' to resume")
    stage1_width = max(int(cfg.stage1_keep * plan.original_width), plan.width)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats: dict = {"method": cfg.method, "engine": engine, "backend": backend, "device": str(device),
                   "world_size": dist.world_size(), "time_s": {}, "params_before": count_parameters(model)}
    if cfg.shard or cfg.offload:
        stats["shard"], stats["offload"] = cfg.shard, cfg.offload
    t_start = time.perf_counter()
    s1 = keep1 = None
    sliced_to = None
    if cfg.method in GRADIENT_METHODS:
        if engine == "reference":
            s1, keep1, scores, keep, sliced_to = _reference_taylor(model, tokens, cfg, plan, stage1_width, stats)
        else:
            ckpt = _Checkpoint(checkpoint_dir, _fingerprint(model, tokens, cfg, engine)) if checkpoint_dir else None
            with _scale_out(model, cfg, device, stats):
                s1, keep1, scores, keep = _lean_taylor(model, tokens, cfg, plan, stage1_width, backend, ckpt, resume,
                                                       stats)
    else:
        scores = _baseline_scores(model, tokens, cfg, stats)
        keep = {k: top_channels(v, plan.width) for k, v in scores.items()}
    if tokens is not None:
        ntok = tokens.numel()
        stats["calibration_tokens"] = ntok
        stats["tokens_per_s"] = {st: (ntok / t if t > 0 else None) for st, t in stats["time_s"].items()}

    # the reference student is already sliced to the stage-1 channels: address it by position
    current_keep = ({k: torch.searchsorted(sliced_to[k], keep[k]) for k in keep} if sliced_to is not None else keep)

    # ---- recovery hook (sdmprune.recover): fine-tune the masked model before slicing ----
    if cfg.recover_steps:
        from .recover import recover_masked_

        if cfg.recover_data is None:
            raise InputError("recover_steps needs recover_data (a data source or prebuilt rows)")
        t0 = time.perf_counter()
        stats["recover"] = recover_masked_(model, current_keep, tokenizer, cfg.recover_data, cfg.recover_steps,
                                           cfg=cfg.recover_config)
        stats["time_s"]["recover"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prune_model_(model, current_keep)
    stats["time_s"]["slice"] = time.perf_counter() - t0
    stats["time_s"]["total"] = time.perf_counter() - t_start
    stats["params_after"] = count_parameters(model)
    if "peak_memory_bytes" not in stats:  # under shard/offload: the scoring peak, recorded by _scale_out
        stats.update(_peak_memory(device))
    return PruneResult(keep=keep, scores=scores, plan=plan, stage1_keep=keep1, stage1_scores=s1, stats=stats)


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF id, local directory, .gguf file, or alias smollm2-135m")
    p.add_argument("--out", required=True, help="output directory (a Hugging Face model directory)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="fraction of ALL parameters to remove, e.g. 0.2")
    g.add_argument("--width", type=int, help="MLP width to keep in every layer")
    p.add_argument("--method", default="sdmprune", choices=METHODS)
    p.add_argument("--calib", default="self", metavar="SRC",
                   help="calibration: c4, wikitext2, a .txt/.jsonl/.parquet file or directory, a .pt of "
                        "token ids [n, L], or self (sampled from the model; default, offline)")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--alpha", type=float, default=0.4)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--stage1-keep", type=float, default=0.975)
    p.add_argument("--batch-size", type=int, default=None, help="samples per backward pass per GPU (default 1)")
    p.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="GPU memory budget, e.g. 18GiB: the batch size becomes the largest that sdmprune's memory "
                        "model (sdmprune plan) predicts to fit per GPU")
    p.add_argument("--engine", default="auto", choices=ENGINES)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--loss-chunk", type=int, default=None, metavar="ROWS",
                   help="token rows per chunk of the fused loss (smaller: less scratch, V*10 bytes a row)")
    p.add_argument("--round-to", type=int, default=None, help="round the width down to a multiple of M")
    p.add_argument("--save-scores", metavar="PATH", help="write per-layer scores and kept indices (safetensors)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (same arguments)")
    p.add_argument("--checkpoint-every", type=int, default=16, help="batches between resume checkpoints")
    p.add_argument("--work-dir", default=None, help="resume state + teacher cache (default: OUT.sdmprune-work)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--eval-ppl", metavar="SRC", help="perplexity before and after pruning on SRC")
    p.add_argument("--eval-seq-len", type=int, default=None, help="perplexity window (default: --seq-len)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--recover-steps", type=int, default=0, metavar="N",
                   help="after selection, N steps of distilled LoRA recovery on the masked model (one weight "
                        "copy; the adapters are merged before slicing)")
    p.add_argument("--recover-data", metavar="SRC", default=None,
                   help="recovery data (instruction .jsonl/.parquet, .txt, or self); default: the calibration windows")
    p.add_argument("--recover-seq-len", type=int, default=None,
                   help="recovery sequence length (default: --seq-len)")
    p.add_argument("--recover-lr", type=float, default=1e-4)
    p.add_argument("--shard", choices=["fsdp"], default=None,
                   help="FSDP2-shard the decoder layers over the ranks of a torchrun launch (each GPU holds 1/N)")
    p.add_argument("--offload", choices=["cpu"], default=None,
                   help="keep the decoder layers in host memory and stream them to --device (small GPUs)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep the checkpointed layer inputs in pinned host memory between forward and backward "
                        "(larger batches in the same memory); with --recover-steps the recovery steps do too")


def _validate_args(args):
    """Every check that needs no model weights, before any work."""
    from .data import resolve_source
    from .loading import default_dtype, resolve_device, resolve_model

    if args.samples < 1:
        raise InputError("--samples must be at least 1")
    if args.seq_len < 2:
        raise InputError("--seq-len must be at least 2")
    if args.eval_seq_len is not None and args.eval_seq_len < 2:
        raise InputError("--eval-seq-len must be at least 2")
    device = _rank_device(resolve_device(args.device))
    cfg = PruneConfig(ratio=args.ratio, width=args.width, alpha=args.alpha, temperature=args.temperature,
                      stage1_keep=args.stage1_keep, method=args.method, engine=args.engine,
                      batch_size=1 if args.batch_size is None else args.batch_size,
                      gradient_checkpointing=not args.no_gradient_checkpointing,
                      loss_token_chunk=args.loss_chunk,
                      seed=args.seed, round_to=args.round_to, checkpoint_every=args.checkpoint_every,
                      progress=not args.no_progress, shard=args.shard, offload=args.offload,
                      offload_device=str(device) if args.offload else None,
                      offload_activations=args.offload_activations,
                      **_recovery_options(args)).validate()
    if cfg.shard == "fsdp":
        from .sharding import _require_process_group

        _require_process_group()
    if dist.world_size() > args.samples and cfg.method not in ("magnitude", "random"):
        raise InputError(f"{dist.world_size()} ranks but only {args.samples} calibration samples "
                         "(--samples): every rank needs at least one")
    out = os.path.abspath(os.path.expanduser(args.out))
    if os.path.exists(out) and not args.overwrite and not (os.path.isdir(out) and not os.listdir(out)):
        raise InputError(f"output {args.out!r} exists (use --overwrite)")
    if args.save_scores:
        parent = os.path.dirname(os.path.abspath(args.save_scores)) or "."
        if not os.path.isdir(parent):
            raise InputError(f"--save-scores: directory {parent!r} does not exist")
    calib = resolve_source(args.calib, "calibration") if cfg.method != "magnitude" and cfg.method != "random" else None
    eval_spec = resolve_source(args.eval_ppl, "evaluation") if args.eval_ppl else None
    source = resolve_model(args.model)
    from .plan import meta_model_from_config

    plan = plan_width(meta_model_from_config(source.config), cfg.ratio, cfg.width, cfg.round_to)
    budget = None
    if cfg.method in GRADIENT_METHODS:
        engine, _ = resolve_engine(cfg.engine, device)
        if args.max_memory is not None:
            if args.batch_size is not None:
                raise InputError("--batch-size and --max-memory exclude each other (--max-memory picks the batch size)")
            cfg.batch_size, budget = batch_size_for_memory(source.config, cfg, engine, args.seq_len, args.max_memory,
                                                           args.samples, default_dtype(args.dtype, device))
    elif args.max_memory is not None:
        raise InputError(f"--max-memory sizes the batch of the gradient passes (methods {', '.join(GRADIENT_METHODS)}); "
                         f"method {cfg.method!r} has none")
    return cfg, out, device, calib, eval_spec, source, plan, budget


def memory_settings(cfg: PruneConfig, engine: str, dtype="bf16") -> dict:
    """The keyword arguments of sdmprune.memory.predict_peak_memory / largest_batch that describe a
    run of ``cfg`` on this process group (``engine`` resolved: "fused", "torch" or "reference")."""
    return dict(dtype=dtype, gpus=dist.world_size(), shard=cfg.shard, offload=cfg.offload, engine=engine,
                gradient_checkpointing=cfg.gradient_checkpointing, loss_token_chunk=cfg.loss_token_chunk,
                offload_activations=cfg.offload_activations)


def batch_size_for_memory(model_config, cfg: PruneConfig, engine: str, seq_len: int, budget: str, samples: int,
                          dtype: str = "bf16") -> tuple:
    """(batch size, note): the largest batch per GPU that sdmprune.memory predicts to fit ``budget``
    (e.g. "18GiB") with ``cfg``'s settings, at most this rank's share of ``samples``; ``note`` holds
    the budget and the prediction for the report. Raises InputError when even batch 1 is predicted not
    to fit. ``engine``: "fused", "torch" or "reference" (one sample per backward)."""
    from .memory import GiB, largest_batch, parse_size, predict_peak_memory

    limit = parse_size(budget)
    kw = memory_settings(cfg, engine, dtype)
    most = 1 if engine == "reference" else max(1, -(-samples // dist.world_size()))
    batch = largest_batch(model_config, seq_len, limit, max_batch=most, **kw)
    if batch == 0:
        need = predict_peak_memory(model_config, seq_len, 1, **kw)["total"]
        hints = [h for h, applies in (("--offload-activations", cfg.gradient_checkpointing and not cfg.offload_activations),
                                      ("--offload cpu", not cfg.offload), ("--shard fsdp over more GPUs", True),
                                      ("a shorter --seq-len", True)) if applies]
        raise InputError(f"--max-memory {budget}: even batch 1 is predicted to need {need / GiB:.2f} GiB per GPU "
                         f"(try {', '.join(hints)})")
    predicted = predict_peak_memory(model_config, seq_len, batch, **kw)["total"]
    return batch, {"max_memory": budget, "budget_bytes": limit, "batch_size": batch, "predicted_peak_bytes": predicted}


def _recovery_options(args) -> dict:
    """PruneConfig fields for ``--recover-steps`` (recovery data defaults to the calibration windows,
    filled in once they exist)."""
    steps = int(getattr(args, "recover_steps", 0) or 0)
    if steps <= 0:
        if steps < 0:
            raise InputError(f"--recover-steps {steps} must be >= 0")
        return {}
    from .recover import FinetuneConfig

    data = args.recover_data
    if data is None and args.method in ("magnitude", "random"):
        raise InputError(f"--recover-steps with method {args.method!r} needs --recover-data (it has no calibration data)")
    if data is not None and data != "self" and not os.path.exists(data):
        raise InputError(f"--recover-data {data!r}: no such file or directory")
    # --offload-activations carries over: the recovery steps checkpoint their layers and offload the inputs too
    offload = bool(getattr(args, "offload_activations", False))
    rcfg = FinetuneConfig(lr=args.recover_lr, seq_len=args.recover_seq_len or args.seq_len, seed=args.seed,
                          progress=not args.no_progress, gradient_checkpointing=offload, offload_activations=offload)
    return {"recover_steps": steps, "recover_data": data if data is not None else "calibration",
            "recover_config": rcfg}


def _rank_device(device: torch.device) -> torch.device:
    """Under torchrun each rank uses its own GPU (LOCAL_RANK) when the device is plain ``cuda``."""
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _init_torchrun(device_arg: str) -> bool:
    """Join the process group of a torchrun launch (WORLD_SIZE > 1) unless one is initialized already:
    NCCL with each rank on GPU LOCAL_RANK, gloo when the run is on the CPU. True when it initialized."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return False
    from .loading import resolve_device

    device = _rank_device(resolve_device(device_arg))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        torch.distributed.init_process_group("gloo")
    return True


def _eval_streaming(model, cfg: PruneConfig, device: torch.device):
    """Forward-only work (perplexity, sampling "self" calibration) under --shard/--offload: the model is
    in host memory, so stream its layers through the GPU instead of running on the CPU. A no-op on
    the CPU."""
    if not (cfg.shard or cfg.offload) or device.type != "cuda":
        return contextlib.nullcontext()
    from .offload import stream_layers

    return stream_layers(model, device)


def run(args) -> int:
    initialized = _init_torchrun(args.device)
    try:
        return _run(args)
    finally:
        if initialized:
            torch.distributed.destroy_process_group()


def _run(args) -> int:
    from .data import calibration_windows
    from .evaluate import perplexity_on_source
    from .loading import default_dtype, load_model

    cfg, out, device, calib, eval_spec, source, plan, budget = _validate_args(args)
    dtype = default_dtype(args.dtype, device)
    main = dist.is_main_process()

    def say(msg):
        if main:
            print(msg, file=sys.stderr, flush=True)

    say(f"plan: width {plan.original_width} -> {plan.width} in {plan.num_layers} layers, "
        f"params {plan.params_before:,} -> {plan.params_after:,} ({plan.achieved_ratio:.2%} removed)"
        + (f"; rounded to a multiple of {plan.rounding['multiple']} (was {plan.rounding['width_before']})"
           if plan.rounding else ""))
    if budget is not None:
        say(f"batch size {budget['batch_size']}: the largest predicted to fit {budget['max_memory']} per GPU "
            f"({budget['predicted_peak_bytes'] / 2**30:.2f} GiB predicted; sdmprune plan shows the parts)")
    t0 = time.perf_counter()
    # under --shard/--offload the weights load into host memory: FSDP2 moves 1/N of every layer to the
    # GPU, the streamer copies layers in as they run
    where = "cpu" if (cfg.shard or cfg.offload) else str(device)
    model, tokenizer = load_model(args.model, dtype=dtype, device=where, source=source)
    say(f"loaded {source.describe()} ({dtype}, {where}) in {time.perf_counter() - t0:.1f}s"
        + (f"; {dist.world_size()} ranks" if dist.world_size() > 1 else "")
        + (f"; --shard {cfg.shard}" if cfg.shard else "")
        + (f"; --offload {cfg.offload} to {device}" if cfg.offload else ""))
    report: dict = {"model": args.model, "model_source": source.describe(), "method": cfg.method,
                    "config": cfg.to_dict(), "dtype": dtype, "versions": package_versions()}
    if budget is not None:
        report["batch_size_from_max_memory"] = budget
    tokens = None
    if calib is not None:
        t0 = time.perf_counter()
        with _eval_streaming(model, cfg, device):  # "self" samples from the model: on the GPU under offload
            tokens, desc = calibration_windows(calib, tokenizer, args.samples, args.seq_len, seed=args.seed,
                                               model=model)
        # every rank shards the SAME samples: rank 0's (sampling "self" on different GPUs may differ)
        tokens = dist.broadcast_from_main(tokens)
        desc["seconds"] = round(time.perf_counter() - t0, 2)
        report["calibration"] = desc
        say(f"calibration: {tokens.shape[0]} x {tokens.shape[1]} tokens from {calib.describe()} ({desc['seconds']}s)")
    ev_len = args.eval_seq_len or args.seq_len
    ev_tokens = None
    if eval_spec is not None:  # every rank (keeps the ranks in step; only rank 0 reports)
        with _eval_streaming(model, cfg, device):
            ppl, ev_tokens, ev_desc = perplexity_on_source(model, tokenizer, eval_spec, ev_len, args.eval_windows,
                                                           seed=args.seed + 1000)
        report["eval"] = {"data": ev_desc, "before": ppl.to_dict()}
        say(f"perplexity before: {float(ppl):.3f} ({eval_spec.describe()}; {ppl.windows} windows of {ev_len}, "
            f"{ppl.backend})")
    if cfg.recover_data == "calibration":  # --recover-steps without --recover-data: the calibration windows
        cfg.recover_data = tokens
    work = args.work_dir or out.rstrip(os.sep) + ".sdmprune-work"
    use_ckpt = cfg.method in GRADIENT_METHODS and cfg.engine != "reference"
    result = prune_model(model, tokens, cfg, checkpoint_dir=work if use_ckpt else None, resume=args.resume,
                         tokenizer=tokenizer)
    st = result.stats
    say(f"pruned: params {st['params_before']:,} -> {st['params_after']:,} "
        f"({1 - st['params_after'] / st['params_before']:.2%} removed) in {st['time_s']['total']:.1f}s, "
        f"engine {st['engine']}")
    if eval_spec is not None and main:  # only rank 0 reports it
        with _eval_streaming(model, cfg, device):
            ppl = perplexity_on_source(model, tokenizer, eval_spec, ev_len, args.eval_windows, tokens=ev_tokens)[0]
        report["eval"]["after"] = ppl.to_dict()
        say(f"perplexity after: {float(ppl):.3f}")
    report.update({
        "plan": plan.to_dict(), "width": result.width,
        "widths": {str(k): int(v.numel()) for k, v in result.keep.items()},
        "kept_indices": {str(k): v.tolist() for k, v in result.keep.items()},
        "stage1_kept_indices": ({str(k): v.tolist() for k, v in result.stage1_keep.items()}
                                if result.stage1_keep is not None else None),
        "params_before": st["params_before"], "params_after": st["params_after"], "stats": st,
    })
    if main:
        from .save import save_pruned

        save_pruned(model, tokenizer, out, report, overwrite=args.overwrite)
        if args.save_scores:
            _save_scores(args.save_scores, result)
        say(f"saved {out}" + (f" and {args.save_scores}" if args.save_scores else ""))
        line = (f"summary: parameters {st['params_before']:,} -> {st['params_after']:,} "
                f"({1 - st['params_after'] / st['params_before']:.2%} removed; MLP width {plan.original_width} -> "
                f"{result.width})")
        if eval_spec is not None:
            ev = report["eval"]
            line += (f"; perplexity {ev['before']['perplexity']:.3f} -> {ev['after']['perplexity']:.3f} on "
                     f"{eval_spec.describe()} ({ev['after']['windows']} windows of {ev_len} tokens)")
        say(line)
        if use_ckpt and os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
    if main:  # the machine-readable result line (stdout)
        print(json.dumps({"out": out, "params_before": st["params_before"], "params_after": st["params_after"],
                          "width": result.width,
                          **({"ppl_before": report["eval"]["before"]["perplexity"],
                              "ppl_after": report["eval"]["after"]["perplexity"]} if eval_spec is not None else {})}))
    return 0


def _save_scores(path: str, result: PruneResult) -> None:
    """safetensors: scores.{l}, keep.{l} (final) and stage1.scores.{l}, stage1.keep.{l}; atomic."""
    from safetensors.torch import save_file

    tensors = {}
    for k in result.keep:
        tensors[f"scores.{k}"] = result.scores[k].float().contiguous()
        tensors[f"keep.{k}"] = result.keep[k].long().contiguous()
        if result.stage1_scores is not None:
            tensors[f"stage1.scores.{k}"] = result.stage1_scores[k].float().contiguous()
        if result.stage1_keep is not None:
            tensors[f"stage1.keep.{k}"] = result.stage1_keep[k].long().contiguous()
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"method": result.stats.get("method", ""), "width": str(result.width)})
    os.replace(tmp, path)
