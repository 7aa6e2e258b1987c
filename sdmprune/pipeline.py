"""The pruning pipeline: calibration tokens -> channel scores -> kept channels -> sliced model.

``prune_model(model, calib_tokens, PruneConfig(...))`` reads as the sequence it runs:

1. plan the width (``sdmprune.widths.plan_width``: a ratio of all parameters, or a width);
2. run the method's registry entry (``sdmprune.scoring.registry``): its scoring call returns the kept channels
   of every gated MLP in the original numbering (``sdmprune.scoring.taylor`` for the gradient methods,
   ``sdmprune.scoring.baselines`` for the one-shot ones, or a method a user registered);
3. optionally refit the kept ``down_proj`` columns in closed form (``cfg.refit``; sdmprune.compensation:
   layer by layer on the calibration tokens, the model still full width with the pruned channels masked);
4. optionally recover the masked model (``sdmprune.recovery.recover.recover_masked_``: LoRA on one weight copy,
   merged in place);
5. slice the kept channels in place (``sdmprune.slicing``).

Scale-out options of the same path, for gradient methods on the fused or torch engine:
``shard="fsdp"`` wraps the decoder layers with FSDP2 over the initialized process group (each rank
holds 1/N of the layers; the pruned model comes back unsharded, full weights on the CPU, on every
rank); ``offload="cpu"`` keeps the decoder layers in host memory and streams them through two
buffers on ``offload_device`` (sdmprune.scale.offload; the model comes back on the CPU). A resumable run
keeps its state in a work folder (``checkpoint_dir``; sdmprune.storage.run_state).
"""
from __future__ import annotations

import copy
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Optional, Union

import torch

from .scale import distributed as dist
from .data import check_token_ids
from .errors import InputError, require_extra
from .scoring.registry import ENGINES, ScoringRun, get_method, gradient_method_names
from .models import count_parameters, find_gated_mlps, get_adapter
from .scoring.passes import peak_memory
from .storage.paths import WorkDir
from .storage.run_state import RunState, tensor_digest, weights_digest
from .widths import WidthPlan, plan_width

# PruneConfig fields as the command line names them: every message says what a user typed
FLAGS = {"ratio": "--ratio", "width": "--width", "alpha": "--alpha", "temperature": "--temperature",
         "stage1_keep": "--stage1-keep", "method": "--method", "engine": "--engine", "batch_size": "--batch-size",
         "round_to": "--round-to", "checkpoint_every": "--checkpoint-every", "loss_token_chunk": "--loss-chunk",
         "recover_steps": "--recover-steps", "seed": "--seed", "refit": "--refit",
         "refit_strength": "--refit-strength"}


