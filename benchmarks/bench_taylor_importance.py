"""Benchmark: gated-MLP forward+backward with fused Taylor importance (GPU only).

Compares, for MLP shapes d x I in {2048 x 8192, 4096 x 14336}, T in {1024, 4096} tokens (samples of
1024 tokens), bf16:

* ``fused``:  gated_mlp_with_importance forward+backward (dX + importance into float32 [I], no weight grads)
* ``plain``:  the plain autograd MLP forward+backward computing the three weight gradients
              (the cost of an ordinary training step; target: fused <= 1.15x plain)
* ``naive``:  the reference path: one autograd backward per sample with weight gradients, then
              |g*W| summed over gate/up/down into an I x d float32 matrix (target: fused >= 2x faster)
* ``kernel``: the importance accumulation alone (accumulate_taylor_scores_)

and the bytes of weight gradients / importance state held after a step (target: 0 weight-grad bytes
and 4*I importance bytes for fused), plus the peak memory above the inputs during the step.

Script mode writes ``<out>/taylor_importance.json`` (device, versions, rows); pytest-benchmark mode::

    python benchmarks/bench_taylor_importance.py --out benchmarks/results
    python benchmarks/bench_taylor_importance.py --shapes 4096x14336 --tokens 4096   # the README's row only
    python -m pytest benchmarks/bench_taylor_importance.py --benchmark-only
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdmprune.kernels.gated_mlp import gated_mlp_with_importance
from sdmprune.kernels.taylor_importance import accumulate_taylor_scores_

SHAPES = [(2048, 8192), (4096, 14336)]  # (d, I)
TOKENS = [1024, 4096]
SAMPLE_LEN = 1024
TARGET_VS_PLAIN = 1.15
TARGET_VS_NAIVE = 2.0


class MLP:
    """Weights of one gated MLP (bf16, CUDA) and the three variants' step functions."""

    def __init__(self, d, I, T, dtype=torch.bfloat16, device="cuda"):
        gen = torch.Generator(device=device).manual_seed(0)
        r = lambda *s, scale: (torch.randn(*s, device=device, generator=gen) * scale).to(dtype)  # noqa: E731
        self.d, self.I, self.T = d, I, T
        self.w_gate, self.w_up = r(I, d, scale=d ** -0.5), r(I, d, scale=d ** -0.5)
        self.w_down = r(d, I, scale=I ** -0.5)
        self.x = r(T, d, scale=1.0)
        self.dy = r(T, d, scale=1e-3)
        self.seg = torch.arange(0, T + 1, SAMPLE_LEN, device=device)
        self.scores = torch.zeros(I, device=device, dtype=torch.float32)
        self.importance = None

    def _weights(self, requires_grad):
        return [w.requires_grad_(requires_grad) for w in (self.w_gate, self.w_up, self.w_down)]

    def fused(self):
        wg, wu, wd = self._weights(False)
        x = self.x.detach().requires_grad_(True)
        y = gated_mlp_with_importance(x.view(-1, SAMPLE_LEN, self.d), (wg, None), (wu, None), (wd, None), "silu",
                                      scores=self.scores, backend="triton")
        y.backward(self.dy.view_as(y))
        return x.grad

    @staticmethod
    def _mlp(x, wg, wu, wd):
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    def plain(self):
        ws = self._weights(True)
        for w in ws:
            w.grad = None
        x = self.x.detach().requires_grad_(True)
        self._mlp(x, *ws).backward(self.dy)
        return x.grad

    def naive(self):
        wg, wu, wd = ws = self._weights(True)
        if self.importance is None:
            self.importance = torch.zeros(self.I, self.d, device=self.x.device, dtype=torch.float32)
        for a in range(0, self.T, SAMPLE_LEN):  # one backward per sample: the abs is per sample
            for w in ws:
                w.grad = None
            x = self.x[a:a + SAMPLE_LEN].detach().requires_grad_(True)
            self._mlp(x, *ws).backward(self.dy[a:a + SAMPLE_LEN])
            with torch.no_grad():
                s = wu.grad.float() * wu.float()
                s += wg.grad.float() * wg.float()
                s += (wd.grad.float() * wd.float()).t()
                self.importance += s.abs_()
        return x.grad

    def kernel(self):
        # the step's tensors for the accumulation alone (random; only the time matters)
        if not hasattr(self, "_k"):
            g = torch.Generator(device=self.x.device).manual_seed(1)
            self._k = [torch.randn(self.T, self.I, device=self.x.device, generator=g).to(self.x.dtype) for _ in range(3)]
        dg, du, h = self._k
        accumulate_taylor_scores_(self.scores, self.x, dg, du, h, self.dy, self.w_gate, self.w_up, self.w_down,
                                  self.seg, backend="triton")

    def held_bytes(self, variant):
        """Bytes of weight gradients and importance state that persist after a step of ``variant``."""
        grads = sum(w.grad.numel() * w.grad.element_size() for w in (self.w_gate, self.w_up, self.w_down)
                    if w.grad is not None)
        if variant == "fused":
            state = self.scores.numel() * 4
        elif variant == "naive":
            state = self.importance.numel() * 4
        else:
            state = 0
        return grads, state

    def reset_grads(self):
        for w in (self.w_gate, self.w_up, self.w_down):
            w.grad = None
            w.requires_grad_(False)


