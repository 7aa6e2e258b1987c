"""HFPrune parity on a real model: the kept channels of ``prune_model(method="hfprune", engine=E)``
against a plain re-statement of the official loop, per layer (intersection over union).

    python benchmarks/hfprune_parity.py                              # SmolLM2-135M, fp32, CPU (~10 min, 2 cores)
    python benchmarks/hfprune_parity.py --samples 2 --seq-len 16 --out /tmp/p.json   # a quick look

The official loop (HFPrune's prune.py, re-stated here without the package's code): one sample per
backward, the model's full logits, loss = the mean over positions of the entropy -sum_v p log p of
softmax(logits), a forward pre-hook on every down_proj keeps its input H with ``retain_grad``, and
``score[c] += sum_t |H[t, c] * dL/dH[t, c]|``. The logits are upcast to float64 for the loss and the
scores are accumulated in float64 (the official code holds them in bf16; float64 makes this loop the
reference the engines' float32 scores are measured against). Every weight requires grad, as in a
training script. The kept set of a layer is the top ``width`` of its scores (ties: the lower index).

Engines: ``torch`` and ``reference`` run in this process. ``fused`` needs Triton; without a GPU it can
only run under the Triton interpreter (TRITON_INTERPRET=1, numpy speed), so a child process first
times a one-decoder-layer copy of the model on one sample (stopped at ``--fused-budget-s``). The whole
run takes at least samples x that; when that bound passes the budget the engine is skipped. Otherwise
a two-layer copy gives the cost per layer, the estimate covers every layer and sample, and the whole
engine runs only when the estimate fits the budget. The JSON says what the probe measured and why
the engine was skipped.

Writes benchmarks/results/hfprune_parity.json (device, versions, settings, per-layer IoU per engine,
wall time). Target: per-layer IoU >= 0.98 for every engine.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from quality import device_name, rel_path  # noqa: E402  (benchmarks/ is not a package)
from kept_channels import kept_iou  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data")
TARGET_IOU = 0.98


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=os.path.join(DATA, "wikitext-2", "valid.txt"))
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--engines", default="torch,reference,fused")
    p.add_argument("--batch-size", type=int, default=4,
                   help="samples per backward of the torch and fused engines (reference: always 1)")
    p.add_argument("--fused-budget-s", type=float, default=900.0,
                   help="run the interpreted fused engine only when its estimated time is below this")
    p.add_argument("--out", default=os.path.join(HERE, "results", "hfprune_parity.json"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); on a shared CPU 1 avoids threads waiting on each other")
    p.add_argument("--fused-worker", default=None, help=argparse.SUPPRESS)  # child mode: result file
    return p.parse_args(argv)


def load_inputs(args):
    """(model fp32 on the CPU, calibration tokens [n, L], their description, width plan)."""
    from sdmprune.data import calibration_windows
    from sdmprune.loading import load_model
    from sdmprune.widths import plan_width

    model, tok = load_model(args.model, dtype="fp32", device="cpu", need_tokenizer=True)
    calib, desc = calibration_windows(args.calib, tok, args.samples, args.seq_len, seed=args.seed)
    return model, calib, desc, plan_width(model, args.ratio)


def official_loop_scores(model, tokens) -> dict:
    """{layer: float64 [I]}: the official loop, one sample per backward (see the module docstring)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    seen, scores, hooks = {}, {}, []
    for i, layer in enumerate(model.model.layers):
        def keep_input(module, args, i=i):
            args[0].retain_grad()
            seen[i] = args[0]
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(keep_input))
    try:
        for s in range(tokens.shape[0]):
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=tokens[s:s + 1], use_cache=False).logits[0].double()
            logp = F.log_softmax(logits, -1)
            (-(logp.exp() * logp).sum(-1).mean()).backward()
            with torch.no_grad():
                for i, h in seen.items():
                    add = (h.double() * h.grad.double()).abs().reshape(-1, h.shape[-1]).sum(0)
                    scores[i] = scores[i] + add if i in scores else add
            seen.clear()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
    return scores


def top_k(scores: torch.Tensor, k: int) -> set:
    # float64 ranking, ties to the lower index (the package's top_channels rule)
    return set(torch.argsort(scores, descending=True, stable=True)[:k].tolist())


