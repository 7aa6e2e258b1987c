"""Scale benchmark of the two-stage prune: Llama-3.2-1B and Llama-3.1-8B shapes with
random bf16 weights built directly on the GPU (meta init -> to_empty -> random init; no download,
no CPU copy), the reference and fused engines of sdmprune.pipeline, one subprocess per run so
each peak is clean. Writes per-stage s/sample, tokens/s and peak memory (measured, beside
predict_peak_memory's prediction) to benchmarks/results/pipeline.json + .md, and on the 1B shape the
per-layer IoU of the kept channels of fused vs reference on the same samples.

    python benchmarks/bench_pipeline.py                       # GPU: the DEFAULT_RUNS below
    python benchmarks/bench_pipeline.py --runs 8b:fused:mem=16GiB,8b:reference
    python benchmarks/bench_pipeline.py --max-memory 16GiB    # every run's batch from predict_peak_memory
    python benchmarks/bench_pipeline.py --smoke               # CPU: tiny shape, torch engine, 2 samples
    python benchmarks/bench_pipeline.py --merge a.json b.json --out benchmarks/results/pipeline.json
                                          # one results file from runs measured in separate commands

A run is shape:engine[:m=METHOD][:b=N][:ckpt=0][:chunk=ROWS][:act=1][:mem=SIZE][:n=SAMPLES][:refit=ls]: the
gradient method (sdmprune, the default, taylor or hfprune; the reference engine is then that method's
official loop), N samples per backward pass, gradient checkpointing off, the fused loss's token
chunk, the checkpointed layer inputs offloaded to pinned host memory
(PruneConfig.offload_activations), a memory budget that picks the batch (SIZE such as 18GiB, or
ref/3: a third of the measured peak of the same shape and method's reference run listed before it),
or the number of samples of this run (default --samples; s/sample is per sample either way, so a
batch that does not divide 16 can run whole batches), and the compensation stage after selection
(PruneConfig.refit; its time beside the scoring stages' and its own peak beside predict_refit_memory's
prediction, both from the same run). The 1B kept-channel IoU of fused vs reference is reported per
method.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared modules
import random_models  # noqa: E402
from kept_channels import kept_iou  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

SHAPES = {  # name -> (builtin shape in sdmprune.memory, target width)
    "1b": ("llama-3.2-1b", 5678),
    "8b": ("llama-3.1-8b", 11468),
}
SMOKE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)


def hf_config(shape_name: str):
    return random_models.hf_config(shape_name, SMOKE)


build_random_model = random_models.build_random_model


def worker(args) -> dict:
    from sdmprune.compensation import gram_dtype
    from sdmprune.errors import InputError
    from sdmprune.memory import BUILTIN_SHAPES, GiB, predict_peak_memory
    from sdmprune.memory import batch_size_for_memory, memory_settings, predict_refit_memory
    from sdmprune.pipeline import PruneConfig, prune_model

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shape_name = "smoke" if args.smoke else SHAPES[args.shape][0]
    config = hf_config(shape_name)
    width = 120 if args.smoke else SHAPES[args.shape][1]
    shape = config if args.smoke else BUILTIN_SHAPES[shape_name]
    ckpt = not args.no_checkpointing
    cfg = PruneConfig(width=width, method=args.method, engine=args.engine, batch_size=args.batch_size,
                      gradient_checkpointing=ckpt, refit=args.refit,
                      loss_token_chunk=args.loss_chunk, offload_activations=args.offload_activations,
                      progress=False, seed=0)
    if args.max_memory:  # what `sdmprune prune --max-memory` picks
        try:
            cfg.batch_size, _ = batch_size_for_memory(shape, cfg, args.engine, args.seq_len, args.max_memory,
                                                      args.samples, dtype, width=width)
        except InputError as exc:
            return {"error": str(exc)}
    if args.engine == "reference":
        cfg.batch_size = 1  # the reference engine runs one sample per backward
    batch = cfg.batch_size
    predicted = predict_peak_memory(shape, args.seq_len, batch, **memory_settings(cfg, args.engine, dtype))
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, config.vocab_size, (args.samples, args.seq_len), generator=gen)
    warmup_s = None
    if device.type == "cuda":
        # Warm-up outside the measurement: Triton compiles and autotunes (keyed on I and d), cuBLAS
        # handles, allocator growth. A one-layer model of the same shapes runs one batch per stage,
        # then is freed (the measured peak is reset inside prune_model).
        t0 = time.perf_counter()
        small = build_random_model(type(config)(**{**config.to_dict(), "num_hidden_layers": 1}), device, dtype)
        prune_model(small, tokens[:batch], cfg)
        del small
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = build_random_model(config, device, dtype)
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = prune_model(model, tokens, cfg)
    st = result.stats
    n = args.samples
    stage_s = {k: st["time_s"].get(k) for k in ("stage1", "stage2")}
    scoring_s = sum(v for v in stage_s.values() if v)
    out = {
        "shape": shape_name, "method": args.method, "engine": st.get("engine"), "backend": st.get("backend"),
        "samples": n,
        "seq_len": args.seq_len, "batch_size": batch, "checkpointing": ckpt, "loss_chunk": args.loss_chunk,
        "offload_activations": args.offload_activations, "activation_offload": st.get("activation_offload"),
        "max_memory": args.max_memory, "build_s": round(build_s, 3),
        "warmup_s": None if warmup_s is None else round(warmup_s, 3),
        "stage_s": stage_s, "s_per_sample": scoring_s / n, "tokens_per_s": n * args.seq_len / scoring_s,
        "stage_s_per_sample": {k: (v / n if v else None) for k, v in stage_s.items()},
        "samples_per_s": n / scoring_s,
        # GPU peak only: on the CPU smoke run the pipeline reports process RSS, not comparable
        "peak_memory_gib": (st["peak_memory_bytes"] / GiB) if device.type == "cuda" else None,
        "predicted_peak_gib": predicted["total"] / GiB, "predicted": predicted,
    }
    if args.refit != "none":  # its peak is the refit stage's own (reset when the stage starts)
        rf = st["refit"]
        out["refit"] = args.refit
        out["refit_s"] = st["time_s"]["refit"]
        out["refit_vs_scoring"] = out["refit_s"] / scoring_s
        out["refit_peak_gib"] = rf["peak_memory_bytes"] / GiB if device.type == "cuda" else None
        out["refit_predicted_gib"] = predict_refit_memory(
            shape, args.seq_len, batch, width=width, dtype=dtype, gram_bytes=gram_dtype(device).itemsize,
            samples=n)["total"] / GiB
        out["refit_held_out_loss"] = rf.get("held_out_loss")
    if args.save_keep:
        torch.save({k: v.cpu() for k, v in result.keep.items()}, args.save_keep)
    return out


def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("transformers", "triton", "sdmprune"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            pass
    out["cuda"] = torch.version.cuda
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out


DEFAULT_RUNS = ",".join([
    "1b:reference",
    "1b:fused:b=4",                   # the default fused setting (checkpointing on)
    "1b:fused:mem=ref/3:chunk=128",   # the batch predicted to fit a third of the reference's peak
    "1b:fused:b=12:chunk=128:n=48",   # the 1B target: >= 4x the reference and <= 1/3 of its peak
    "1b:fused:b=16:chunk=128:n=32",   # two batches a stage
    "1b:fused:b=16:chunk=128:act=1:n=32",      # the same with the layer inputs in pinned host memory
    "1b:fused:mem=ref/3:chunk=128:act=1:n=32",  # the batch that fits a third of the reference, offloaded
    "1b:fused:b=8:ckpt=0",            # throughput: no checkpointing
    "8b:reference",
    "8b:fused:mem=18GiB",             # the batch predict_peak_memory fits into 18 GiB
    "8b:fused:b=4:ckpt=0",            # throughput on a large card
    "8b:fused:mem=18GiB:act=1:n=26",  # offloaded layer inputs: a larger batch in the same 18 GiB
    # hfprune beside sdmprune: against its own official loop (one frozen copy, retained H and dL/dH)
    "1b:reference:m=hfprune",
    "1b:fused:m=hfprune:mem=ref/3:chunk=128",
    "8b:reference:m=hfprune",
    "8b:fused:m=hfprune:mem=18GiB",
    # the refit stage after selection: its time and its own peak against the memory model
    "1b:fused:b=4:refit=ls",
    "8b:fused:b=2:refit=ls",
])
KEYS = ("m", "b", "ckpt", "chunk", "act", "mem", "n", "refit")
TEXT_KEYS = ("m", "mem", "refit")
REFITS = ("none", "ls")
METHODS = ("sdmprune", "taylor", "hfprune")
FLAGS = ("ckpt", "act")


def parse_run(spec: str) -> dict:
    """'shape:engine[:m=METHOD][:b=N][:ckpt=0|1][:chunk=ROWS][:act=0|1][:mem=SIZE|ref/K][:n=SAMPLES][:refit=ls]'
    -> dict."""
    parts = spec.strip().split(":")
    want = "shape:engine[:m=METHOD][:b=N][:ckpt=0][:chunk=N][:act=1][:mem=SIZE|ref/K][:n=SAMPLES][:refit=ls]"
    if len(parts) < 2:
        raise SystemExit(f"bad run spec {spec!r}: want {want}")
    run = {"shape": parts[0], "engine": parts[1], "m": "sdmprune", "b": None, "ckpt": True, "chunk": None, "act": False,
           "mem": None, "n": None, "refit": "none", "spec": spec}
    for kv in parts[2:]:
        k, _, v = kv.partition("=")
        if k not in KEYS:
            raise SystemExit(f"bad run spec {spec!r}: unknown key {k!r} (want {want})")
        try:
            run[k] = v if k in TEXT_KEYS else (v not in ("0", "false") if k in FLAGS else int(v))
        except ValueError:
            raise SystemExit(f"bad run spec {spec!r}: {k}={v!r} is not an integer") from None
    if run["refit"] not in REFITS:
        raise SystemExit(f"bad run spec {spec!r}: refit={run['refit']!r} is not one of {', '.join(REFITS)}")
    if run["m"] not in METHODS:
        raise SystemExit(f"bad run spec {spec!r}: m={run['m']!r} is not one of {', '.join(METHODS)}")
    if run["mem"] and run["mem"].startswith("ref/"):
        try:
            run["mem_ref_divisor"] = float(run["mem"][4:])
        except ValueError:
            raise SystemExit(f"bad run spec {spec!r}: mem=ref/K needs a number K") from None
    return run


def resolve_budget(run: dict, reference_peaks: dict) -> dict:
    """mem=ref/K -> a byte budget from the measured peak of this shape and method's reference run (or an
    error). ``reference_peaks``: {(shape, method): GiB}."""
    k = run.get("mem_ref_divisor")
    if k is None:
        return run
    peak = reference_peaks.get((run["shape"], run["m"]))
    if peak is None:
        return dict(run, error=f"mem={run['mem']}: no measured {reference_spec(run)} run before this one")
    return dict(run, mem=str(int(peak * 2**30 / k)), mem_spec=run["mem"])


def reference_spec(run: dict) -> str:
    """The spec of the reference run a ``mem=ref/K`` run measures against."""
    return f"{run['shape']}:reference" + ("" if run["m"] == "sdmprune" else f":m={run['m']}")


def run_one(args, run: dict, save_keep=None) -> dict:
    b = run["b"] if run["b"] is not None else args.batch_size
    n = run.get("n") or args.samples
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--shape", run["shape"], "--engine", run["engine"],
           "--method", run["m"],
           "--samples", str(n), "--seq-len", str(args.seq_len), "--batch-size", str(b)]
    mem = run["mem"] or args.max_memory
    if mem:
        cmd += ["--max-memory", mem]
    if not run["ckpt"]:
        cmd += ["--no-checkpointing"]
    if run["chunk"]:
        cmd += ["--loss-chunk", str(run["chunk"])]
    if run["act"]:
        cmd += ["--offload-activations"]
    if run["refit"] != "none":
        cmd += ["--refit", run["refit"]]
    if args.smoke:
        cmd += ["--smoke"]
    if save_keep:
        cmd += ["--save-keep", save_keep]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"spec": run["spec"], "shape": run["shape"], "method": run["m"], "engine": run["engine"],
                "error": proc.stderr.strip().splitlines()[-1:]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), spec=run["spec"])


def out_path(out, smoke: bool) -> str:
    """--out may be a directory (run_gpu.sh passes benchmarks/results) or a .json path. Smoke (CPU)
    numbers go to pipeline-smoke.json (a temp dir by default), never to the GPU results file."""
    name = "pipeline-smoke.json" if smoke else "pipeline.json"
    if out is None:
        return os.path.join(tempfile.mkdtemp(prefix="sdmprune-bench-"), name) if smoke else os.path.join(RESULTS, name)
    if out.endswith(".json"):
        if smoke and os.path.basename(out) == "pipeline.json":
            out = os.path.join(os.path.dirname(out), name)
        return out
    return os.path.join(out, name)


def write_results(report: dict, path: str) -> None:
    from sdmprune.storage.paths import atomic_write_file, write_json_atomic

    write_json_atomic(path, report)
    rows = ["| run | batch | ckpt | stage 1 s/sample | stage 2 s/sample | tokens/s (both stages) | "
            "peak GiB (measured) | peak GiB (predicted) |",
            "|---|---|---|---|---|---|---|---|"]
    # "ckpt" says "on, offloaded" when the checkpointed layer inputs waited in pinned host memory
    for r in report["runs"]:
        if "error" in r:
            rows.append(f"| {r.get('spec')} | error: {r['error']} | | | | | | |")
            continue
        peak = "n/a (CPU)" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        per = r.get("stage_s_per_sample", {})
        s1, s2 = (f"{per[k]:.4f}" if per.get(k) else "-" for k in ("stage1", "stage2"))
        ckpt = ("on, offloaded" if r.get("offload_activations") else "on") if r.get("checkpointing", True) else "off"
        rows.append(f"| {r.get('spec')} | {r['batch_size']} | {ckpt} | "
                    f"{s1} | {s2} | {r['tokens_per_s']:.0f} | {peak} | {r['predicted_peak_gib']:.2f} |")
    md = [f"Device: {report['versions'].get('device')}; versions: " + ", ".join(
        f"{k} {v}" for k, v in report["versions"].items() if k != "device"), "", *rows]
    refits = [r for r in report["runs"] if r.get("refit") and "error" not in r]
    if refits:
        md += ["", "Refit stage (--refit ls) of the same runs: its time beside the scoring stages', its own peak "
               "beside predict_refit_memory's prediction", "",
               "| run | refit s | refit ÷ scoring time | refit peak GiB (measured) | refit peak GiB (predicted) | "
               "held-out loss before -> after |", "|---|---|---|---|---|---|"]
        for r in refits:
            peak = "n/a (CPU)" if r["refit_peak_gib"] is None else f"{r['refit_peak_gib']:.2f}"
            loss = r.get("refit_held_out_loss") or {}
            held = (f"{loss['before']:.4f} -> {loss['after']:.4f}" if loss.get("before") is not None else "-")
            md.append(f"| {r.get('spec')} | {r['refit_s']:.2f} | {r['refit_vs_scoring']:.2f}x | {peak} | "
                      f"{r['refit_predicted_gib']:.2f} | {held} |")
    for key, method in [("iou_1b", "sdmprune")] + [(f"iou_1b_{m}", m) for m in METHODS if m != "sdmprune"]:
        if report.get(key):
            vals = list(report[key].values())
            md += ["", f"1B fused vs reference kept-channel IoU per layer ({method}): min {min(vals):.4f}, "
                   f"mean {sum(vals) / len(vals):.4f}"]
    with atomic_write_file(os.path.splitext(path)[0] + ".md") as tmp:
        tmp.write_text("\n".join(md) + "\n")


def iou_key(method: str) -> str:
    """The report's key of the 1B fused-vs-reference IoU of ``method``."""
    return "iou_1b" if method == "sdmprune" else f"iou_1b_{method}"


