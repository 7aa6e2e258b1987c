"""Layer streaming, sharding and data parallel through the pipeline: Llama-3.1-8B shape,
random bf16 weights, 1024-token samples, ``prune_model`` (sdmprune, both stages, fused engine):

* resident (the model on the GPU): samples/s and peak GPU memory (the compute-only baseline);
* ``offload="cpu"``: samples/s and peak GPU memory (targets: <= 6 GiB, >= 0.6x resident), beside the
  copy-only time of the same number of passes (LayerStreamer.copy_pass) to show the overlap;
* data parallel and ``shard="fsdp"`` with world size 1 (nccl): kept channels vs the resident run.

Every run starts from the same random weights (same seed); the kept channels of each run are
compared with the resident run's (IoU per layer; bf16, so near-ties may differ).

    python benchmarks/bench_offload.py                   # GPU; writes benchmarks/results/offload.json
    python benchmarks/bench_offload.py --out DIR         # DIR/offload.json (run_gpu.sh)
    python benchmarks/bench_offload.py --smoke           # CPU: tiny shape, torch engine, gloo; temp dir
    python benchmarks/bench_offload.py --no-distributed  # resident and offload cpu only (the README's row)

Without a GPU (and without --smoke) it prints a note, measures nothing and writes nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from kept_channels import kept_iou  # noqa: E402  (benchmarks/ is not a package)
TARGET_WIDTH = {"llama-3.1-8b": 11468, "llama-3.2-1b": 5678, "smoke": 120}


def out_path(out, smoke: bool) -> str:
    """--out may be a directory (run_gpu.sh) or a .json path; smoke results never take the GPU name."""
    name = "offload-smoke.json" if smoke else "offload.json"
    if out is None:
        return os.path.join(tempfile.mkdtemp(prefix="sdmprune-bench-"), name) if smoke else \
            os.path.join(HERE, "results", name)
    return out if out.endswith(".json") else os.path.join(out, name)


def summary(name, result, n, device) -> dict:
    from sdmprune.memory import GiB

    st = result.stats
    t = sum(v for k, v in st["time_s"].items() if k in ("stage1", "stage2"))
    row = {"run": name, "samples_per_s": n / t, "stage1_s": st["time_s"].get("stage1"),
           "stage2_s": st["time_s"].get("stage2"), "engine": st["engine"], "world_size": st["world_size"]}
    if device.type == "cuda":
        row["peak_gib"] = st["peak_memory_bytes"] / GiB
    if "offload_stats" in st:
        row["sync_loads"] = st["offload_stats"]["sync_loads"]
        row["copied_gib"] = st["offload_stats"]["bytes_copied"] / GiB
    if "sharded_param_bytes_per_rank" in st:
        row["sharded_param_gib"] = st["sharded_param_bytes_per_rank"] / GiB
    return row


def main(argv=None) -> int:
    from bench_pipeline import build_random_model, hf_config, versions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b", choices=["llama-3.1-8b", "llama-3.2-1b"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shape, torch engine, gloo (checks the code)")
    p.add_argument("--out", default=None, help="results directory or .json file")
    p.add_argument("--no-distributed", action="store_true", help="skip the data-parallel and FSDP runs")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_offload: needs a CUDA GPU (use --smoke on CPU); nothing measured, nothing written",
              file=sys.stderr)
        return 0
    from sdmprune.scale import distributed
    from sdmprune.memory import BUILTIN_SHAPES, GiB, predict_peak_memory
    from sdmprune.scale.offload import LayerStreamer
    from sdmprune.pipeline import PruneConfig, prune_model

    if args.smoke:
        args.shape, args.samples, args.seq_len, args.batch_size = "smoke", 4, 16, 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config = hf_config(args.shape)
    cfg = PruneConfig(width=TARGET_WIDTH[args.shape], engine="torch" if args.smoke else "fused",
                      batch_size=args.batch_size, progress=False)
    tokens = torch.randint(0, config.vocab_size, (args.samples, args.seq_len),
                           generator=torch.Generator().manual_seed(0))
    report = {"versions": versions(), "device": str(device), "smoke": args.smoke, "shape": args.shape,
              "samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size, "runs": []}

    def fresh(on):
        # same weights every time; a copy of the config, which the prune rewrites (intermediate_size)
        model = build_random_model(copy.deepcopy(config), device, dtype, seed=0)
        if on != device.type:
            model = model.to(on)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return model

    if device.type == "cuda":  # compile the Triton kernels on a one-layer model of the same widths
        from transformers import LlamaConfig

        small = LlamaConfig(**{**copy.deepcopy(config).to_dict(), "num_hidden_layers": 1})
        prune_model(build_random_model(small, device, dtype), tokens[: args.batch_size], cfg)
        torch.cuda.empty_cache()

    # resident: compute only
    ref = prune_model(fresh(device.type), tokens, cfg)
    report["runs"].append(summary("resident", ref, args.samples, device))

    # --offload cpu: copy-only first (one forward+backward of copies per pass), then the prune
    model = fresh("cpu")
    with LayerStreamer(model, device) as s:
        copy_pass = min(s.copy_pass() for _ in range(2))
    passes = 2 * -(-args.samples // args.batch_size)  # two stages
    off = prune_model(model, tokens, cfg, offload="cpu", offload_device=str(device))
    row = summary("offload cpu", off, args.samples, device)
    row["copy_only_s"] = copy_pass * passes
    row["compute_only_s"] = args.samples / report["runs"][0]["samples_per_s"]
    row["combined_s"] = args.samples / row["samples_per_s"]
    row["speed_vs_resident"] = row["samples_per_s"] / report["runs"][0]["samples_per_s"]
    row["kept_iou_min"] = min(kept_iou(off.keep, ref.keep).values())
    if not args.smoke:
        row["predicted_peak_gib"] = predict_peak_memory(BUILTIN_SHAPES[args.shape], args.seq_len, args.batch_size,
                                                        offload="cpu")["total"] / GiB
    report["runs"].append(row)
    del model

    path = out_path(args.out, args.smoke)

    def save():
        from sdmprune.storage.paths import write_json_atomic

        write_json_atomic(path, report)

    r = {x["run"]: x for x in report["runs"]}
    if not args.smoke:
        report["targets"] = {"offload_peak_le_6gib": r["offload cpu"]["peak_gib"] <= 6,
                             "offload_speed_ge_0.6x": r["offload cpu"]["speed_vs_resident"] >= 0.6}
    save()  # the headline rows first: a run cut short in the distributed part keeps them

    # data parallel and FSDP2, world size 1
    if not args.no_distributed:
        import torch.distributed as tdist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        if device.type == "cuda":
            tdist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        else:
            tdist.init_process_group("gloo", rank=0, world_size=1)
        try:
            assert distributed.world_size() == 1
            dp = prune_model(fresh(device.type), tokens, cfg)
            row = summary("data parallel, world 1", dp, args.samples, device)
            row["kept_iou_min"] = min(kept_iou(dp.keep, ref.keep).values())
            report["runs"].append(row)
            fs = prune_model(fresh("cpu"), tokens, cfg, shard="fsdp")  # FSDP2 moves the shards to the GPU
            row = summary("fsdp, world 1", fs, args.samples, device)
            row["kept_iou_min"] = min(kept_iou(fs.keep, ref.keep).values())
            report["runs"].append(row)
        finally:
            tdist.destroy_process_group()
        save()
    print(json.dumps(report["runs"], indent=1))
    print(f"wrote {path}" + (" (CPU smoke: no GPU numbers)" if args.smoke else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
