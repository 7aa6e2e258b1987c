"""``sdmprune eval``: perplexity on a data source and lm-eval tasks of one model, optionally as JSON."""
from __future__ import annotations

import argparse
import json

from ..errors import InputError, require_extra
from .common import at_least, device_options, model_argument, progress_option, warn_remote_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_argument(p, "the model to evaluate")
    p.add_argument("--ppl", metavar="SRC", help="perplexity source: wikitext2, c4, a local file, a .pt, or self")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl/.json/.parquet records")
    p.add_argument("--seq-len", type=int, default=2048, help="perplexity window in tokens")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (default: all)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks, groups or task YAML paths; 'paper' = the zero-shot set of "
                        "the pruning papers (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa); "
                        "needs sdmprune[eval]")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="a folder of local lm-eval task YAMLs whose names --tasks may use (offline tasks)")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (default: the task's)")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (default: all)")
    p.add_argument("--batch-size", type=int, default=1, help="windows (or lm-eval requests) per forward")
    device_options(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of 'self' evaluation text (the same text as prune/finetune with this --seed)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --json when it is an earlier sdmprune result")
    progress_option(p)


def run(args) -> int:
    from ..data import eval_token_stream, resolve_source
    from ..evaluate import perplexity_windows, resolve_tasks
    from ..loading import check_positions, check_sources_against_model, default_dtype, resolve_device, resolve_model
    from ..storage.paths import check_output_file

    if not args.ppl and not args.tasks:
        raise InputError("nothing to evaluate: give --ppl SRC and/or --tasks")
    at_least(args.seq_len, 2, "--seq-len")
    at_least(args.max_windows, 1, "--max-windows")
    at_least(args.batch_size, 1, "--batch-size")
    if args.limit is not None and not args.limit > 0:
        raise InputError(f"--limit must be positive (got {args.limit})")
    at_least(args.num_fewshot, 0, "--num-fewshot")
    if args.include_path and not args.tasks:
        raise InputError("--include-path names where --tasks come from: give --tasks too")
    if args.tasks:
        require_extra("lm_eval", "--tasks")
    json_path = None
    if args.json:
        inputs = [args.model] + ([args.ppl] if args.ppl and args.ppl != "self" else [])
        json_path = check_output_file(args.json, args.overwrite, flag="--json", inputs=inputs)
    spec = resolve_source(args.ppl, "perplexity", args.text_field) if args.ppl else None
    device = resolve_device(args.device)
    source = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    if spec is not None:
        check_positions(source.config, args.seq_len)
    tokenizer = check_sources_against_model(source, [("--ppl", spec)],
                                            ["--tasks runs on text"] if args.tasks else ())
    stream = None
    if spec is not None and spec.kind != "self":  # tokenized now: a text shorter than one window is refused here
        stream = eval_token_stream(spec, tokenizer, max_tokens=args.max_windows * args.seq_len
                                   if args.max_windows else None, seed=args.seed, seq_len=args.seq_len)
        perplexity_windows(stream[0].numel(), args.seq_len, args.max_windows)
    tasks = resolve_tasks(args.tasks, args.include_path) if args.tasks else None
    warn_remote_code(args)
    results = run_eval(args, source, spec, tasks, default_dtype(args.dtype, device), tokenizer, stream)
    if json_path is not None:
        from ..storage.paths import write_json_atomic

        write_json_atomic(json_path, results, written_by="sdmprune eval")
    return 0


def run_eval(args, source, spec, tasks, dtype, tokenizer=None, stream=None) -> dict:
    """Load the model and evaluate it (the checked arguments of ``run``; ``tasks``: resolve_tasks's
    (names, task manager) or None; ``tokenizer``: the model's, loaded by the checks; ``stream``: the
    perplexity tokens and their description, where they did not need the model)."""
    from ..evaluate import evaluate_tasks, perplexity_on_source
    from ..loading import load_model

    model, tokenizer = load_model(args.model, dtype=dtype, device=args.device, source=source, tokenizer=tokenizer)
    results = {"model": args.model}
    if spec is not None:
        tokens, desc = stream if stream is not None else (None, None)
        ppl, _, sampled = perplexity_on_source(model, tokenizer, spec, args.seq_len, args.max_windows,
                                               args.batch_size, seed=args.seed, tokens=tokens,
                                               progress=not args.no_progress)
        desc = desc if desc is not None else sampled
        results["perplexity"] = {**ppl.to_dict(), "data": desc}
        print(f"perplexity ({spec.raw}, {ppl.windows} windows of {args.seq_len}, {ppl.backend}): {float(ppl):.4f}")
    if tasks:
        names, manager = tasks
        results["tasks"] = evaluate_tasks(model, tokenizer, names, batch_size=args.batch_size, limit=args.limit,
                                          num_fewshot=args.num_fewshot, task_manager=manager)
        results["lm_eval"] = {"tasks": names, "num_fewshot": args.num_fewshot, "limit": args.limit,
                              "include_path": args.include_path}
        print(json.dumps(results["tasks"], indent=2, default=str))
    return results
