"""Scale benchmark of the two-stage prune (issue #7): Llama-3.2-1B and Llama-3.1-8B shapes with
random bf16 weights built directly on the GPU (meta init -> to_empty -> random init; no download,
no CPU copy), the reference and fused engines of sdmprune.pipeline, one subprocess per
(shape, engine) so each peak is clean. Writes s/sample, tokens/s, stage times and peak memory
(measured, beside predict_peak_memory's prediction) to benchmarks/results/pipeline.json + .md,
and on the 1B shape the per-layer IoU of the kept channels of fused vs reference on the same samples.

    python benchmarks/bench_pipeline.py                       # GPU: 1b and 8b, fused and reference
    python benchmarks/bench_pipeline.py --max-memory 16GiB    # batch size from predict_peak_memory
    python benchmarks/bench_pipeline.py --smoke               # CPU: tiny shape, torch engine, 2 samples
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

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

SHAPES = {  # name -> (builtin shape in sdmprune.memory, target width)
    "1b": ("llama-3.2-1b", 5678),
    "8b": ("llama-3.1-8b", 11468),
}
SMOKE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)


def hf_config(shape_name: str):
    from transformers import LlamaConfig

    if shape_name == "smoke":
        return LlamaConfig(max_position_embeddings=256, **SMOKE)
    from sdmprune.memory import BUILTIN_SHAPES

    s = BUILTIN_SHAPES[shape_name]
    return LlamaConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                       num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                       num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim, vocab_size=s.vocab_size,
                       tie_word_embeddings=s.tie_word_embeddings, max_position_embeddings=131072,
                       rope_theta=500000.0)


def build_random_model(config, device, dtype, seed=0):
    """A random model built on ``device`` without a CPU copy: meta init, to_empty, then init in place."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        # buffers are uninitialized after to_empty: rebuild the rotary embedding
        rot = model.model.rotary_emb
        model.model.rotary_emb = type(rot)(config=config).to(device)  # tiny: built on the host
    model.tie_weights()
    return model.eval()


def worker(args) -> dict:
    from sdmprune.memory import BUILTIN_SHAPES, GiB, largest_batch, parse_size, predict_peak_memory
    from sdmprune.pipeline import PruneConfig, prune_model

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shape_name = "smoke" if args.smoke else SHAPES[args.shape][0]
    config = hf_config(shape_name)
    width = 120 if args.smoke else SHAPES[args.shape][1]
    engine_for_memory = "torch" if args.engine == "torch" else args.engine
    batch = args.batch_size
    shape = config if args.smoke else BUILTIN_SHAPES[shape_name]
    if args.max_memory:
        budget = parse_size(args.max_memory)
        batch = largest_batch(shape, args.seq_len, budget, dtype=dtype, engine=engine_for_memory,
                              max_batch=args.samples)
        if batch == 0:
            return {"error": f"does not fit {args.max_memory} at batch 1 (predicted)"}
    if args.engine == "reference":
        batch = 1  # the reference engine runs one sample per backward
    predicted = predict_peak_memory(shape, args.seq_len, batch, dtype=dtype, engine=engine_for_memory)
    t0 = time.perf_counter()
    model = build_random_model(config, device, dtype)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, config.vocab_size, (args.samples, args.seq_len), generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = prune_model(model, tokens, PruneConfig(width=width, engine=args.engine, batch_size=batch,
                                                    progress=False, seed=0))
    st = result.stats
    n = args.samples
    stage_s = {k: st["time_s"].get(k) for k in ("stage1", "stage2")}
    scoring_s = sum(v for v in stage_s.values() if v)
    out = {
        "shape": shape_name, "engine": st.get("engine"), "backend": st.get("backend"), "samples": n,
        "seq_len": args.seq_len, "batch_size": batch, "build_s": round(build_s, 3),
        "stage_s": stage_s, "s_per_sample": scoring_s / n, "tokens_per_s": n * args.seq_len / scoring_s,
        "samples_per_s": n / scoring_s,
        # GPU peak only: on the CPU smoke run the pipeline reports process RSS, not comparable
        "peak_memory_gib": (st["peak_memory_bytes"] / GiB) if device.type == "cuda" else None,
        "predicted_peak_gib": predicted["total"] / GiB, "predicted": predicted,
    }
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


def run_one(args, shape, engine, save_keep=None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--shape", shape, "--engine", engine,
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    if args.max_memory:
        cmd += ["--max-memory", args.max_memory]
    if args.smoke:
        cmd += ["--smoke"]
    if save_keep:
        cmd += ["--save-keep", save_keep]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"shape": shape, "engine": engine, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def iou(a: dict, b: dict) -> dict:
    out = {}
    for k in a:
        sa, sb = set(a[k].tolist()), set(b[k].tolist())
        out[str(k)] = len(sa & sb) / len(sa | sb)
    return out


def write_results(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(report, fh, indent=2)
    os.replace(path + ".tmp", path)
    rows = ["| shape | engine | batch | s/sample | tokens/s | peak GiB (measured) | peak GiB (predicted) |",
            "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            rows.append(f"| {r.get('shape')} | {r.get('engine')} | error: {r['error']} | | | | |")
            continue
        peak = "n/a (CPU)" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        rows.append(f"| {r['shape']} | {r['engine']} | {r['batch_size']} | {r['s_per_sample']:.4f} | "
                    f"{r['tokens_per_s']:.0f} | {peak} | {r['predicted_peak_gib']:.2f} |")
    md = [f"Device: {report['versions'].get('device')}; versions: " + ", ".join(
        f"{k} {v}" for k, v in report["versions"].items() if k != "device"), "", *rows]
    if report.get("iou_1b"):
        vals = list(report["iou_1b"].values())
        md += ["", f"1B fused vs reference kept-channel IoU per layer: min {min(vals):.4f}, "
               f"mean {sum(vals) / len(vals):.4f}"]
    with open(os.path.splitext(path)[0] + ".md", "w") as fh:
        fh.write("\n".join(md) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--engines", default="fused,reference")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-memory", default=None, help="per-GPU budget: the batch size comes from predict_peak_memory")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shape, torch engine, 2 samples")
    p.add_argument("--out", default=None, help="results directory (or .json file); default benchmarks/results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="1b", help=argparse.SUPPRESS)
    p.add_argument("--engine", default="fused", help=argparse.SUPPRESS)
    p.add_argument("--save-keep", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.smoke:
        args.samples, args.seq_len, args.batch_size = 2, 16, 2
        shapes, engines = ["smoke"], ["torch"]
    else:
        if not torch.cuda.is_available():
            print("bench_pipeline: needs a CUDA GPU (use --smoke on CPU); nothing measured, nothing written",
                  file=sys.stderr)
            return 0
        shapes, engines = args.shapes.split(","), args.engines.split(",")
    out = out_path(args.out, args.smoke)
    report = {"versions": versions(), "smoke": args.smoke, "samples": args.samples, "seq_len": args.seq_len,
              "runs": []}
    keeps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            for engine in engines:
                keep_path = os.path.join(tmp, f"{shape}-{engine}.pt") if shape == "1b" else None
                r = run_one(args, shape, engine, keep_path)
                print(json.dumps({k: v for k, v in r.items() if k != "predicted"}), flush=True)
                report["runs"].append(r)
                if keep_path and os.path.exists(keep_path):
                    keeps[engine] = torch.load(keep_path)
        if "fused" in keeps and "reference" in keeps:
            report["iou_1b"] = iou(keeps["fused"], keeps["reference"])
    write_results(report, out)
    print(f"wrote {out}" + (" (CPU smoke: no GPU numbers)" if args.smoke else ""), file=sys.stderr)
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