def cuda_time_ms(fn, warmup=3, reps=10):
    """Median wall time of fn() in ms, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def peak_extra_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(d, I, T):
    m = MLP(d, I, T)
    row = {"d": d, "I": I, "T": T, "samples": T // SAMPLE_LEN, "dtype": "bf16"}
    for variant in ("fused", "plain", "naive"):
        fn = getattr(m, variant)
        row[f"{variant}_ms"] = cuda_time_ms(fn)
        grads, state = m.held_bytes(variant)
        row[f"{variant}_weight_grad_bytes"] = grads
        row[f"{variant}_importance_bytes"] = state
        m.reset_grads()
        m.importance = None  # the peak below includes allocating the state
        row[f"{variant}_peak_extra_bytes"] = peak_extra_bytes(fn)
        m.reset_grads()
        m.importance = None
    row["kernel_ms"] = cuda_time_ms(m.kernel)
    row["fused_over_plain"] = row["fused_ms"] / row["plain_ms"]
    row["naive_over_fused"] = row["naive_ms"] / row["fused_ms"]
    row["meets_plain_target"] = row["fused_over_plain"] <= TARGET_VS_PLAIN
    row["meets_naive_target"] = row["naive_over_fused"] >= TARGET_VS_NAIVE
    row["meets_bytes_target"] = row["fused_weight_grad_bytes"] == 0 and row["fused_importance_bytes"] == 4 * I
    del m
    torch.cuda.empty_cache()
    return row


def environment():
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--quick", action="store_true", help="only the first shape and T")
    p.add_argument("--shapes", default=None, help="d x I shapes, e.g. 4096x14336 (default: all)")
    p.add_argument("--tokens", default=None, help="token counts, e.g. 4096 (default: all)")
    args = p.parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES
    tokens = TOKENS[:1] if args.quick else TOKENS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    if not torch.cuda.is_available():
        print("bench_taylor_importance: needs a CUDA GPU; nothing measured", file=sys.stderr)
        return 0
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for d, I in shapes:
        for T in tokens:
            row = measure(d, I, T)
            print(json.dumps(row), flush=True)
            rows.append(row)
            result = {"benchmark": "taylor_importance", **environment(),
                      "targets": f"fused <= {TARGET_VS_PLAIN}x plain; naive >= {TARGET_VS_NAIVE}x fused; "
                                 "fused holds 0 weight-grad bytes and 4*I importance bytes",
                      "rows": rows}
            # after every row: a run cut short keeps what it measured
            (out / "taylor_importance.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'taylor_importance.json'}")
    return 0


# ------------------------------------------------------------------------------ pytest-benchmark
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}_I{s[1]}")
@pytest.mark.parametrize("variant", ["fused", "plain", "naive", "kernel"])
def test_bench_taylor_importance(benchmark, variant, shape, T):
    m = MLP(shape[0], shape[1], T)
    fn = getattr(m, variant)

    def step():
        fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update({"variant": variant, "d": shape[0], "I": shape[1], "T": T})
    benchmark.pedantic(step, warmup_rounds=2, rounds=10, iterations=1)


if __name__ == "__main__":
    sys.exit(main())
