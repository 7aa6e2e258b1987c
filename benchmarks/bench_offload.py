"""Layer streaming and sharding on one GPU (issue #10): Llama-3.1-8B shape, random bf16 weights,
1024-token samples. Stage-1 style CE Taylor passes (TaylorImportance + the fused LM-head loss):

* resident fused engine (compute only): samples/s and peak GPU memory;
* --offload cpu (LayerStreamer): samples/s, peak GPU memory (target <= 6 GiB, >= 0.6x resident);
* copy only: one forward+backward worth of layer copies (LayerStreamer.copy_pass);
* --shard fsdp and plain data parallel with world size 1 (nccl): scores match the resident run.

Writes benchmarks/results/offload.json with the device and versions. GPU only: on CPU it prints a
note and measures nothing (tests/test_offload.py covers the mechanism on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def taylor_pass(model, tokens, batch, backend="triton"):
    """(scores, seconds) of CE Taylor over ``tokens`` [n, L], ``batch`` samples per backward."""
    from sdmprune.importance import TaylorImportance
    from sdmprune.kernels.fused_linear_distill_loss import fused_linear_distill_loss
    from sdmprune.models import get_adapter

    adapter = get_adapter(model)
    body, weight = adapter.body(model), adapter.lm_head(model).weight
    device = weight.device
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with TaylorImportance(model, backend=backend) as imp:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, tokens.shape[0], batch):
            x = tokens[i:i + batch].to(device)
            h = body(input_ids=x, use_cache=False).last_hidden_state
            labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1).reshape(-1)
            loss = fused_linear_distill_loss(h.reshape(-1, h.shape[-1]), weight, labels, None, alpha=0.0,
                                             backend=backend)
            (loss * x.shape[0]).backward()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        scores = {k: v.detach().float().cpu() for k, v in imp.scores().items()}
    model.activation_checkpointing_disable()
    return scores, dt


def max_rel_diff(a, b):
    return max(float(((a[k] - b[k]).abs() / b[k].abs().clamp_min(1e-30)).max()) for k in b)


def main(argv=None) -> int:
    from bench_pipeline import build_random_model, hf_config, versions
    from sdmprune.memory import GiB, predict_peak_memory, BUILTIN_SHAPES
    from sdmprune.offload import LayerStreamer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=os.path.join(HERE, "results", "offload.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_offload: needs a CUDA GPU; nothing measured", file=sys.stderr)
        return 0
    config = hf_config(args.shape)
    tokens = torch.randint(0, config.vocab_size, (args.samples, args.seq_len),
                           generator=torch.Generator().manual_seed(0))
    model = build_random_model(config, "cuda", torch.bfloat16)
    report = {"versions": versions(), "shape": args.shape, "samples": args.samples, "seq_len": args.seq_len,
              "batch_size": args.batch_size}

    # resident (compute only)
    taylor_pass(model, tokens[: args.batch_size], args.batch_size)  # warm-up (Triton compile)
    torch.cuda.reset_peak_memory_stats()
    ref, dt = taylor_pass(model, tokens, args.batch_size)
    report["resident"] = {"samples_per_s": args.samples / dt, "seconds": dt,
                          "peak_gib": torch.cuda.max_memory_allocated() / GiB}

    # data parallel and FSDP2 with world size 1 on this GPU
    import torch.distributed as tdist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    tdist.init_process_group("nccl", rank=0, world_size=1)
    from sdmprune import distributed

    dp, _ = taylor_pass(model, tokens[distributed.shard_indices(args.samples)], args.batch_size)
    dp = distributed.all_reduce_scores_(dp)
    report["dp_world1_max_rel_diff"] = max_rel_diff(dp, ref)
    from sdmprune.sharding import shard_model, unshard_model_

    shard_model(model)
    fs, dt_fsdp = taylor_pass(model, tokens, args.batch_size)
    report["fsdp_world1"] = {"max_rel_diff": max_rel_diff(fs, ref), "samples_per_s": args.samples / dt_fsdp}
    unshard_model_(model, device="cpu")  # the model now lives on the host: the streaming start point
    tdist.destroy_process_group()
    torch.cuda.empty_cache()

    # --offload cpu
    streamer = LayerStreamer(model, "cuda")
    report["copy_only_s_per_pass"] = streamer.copy_pass()
    taylor_pass(model, tokens[: args.batch_size], args.batch_size)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    got, dt_off = taylor_pass(model, tokens, args.batch_size)
    passes = -(-args.samples // args.batch_size)
    report["offload"] = {"samples_per_s": args.samples / dt_off, "seconds": dt_off,
                         "peak_gib": torch.cuda.max_memory_allocated() / GiB,
                         "speed_vs_resident": dt / dt_off, "max_rel_diff": max_rel_diff(got, ref),
                         "copy_only_s": report["copy_only_s_per_pass"] * passes,
                         "predicted_peak_gib": predict_peak_memory(BUILTIN_SHAPES[args.shape], args.seq_len,
                                                                   args.batch_size, offload="cpu")["total"] / GiB,
                         "sync_loads": streamer.stats["sync_loads"]}
    streamer.remove()
    report["targets"] = {"offload_peak_le_6gib": report["offload"]["peak_gib"] <= 6,
                         "offload_speed_ge_0.6x": report["offload"]["speed_vs_resident"] >= 0.6}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as fh:
        json.dump(report, fh, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
