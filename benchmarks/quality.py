"""Quality benchmark: every pruning method at every ratio, with and without the refit of the kept down_proj
columns, perplexity before and after one distilled-LoRA recovery budget, on two evaluation domains, over
several calibration seeds.

    nice -n 10 python benchmarks/quality.py --threads 1        # SmolLM2-135M, CPU: the JSON records its wall time
    python benchmarks/quality.py --model DIR --samples 2 --seq-len 16 --eval-windows 2 --eval-seq-len 16 \
        --recover-steps 1 --out /tmp/q.json                    # a shrunken run that proves the pipeline
    python benchmarks/quality.py --methods sdmprune --seeds 0 --recover-alpha 0 --out /tmp/ce.json
                                                               # plain-CE recovery instead of distilled
    python benchmarks/quality.py --methods sdmprune,hfprune,wanda-sp --ratios 0.2 --recover-steps 0 \
        --refits none,ls,ls:0.1,ls:1 --out benchmarks/results/refit_probe.json
                                                               # the refit variants before recovery only

Per selection (method x ratio x calibration seed):

1. select: ``sdmprune.pipeline.score_channels`` on a copy of the unpruned model with that seed's calibration
   windows (sdmprune alpha/T follow the paper per ratio); time and peak memory of the call. The refit
   comes after selection, so every ``--refits`` variant below reuses this one selection;
2. per refit variant (``none``; ``ls``: strength chosen per layer on held-out calibration windows; ``ls:S``:
   the fixed strength S for every layer, one strength per run), on a fresh copy:
   ``sdmprune.compensation.refit_down_proj_`` with the same calibration windows (skipped for ``none``),
   then ``sdmprune.slicing.prune_model_`` -- what ``prune_model(..., refit=...)`` runs after selection;
   perplexity on both evaluation domains ("before recovery");
3. recovery (``--recover-steps`` > 0) on a copy of the refit, still masked model:
   ``sdmprune.recovery.recover.recover_masked_`` with the kept channels (distilled LoRA on the masked model,
   teacher = the unpruned weights, merged in place), then ``prune_model_`` -- the calls
   ``prune_model(..., recover_steps=N)`` makes, without scoring again; the same steps, learning rate and
   token windows for every run; time and peak memory; perplexity on both domains again ("after recovery").

Calibration: ``--samples`` random windows of ``--seq-len`` tokens of WikiText-2 validation
(../shared/data/wikitext-2/valid.txt, the tokenized form with <unk>), drawn with each of ``--seeds``;
``--calib self`` samples them from the unpruned model instead (domain-neutral; seeded the same way).
The methods in ``--seeded-methods`` run with every seed; the others (magnitude and random read no
calibration text) with the first seed only. Evaluation domains, ``--eval-windows`` windows of
``--eval-seq-len`` tokens evenly spaced over each whole text:
- ``wikitext2``: the WikiText-2 raw test split (../shared/data/wikitext-2-raw/wiki.test.raw), the
  calibration domain (other articles);
- ``stdlib``: Python source no calibration saw: ``--stdlib-files`` of the running interpreter's own
  standard library, concatenated in the listed order (the list and the interpreter version are saved).
Recovery: ``--recover-steps`` optimizer steps of ``--recover-batch`` windows of ``--recover-seq-len``
tokens of ``--recover-data`` (drawn once with ``--recover-seed``), LoRA r 8 / alpha 16 / dropout 0.05 on
all seven linear modules, AdamW ``--recover-lr`` with cosine decay, loss (1 - a) CE + a KL to the
unpruned model (a = ``--recover-alpha``; 0 gives plain-CE recovery).

Peak memory: the CUDA allocator's peak on a GPU; on Linux CPUs the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs at the start of each step after malloc_trim hands memory
freed by earlier steps back to the OS, so it is that step's own peak). It includes the unpruned model
kept for the next run and the step's working copy, recorded as ``memory_at_start_bytes``; the peak
above that is what the step itself needed.

Writes ``--out`` (default benchmarks/results/quality.json) after every run, so a cut run keeps what it
measured, and the markdown table beside it (rendered by benchmarks/report.py); ``--resume`` goes on from
such a file when its settings are this run's, skipping every (seed, ratio, method, refit) it holds. Only measured numbers.
The model is the Q4_1 GGUF dequantized: compare methods with each other, not with published numbers.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import sys
import sysconfig
import time
import weakref

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(ROOT, "..", "shared", "data")
PAPER_HPARAMS = {0.2: (0.4, 0.2), 0.3: (0.42, 0.5), 0.4: (0.1, 0.2)}
CALIB_TEXT = os.path.join(DATA, "wikitext-2", "valid.txt")
WIKITEXT_TEST = os.path.join(DATA, "wikitext-2-raw", "wiki.test.raw")
# what the default data files are, for the results; any other file is named by its path
DATA_NAMES = {os.path.abspath(CALIB_TEXT): "WikiText-2 validation, tokenized form with <unk>",
              os.path.abspath(WIKITEXT_TEST): "WikiText-2 raw test split"}
DOMAINS = ("wikitext2", "stdlib")
PHASES = ("before", "after")
# Pure-Python standard-library modules present in every CPython 3.8+, a mix of small and large
# files, parsers, data structures and OS glue; fixed by name so every run reads the same code.
STDLIB_FILES = ("abc.py", "argparse.py", "base64.py", "bisect.py", "calendar.py", "contextlib.py", "copy.py",
                "csv.py", "dataclasses.py", "fractions.py", "functools.py", "heapq.py", "json/decoder.py",
                "json/encoder.py", "operator.py", "pathlib.py", "shlex.py", "string.py", "textwrap.py", "uuid.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="sdmprune,hfprune,taylor,wanda-sp,magnitude,random")
    p.add_argument("--ratios", default="0.2,0.3")
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    p.add_argument("--seeded-methods", default="sdmprune,hfprune,taylor,wanda-sp",
                   help="methods repeated over every seed (the others run with the first seed only)")
    p.add_argument("--refits", default="none,ls",
                   help="refit variants per selection: none, ls (strength chosen per layer), ls:S (fixed S)")
    p.add_argument("--calib", default=CALIB_TEXT)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="calibration samples per backward")
    p.add_argument("--wikitext", default=WIKITEXT_TEST, help="the calibration-domain evaluation text")
    p.add_argument("--stdlib-files", default=",".join(STDLIB_FILES),
                   help="files under sysconfig.get_paths()['stdlib'], in order")
    p.add_argument("--eval-windows", type=int, default=8, help="windows per domain, evenly spaced")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--recover-steps", type=int, default=4, help="0: no recovery (before-recovery columns only)")
    p.add_argument("--recover-batch", type=int, default=2, help="windows per optimizer step")
    p.add_argument("--recover-seq-len", type=int, default=128)
    # above the recipe's 1e-4: four cosine-decayed steps from a zero-initialized LoRA move little at 1e-4
    p.add_argument("--recover-lr", type=float, default=5e-4)
    p.add_argument("--recover-alpha", type=float, default=0.5, help="KL weight; 0 = plain CE")
    p.add_argument("--recover-temperature", type=float, default=1.0)
    p.add_argument("--recover-data", default=CALIB_TEXT)
    p.add_argument("--recover-seed", type=int, default=1234, help="draws the recovery windows (once)")
    p.add_argument("--engine", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality.json"))
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out (same settings) and run only the missing ones")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); on a shared CPU 1 avoids threads waiting on each other")
    return p.parse_args(argv)


def csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def rel_path(path) -> str:
    """A data path relative to the repository root, so results read the same on every machine."""
    p = str(path)
    return os.path.relpath(p, ROOT) if os.path.exists(p) else p


def data_name(path) -> str:
    if str(path) == "self":
        return "domain-neutral"
    return DATA_NAMES.get(os.path.abspath(str(path)), f"the file {rel_path(path)}")


def refit_strength(variant: str):
    """(refit, fixed strength or None) of a ``--refits`` variant: none, ls, ls:S."""
    name, _, strength = variant.partition(":")
    if name not in ("none", "ls") or (name == "none" and strength):
        raise SystemExit(f"unknown refit variant {variant!r} (none, ls, ls:S)")
    return name, (float(strength) if strength else None)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------ peak memory
def _proc_status_kib(field: str):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _return_freed_memory() -> bool:
    """Hand memory freed by earlier steps back to the OS (glibc malloc_trim). Without it the allocator
    keeps it resident, the next step reuses it unseen, and every step's peak RSS reads as the largest
    earlier one. False where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def collect_if_alive(ref: weakref.ref) -> None:
    """After ``del model``: a full garbage collection only when a weight of the dropped copy is still
    alive (a reference cycle), so the next step starts without it; one pass over a large heap takes
    longer than a whole tiny-model run."""
    if ref() is not None:
        gc.collect()