@dataclass
class PruneConfig:
    """What to prune and how. Give exactly one of ``ratio`` (fraction of ALL parameters removed)
    and ``width`` (MLP width kept in every layer). ``method``: a registered method (sdmprune.scoring.registry)."""

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
    # compensation after selection (sdmprune.compensation): "none" or "ls" (refit the kept down_proj columns);
    # refit_strength: None chooses it per layer on held-out calibration windows, a number fixes it
    refit: str = "none"
    refit_strength: Optional[float] = None
    # recovery after selection, on the masked model (sdmprune.recovery.recover hooks in here); off by default
    recover_steps: int = 0
    recover_data: Any = None
    recover_config: Any = None  # sdmprune.recovery.recover.FinetuneConfig (None = its defaults)
    # scale-out (sdmprune.scale.sharding / sdmprune.scale.offload); both need a gradient method on engine fused/torch
    shard: Optional[str] = None  # "fsdp": FSDP2-shard the decoder layers (needs an initialized process group)
    offload: Optional[str] = None  # "cpu": decoder layers in host memory, streamed to offload_device
    offload_device: Optional[str] = None  # where offloaded layers run (None: cuda if available, else cpu)
    # checkpointed layer inputs in pinned host memory between forward and backward (sdmprune.scale.activation_offload)
    offload_activations: bool = False

    def validate(self) -> "PruneConfig":
        """InputError (named as on the command line) for any setting out of range; returns self."""
        method = get_method(self.method)
        if self.engine not in ENGINES:
            raise InputError(f"--engine {self.engine!r} is unknown (one of {', '.join(ENGINES)})")
        if (self.ratio is None) == (self.width is None):
            raise InputError("give exactly one of --ratio and --width")
        for name in ("ratio", "alpha", "temperature", "stage1_keep", "host_cache_limit_gb"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(float(value)):
                raise InputError(f"{FLAGS.get(name, name)} {value} is not a finite number")
        if self.ratio is not None and not (0.0 < float(self.ratio) < 1.0):
            raise InputError(f"--ratio {self.ratio} is outside (0, 1)")
        if self.width is not None and int(self.width) < 1:
            raise InputError(f"--width {self.width} must be at least 1")
        if not (0.0 <= self.alpha <= 1.0):
            raise InputError(f"--alpha {self.alpha} is outside [0, 1]")
        if not self.temperature > 0:
            raise InputError(f"--temperature {self.temperature} must be positive")
        if not (0.0 < self.stage1_keep <= 1.0):
            raise InputError(f"--stage1-keep {self.stage1_keep} is outside (0, 1]")
        for name in ("batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{FLAGS[name]} {getattr(self, name)} must be at least 1")
        for name in ("round_to", "loss_token_chunk"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise InputError(f"{FLAGS[name]} {getattr(self, name)} must be a positive integer")
        if int(self.recover_steps) < 0:
            raise InputError(f"--recover-steps {self.recover_steps} must be >= 0")
        from .compensation import REFITS

        if self.refit not in REFITS:
            raise InputError(f"--refit {self.refit!r} is unknown (one of {', '.join(REFITS)})")
        if self.refit_strength is not None:
            if self.refit == "none":
                raise InputError("--refit-strength applies to --refit ls")
            if math.isnan(float(self.refit_strength)) or not float(self.refit_strength) > 0:
                raise InputError(f"--refit-strength {self.refit_strength} must be a positive number")
        if self.shard not in (None, "fsdp"):
            raise InputError(f"--shard {self.shard!r} is not supported (supported: fsdp)")
        if self.offload not in (None, "cpu"):
            raise InputError(f"--offload {self.offload!r} is not supported (supported: cpu)")
        lean = method.gradient and self.engine != "reference"
        gradient_methods = "/".join(gradient_method_names())
        if self.shard or self.offload:
            flag = "--shard fsdp" if self.shard else "--offload cpu"
            if not lean:
                raise InputError(f"{flag} applies to the methods {gradient_methods} with the fused or torch engine")
            if self.shard and self.offload:
                raise InputError("--shard fsdp and --offload cpu cannot be combined")
            if self.recover_steps:
                raise InputError(f"recovery (--recover-steps) does not run under {flag}; recover the saved model")
        if self.recover_steps:
            require_extra("peft", "--recover-steps (LoRA recovery)")
            if self.recover_config is not None:
                from .recovery.recover import check_recovery_config

                check_recovery_config(self.recover_config)
        if self.recover_steps and self.recover_data is None:
            raise InputError("--recover-steps needs recovery data (a data source, calibration tokens or rows)")
        if self.offload_activations:
            if not lean:
                raise InputError(f"--offload-activations applies to the methods {gradient_methods} with the fused "
                                 "or torch engine")
            if not self.gradient_checkpointing:
                raise InputError("--offload-activations moves the checkpointed layer inputs: it needs gradient "
                                 "checkpointing (drop --no-gradient-checkpointing)")
        if self.offload:
            from .scale.offload import check_offload

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
    ``stage1_scores`` / ``stage1_keep`` are set where the method has them."""

    keep: Dict[int, torch.Tensor]
    scores: Dict[int, torch.Tensor]
    plan: WidthPlan
    stage1_keep: Optional[Dict[int, torch.Tensor]] = None
    stage1_scores: Optional[Dict[int, torch.Tensor]] = None
    stats: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.plan.width


# ------------------------------------------------------------------------------------ the entries
def prune_model(model, calib_tokens: Optional[torch.Tensor], cfg: Optional[PruneConfig] = None, *,
                checkpoint_dir: Union[None, str, os.PathLike, WorkDir] = None, resume: bool = False, tokenizer=None,
                on_selected: Optional[Callable] = None, **overrides) -> PruneResult:
    """Score, select and slice the MLP channels of ``model`` in place; see the module docstring.

    calib_tokens: LongTensor [n, L] (None for methods without calibration). ``overrides`` are PruneConfig
    fields. checkpoint_dir: a work folder for resume state (gradient methods on the fused/torch engines;
    written every ``cfg.checkpoint_every`` batches); resume=True continues from it to the same result as an
    uninterrupted run, and refuses a checkpoint of other settings, weights, dtype, device kind or data.
    tokenizer: only used by the optional recovery step (``cfg.recover_steps``). on_selected: called as
    ``on_selected(model, keep)`` once the channels are chosen, before recovery and slicing (the model is
    still whole: e.g. evaluate it with the other channels masked, models.ChannelMasks).
    """
    from .slicing import prune_model_

    cfg = configured(cfg, **overrides)
    run, result = _select(model, calib_tokens, cfg, checkpoint_dir, resume)
    stats = result.stats
    unrefit = _refit(run, result.keep) if cfg.refit != "none" else None
    if on_selected is not None:
        on_selected(model, result.keep)
    if cfg.recover_steps:  # fine-tune the masked model before slicing (one weight copy)
        from .recovery.recover import recover_masked_

        t0 = time.perf_counter()
        stats["recover"] = recover_masked_(model, result.keep, tokenizer, cfg.recover_data, cfg.recover_steps,
                                           cfg=cfg.recover_config, unrefit_columns=unrefit)
        stats["time_s"]["recover"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prune_model_(model, result.keep)
    stats["time_s"]["slice"] = time.perf_counter() - t0
    _finish(model, stats)
    return result


def score_channels(model, calib_tokens: Optional[torch.Tensor], cfg: Optional[PruneConfig] = None, *,
                   checkpoint_dir: Union[None, str, os.PathLike, WorkDir] = None, resume: bool = False,
                   **overrides) -> PruneResult:
    """The channels ``prune_model`` would keep, and the scores it ranked, for any registered method --
    without recovery or slicing: the model's weights are left as they were (``keep`` and ``scores`` in
    the original channel numbering; neither ``refit`` nor ``recover_steps`` is run). Arguments as for
    ``prune_model``. This is the entry for another pruner (e.g. sdmprune.integrations.torch_pruning) to act on."""
    cfg = configured(cfg, **overrides)
    _, result = _select(model, calib_tokens, cfg, checkpoint_dir, resume)
    stats = result.stats
    _finish(model, stats)
    return result


def _finish(model, stats: dict) -> None:
    stats["time_s"]["total"] = time.perf_counter() - stats.pop("_t_start")
    stats["params_after"] = count_parameters(model)
    if "peak_memory_bytes" not in stats:  # under shard/offload: the scoring peak, recorded by scale_out
        stats.update(peak_memory(torch.device(stats["device"])))


def _select(model, calib_tokens, cfg: PruneConfig, checkpoint_dir, resume: bool):
    """Plan the width and run the method's registry entry (with the run's scale-out options and resume
    state); returns (the ScoringRun, the PruneResult), whose stats hold the timings so far and ``_t_start``."""
    method = get_method(cfg.method)
    if cfg.shard == "fsdp":
        from .scale.sharding import require_process_group

        require_process_group()  # InputError before any work
    plan = plan_width(model, cfg.ratio, cfg.width, cfg.round_to)
    tokens = check_tokens(calib_tokens, model, needed=method.needs_calibration or cfg.refit != "none")
    if tokens is not None:
        dist.shard_indices(tokens.shape[0])  # more ranks than samples: InputError before anything is written
    if cfg.refit != "none":
        from .compensation import split_windows

        split_windows(tokens.shape[0])  # too few samples to hold some out: InputError before any work
    device = scoring_device(model, cfg)
    engine, backend = ("none", "none")
    if method.gradient:
        from .scoring.taylor import resolve_engine

        engine, backend = resolve_engine(cfg.engine, device, method)
    state = None
    if checkpoint_dir is not None:
        if engine not in method.resumable:
            raise InputError(f"method {cfg.method!r} with engine {engine!r} does not checkpoint; "
                             "use engine 'torch' or 'fused' to resume")
        work = checkpoint_dir if isinstance(checkpoint_dir, WorkDir) else WorkDir(checkpoint_dir, given=True)
        state = prune_state(work, prune_fingerprint(model, tokens, cfg, engine, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats: dict = {"method": cfg.method, "engine": engine, "backend": backend, "device": str(device),
                   "world_size": dist.world_size(), "time_s": {}, "params_before": count_parameters(model)}
    if cfg.shard or cfg.offload:
        stats["shard"], stats["offload"] = cfg.shard, cfg.offload
    stats["_t_start"] = time.perf_counter()

    run = ScoringRun(model=model, tokens=tokens, config=cfg, plan=plan, device=device, engine=engine,
                     backend=backend, state=state, resume=resume, stats=stats)
    with scale_out(model, cfg, device, stats):
        selection = method.select(run)
    if tokens is not None:
        stats["calibration_tokens"] = tokens.numel()
        stats["tokens_per_s"] = {st: (tokens.numel() / t if t > 0 else None) for st, t in stats["time_s"].items()}
    return run, PruneResult(keep=selection.keep, scores=selection.scores, plan=plan,
                            stage1_keep=selection.stage1_keep, stage1_scores=selection.stage1_scores, stats=stats)


def _refit(run: ScoringRun, keep) -> Optional[dict]:
    """The refit stage on the still full-width model (after scale_out: plain, its layers moved to the run's
    device one at a time). Records its report, time and peak in the stats; resumable per layer beside the
    selection's state (the same fingerprint). Returns the replaced columns when recovery follows (its
    teacher must stay the unpruned model), else None."""
    from .compensation import kept_columns, refit_down_proj_

    cfg, stats, device = run.config, run.stats, run.device
    unrefit = kept_columns(run.model, keep) if cfg.recover_steps else None
    state = None
    if run.state is not None:
        state = RunState(run.state.work, f"sdmprune-refit-rank{dist.rank()}.pt", run.state.fingerprint)
    if device.type == "cuda":  # the scoring peak so far, then the stage's own
        stats.setdefault("peak_memory_bytes", peak_memory(device)["peak_memory_bytes"])
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    stats["refit"] = refit_down_proj_(run.model, run.tokens, keep, device=device, batch_size=cfg.batch_size,
                                      strength=cfg.refit_strength, state=state, resume=run.resume,
                                      progress=cfg.progress)
    stats["time_s"]["refit"] = time.perf_counter() - t0
    stats["refit"].update(peak_memory(device))
    if device.type == "cuda":
        stats["peak_memory_bytes"] = max(stats["peak_memory_bytes"], stats["refit"]["peak_memory_bytes"])
        stats["peak_memory_kind"] = stats["refit"]["peak_memory_kind"]
    return unrefit


def configured(cfg: Optional[PruneConfig] = None, **overrides) -> PruneConfig:
    """A validated copy of ``cfg`` (default PruneConfig()) with ``overrides`` (PruneConfig fields) applied."""
    cfg = copy.copy(cfg) if cfg is not None else PruneConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown PruneConfig field {k!r}")
        setattr(cfg, k, v)
    return cfg.validate()


def check_tokens(tokens, model, needed: bool) -> Optional[torch.Tensor]:
    """Calibration tokens as a CPU LongTensor [n, L] with ids inside the vocabulary (InputError otherwise)."""
    if tokens is None:
        if needed:
            raise InputError("this method needs calibration tokens")
        return None
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise InputError(f"calibration tokens must be [n, L] with n >= 1, L >= 2; got {tuple(tokens.shape)}")
    if tokens.is_floating_point():
        raise InputError("calibration tokens must be integer token ids")
    check_token_ids(tokens, get_adapter(model).lm_head(model).weight.shape[0], "calibration tokens")
    return tokens.long().cpu()


def prune_fingerprint(model, tokens, cfg: PruneConfig, engine: str, device: torch.device) -> dict:
    """What decides a prune's result, for resume (sdmprune.storage.run_state): the settings
    (``prune_settings``), then the model's weights and the calibration tokens."""
    fp = prune_settings(cfg, engine, next(model.parameters()).dtype, device.type,
                        {m.index: m.width for m in find_gated_mlps(model)})
    fp.update({"weights": weights_digest(model), "calibration": tensor_digest(tokens)})
    return fp


