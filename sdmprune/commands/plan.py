"""``sdmprune plan``: the memory model (sdmprune.memory) from a config alone: what a prune holds per GPU
at its peak, and the largest batch that fits a budget."""
from __future__ import annotations

import argparse
import json

from ..errors import InputError
from ..memory import (BUILTIN_SHAPES, ENGINES, GiB, format_plan, largest_batch, parse_size, predict_peak_memory,
                      predict_refit_memory, resolve_shape)
from ..scoring.taylor import OBJECTIVES
from ..loading import check_positions
from .common import at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder, hub id, .gguf file, smollm2-135m, or a built-in shape: "
                   + ", ".join(BUILTIN_SHAPES))
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (ranks)")
    p.add_argument("--shard", choices=["fsdp"], default=None, help="FSDP2 sharding of the decoder layers")
    p.add_argument("--offload", choices=["cpu"], default=None, help="stream decoder layers from host memory")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, default=1, help="samples per backward pass per GPU")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="model dtype")
    p.add_argument("--method", choices=list(OBJECTIVES), default="sdmprune",
                   help="as prune --method (the methods with gradient passes)")
    p.add_argument("--engine", choices=list(ENGINES), default="fused", help="as prune --engine")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="as prune --no-gradient-checkpointing")
    p.add_argument("--loss-chunk", type=int, default=None, metavar="ROWS", help="as prune --loss-chunk")
    p.add_argument("--offload-activations", action="store_true", help="as prune --offload-activations")
    p.add_argument("--refit", choices=["none", "ls"], default="none",
                   help="as prune --refit: also predict the refit stage (it runs after the scoring passes)")
    p.add_argument("--width", type=int, default=None,
                   help="kept MLP width for --refit (default: the full width, an upper bound)")
    p.add_argument("--samples", type=int, default=1024, help="calibration windows per rank (--refit: host memory)")
    p.add_argument("--max-memory", default=None, help="budget per GPU, e.g. 16GiB: print the largest batch that fits")
    p.add_argument("--trust-remote-code", action="store_true", help="read a config that needs the model's own code")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")


def run(args: argparse.Namespace) -> int:
    for value, least, flag in ((args.gpus, 1, "--gpus"), (args.seq_len, 1, "--seq-len"),
                               (args.batch_size, 1, "--batch-size"), (args.loss_chunk, 1, "--loss-chunk")):
        at_least(value, least, flag)
    budget = parse_size(args.max_memory) if args.max_memory is not None else None
    if budget is not None and budget <= 0:
        raise InputError(f"--max-memory {args.max_memory}: the budget must be positive")
    if args.offload and args.shard:
        raise InputError("--offload cpu and --shard fsdp are exclusive")
    shape = resolve_shape(args.model, trust_remote_code=args.trust_remote_code)
    check_positions(shape, args.seq_len)  # as prune refuses it
    kw = dict(dtype=args.dtype, gpus=args.gpus, shard=args.shard, offload=args.offload, engine=args.engine,
              gradient_checkpointing=args.gradient_checkpointing, loss_token_chunk=args.loss_chunk,
              offload_activations=args.offload_activations, method=args.method)
    at_least(args.width, 1, "--width")
    at_least(args.samples, 1, "--samples")
    if args.width is not None and args.refit == "none":
        raise InputError("--width applies to --refit ls (the kept width the refit solves for)")
    pred = predict_peak_memory(shape, args.seq_len, args.batch_size, **kw)
    fit = largest_batch(shape, args.seq_len, budget, **kw) if budget is not None else None
    refit = None
    if args.refit == "ls":
        refit = predict_refit_memory(shape, args.seq_len, args.batch_size, width=args.width, dtype=args.dtype,
                                     gpus=args.gpus, shard=args.shard, offload=args.offload, samples=args.samples)
    if args.json:
        print(json.dumps({"model": shape.name, "parameters": shape.parameters, "method": args.method,
                          "batch_size": args.batch_size, "seq_len": args.seq_len, "bytes": pred,
                          "refit_bytes": refit, "budget": budget, "largest_batch": fit}, indent=2))
        return 0
    desc = (f"method={args.method} gpus={args.gpus} shard={args.shard or 'none'} offload={args.offload or 'none'} "
            f"seq_len={args.seq_len} dtype={args.dtype} engine={args.engine} "
            f"checkpointing={'on' if args.gradient_checkpointing else 'off'}"
            + (" offload_activations=on" if args.offload_activations else ""))
    print(format_plan(shape, pred, args.batch_size, fit, budget, desc))
    if refit is not None:
        gib = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
        print(f"refit stage (--refit ls, after the scoring passes; kept width {args.width or shape.intermediate_size}"
              f"{'' if args.width else ', the upper bound'}):\n"
              f"  weights             {gib(refit['weights'])}\n  Grams               {gib(refit['grams'])}\n"
              f"  activations         {gib(refit['activations'])}\n  float64 solve       {gib(refit['solve'])}\n"
              f"  runtime overhead    {gib(refit['overhead'])}\n  total               {gib(refit['total'])}\n"
              f"host: calibration hidden states {gib(refit['host_stream'])}")
    return 0