def peak_start(dev: torch.device) -> dict:
    """Start measuring one step's peak memory: {"kind", "start"} (bytes in use now)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return {"kind": "torch.cuda.max_memory_allocated", "start": int(torch.cuda.memory_allocated(dev))}
    trimmed = _return_freed_memory()
    try:  # Linux: "5" resets the peak resident set (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return {"kind": "process peak RSS (VmHWM, reset at the step's start"
                        + (", freed memory returned to the OS first)" if trimmed else ")"),
                "start": _proc_status_kib("VmRSS") * 1024}
    except (OSError, TypeError):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"kind": "process max RSS so far (ru_maxrss, not resettable here)", "start": rss}


def peak_end(dev: torch.device, started: dict) -> dict:
    if dev.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(dev))
    elif started["kind"].startswith("process peak RSS"):
        peak = _proc_status_kib("VmHWM") * 1024
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"peak_memory_bytes": peak, "memory_at_start_bytes": started["start"], "peak_memory_kind": started["kind"]}


def peak_above_start(step: dict):
    """What one step itself needed: its peak minus the memory in use at its start; None for ru_maxrss,
    the process's peak so far, of which nothing is the step's own."""
    if step["peak_memory_kind"].startswith(("process peak RSS", "torch.cuda")):
        return step["peak_memory_bytes"] - step["memory_at_start_bytes"]
    return None


# ------------------------------------------------------------------------------------ evaluation data
def spread_windows(tokens: torch.Tensor, n: int, seq_len: int):
    """``n`` windows of ``seq_len`` tokens evenly spaced over the whole stream (window i of the stream's
    m non-overlapping windows at floor(i * m / n)): the evaluation covers the whole text, not its
    first article or file. Returns (stream of the n windows, their start offsets)."""
    m = tokens.numel() // seq_len
    if m < n:
        raise SystemExit(f"evaluation text has {m} windows of {seq_len} tokens, fewer than --eval-windows {n}")
    starts = [(i * m // n) * seq_len for i in range(n)]
    return torch.cat([tokens[s:s + seq_len] for s in starts]), starts


def stdlib_source(names):
    """A SourceSpec of the listed standard-library files (documents in order) and its description."""
    from sdmprune.data import SourceSpec, read_text_file

    root = sysconfig.get_paths()["stdlib"]
    texts = [read_text_file(os.path.join(root, name), "evaluation") for name in names]
    spec = SourceSpec(raw=f"python {platform.python_version()} stdlib", kind="docs", path=root, texts=texts,
                      is_documents=True)
    desc = {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "stdlib_dir": root, "files": list(names), "bytes": sum(len(t.encode()) for t in texts),
            "joined_with": "a blank line"}
    return spec, desc


def evaluation_streams(args, tokenizer) -> tuple:
    """({domain: token stream of the evenly spaced windows}, {domain: description})."""
    from sdmprune.data import eval_token_stream, resolve_source

    spec, std_desc = stdlib_source(csv(args.stdlib_files))
    # WikiText-2 test is the calibration domain only when the calibration text is WikiText-2 too
    same_corpus = os.path.abspath(str(args.calib)) == os.path.abspath(CALIB_TEXT)
    sources = {"wikitext2": (resolve_source(args.wikitext, "evaluation"),
                             {"name": data_name(args.wikitext) + (", the calibration domain" if same_corpus
                                                                  else ""),
                              "source": rel_path(args.wikitext)}),
               "stdlib": (spec, {"name": "Python standard-library source (never in calibration)", **std_desc})}
    streams, descs = {}, {}
    for domain, (src, desc) in sources.items():
        tokens, _ = eval_token_stream(src, tokenizer)
        streams[domain], starts = spread_windows(tokens, args.eval_windows, args.eval_seq_len)
        descs[domain] = {**desc, "tokens_total": int(tokens.numel()), "window_starts": starts}
    return streams, descs


def perplexities(model, streams, args) -> dict:
    from sdmprune.evaluate import evaluate_perplexity

    out = {}
    for domain, stream in streams.items():
        ppl = evaluate_perplexity(model, stream, seq_len=args.eval_seq_len, batch_size=args.eval_batch_size)
        out[domain] = ppl.to_dict()
    return out


# ------------------------------------------------------------------------------------ summary
def summarize(runs: list) -> list:
    """Per (ratio, method, refit variant), over its seeds: mean, std (sample, n - 1), min and max of every
    domain's perplexity before and after recovery (when recovery ran), of the prune, refit and recovery
    times, the largest peak memory, and for a refit the mean held-out loss before/after and the strengths
    chosen; ``vs_none``: per domain and phase, the mean over seeds of the perplexity ratio to the same
    selection without refit."""
    groups = {}
    for r in runs:
        groups.setdefault((r["ratio"], r["method"], r.get("refit", "none")), []).append(r)
    none = {(r["ratio"], r["method"], r["seed"]): r for r in runs if r.get("refit", "none") == "none"}

    def stats(values):
        values = [float(v) for v in values]
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
        return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}

    out = []
    for (ratio, method, refit), rs in groups.items():
        row = {"ratio": ratio, "method": method, "refit": refit, "seeds": [r["seed"] for r in rs],
               "width": rs[0]["width"], "params_after": rs[0]["params_after"], "removed": rs[0]["removed"]}
        phases = [p for p in PHASES if all(r.get(p) for r in rs)]
        for phase in phases:
            row[phase] = {d: stats([r[phase][d]["perplexity"] for r in rs]) for d in DOMAINS}
        row["prune_time_s"] = stats([r["prune"]["time_s"] for r in rs])
        steps = ["prune"] + (["recovery"] if "after" in phases else [])
        for step in steps:
            if step == "recovery":
                row["recovery_time_s"] = stats([r["recovery"]["time_s"] for r in rs])
            row[f"{step}_peak_memory_bytes"] = max(r[step]["peak_memory_bytes"] for r in rs)
            above = [peak_above_start(r[step]) for r in rs]
            row[f"{step}_peak_above_start_bytes"] = None if None in above else max(above)
        if refit != "none":
            info = [r["refit_report"] for r in rs]
            row["refit_time_s"] = stats([i["time_s"] for i in info])
            row["held_out_loss"] = {k: stats([i["held_out_loss"][k] for i in info]) for k in ("before", "after")}
            chosen = [s for i in info for s in i["strengths"].values()]
            row["strengths_chosen"] = {s: chosen.count(s) for s in sorted(set(chosen), key=float)}
            pairs = [(r, none.get((ratio, method, r["seed"]))) for r in rs]
            if all(n is not None for _, n in pairs):
                row["vs_none"] = {phase: {d: stats([r[phase][d]["perplexity"] / n[phase][d]["perplexity"]
                                                    for r, n in pairs]) for d in DOMAINS} for phase in phases}
        out.append(row)
    return out


# settings that do not change a measured number: where it is written, how it is resumed, CPU threads
RUN_ONLY_ARGS = ("out", "resume", "threads")


def previous_runs(args, res) -> tuple:
    """The runs of an earlier, cut run in ``--out``: ({(seed, ratio, method, refit): run}, the calls that
    measured them: [{device, wall_s, runs}]); ({}, []) when there is no such file. A file measured with other
    settings is refused (one line), never mixed in."""
    if not os.path.exists(args.out):
        return {}, []
    with open(args.out) as fh:
        old = json.load(fh)
    differ = sorted(k for k, v in res["args"].items()
                    if k not in RUN_ONLY_ARGS and old.get("args", {}).get(k) != v)
    if differ or old.get("versions", {}).get("torch") != res["versions"].get("torch"):
        raise SystemExit(f"--resume: {args.out} was measured with other settings "
                         f"({', '.join(differ) or 'torch release'}); choose another --out")
    earlier = old.get("resumed", {}).get("earlier_calls", [])
    kept = old.get("resumed", {}).get("runs_kept", 0)
    calls = earlier + [{"device": old.get("device"), "wall_s": old.get("wall_s"),
                        "runs": len(old.get("runs", [])) - kept}]
    return {(r["seed"], r["ratio"], r["method"], r["refit"]): r for r in old.get("runs", [])}, calls


def planned_runs(methods, ratios, seeds, seeded) -> list:
    """(seed, ratio, method) in run order: every method at the first seed first, so a cut run has the
    whole table once before it has any spread."""
    return [(s, ratio, m) for i, s in enumerate(seeds) for ratio in ratios for m in methods if i == 0 or m in seeded]


# ------------------------------------------------------------------------------------ the run
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sdmprune.data import calibration_windows, resolve_source
    from sdmprune.loading import load_model, resolve_device
    from sdmprune.models import count_parameters
    from sdmprune.storage.paths import atomic_write_file, write_json_atomic
    from sdmprune.compensation import kept_columns, refit_down_proj_
    from sdmprune.pipeline import PruneConfig, score_channels
    from sdmprune.recovery.recover import FinetuneConfig, recover_masked_
    from sdmprune.storage.save import package_versions
    from sdmprune.slicing import prune_model_

    sys.path.insert(0, HERE)
    from report import quality_markdown

    t_all = time.perf_counter()
    dev = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    methods, seeds, seeded = csv(args.methods), [int(s) for s in csv(args.seeds)], set(csv(args.seeded_methods))
    refits = csv(args.refits)
    for variant in refits:
        refit_strength(variant)
    ratios = [float(r) for r in csv(args.ratios)]
    calib_spec = resolve_source(args.calib, "calibration")
    base, tok = load_model(args.model, dtype=dtype, device=str(dev), need_tokenizer=True)
    calib, calib_desc = {}, None
    for s in seeds:
        calib[s], calib_desc = calibration_windows(calib_spec, tok, args.samples, args.seq_len, seed=s, model=base)
    streams, eval_desc = evaluation_streams(args, tok)
    n_rec = args.recover_steps * args.recover_batch
    rec_tokens, rec_desc = (calibration_windows(args.recover_data, tok, n_rec, args.recover_seq_len,
                                                seed=args.recover_seed) if n_rec else (None, {}))
    rec_cfg = FinetuneConfig(lr=args.recover_lr, alpha=args.recover_alpha, temperature=args.recover_temperature,
                             batch_size=args.recover_batch, grad_accum=1, seq_len=args.recover_seq_len, seed=0,
                             progress=False)
    plan = planned_runs(methods, ratios, seeds, seeded)
    out_md = os.path.splitext(args.out)[0] + ".md"
    res = {
        "benchmark": "quality", "args": {k: rel_path(v) if k in ("calib", "wikitext", "recover_data", "out") else v
                                         for k, v in vars(args).items()},
        "device": device_name(dev), "dtype": dtype, "versions": package_versions(),
        # times are wall seconds on a shared machine: the load says how shared it was
        "load_average_at_start": list(os.getloadavg()),
        "model": {"spec": args.model, "params": count_parameters(base)},
        "calibration": {"source": rel_path(args.calib), "name": data_name(args.calib),
                        "samples": args.samples, "seq_len": args.seq_len, "seeds": seeds,
                        "mode": calib_desc.get("mode"),
                        "seeded_methods": [m for m in methods if m in seeded],
                        "first_seed_only": [m for m in methods if m not in seeded],
                        "scoring_batch_size": args.batch_size, "engine": args.engine},
        "refits": refits,
        "refit": {"how": "sdmprune.compensation.refit_down_proj_ on the masked unpruned weights with the same "
                         "calibration windows (the last quarter held out to choose the strength), then sliced",
                  "variants": {"none": "the kept weights, sliced", "ls": "strength chosen per layer on the "
                               "held-out windows", "ls:S": "fixed strength S for every layer"}},
        "evaluation": {"windows": args.eval_windows, "seq_len": args.eval_seq_len,
                       "selection": "windows evenly spaced over the whole text", "domains": eval_desc},
        "recovery": {"how": "recover_masked_ on the masked (refit) weights (one copy; the teacher is the unpruned "
                            "model), LoRA merged, then sliced",
                     "steps": args.recover_steps, "sequences_per_step": args.recover_batch,
                     "seq_len": args.recover_seq_len, "tokens": n_rec * args.recover_seq_len, "lr": args.recover_lr,
                     "schedule": "AdamW, cosine decay to 0, no warm-up", "weight_decay": rec_cfg.weight_decay,
                     "lora": f"r {rec_cfg.lora_r}, alpha {rec_cfg.lora_alpha}, dropout {rec_cfg.lora_dropout}, "
                             "q/k/v/o/gate/up/down",
                     "loss": "(1 - alpha) CE + alpha KL(unpruned teacher at T || student)" if args.recover_alpha
                     else "plain CE", "alpha": args.recover_alpha, "temperature": args.recover_temperature,
                     "data": {"source": rel_path(args.recover_data), "name": data_name(args.recover_data),
                              "windows": n_rec, "seed": args.recover_seed, "mode": rec_desc.get("mode")}},
        "planned_runs": len(plan) * len(refits), "runs": [], "summary": [],
    }
    done, earlier_calls = previous_runs(args, res) if args.resume else ({}, [])
    t0 = time.perf_counter()
    res["base"] = {"params": count_parameters(base), "perplexity": perplexities(base, streams, args),
                   "eval_s": time.perf_counter() - t0}

    def write():
        res["summary"] = summarize(res["runs"])
        res["complete"] = len(res["runs"]) == res["planned_runs"]
        res["wall_s"] = time.perf_counter() - t_all
        res["load_average_now"] = list(os.getloadavg())
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json_atomic(args.out, res)
        with atomic_write_file(out_md) as tmp:
            tmp.write_text(quality_markdown(res, source=os.path.basename(args.out)))

    if done:
        res["runs"] = list(done.values())
        res["resumed"] = {"runs_kept": len(done), "earlier_calls": earlier_calls}
    write()
    print("unpruned " + ", ".join(f"{d} {v['perplexity']:.3f}" for d, v in res["base"]["perplexity"].items()),
          file=sys.stderr)
    for i, (seed, ratio, method) in enumerate(plan):
        todo = [v for v in refits if (seed, ratio, method, v) not in done]
        if not todo:
            continue
        alpha, T = PAPER_HPARAMS.get(round(ratio, 2), (0.4, 0.2))
        cfg = PruneConfig(ratio=ratio, method=method, alpha=alpha, temperature=T, engine=args.engine,
                          batch_size=args.batch_size, seed=seed, progress=False)
        model = copy.deepcopy(base)
        mem = peak_start(dev)
        t0 = time.perf_counter()
        r = score_channels(model, calib[seed], cfg)  # the weights stay as they were: one selection for every variant
        prune = {"time_s": time.perf_counter() - t0, "stage_time_s": r.stats["time_s"], "engine": r.stats["engine"],
                 **peak_end(dev, mem)}
        alive = weakref.ref(next(model.parameters()))
        del model
        collect_if_alive(alive)
        for variant in todo:
            refit, strength = refit_strength(variant)
            model = copy.deepcopy(base)
            refit_report = unrefit = None
            if refit == "ls":
                unrefit = kept_columns(model, r.keep) if args.recover_steps else None
                rep = refit_down_proj_(model, calib[seed], r.keep, batch_size=args.batch_size, strength=strength,
                                       progress=False)
                refit_report = {"time_s": rep["time_s"], "held_out_loss": rep["held_out_loss"],
                                "strengths": {k: v["strength"] for k, v in rep["layers"].items()},
                                "layers": rep["layers"]}
            masked = copy.deepcopy(model) if args.recover_steps else None  # refit, still whole: recovery's start
            prune_model_(model, r.keep)
            params_after = count_parameters(model)
            before = perplexities(model, streams, args)
            alive = weakref.ref(next(model.parameters()))
            del model
            collect_if_alive(alive)
            recovery = after = None
            if masked is not None:  # the same two calls prune_model(..., recover_steps=N) makes
                mem = peak_start(dev)
                t0 = time.perf_counter()
                rec = recover_masked_(masked, r.keep, tok, rec_tokens, args.recover_steps, cfg=rec_cfg,
                                      unrefit_columns=unrefit)
                prune_model_(masked, r.keep)
                recovery = {"time_s": time.perf_counter() - t0, **peak_end(dev, mem),
                            **{k: rec.get(k) for k in ("steps", "tokens", "first_loss", "last_loss")}}
                after = perplexities(masked, streams, args)
                alive = weakref.ref(next(masked.parameters()))
                del masked
                collect_if_alive(alive)
            res["runs"].append({"seed": seed, "ratio": ratio, "method": method, "refit": variant, "width": r.width,
                                "alpha": alpha if method == "sdmprune" else None,
                                "temperature": T if method == "sdmprune" else None,
                                "params_after": params_after, "removed": 1 - params_after / r.stats["params_before"],
                                "prune": prune, "refit_report": refit_report, "before": before,
                                "recovery": recovery, "after": after})
            write()
            print(f"[{len(res['runs'])}/{res['planned_runs']}] seed {seed} {ratio:.0%} {method:9s} refit {variant:7s} "
                  f"width {r.width} " + " ".join(
                      f"{d} {before[d]['perplexity']:.2f}" + (f"->{after[d]['perplexity']:.2f}" if after else "")
                      for d in DOMAINS)
                  + (f" (held-out loss {refit_report['held_out_loss']['before']:.4f}->"
                     f"{refit_report['held_out_loss']['after']:.4f}, {refit_report['time_s']:.0f}s)" if refit_report else "")
                  + f" (prune {prune['time_s']:.0f}s, {time.perf_counter() - t_all:.0f}s so far)", file=sys.stderr)
    print(quality_markdown(res, source=os.path.basename(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