def compare(keep: dict, scores: dict, official: dict, width: int) -> dict:
    """Per-layer IoU of ``keep`` against the official top-``width``, how far the swapped channels sit
    from the k-th official score (relative: near 0 means a near-tie), and the score difference."""
    wanted = {layer: top_k(ref, width) for layer, ref in official.items()}
    iou = kept_iou(keep, wanted)
    gap, diff, swaps = {}, {}, 0
    for layer, ref in official.items():
        want, got = wanted[layer], set(keep[layer].tolist())
        kth = float(ref[list(want)].min())
        swapped = want ^ got
        swaps += len(want - got)
        gap[layer] = max((abs(float(ref[c]) - kth) / abs(kth) for c in swapped), default=0.0)
        s = scores[layer].double()
        diff[layer] = float((s - ref).abs().max() / ref.abs().max())
    vals = list(iou.values())
    return {"iou_min": min(vals), "iou_mean": sum(vals) / len(vals),
            "layers_below_target": [int(k) for k, v in iou.items() if v < TARGET_IOU],
            "meets_target": min(vals) >= TARGET_IOU,
            "channels_swapped_all_layers": swaps,
            "swapped_max_rel_gap_to_kth": max(gap.values()),
            "score_max_rel_diff": max(diff.values()),
            "iou_per_layer": {k: round(v, 6) for k, v in iou.items()}}


def run_engine(model, calib, width: int, engine: str, batch_size: int):
    from sdmprune.pipeline import PruneConfig, prune_model

    m = copy.deepcopy(model)
    cfg = PruneConfig(width=width, method="hfprune", engine=engine, batch_size=batch_size, progress=False)
    t0 = time.perf_counter()
    r = prune_model(m, calib, cfg)
    return r, time.perf_counter() - t0


def truncated(model, layers: int):
    """A copy of ``model`` with its first ``layers`` decoder layers only (the same LM head and norms):
    the cost of one layer in the interpreter, without running all of them."""
    m = copy.deepcopy(model)
    m.model.layers = torch.nn.ModuleList(list(m.model.layers[:layers]))
    m.config.num_hidden_layers = layers
    return m


class _ProbeTimeout(Exception):
    pass


def _timed_prune(model, calib, width: int, limit_s: float = None) -> float:
    """Seconds of one fused-engine prune of ``model`` on ``calib``; _ProbeTimeout past ``limit_s``."""
    import signal

    from sdmprune.pipeline import PruneConfig, prune_model

    fired = []

    def stop(signum, frame):
        fired.append(True)
        raise _ProbeTimeout

    cfg = PruneConfig(width=width, method="hfprune", engine="fused", batch_size=1, progress=False)
    old = signal.signal(signal.SIGALRM, stop)
    if limit_s:
        signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        t0 = time.perf_counter()
        prune_model(model, calib, cfg)
        return time.perf_counter() - t0
    except Exception:
        if fired:  # raised inside a kernel, the interpreter re-raises it as its own InterpreterError
            raise _ProbeTimeout from None
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def fused_worker(args) -> int:
    """Child process under TRITON_INTERPRET=1: probe, then run the fused engine if it fits the budget.
    Writes {probe, estimate_s, ran, status, keep, scores, seconds} to ``args.fused_worker`` (torch.save)."""
    model, calib, _, plan = load_inputs(args)
    n, n_layers, budget = calib.shape[0], len(model.model.layers), args.fused_budget_s
    out = {"budget_s": budget, "ran": False}
    try:
        one = _timed_prune(truncated(model, 1), calib[:1], plan.width, limit_s=budget)
    except _ProbeTimeout:
        out["probe"] = {"one_layer_one_sample_s": f"> {budget:.0f}"}
        out["status"] = (f"skipped: one decoder layer on one sample did not finish within the {budget:.0f} s budget "
                         "under the Triton interpreter")
        torch.save(out, args.fused_worker)
        return 0
    out["probe"] = {"one_layer_one_sample_s": one}
    # every sample runs every layer, so the run takes at least n times one layer on one sample
    if n * one > budget:
        out["estimate_lower_bound_s"] = n * one
        out["status"] = (f"skipped: one decoder layer on one sample took {one:.0f} s under the Triton interpreter, "
                         f"so {n} samples x {n_layers} layers take over {n * one:.0f} s, past the {budget:.0f} s "
                         "budget")
        torch.save(out, args.fused_worker)
        return 0
    two = _timed_prune(truncated(model, 2), calib[:1], plan.width)
    per_layer = max(two - one, 0.0)
    fixed = max(one - per_layer, 0.0)  # embedding, final norm, entropy loss over the vocabulary
    estimate = n * (fixed + n_layers * per_layer)
    out["probe"].update(two_layers_one_sample_s=two, per_layer_per_sample_s=per_layer, fixed_per_sample_s=fixed)
    out["estimate_s"] = estimate
    print(f"fused (interpreter): {per_layer:.1f} s per layer per sample, {fixed:.1f} s fixed; "
          f"estimate {estimate:.0f} s for the run (budget {budget:.0f} s)", file=sys.stderr)
    if estimate <= budget:
        r, seconds = run_engine(model, calib, plan.width, "fused", args.batch_size)
        out.update(ran=True, status="ran (TRITON_INTERPRET=1)", keep=r.keep, scores=r.scores, seconds=seconds,
                   backend=r.stats["backend"])
    else:
        out["status"] = (f"skipped: estimated {estimate:.0f} s under the Triton interpreter, over the "
                         f"{budget:.0f} s budget")
    torch.save(out, args.fused_worker)
    return 0