def prune_settings(cfg: PruneConfig, engine: str, dtype: torch.dtype, device_type: str, widths: Dict[int, int]) -> dict:
    """The part of a prune's resume fingerprint that the arguments decide: the settings, the engine, the
    dtype, the device kind, the ranks and the MLP widths (``widths``: {layer: width}, from the config),
    so ``prune --resume`` compares it before any weight is loaded (``RunState.check_settings``)."""
    fp = {FLAGS[k]: getattr(cfg, k) for k in ("method", "ratio", "width", "alpha", "temperature", "stage1_keep",
                                                "batch_size", "seed", "round_to", "refit", "refit_strength")}
    fp.update({"engine": engine, "dtype": str(dtype).replace("torch.", ""), "device": device_type,
               "ranks": dist.world_size(), "widths": dict(widths)})
    return fp


def prune_state(work: WorkDir, fingerprint: dict) -> RunState:
    """This rank's resume state of a prune in the work folder ``work``."""
    return RunState(work, f"sdmprune-state-rank{dist.rank()}.pt", fingerprint)


def offload_device(cfg: PruneConfig) -> torch.device:
    """The device offloaded layers stream to: ``cfg.offload_device``, else cuda if available, else cpu."""
    if cfg.offload_device is not None:
        try:
            return torch.device(cfg.offload_device)
        except RuntimeError:
            raise InputError(f"unknown device {cfg.offload_device!r}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def scoring_device(model, cfg: PruneConfig) -> torch.device:
    """Where the scoring passes run: the FSDP2 shards' device, the offload target, or the model's device."""
    if cfg.shard == "fsdp":
        from .scale.sharding import shard_device

        return shard_device()
    if cfg.offload == "cpu":
        device = offload_device(cfg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    return next(model.parameters()).device


@contextmanager
def scale_out(model, cfg: PruneConfig, device: torch.device, stats: dict):
    """Around the scoring passes: FSDP2-shard (``cfg.shard``) or stream (``cfg.offload``) the decoder
    layers; afterwards the model is plain again (full weights on the CPU), ready for slicing. A no-op
    without either option."""
    if cfg.shard == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        from .scale.sharding import shard_model, sharded_bytes, unshard_model_

        # the mesh follows the process group's backend (the default mesh would pick CUDA whenever a
        # GPU exists, even under gloo with --device cpu)
        shard_model(model, mesh=init_device_mesh(device.type, (dist.world_size(),)))
        stats["sharded_param_bytes_per_rank"] = sharded_bytes(model)
        try:
            yield
        finally:
            stats.update(peak_memory(device))  # the scoring peak, before the layers are gathered for slicing
            unshard_model_(model)  # collective: every rank gathers full weights on the CPU
    elif cfg.offload == "cpu":
        from .scale.offload import stream_layers

        layers = get_adapter(model).decoder_layers(model)
        home = next(layers[0].parameters()).device
        streamer = stream_layers(model, device)
        try:
            yield
        finally:
            stats["offload_stats"] = dict(streamer.stats)
            stats.update(peak_memory(device))
            streamer.remove()  # layers back on their host copies, the rest where it was
            if home.type != "cpu":  # the layers started on a device: put them back there
                for layer in layers:
                    layer.to(home)
    else:
        yield