IOU_KEYS = tuple(iou_key(m) for m in METHODS)


def merge_reports(paths) -> dict:
    """One report from several (e.g. the 1B and the 8B runs, measured by separate device commands):
    the runs in the order given, a spec already present dropped (the first measurement stands), the
    header fields and the 1B IoU from the first file that has them."""
    merged, seen = None, set()
    for path in paths:
        with open(path) as fh:
            rep = json.load(fh)
        if merged is None:
            merged = dict(rep, runs=[])
            for key in IOU_KEYS:
                merged.pop(key, None)
        for r in rep.get("runs", []):
            if r.get("spec") not in seen:
                seen.add(r.get("spec"))
                merged["runs"].append(r)
        for key in IOU_KEYS:
            if rep.get(key) and key not in merged:
                merged[key] = rep[key]
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=DEFAULT_RUNS,
                   help="comma-separated shape:engine[:b=N][:ckpt=0][:chunk=ROWS][:mem=SIZE] (one process each)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-memory", default=None, help="per-GPU budget: the batch size comes from predict_peak_memory")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shape, torch engine, 2 samples")
    p.add_argument("--out", default=None, help="results directory (or .json file); default benchmarks/results")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="write the runs of these results files as one (to --out); measures nothing")
    p.add_argument("--no-checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loss-chunk", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--offload-activations", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="1b", help=argparse.SUPPRESS)
    p.add_argument("--engine", default="fused", help=argparse.SUPPRESS)
    p.add_argument("--method", default="sdmprune", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--save-keep", default=None, help=argparse.SUPPRESS)
    p.add_argument("--refit", default="none", choices=REFITS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.merge:
        out = out_path(args.out, False)
        write_results(merge_reports(args.merge), out)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if args.smoke:
        args.samples, args.seq_len, args.batch_size = 2, 16, 2
        runs = [parse_run(r) for r in ("smoke:torch", "smoke:torch:act=1", "smoke:torch:m=hfprune",
                                       "smoke:torch:refit=ls")]
    else:
        if not torch.cuda.is_available():
            print("bench_pipeline: needs a CUDA GPU (use --smoke on CPU); nothing measured, nothing written",
                  file=sys.stderr)
            return 0
        runs = [parse_run(r) for r in args.runs.split(",") if r.strip()]
    out = out_path(args.out, args.smoke)
    report = {"versions": versions(), "smoke": args.smoke, "samples": args.samples, "seq_len": args.seq_len,
              "runs": []}
    keeps, reference_peaks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(runs):
            run = resolve_budget(run, reference_peaks)
            if "error" in run:
                r = {"spec": run["spec"], "shape": run["shape"], "method": run["m"], "engine": run["engine"],
                     "error": run["error"]}
                print(json.dumps(r), flush=True)
                report["runs"].append(r)
                continue
            # the first 1b run of each engine and method on the default samples keeps its channels for the IoU
            key = (run["engine"], run["m"])
            want_keep = run["shape"] == "1b" and key not in keeps and not run.get("n")
            keep_path = os.path.join(tmp, f"{i}.pt") if want_keep else None
            r = run_one(args, run, keep_path)
            if run.get("mem_spec"):
                r["max_memory_spec"] = run["mem_spec"]
            if run["engine"] == "reference" and r.get("peak_memory_gib"):
                reference_peaks[(run["shape"], run["m"])] = r["peak_memory_gib"]
            print(json.dumps({k: v for k, v in r.items() if k != "predicted"}), flush=True)
            report["runs"].append(r)
            if keep_path and os.path.exists(keep_path):
                keeps[key] = torch.load(keep_path)
            for method in METHODS:
                if ("fused", method) in keeps and ("reference", method) in keeps:
                    report[iou_key(method)] = kept_iou(keeps[("fused", method)], keeps[("reference", method)])
            write_results(report, out)  # after every run: a later crash keeps what was measured
    write_results(report, out)
    print(f"wrote {out}" + (" (CPU smoke: no GPU numbers)" if args.smoke else ""), file=sys.stderr)
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