def run_fused_child(argv, budget_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fused.pt")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        # the probe and, when it fits, the run; a probe slower than the budget itself ends here
        limit = 2 * budget_s + 300
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--fused-worker", path], env=env,
                                  timeout=limit)
        except subprocess.TimeoutExpired:
            return {"status": f"skipped: the interpreted probe and run did not finish within {limit:.0f} s"}
        if proc.returncode != 0:
            return {"status": f"failed (exit code {proc.returncode})"}
        return torch.load(path, weights_only=False)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fused_worker:
        return fused_worker(args)
    from sdmprune.storage.paths import write_json_atomic
    from sdmprune.storage.save import package_versions

    t_all = time.perf_counter()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    model, calib, desc, plan = load_inputs(args)
    desc["source"] = rel_path(desc["source"])
    res = {"benchmark": "hfprune_parity", "device": device_name(torch.device("cpu")),
           "versions": package_versions(), "torch_threads": torch.get_num_threads(),
           "settings": {"model": args.model, "dtype": "fp32", "calibration": desc, "ratio": args.ratio,
                        "width": plan.width, "original_width": plan.original_width,
                        "layers": len(model.model.layers), "batch_size_torch_fused": args.batch_size,
                        "official_loop": "one sample per backward, full logits upcast to float64, loss = mean over "
                                         "positions of -sum p log p, score += sum_t |H * dL/dH| accumulated in "
                                         "float64, every weight requires grad"},
           "target": f"per-layer IoU >= {TARGET_IOU} for every engine", "engines": []}

    def write():
        res["wall_s"] = time.perf_counter() - t_all
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json_atomic(args.out, res)

    t0 = time.perf_counter()
    official = official_loop_scores(copy.deepcopy(model), calib)
    res["official_loop_s"] = time.perf_counter() - t0
    print(f"official loop: {res['official_loop_s']:.0f} s", file=sys.stderr)
    write()
    for engine in engines:
        row = {"engine": engine}
        if engine == "fused":
            child = run_fused_child(argv, args.fused_budget_s)
            row.update({k: v for k, v in child.items() if k not in ("keep", "scores")})
            if child.get("ran"):
                row.update(compare(child["keep"], child["scores"], official, plan.width))
        else:
            r, seconds = run_engine(model, calib, plan.width, engine, 1 if engine == "reference" else args.batch_size)
            row.update({"status": "ran", "backend": r.stats["backend"], "seconds": seconds,
                        "batch_size": 1 if engine == "reference" else args.batch_size,
                        **compare(r.keep, r.scores, official, plan.width)})
        res["engines"].append(row)
        print(f"{engine}: {row['status']}" + (f", IoU min {row['iou_min']:.4f} mean {row['iou_mean']:.4f}"
                                             if "iou_min" in row else ""), file=sys.stderr)
        write()
    print(json.dumps({e["engine"]: {k: e.get(k) for k in ("status", "iou_min", "iou_mean")} for e in res["engines"]},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
