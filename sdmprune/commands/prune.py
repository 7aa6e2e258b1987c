"""``sdmprune prune``: check everything, load, calibrate, (evaluate), prune, (evaluate), save.

Every check that needs no weights runs first (``check_prune_arguments``): the method, the numbers,
the device, the output paths under the ownership rule (sdmprune.storage.paths), the data sources, the model's
config and the width plan. Only then is the model loaded. Under torchrun each rank scores its shard
of the samples and rank 0 writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from ..scale import distributed as dist
from ..errors import InputError, require_extra
from ..scoring.registry import ENGINES, get_method
from .common import (at_least, device_options, import_plugins, model_argument, progress_option, say_layer_ops,
                     verbose_option, warn_remote_code)


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_argument(p, "the model to prune")
    p.add_argument("--out", required=True, help="output folder: a Hugging Face model folder, written atomically")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="fraction of ALL parameters to remove, e.g. 0.2")
    g.add_argument("--width", type=int, help="MLP width to keep in every layer")
    p.add_argument("--method", default="sdmprune",
                   help="sdmprune, hfprune, taylor, wanda-sp, magnitude, random, or a method a --plugin registers")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE (a module name or a .py file) first; it registers methods with "
                        "sdmprune.register_method (repeatable)")
    p.add_argument("--calib", default="self", metavar="SRC",
                   help="calibration: c4, wikitext2, a .txt/.jsonl/.json/.parquet file or folder, a .pt of "
                        "token ids [n, L], or self (sampled from the model; offline)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl/.json/.parquet records")
    p.add_argument("--samples", type=int, default=1024, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per calibration window")
    p.add_argument("--alpha", type=float, default=0.4, help="weight of the KL term in stage 2 (sdmprune)")
    p.add_argument("--temperature", type=float, default=0.2, help="on the teacher logits in stage 2 (sdmprune)")
    p.add_argument("--stage1-keep", type=float, default=0.975,
                   help="fraction of the channels stage 1 keeps (sdmprune)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per backward pass per GPU (default 1)")
    p.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="GPU memory budget, e.g. 18GiB: the batch size becomes the largest that the memory model "
                        "(sdmprune plan) predicts to fit per GPU")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="gradient methods: fused (Triton), torch, reference (the official loop); auto: fused on "
                        "CUDA, else torch")
    device_options(p)
    p.add_argument("--seed", type=int, default=0, help="calibration windows, 'self' text and the random method")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep every layer's activations (faster, more memory)")
    p.add_argument("--loss-chunk", type=int, default=None, metavar="ROWS",
                   help="token rows per chunk of the fused loss (smaller: less scratch, V*10 bytes a row; "
                        "default: a 768 MiB plan)")
    p.add_argument("--round-to", type=int, default=None, metavar="M",
                   help="round the width down to a multiple of M (off by default, as in the paper)")
    p.add_argument("--save-scores", metavar="PATH", help="also write per-layer scores and kept indices (safetensors)")
    p.add_argument("--gguf", metavar="PATH",
                   help="for a .gguf model: also write the pruned model as a GGUF (the input's metadata, tokenizer "
                        "and quantization; ffn_down requantized, or F16 where the width is not a whole number of "
                        "quantization blocks: --round-to 32 keeps Q4/Q8 blocks whole)")
    p.add_argument("--gguf-down-type", metavar="TYPE", default=None,
                   help="type of ffn_down in --gguf instead of the input's (e.g. Q8_0 or F16: less error than "
                        "requantizing to Q4_1)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (same arguments)")
    p.add_argument("--checkpoint-every", type=int, default=16, help="batches between resume checkpoints")
    p.add_argument("--work-dir", default=None,
                   help="resume state and teacher cache (default: OUT.sdmprune-work); a folder you name is kept, "
                        "only the run's own files are removed from it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT when it is an earlier sdmprune output (never a folder holding anything else)")
    p.add_argument("--eval-ppl", metavar="SRC", help="perplexity before and after pruning on SRC")
    p.add_argument("--eval-seq-len", type=int, default=None, help="perplexity window (default: --seq-len)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows (default: all)")
    progress_option(p)
    verbose_option(p)
    p.add_argument("--refit", choices=["none", "ls"], default="none",
                   help="after selection, refit the kept down_proj columns in closed form on the calibration "
                        "tokens (ls: least squares regularised toward the kept weights; its strength is chosen per "
                        "layer on held-out calibration windows); see the README for when it helps")
    p.add_argument("--refit-strength", type=float, default=None, metavar="S",
                   help="with --refit ls: one fixed strength (relative to the mean diagonal of the Gram) instead "
                        "of the per-layer choice")
    p.add_argument("--recover-steps", type=int, default=0, metavar="N",
                   help="after selection, N steps of distilled LoRA recovery on the masked model (one weight "
                        "copy; the adapters are merged before slicing)")
    p.add_argument("--recover-data", metavar="SRC", default=None,
                   help="recovery data (instruction .jsonl/.parquet, .txt, or self); default: the calibration windows")
    p.add_argument("--recover-seq-len", type=int, default=None, help="recovery sequence length (default: --seq-len)")
    p.add_argument("--recover-lr", type=float, default=1e-4, help="recovery learning rate")
    p.add_argument("--shard", choices=["fsdp"], default=None,
                   help="FSDP2-shard the decoder layers over the ranks of a torchrun launch (each GPU holds 1/N)")
    p.add_argument("--offload", choices=["cpu"], default=None,
                   help="keep the decoder layers in host memory and stream them to --device (small GPUs)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep the checkpointed layer inputs in pinned host memory between forward and backward "
                        "(larger batches in the same memory); with --recover-steps the recovery steps do too")


@dataclass
class PruneJob:
    """A checked ``prune`` command: everything ``run`` needs, found before any weight is loaded."""

    cfg: Any
    out: str
    device: Any
    dtype: str
    calib: Any
    eval_spec: Any
    source: Any
    plan: Any
    work: Any
    scores_path: Optional[str]
    budget: Optional[dict]
    gguf_path: Optional[str] = None
    tokenizer: Any = None  # the model's (None when it has none and no input is text)
    resume_note: Optional[str] = None  # --resume with nothing to resume: said before the run starts


def check_prune_arguments(args) -> PruneJob:
    """Every check that needs no model weights, in the order a user would fix them."""
    from ..data import resolve_source
    from ..loading import (check_positions, check_sources_against_model, default_dtype, parse_dtype,
                           resolve_device, resolve_model)
    from ..memory import batch_size_for_memory
    from ..models import find_gated_mlps, meta_model_from_config
    from ..storage.paths import WorkDir, check_output_dir, check_output_file
    from ..pipeline import PruneConfig, prune_settings, prune_state
    from ..scoring.taylor import DISTILLING, resolve_engine, stage1_width
    from ..widths import plan_width

    import_plugins(args.plugin)
    method = get_method(args.method)
    at_least(args.samples, 1, "--samples")
    at_least(args.seq_len, 2, "--seq-len")
    at_least(args.eval_seq_len, 2, "--eval-seq-len")
    at_least(args.eval_windows, 1, "--eval-windows")
    at_least(args.recover_seq_len, 2, "--recover-seq-len")
    device = dist.rank_device(resolve_device(args.device))
    dtype = default_dtype(args.dtype, device)
    cfg = PruneConfig(ratio=args.ratio, width=args.width, alpha=args.alpha, temperature=args.temperature,
                      stage1_keep=args.stage1_keep, method=args.method, engine=args.engine,
                      batch_size=1 if args.batch_size is None else args.batch_size,
                      gradient_checkpointing=not args.no_gradient_checkpointing, loss_token_chunk=args.loss_chunk,
                      seed=args.seed, round_to=args.round_to, checkpoint_every=args.checkpoint_every,
                      progress=not args.no_progress, shard=args.shard, offload=args.offload,
                      offload_device=str(device) if args.offload else None,
                      offload_activations=args.offload_activations, refit=args.refit,
                      refit_strength=args.refit_strength, **_recovery_options(args)).validate()
    needs_calibration = method.needs_calibration or cfg.refit != "none"
    if cfg.refit != "none":
        from ..compensation import split_windows

        split_windows(args.samples)  # some windows are held out: at least 2 samples
    if cfg.shard == "fsdp":
        from ..scale.sharding import require_process_group

        require_process_group()
    if dist.world_size() > args.samples and needs_calibration:
        raise InputError(f"{dist.world_size()} ranks but only {args.samples} calibration samples "
                         "(--samples): every rank needs at least one")

    # outputs: the ownership rule, before anything is read or loaded
    data_inputs = [s for s in (args.calib, args.eval_ppl, args.recover_data) if s and s != "self"]
    out = str(check_output_dir(args.out, args.overwrite, inputs=[args.model, *data_inputs, args.work_dir]))
    scores_path = None
    if args.save_scores:
        scores_path = str(check_output_file(args.save_scores, args.overwrite, flag="--save-scores",
                                            inputs=[args.model, *data_inputs]))
    for flag, path in (("--save-scores", scores_path),
                       ("--gguf", args.gguf and os.path.abspath(os.path.expanduser(args.gguf)))):
        if path and path.rstrip(os.sep) == out.rstrip(os.sep):
            raise InputError(f"{flag} {path!r} is the --out folder; name a file inside or beside it")
    gguf_path = None
    if args.gguf_down_type and not args.gguf:
        raise InputError("--gguf-down-type applies to --gguf")
    if args.gguf:
        require_extra("gguf", "--gguf")
        from ..storage.gguf_export import check_down_type

        check_down_type(args.gguf_down_type)
        if cfg.recover_steps:
            raise InputError("--gguf slices the input GGUF's own weights; recovered (--recover-steps) weights would "
                             "not be in it: export the recovered model from the saved folder instead")
        gguf_path = str(check_output_file(args.gguf, args.overwrite, flag="--gguf",
                                          inputs=[args.model, *data_inputs]))
    work = None
    if method.gradient and cfg.engine != "reference":
        given = args.work_dir is not None
        work = WorkDir(args.work_dir if given else out.rstrip(os.sep) + ".sdmprune-work", given=given)
        if str(work.path) == out or str(work.path).startswith(out + os.sep):
            raise InputError(f"--work-dir {str(work.path)!r} lies inside --out; name a folder beside it")

    # data sources (local files are read and checked here) and the model's config
    calib = resolve_source(args.calib, "calibration", args.text_field) if needs_calibration else None
    eval_spec = resolve_source(args.eval_ppl, "evaluation", args.text_field) if args.eval_ppl else None
    recover_text = args.recover_data not in (None, "self") and cfg.recover_steps
    if recover_text:
        from ..recovery.sft_data import check_source

        check_source(args.recover_data)  # read and checked now, not after the scoring
    source = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    if gguf_path is not None and source.kind != "gguf":
        raise InputError(f"--gguf writes a GGUF of a GGUF input; {args.model!r} is not a .gguf model")
    if needs_calibration:
        check_positions(source.config, args.seq_len)
    if eval_spec is not None:
        check_positions(source.config, args.eval_seq_len or args.seq_len, "--eval-seq-len"
                        if args.eval_seq_len else "--seq-len")
    if cfg.recover_steps:
        check_positions(source.config, cfg.recover_config.seq_len,
                        "--recover-seq-len" if args.recover_seq_len else "--seq-len")
    tokenizer = check_sources_against_model(source, [("--calib", calib), ("--eval-ppl", eval_spec)],
                                            [f"--recover-data {args.recover_data!r} is text"] if recover_text else ())
    meta = meta_model_from_config(source.config, args.trust_remote_code)
    plan = plan_width(meta, cfg.ratio, cfg.width, cfg.round_to)
    if cfg.method in DISTILLING:
        stage1_width(cfg, plan)
    engine = resolve_engine(cfg.engine, device, method)[0] if method.gradient else "none"
    budget = None
    if args.max_memory is not None:
        if not method.gradient:
            raise InputError(f"--max-memory sizes the batch of the gradient passes; method {cfg.method!r} has none")
        if args.batch_size is not None:
            raise InputError("--batch-size and --max-memory exclude each other (--max-memory picks the batch size)")
        cfg.batch_size, budget = batch_size_for_memory(source.config, cfg, engine, args.seq_len, args.max_memory,
                                                       args.samples, dtype, width=plan.width)
    # --resume: the settings are compared now; the weights and calibration digests once they exist
    resume_note = None
    if args.resume and work is None:
        what = f"method {cfg.method!r}" if not method.gradient else f"engine {engine!r}"
        resume_note = f"--resume: {what} keeps no checkpoint; starting from the beginning"
    elif args.resume:
        settings = prune_settings(cfg, engine, parse_dtype(dtype), device.type,
                                  {m.index: m.width for m in find_gated_mlps(meta)})
        if not prune_state(work, settings).check_settings():
            resume_note = f"--resume: no checkpoint in {str(work.path)!r}; starting from the beginning"
    return PruneJob(cfg, out, device, dtype, calib, eval_spec, source, plan, work, scores_path, budget, gguf_path,
                    tokenizer, resume_note)


def _recovery_options(args) -> dict:
    """PruneConfig fields for ``--recover-steps`` (recovery data defaults to the calibration windows,
    filled in once they exist)."""
    steps = int(args.recover_steps or 0)
    if steps <= 0:
        if steps < 0:
            raise InputError(f"--recover-steps {steps} must be >= 0")
        return {}
    from ..recovery.recover import FinetuneConfig

    data = args.recover_data
    if data is None and not get_method(args.method).needs_calibration:
        raise InputError(f"--recover-steps with method {args.method!r} needs --recover-data (it has no calibration data)")
    if data is not None and data != "self" and not os.path.exists(data):
        raise InputError(f"--recover-data {data!r}: no such file or directory")
    # --offload-activations carries over: the recovery steps checkpoint their layers and offload the inputs too
    offload = bool(args.offload_activations)
    rcfg = FinetuneConfig(lr=args.recover_lr, seq_len=args.recover_seq_len or args.seq_len, seed=args.seed,
                          progress=not args.no_progress, gradient_checkpointing=offload, offload_activations=offload)
    return {"recover_steps": steps, "recover_data": data if data is not None else "calibration",
            "recover_config": rcfg}


def _calibrate(job: PruneJob, args, tokenizer, model, report: dict):
    """The calibration windows [n, L] (the same on every rank: rank 0's), described in ``report``."""
    from ..data import calibration_windows

    t0 = time.perf_counter()
    tokens, desc = calibration_windows(job.calib, tokenizer, args.samples, args.seq_len, seed=args.seed, model=model)
    # every rank shards the SAME samples: rank 0's (sampling "self" on different GPUs may differ)
    tokens = dist.broadcast_from_main(tokens)
    desc["seconds"] = round(time.perf_counter() - t0, 2)
    report["calibration"] = desc
    return tokens


def run(args) -> int:
    from ..loading import resolve_device

    initialized = dist.init_torchrun(resolve_device(args.device))
    try:
        return _run(args)
    finally:
        if initialized:
            import torch

            torch.distributed.destroy_process_group()


def _run(args) -> int:
    from ..evaluate import perplexity_on_source
    from ..loading import load_model
    from ..scale.offload import maybe_stream_layers
    from ..pipeline import prune_model
    from ..storage.save import package_versions, save_pruned, save_scores

    job = check_prune_arguments(args)
    warn_remote_code(args)
    cfg, plan, device, source = job.cfg, job.plan, job.device, job.source
    main = dist.is_main_process()
    args.resume_hint = job.work  # cli: "rerun with --resume" only once this holds a checkpoint

    def say(msg):
        if main:
            print(msg, file=sys.stderr, flush=True)

    report: dict = {"model": args.model, "model_source": source.describe(), "method": cfg.method,
                    "config": cfg.to_dict(), "dtype": job.dtype, "versions": package_versions()}
    if job.budget is not None:
        report["batch_size_from_max_memory"] = job.budget
    if job.resume_note:
        say(job.resume_note)
    # text calibration needs only the tokenizer: windows first, so a text too short fails before the load
    tokenizer = job.tokenizer
    tokens = None
    if job.calib is not None and job.calib.kind != "self":
        tokens = _calibrate(job, args, tokenizer, None, report)
    ev_len = args.eval_seq_len or args.seq_len
    ev_tokens = ev_desc = None
    if job.eval_spec is not None and job.eval_spec.kind != "self":  # the same: a text too short fails now
        from ..data import eval_token_stream
        from ..evaluate import perplexity_windows

        ev_tokens, ev_desc = eval_token_stream(job.eval_spec, tokenizer, seed=args.seed, seq_len=ev_len,
                                               max_tokens=args.eval_windows * ev_len if args.eval_windows else None)
        perplexity_windows(ev_tokens.numel(), ev_len, args.eval_windows)
    say(f"plan: width {plan.original_width} -> {plan.width} in {plan.num_layers} layers, "
        f"params {plan.params_before:,} -> {plan.params_after:,} ({plan.achieved_ratio:.2%} removed)"
        + (f"; rounded to a multiple of {plan.rounding['multiple']} (was {plan.rounding['width_before']})"
           if plan.rounding else ""))
    if job.budget is not None:
        say(f"batch size {job.budget['batch_size']}: the largest predicted to fit {job.budget['max_memory']} per GPU "
            f"({job.budget['predicted_peak_bytes'] / 2**30:.2f} GiB predicted; sdmprune plan shows the parts)")
    t0 = time.perf_counter()
    # under --shard/--offload the weights load into host memory: FSDP2 moves 1/N of every layer to the
    # GPU, the streamer copies layers in as they run
    where = "cpu" if (cfg.shard or cfg.offload) else str(device)
    model, _ = load_model(args.model, dtype=job.dtype, device=where, source=source, tokenizer=tokenizer)
    say(f"loaded {source.describe()} ({job.dtype}, {where}) in {time.perf_counter() - t0:.1f}s"
        + (f"; {dist.world_size()} ranks" if dist.world_size() > 1 else "")
        + (f"; --shard {cfg.shard}" if cfg.shard else "")
        + (f"; --offload {cfg.offload} to {device}" if cfg.offload else ""))
    streaming = bool(cfg.shard or cfg.offload)  # forward-only work then streams the layers through the GPU
    if job.calib is not None and tokens is None:  # "self": sampled from the model
        with maybe_stream_layers(model, device, streaming):
            tokens = _calibrate(job, args, tokenizer, model, report)
    if tokens is not None:
        say(f"calibration: {tokens.shape[0]} x {tokens.shape[1]} tokens from {job.calib.describe()} "
            f"({report['calibration']['seconds']}s)")
    progress = not args.no_progress
    if job.eval_spec is not None:  # every rank (keeps the ranks in step; only rank 0 reports)
        with maybe_stream_layers(model, device, streaming):
            ppl, ev_tokens, sampled = perplexity_on_source(model, tokenizer, job.eval_spec, ev_len, args.eval_windows,
                                                           seed=args.seed, tokens=ev_tokens, progress=progress and main)
        report["eval"] = {"data": ev_desc if ev_desc is not None else sampled, "before": ppl.to_dict()}
        say(f"perplexity before: {float(ppl):.3f} ({job.eval_spec.describe()}; {ppl.windows} windows of {ev_len}, "
            f"{ppl.backend})")
    if cfg.recover_data == "calibration":  # --recover-steps without --recover-data: the calibration windows
        cfg.recover_data = tokens

    def evaluate_pruned(model_, keep):
        # with recovery, "after pruning" is the selected channels before recovery: the masked model
        from ..models import ChannelMasks

        with ChannelMasks(model_, keep), maybe_stream_layers(model_, device, streaming):
            ppl = perplexity_on_source(model_, tokenizer, job.eval_spec, ev_len, args.eval_windows, tokens=ev_tokens,
                                       progress=progress)[0]
        report["eval"]["pruned"] = ppl.to_dict()
        say(f"perplexity after pruning: {float(ppl):.3f}")

    recovering_with_eval = cfg.recover_steps and job.eval_spec is not None and main
    result = prune_model(model, tokens, cfg, checkpoint_dir=job.work, resume=args.resume, tokenizer=tokenizer,
                         on_selected=evaluate_pruned if recovering_with_eval else None)
    st = result.stats
    if main:
        say_layer_ops(st.get("layer_ops"), args.verbose, "scoring passes")
        say_layer_ops(st.get("recover", {}).get("layer_ops"), args.verbose, "recovery steps")
    say(f"pruned: params {st['params_before']:,} -> {st['params_after']:,} "
        f"({1 - st['params_after'] / st['params_before']:.2%} removed) in {st['time_s']['total']:.1f}s, "
        f"engine {st['engine']}")
    if st.get("refit"):
        loss = st["refit"].get("held_out_loss") or {}
        say(f"refit: down_proj kept columns, strength {st['refit']['strength']}"
            + (f"; held-out reconstruction loss {loss['before']:.4f} -> {loss['after']:.4f} (mean over layers)"
               if loss else "") + f" in {st['time_s']['refit']:.1f}s")
    if job.eval_spec is not None and main:  # only rank 0 reports it
        with maybe_stream_layers(model, device, streaming):
            ppl = perplexity_on_source(model, tokenizer, job.eval_spec, ev_len, args.eval_windows, tokens=ev_tokens,
                                       progress=progress)[0]
        report["eval"]["after"] = ppl.to_dict()
        say(f"perplexity after {'recovery' if cfg.recover_steps else 'pruning'}: {float(ppl):.3f}")
    report.update({
        "plan": plan.to_dict(), "width": result.width,
        "widths": {str(k): int(v.numel()) for k, v in result.keep.items()},
        "kept_indices": {str(k): v.tolist() for k, v in result.keep.items()},
        "stage1_kept_indices": ({str(k): v.tolist() for k, v in result.stage1_keep.items()}
                                if result.stage1_keep is not None else None),
        "params_before": st["params_before"], "params_after": st["params_after"], "stats": st,
    })
    if main:
        def write_gguf(path):  # before the report is written, so that it says how the GGUF was written
            from ..storage.gguf_export import write_pruned_gguf

            refit = None
            if cfg.refit != "none":  # ffn_down from the refit weights, not the input's own
                from ..models import find_gated_mlps

                refit = {m.index: m.down.weight.detach() for m in find_gated_mlps(model)}
            report["gguf"] = write_pruned_gguf(source.describe(), result.keep, path,
                                               overwrite=args.overwrite, down_type=args.gguf_down_type,
                                               down_weights=refit)
            report["gguf"]["path"] = job.gguf_path  # where it ends up (``path`` may be inside OUT's temporary folder)

        def write_scores(path):
            save_scores(path, result, overwrite=args.overwrite)

        # a file asked for inside OUT is written into the output before it is renamed into place, so that
        # OUT's manifest lists it (and a later --overwrite of OUT replaces it)
        side = [(p, write) for p, write in ((job.gguf_path, write_gguf), (job.scores_path, write_scores)) if p]
        inside = [(p, write) for p, write in side if p.startswith(job.out + os.sep)]
        if job.gguf_path and (job.gguf_path, write_gguf) not in inside:
            write_gguf(job.gguf_path)
        data_inputs = [s for s in (args.calib, args.eval_ppl, args.recover_data) if s and s != "self"]
        save_pruned(model, tokenizer, job.out, report, overwrite=args.overwrite,
                    inputs=[args.model, *data_inputs, args.work_dir],
                    also=lambda folder: [write(folder / os.path.relpath(p, job.out)) for p, write in inside])
        if job.scores_path and (job.scores_path, write_scores) not in inside:
            write_scores(job.scores_path)
        if job.gguf_path:
            types = ", ".join(f"{k} x{v}" for k, v in report["gguf"].get("tensor_types", {}).items())
            say(f"GGUF: {job.gguf_path} ({types})")
            if report["gguf"].get("fallbacks"):
                say(f"GGUF: written as F16 instead of the input's type: {report['gguf']['fallbacks']}")
        say(f"saved {job.out}" + (f" and {job.scores_path}" if job.scores_path else ""))
        line = (f"summary: parameters {st['params_before']:,} -> {st['params_after']:,} "
                f"({1 - st['params_after'] / st['params_before']:.2%} removed; MLP width {plan.original_width} -> "
                f"{result.width})")
        if job.eval_spec is not None:
            ev = report["eval"]
            steps = [f"{ev['before']['perplexity']:.3f}"]
            if "pruned" in ev:
                steps.append(f"{ev['pruned']['perplexity']:.3f} pruned")
            steps.append(f"{ev['after']['perplexity']:.3f}" + (" recovered" if cfg.recover_steps else ""))
            line += (f"; perplexity {' -> '.join(steps)} on {job.eval_spec.describe()} "
                     f"({ev['after']['windows']} windows of {ev_len} tokens)")
        say(line)
    if job.work is not None:
        dist.barrier()  # every rank's state files are done with before any is removed
        job.work.cleanup()
    if main:  # the machine-readable result line (stdout)
        print(json.dumps({"out": job.out, "params_before": st["params_before"], "params_after": st["params_after"],
                          "width": result.width,
                          **({"ppl_before": report["eval"]["before"]["perplexity"],
                              "ppl_after": report["eval"]["after"]["perplexity"]} if job.eval_spec is not None else {})}))
    return 0
