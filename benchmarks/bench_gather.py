"""Benchmark of the in-place channel gather (GPU only; skips on CPU).

Shapes of one Llama-3.1-8B MLP, bf16, keeping 10035 of 14336 channels (a 30 % cut):
  rows:    W_up   [14336, 4096] -> [10035, 4096]   (gather_rows_)
  columns: W_down [4096, 14336] -> [4096, 10035]   (gather_cols_)
Each op is timed (CUDA events, median of repeats; the op's own idx validation, which copies idx to the
host, is included) against ``index_select`` and against a plain device copy of the same output bytes.
Bandwidth counts the bytes the op must move: read + write of the output (2 * k * C * 2 bytes).
Both CUDA algorithms are timed: the default waves (through an 8 MiB scratch) and the opt-in ordered
single launch (SDMPRUNE_CUDA_GATHER=ordered; csrc/gather_cuda.cu explains both); the verdict
``meets_target`` is the default's, ``ordered_meets_target`` the other's.
Targets: rows >= 0.8x copy bandwidth, columns >= 0.7x. Memory: the extra device memory of one op,
and the peak over slicing several layers of real shape (gate, up, down per layer) in place vs with
index_select (the new weight replaces the old one per matrix, the old freed at once).

  python benchmarks/bench_gather.py [--layers 4] [--out benchmarks/results/gather.json]
  python -m pytest benchmarks/bench_gather.py --benchmark-only      (pytest-benchmark)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys

import pytest
import torch

HIDDEN, WIDTH, KEEP = 4096, 14336, 10035
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "gather.json")


def _gpu_ready():
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    from sdmprune import ops

    if not ops.extension_available("cuda"):
        return False, "sdmprune._C built without CUDA"
    return True, ""


def _keep(device):
    gen = torch.Generator().manual_seed(0)
    return torch.randperm(WIDTH, generator=gen)[:KEEP].sort().values.to(device)


def _time(fn, setup=None, repeats=20, warmup=3):
    """Median milliseconds of fn() (setup() runs untimed before each call)."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _extra_memory(fn):
    """Peak device bytes allocated by fn() above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


@contextlib.contextmanager
def _gather_algorithm(name: str):
    """The CUDA gather reads SDMPRUNE_CUDA_GATHER on every call ("ordered": one launch, no scratch)."""
    old = os.environ.get("SDMPRUNE_CUDA_GATHER")
    os.environ["SDMPRUNE_CUDA_GATHER"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["SDMPRUNE_CUDA_GATHER"]
        else:
            os.environ["SDMPRUNE_CUDA_GATHER"] = old


def bench_op(kind: str, repeats: int = 20) -> dict:
    from sdmprune import ops

    dev = torch.device("cuda")
    idx = _keep(dev)
    shape = (WIDTH, HIDDEN) if kind == "rows" else (HIDDEN, WIDTH)
    dim = 0 if kind == "rows" else 1
    op = ops.gather_rows_ if kind == "rows" else ops.gather_cols_
    pristine = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    w = pristine.clone()
    ref = pristine.index_select(dim, idx)
    out_bytes = ref.numel() * ref.element_size()
    assert torch.equal(op(w, idx), ref), "gather result differs from index_select"

    t_op = _time(lambda: op(w, idx), setup=lambda: w.copy_(pristine), repeats=repeats)
    # the ordered single-launch algorithm (SDMPRUNE_CUDA_GATHER=ordered), same checks
    with _gather_algorithm("ordered"):
        w.copy_(pristine)
        assert torch.equal(op(w, idx), ref), "ordered gather result differs from index_select"
        t_ordered = _time(lambda: op(w, idx), setup=lambda: w.copy_(pristine), repeats=repeats)
        w.copy_(pristine)
        extra_ordered = _extra_memory(lambda: op(w, idx))
    t_is = _time(lambda: pristine.index_select(dim, idx), repeats=repeats)
    src = torch.empty_like(ref)
    dst = torch.empty_like(ref)
    t_copy = _time(lambda: dst.copy_(src), repeats=repeats)
    del src, dst
    w.copy_(pristine)
    extra_op = _extra_memory(lambda: op(w, idx))
    extra_is = _extra_memory(lambda: pristine.index_select(dim, idx))

    def gbs(ms):
        return 2 * out_bytes / (ms * 1e-3) / 1e9

    target = 0.8 if kind == "rows" else 0.7
    return {
        "shape": list(shape), "keep": KEEP, "dtype": "bfloat16", "dim": dim,
        "ms": {"inplace": t_op, "inplace_ordered": t_ordered, "index_select": t_is, "copy": t_copy},
        "bandwidth_GBps": {"inplace": gbs(t_op), "inplace_ordered": gbs(t_ordered), "index_select": gbs(t_is),
                           "copy": gbs(t_copy)},
        "inplace_vs_copy_bandwidth": t_copy / t_op,
        "ordered_vs_copy_bandwidth": t_copy / t_ordered,
        "target_vs_copy": target,
        "meets_target": t_copy / t_op >= target,
        "ordered_meets_target": t_copy / t_ordered >= target,
        "extra_bytes": {"inplace": extra_op, "inplace_ordered": extra_ordered, "index_select": extra_is,
                        "output": out_bytes},
    }


def bench_model_peak(layers: int) -> dict:
    """Peak device memory while slicing `layers` real-shape MLPs: in place vs index_select."""
    from torch import nn

    from sdmprune.slicing import prune_mlp_

    dev = torch.device("cuda")
    keep = _keep(dev)

    def build():
        mlps = nn.ModuleList()
        for _ in range(layers):
            m = nn.Module()
            m.gate_proj = nn.Linear(HIDDEN, WIDTH, bias=False, device=dev, dtype=torch.bfloat16)
            m.up_proj = nn.Linear(HIDDEN, WIDTH, bias=False, device=dev, dtype=torch.bfloat16)
            m.down_proj = nn.Linear(WIDTH, HIDDEN, bias=False, device=dev, dtype=torch.bfloat16)
            mlps.append(m)
        return mlps

    def run(slice_fn):
        mlps = build()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            for m in mlps:
                slice_fn(m)
        torch.cuda.synchronize()
        res = {"model_bytes": base, "peak_extra_bytes": torch.cuda.max_memory_allocated() - base,
               "after_bytes": torch.cuda.memory_allocated()}
        del mlps
        torch.cuda.empty_cache()
        return res

    def with_index_select(m):
        for lin in (m.gate_proj, m.up_proj):
            lin.weight = nn.Parameter(lin.weight.index_select(0, keep), requires_grad=False)
        m.down_proj.weight = nn.Parameter(m.down_proj.weight.index_select(1, keep), requires_grad=False)

    torch.cuda.empty_cache()
    inplace = run(lambda m: prune_mlp_(m, keep))
    inplace_resize = run(lambda m: prune_mlp_(m, keep, reclaim="resize"))
    index_select = run(with_index_select)
    return {"layers": layers, "inplace": inplace, "inplace_resize": inplace_resize,
            "index_select": index_select,
            "note": "inplace keeps each old storage (memory returns at save/reload or reclaim_memory); "
                    "inplace_resize and index_select return it, one matrix-sized transient each"}


def run_all(layers: int = 4) -> dict:
    from sdmprune import __version__

    props = torch.cuda.get_device_properties(0)
    return {
        "status": "measured",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": props.name, "device_memory_GiB": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__, "cuda": torch.version.cuda, "sdmprune": __version__,
        "python": platform.python_version(),
        "rows": bench_op("rows"), "cols": bench_op("cols"), "model_peak": bench_model_peak(layers),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="real-shape MLP layers for the peak-memory model")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="results JSON, or a directory for gather.json (written only when run on a GPU)")
    args = p.parse_args(argv)
    if os.path.isdir(args.out):
        args.out = os.path.join(args.out, "gather.json")
    ok, why = _gpu_ready()
    if not ok:
        print(f"bench_gather: skipped ({why}); {args.out} not written")
        return 0
    result = run_all(args.layers)
    from sdmprune.storage.paths import write_json_atomic

    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


# pytest-benchmark ---------------------------------------------------------------------------

_ok, _why = _gpu_ready()
gpu = pytest.mark.skipif(not _ok, reason=_why)


@gpu
@pytest.mark.parametrize("kind", ["rows", "cols"])
@pytest.mark.parametrize("impl", ["inplace", "inplace_ordered", "index_select", "copy"])
def test_bench_gather(benchmark, kind, impl, monkeypatch):
    from sdmprune import ops

    dev = torch.device("cuda")
    idx = _keep(dev)
    shape = (WIDTH, HIDDEN) if kind == "rows" else (HIDDEN, WIDTH)
    dim = 0 if kind == "rows" else 1
    pristine = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    w = pristine.clone()
    out = pristine.index_select(dim, idx)
    src = torch.empty_like(out)
    op = ops.gather_rows_ if kind == "rows" else ops.gather_cols_

    def setup():
        w.copy_(pristine)
        torch.cuda.synchronize()

    if impl == "inplace_ordered":
        monkeypatch.setenv("SDMPRUNE_CUDA_GATHER", "ordered")

    def call():
        if impl.startswith("inplace"):
            op(w, idx)
        elif impl == "index_select":
            pristine.index_select(dim, idx)
        else:
            out.copy_(src)
        torch.cuda.synchronize()

    benchmark.pedantic(call, setup=setup, rounds=30, warmup_rounds=3)


if __name__ == "__main__":
    sys.exit(main())
