"""Benchmark: the elementwise ops of a decoder layer that sdmprune fuses (GPU; --smoke on CPU).

* ``rms_norm``: forward + backward (dx) of a Llama RMSNorm over T tokens, bf16, frozen weight:
  transformers' LlamaRMSNorm (autograd over ~6 kernels), ``sdmprune.kernels.rms_norm`` (one Triton
  kernel each way), and Liger-Kernel's RMSNorm when it is installed. Also the bytes each keeps for
  backward (counted with saved-tensor hooks).
* ``rotary``: forward + backward of transformers' ``apply_rotary_pos_emb`` on q [B, 32, L, D] and
  k [B, 8, L, D] (the transposed views the attention makes), against ``sdmprune_kernels/rotary.py``.
* ``gated_activation``: the elementwise part of the gated MLP between its matmuls, [T, I] bf16 with a
  channel mask (stage 2): forward H = act(G) * U * mask and backward (dU, dG, H from dH), the PyTorch
  path against the Triton kernels of ``sdmprune_kernels/gated_mlp.py``.

Shapes: T = 8192 tokens; d in {2048, 4096}, I in {8192, 14336}, head_dim in {64, 128} (Llama-3.2-1B,
Llama-3.1-8B).
Writes ``<out>/layer_ops.json`` with the device, versions and median milliseconds of both sides of
each comparison measured in the same process::

    python benchmarks/bench_layer_ops.py --out benchmarks/results
    python benchmarks/bench_layer_ops.py --smoke     # CPU, tiny shapes, PyTorch paths: checks the script
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sdmprune.kernels import gated_mlp as gmod
from sdmprune.kernels.rms_norm import rms_norm

TOKENS = 8192
NORM_DIMS = [2048, 4096]
MLP_WIDTHS = [8192, 14336]
HEAD_DIMS = [64, 128]


def timed(fn, reps: int, warmup: int, device) -> float:
    """Median milliseconds of fn() over reps (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while fn() runs (weights included)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def bench_rms_norm(T, d, device, dtype, reps, warmup, backend):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, d, device=device, generator=gen).to(dtype).requires_grad_(True)
    dy = torch.randn(T, d, device=device, generator=gen).to(dtype)
    hf = LlamaRMSNorm(d, eps=1e-5).to(device=device, dtype=dtype)
    hf.weight.requires_grad_(False)
    sides = {"transformers": lambda: hf(x), "sdmprune": lambda: rms_norm(x, hf.weight, 1e-5, backend=backend)}
    try:  # the usual fused baseline, where installed
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        if device.type == "cuda":
            lg = LigerRMSNorm(d, eps=1e-5).to(device=device, dtype=dtype)
            lg.weight.requires_grad_(False)
            sides["liger"] = lambda: lg(x)
    except Exception:  # noqa: BLE001 - optional
        pass
    row = {"op": "rms_norm", "T": T, "d": d, "dtype": str(dtype).replace("torch.", "")}
    for name, f in sides.items():
        def step(f=f):
            x.grad = None
            f().backward(dy)
        row[f"{name}_ms"] = round(timed(step, reps, warmup, device), 4)
        row[f"{name}_saved_bytes"] = saved_bytes(f)
    row["sdmprune_speedup"] = round(row["transformers_ms"] / row["sdmprune_ms"], 3)
    return row


def bench_rotary(T, head_dim, device, dtype, reps, warmup, backend):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from sdmprune.kernels.rotary import apply_rotary

    L = min(T, 1024)
    B, H, Hk = T // L, 32, 8
    gen = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=gen).to(dtype)  # noqa: E731
    q = r(B, L, H, head_dim).transpose(1, 2).requires_grad_(True)
    k = r(B, L, Hk, head_dim).transpose(1, 2).requires_grad_(True)
    cos, sin = r(1, L, head_dim), r(1, L, head_dim)
    dq, dk = r(B, H, L, head_dim), r(B, Hk, L, head_dim)
    row = {"op": "rotary", "T": T, "q_heads": H, "kv_heads": Hk, "head_dim": head_dim,
           "dtype": str(dtype).replace("torch.", "")}
    for name, f in (("transformers", lambda: apply_rotary_pos_emb(q, k, cos, sin)),
                    ("sdmprune", lambda: apply_rotary(q, k, cos, sin, backend=backend))):
        def step(f=f):
            q.grad = k.grad = None
            qe, ke = f()
            torch.autograd.backward((qe, ke), (dq, dk))
        row[f"{name}_ms"] = round(timed(step, reps, warmup, device), 4)
    row["sdmprune_speedup"] = round(row["transformers_ms"] / row["sdmprune_ms"], 3)
    return row


def bench_gated_activation(T, I, device, dtype, reps, warmup, backend):
    gen = torch.Generator(device=device).manual_seed(0)
    g, u, dh = (torch.randn(T, I, device=device, generator=gen).to(dtype) for _ in range(3))
    mask = (torch.rand(I, device=device, generator=gen) > 0.3).to(dtype)
    row = {"op": "gated_activation", "T": T, "I": I, "dtype": str(dtype).replace("torch.", ""), "act": "silu",
           "masked": True}
    for name, be in (("torch", "torch"), ("sdmprune", backend)):
        row[f"{name}_fwd_ms"] = round(timed(lambda: gmod.gated_activation_forward(g, u, "silu", mask, be),
                                            reps, warmup, device), 4)
        # dh is scratch (dG is written over it): a fresh copy per call, timed on both sides alike
        row[f"{name}_bwd_ms"] = round(timed(lambda: gmod.gated_activation_backward(g, u, dh.clone(), "silu", mask, be),
                                            reps, warmup, device), 4)
    row["sdmprune_fwd_speedup"] = round(row["torch_fwd_ms"] / row["sdmprune_fwd_ms"], 3)
    row["sdmprune_bwd_speedup"] = round(row["torch_bwd_ms"] / row["sdmprune_bwd_ms"], 3)
    return row


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "transformers", "liger_kernel", "sdmprune"):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001
            pass
    out["cuda"] = torch.version.cuda
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="directory for layer_ops.json")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, PyTorch paths (checks the script)")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    if args.smoke:
        device, dtype, backend, reps, warmup = torch.device("cpu"), torch.float32, "torch", 2, 1
        tokens, dims, widths, head_dims = 64, [32], [48], [8]
    else:
        if not torch.cuda.is_available():
            print("bench_layer_ops: needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        device, dtype, backend, reps, warmup = torch.device("cuda"), torch.bfloat16, "triton", args.reps, 5
        tokens, dims, widths, head_dims = TOKENS, NORM_DIMS, MLP_WIDTHS, HEAD_DIMS
    rows = [bench_rms_norm(tokens, d, device, dtype, reps, warmup, backend) for d in dims]
    rows += [bench_rotary(tokens, hd, device, dtype, reps, warmup, backend) for hd in head_dims]
    rows += [bench_gated_activation(tokens, I, device, dtype, reps, warmup, backend) for I in widths]
    result = {
        "benchmark": "layer_ops",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
        "versions": versions(), "smoke": bool(args.smoke),
        "note": "median ms of forward+backward (rms_norm, rotary) or of one call (gated_activation); both sides of "
                "each row measured in this process",
        "rows": rows,
    }
    if args.out:
        from sdmprune.storage.paths import write_json_atomic

        write_json_atomic(Path(args.out) / "layer_ops.json", result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
