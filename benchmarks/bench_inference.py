"""Inference speed of pruned models: prefill and decode tokens/s of the unpruned model against the
model pruned to 20 / 30 / 40 % of its parameters (uniform width from sdmprune.widths.plan_width), with
the width as planned and rounded down to multiples of 64 and 128, beside the parameter and FLOP
reductions. Writes benchmarks/results/inference.json (+ .md) on the CPU, inference-gpu.json on CUDA.

    python benchmarks/bench_inference.py --smoke                   # tiny shape, a few seconds
    python benchmarks/bench_inference.py --device cpu --threads 1 \\
        --shapes smollm2-135m:prompt=32:new=8 llama-3.2-1b:prompt=32:new=4:prefill_batches=1
    python benchmarks/bench_inference.py --device cuda             # 1B and 8B shapes in bf16

A shape is a name from sdmprune.memory.BUILTIN_SHAPES with optional overrides
``:prompt=P:new=N:reps=R:batches=1+8:prefill_batches=1+8``. Weights are random (speed does not depend
on their values): the model is built on the meta device and initialized in place on the target device.

What is measured, per model and batch size B (median over --reps repetitions after --warmup untimed
runs; the models of one ratio -- the baseline and each rounding -- are measured interleaved, so load
from other processes falls on all of them alike, and each speed-up is against that same-run baseline):
  * prefill: one forward over a B x P prompt that builds the KV cache and keeps the last position's
    logits (what ``generate`` does first); tokens/s = B * P / time;
  * decode: greedy ``generate`` of N new tokens continuing from a KV cache of the prompt (a copy of a
    cache built once, untimed), so all N steps are one-token steps; tokens/s = B * N / time.
Pruned models share every non-MLP tensor with the baseline; their MLPs are a random sorted subset of
channels per layer sliced by sdmprune.slicing.prune_mlp_ (which channels does not matter for speed:
after slicing every MLP matrix is a dense contiguous matrix of the pruned shape). Each pruned model is
checked against the baseline with the same channels masked (max |logit difference|, in the JSON).

FLOPs are counted per forward (2 per multiply-add): the linear layers (attention projections, MLP,
the LM head for the positions whose logits are computed) plus attention scores and values over the
causal context; the reductions are 1 - pruned / baseline for the measured prefill and decode.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared modules
import random_models  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

RATIOS = (0.2, 0.3, 0.4)
ROUNDINGS = (None, 64, 128)
# tiny config for --smoke: wide enough that rounding to 64 and 128 gives distinct widths
SMOKE = dict(hidden_size=64, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True)
DEFAULTS = {  # per device: shapes, and the setting a shape gets unless its spec overrides it
    "cpu": (["smollm2-135m", "llama-3.2-1b"], dict(prompt=32, new=8, reps=3, batches=(1, 8), prefill_batches=(1, 8))),
    "cuda": (["llama-3.2-1b", "llama-3.1-8b"], dict(prompt=512, new=64, reps=5, batches=(1, 8),
                                                    prefill_batches=(1, 8))),
    "smoke": (["smoke"], dict(prompt=8, new=4, reps=1, batches=(1, 2), prefill_batches=(1, 2))),
}


# ------------------------------------------------------------------------------------ shapes and models
def parse_shape(spec: str, defaults: dict) -> dict:
    name, *opts = spec.split(":")
    out = dict(defaults, name=name)
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in ("prompt", "new", "reps", "batches", "prefill_batches") or not value:
            raise SystemExit(f"bad shape option {opt!r} in {spec!r} (prompt=, new=, reps=, batches=, prefill_batches=)")
        try:
            out[key] = tuple(int(v) for v in value.split("+")) if "batches" in key else int(value)
        except ValueError:
            raise SystemExit(f"bad value in {opt!r}") from None
    return out


def hf_config(name: str):
    return random_models.hf_config(name, SMOKE, max_positions=8192)


build_random_model = random_models.build_random_model


def pruned_variant(base, keep: dict):
    """The baseline pruned to ``keep`` (layer -> channels): every non-MLP tensor shared with ``base``,
    the MLP matrices copied and sliced in place by sdmprune.slicing.prune_mlp_ (one layer at a time)."""
    from transformers import AutoModelForCausalLM

    from sdmprune.models import find_gated_mlps
    from sdmprune.slicing import prune_mlp_

    config = copy.deepcopy(base.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=base.dtype)
    model.load_state_dict(base.state_dict(), assign=True)  # shares the tensors, copies nothing
    device = base.model.embed_tokens.weight.device
    random_models.rebuild_rotary(model, config, device)
    model.tie_weights()
    for g in find_gated_mlps(model):
        for lin in (g.gate, g.up, g.down):  # own copies: slicing compacts in place
            lin.weight = torch.nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
        prune_mlp_(g, keep[g.index], reclaim="resize")
    model.config.intermediate_size = len(next(iter(keep.values())))
    return model.eval()


@torch.inference_mode()
def check_against_mask(base, variant, keep: dict, vocab: int, device) -> float:
    """max |logits(variant) - logits(base with the pruned channels masked to zero)| on 8 tokens."""
    from sdmprune.models import ChannelMasks

    ids = torch.randint(1, vocab, (1, 8), generator=torch.Generator().manual_seed(3)).to(device)
    with ChannelMasks(base, keep):
        want = base(ids).logits.float()
    return float((variant(ids).logits.float() - want).abs().max())


# ------------------------------------------------------------------------------------ FLOPs
def forward_flops(config, width: int, tokens: int, context_before: int, logit_positions: int) -> int:
    """FLOPs of one forward of ``tokens`` new positions after ``context_before`` cached ones (batch 1)."""
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    H, KV = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // H
    per_token_layer = d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * width
    # position t attends to context_before + t + 1 keys: QK^T and AV, H * hd multiply-adds per key each
    keys = tokens * context_before + tokens * (tokens + 1) // 2
    return 2 * (tokens * L * per_token_layer + logit_positions * V * d + L * 2 * H * hd * keys)


def prefill_flops(config, width, prompt):
    return forward_flops(config, width, prompt, 0, 1)


def decode_flops(config, width, prompt, new):
    # step 0 feeds the last prompt token over a cache of prompt - 1; step t over prompt - 1 + t
    return sum(forward_flops(config, width, 1, prompt - 1 + t, 1) for t in range(new))


# ------------------------------------------------------------------------------------ timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_prefill(model, ids, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def time_decode(model, ids, cache, new: int, device) -> float:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    work = copy.deepcopy(cache)  # generate extends the cache it is given
    mask = torch.ones_like(ids)
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, generation_config=gen, **{_cache_kw(model): work})
    _sync(device)
    elapsed = time.perf_counter() - t0
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {new}")
    return elapsed


def _cache_kw(model) -> str:
    # transformers 5 renamed past_key_values to cache (the old name warns, and goes in 6.0)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def prompt_cache(model, ids):
    out = model(ids[:, :-1], use_cache=True, logits_to_keep=1)
    return out["cache"] if "cache" in out else out["past_key_values"]


def measure_group(models: dict, shape: dict, vocab: int, device, warmup: int, on_rep=None) -> dict:
    """{key: {"prefill": {B: [s...]}, "decode": {B: [s...]}}}, the models interleaved in every repetition
    (the order rotated each repetition, so none is always first after another's run)."""
    g = torch.Generator().manual_seed(1)
    batches = sorted(set(shape["batches"]) | set(shape["prefill_batches"]))
    ids = {b: torch.randint(1, vocab, (b, shape["prompt"]), generator=g).to(device) for b in batches}
    caches = {(k, b): prompt_cache(m, ids[b]) for k, m in models.items() for b in shape["batches"]}
    times = {k: {"prefill": {b: [] for b in shape["prefill_batches"]}, "decode": {b: [] for b in shape["batches"]}}
             for k in models}
    keys = list(models)
    for rep in range(-warmup, shape["reps"]):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for k in order:
            m = models[k]
            for b in shape["prefill_batches"]:
                t = time_prefill(m, ids[b], device)
                if rep >= 0:
                    times[k]["prefill"][b].append(t)
            for b in shape["batches"]:
                t = time_decode(m, ids[b], caches[(k, b)], shape["new"], device)
                if rep >= 0:
                    times[k]["decode"][b].append(t)
        if rep >= 0 and on_rep is not None:
            on_rep(times, rep + 1)
    return times


def speeds(times: dict, base_times: dict, shape: dict) -> dict:
    out = {}
    for kind, per_token in (("prefill", shape["prompt"]), ("decode", shape["new"])):
        out[kind] = {}
        for b, ts in times[kind].items():
            if not ts:
                continue
            tps = b * per_token / statistics.median(ts)
            base = b * per_token / statistics.median(base_times[kind][b])
            out[kind][str(b)] = {"tokens_per_s": tps, "baseline_tokens_per_s": base, "speedup": tps / base,
                                 "times_s": ts, "baseline_times_s": base_times[kind][b]}
    return out


# ------------------------------------------------------------------------------------ environment
def versions(device) -> dict:
    from importlib.metadata import version

    out = {"torch": torch.__version__}
    for name in ("transformers", "sdmprune"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed as a distribution
            pass
    if device.type == "cuda":
        out["device"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    else:
        out["device"] = "cpu: " + _cpu_name()
    out["threads"] = torch.get_num_threads()
    out["cpus"] = os.cpu_count()
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _load() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ------------------------------------------------------------------------------------ results
def out_path(out, device, smoke: bool) -> str:
    """--out may be a folder or a .json path. Smoke numbers go to a temporary folder by default, never to
    the results files; CUDA runs to inference-gpu.json, CPU runs to inference.json."""
    name = "inference-smoke.json" if smoke else ("inference-gpu.json" if device.type == "cuda" else "inference.json")
    if out is None:
        return os.path.join(tempfile.mkdtemp(prefix="sdmprune-bench-"), name) if smoke else os.path.join(RESULTS, name)
    return out if out.endswith(".json") else os.path.join(out, name)


def _cell(entry) -> str:
    if not entry:
        return "-"
    return f"{entry['baseline_tokens_per_s']:.1f} -> {entry['tokens_per_s']:.1f} ({entry['speedup']:.2f}x)"


def _spread(ts) -> float:
    return (max(ts) - min(ts)) / statistics.median(ts)


def _rounding_table(s: dict, pb, db) -> list:
    """Rounded width against the planned width of the same ratio (both from the same interleaved run):
    the measured speed ratio beside the ratio the FLOPs alone predict, (1 - f_planned) / (1 - f_rounded)."""
    metrics = [("prefill", b) for b in pb] + [("decode", b) for b in db]
    lines = ["", "Rounding: tokens/s of the rounded width / tokens/s of the planned width, measured (expected from "
             "the FLOPs alone); the last column is the largest (max - min) / median of the baseline's repetitions "
             "in that ratio's run (how noisy the machine was).", "",
             "| ratio | round-to | width | extra params removed | "
             + " | ".join(f"{k} B={b}" for k, b in metrics) + " | baseline spread |",
             "|" + "---|" * (5 + len(metrics))]
    for ratio in dict.fromkeys(r["ratio"] for r in s["rows"]):
        rows = [r for r in s["rows"] if r["ratio"] == ratio]
        plain = next((r for r in rows if r["round_to"] is None), None)
        if plain is None or "speed" not in plain:
            continue
        base_spread = max((_spread(e["baseline_times_s"]) for kind in ("prefill", "decode")
                           for e in plain["speed"].get(kind, {}).values() if len(e["baseline_times_s"]) > 1),
                          default=0.0)
        for r in rows:
            if r["round_to"] is None or r["width"] == plain["width"] or "speed" not in r:
                continue
            cells = [f"{ratio:.0%}", str(r["round_to"]), str(r["width"]),
                     f"{r['param_reduction'] - plain['param_reduction']:+.2%}"]
            for kind, b in metrics:
                got, ref = r["speed"].get(kind, {}).get(b), plain["speed"].get(kind, {}).get(b)
                if not got or not ref:
                    cells.append("-")
                    continue
                expected = (1 - plain["flop_reduction"][kind]) / (1 - r["flop_reduction"][kind])
                cells.append(f"{got['tokens_per_s'] / ref['tokens_per_s']:.2f}x ({expected:.2f}x)")
            cells.append(f"{base_spread:.0%}")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: dict, conclusion_path: str) -> str:
    v = report["versions"]
    lines = [f"# Inference speed of pruned models ({report['started']})", "",
             f"Device: {v.get('device')}; torch threads: {v.get('threads')} of {v.get('cpus')} CPUs; "
             + ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "sdmprune", "cuda") if v.get(k)),
             f"Command: `{report['command']}`"
             + (f" (wall time {report['wall_s'] / 60:.1f} min)" if report.get("wall_s") else ""), "",
             "Each cell: same-run baseline tokens/s -> pruned tokens/s (speed-up), median of the repetitions; "
             "the baseline and the widths of one ratio are measured interleaved. Params / FLOPs removed: "
             "fraction of the whole model (embeddings and LM head included) / of one prefill or decode run. "
             "Kept channels: a random sorted subset per layer (speed does not depend on which).", ""]
    for s in report["shapes"]:
        pb = [str(b) for b in s["prefill_batches"]]
        db = [str(b) for b in s["batches"]]
        lines += [f"## {s['shape']} ({s['dtype']}, {s['device']}): prompt {s['prompt']} tokens, "
                  f"{s['new']} new tokens, {s['reps']} repetitions after {s['warmup']} warm-up, "
                  f"width {s['original_width']}", ""]
        head = ["ratio", "round-to", "width", "params removed", "FLOPs removed (prefill / decode)"]
        head += [f"prefill tok/s B={b}" for b in pb] + [f"decode tok/s B={b}" for b in db]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in s["rows"]:
            cells = [f"{r['ratio']:.0%}", str(r["round_to"] or "-"), str(r["width"]), f"{r['param_reduction']:.2%}",
                     f"{r['flop_reduction']['prefill']:.2%} / {r['flop_reduction']['decode']:.2%}"]
            sp = r.get("speed", {})
            cells += [_cell(sp.get("prefill", {}).get(b)) for b in pb]
            cells += [_cell(sp.get("decode", {}).get(b)) for b in db]
            if r.get("measured_as"):
                cells[2] += f" (= {r['measured_as']})"
            lines.append("| " + " | ".join(cells) + " |")
        lines += _rounding_table(s, pb, db)
        done = [r.get("reps_done", 0) for r in s["rows"]]
        if done and min(done) < s["reps"]:
            lines += ["", f"(in progress: {min(done)} of {s['reps']} repetitions for some rows)"]
        lines += ["", "Load average (1/5/15 min) at the start / end of each ratio: "
                  + "; ".join(f"{g['ratio']:.0%}: {g['load_start']} / {g.get('load_end')}" for g in s["groups"]), ""]
    if os.path.exists(conclusion_path):
        with open(conclusion_path, encoding="utf-8") as fh:
            text = fh.read().strip()
        first, _, body = text.partition("\n")
        written_for = first.removeprefix("run:").strip()
        stale = "" if written_for == report["started"] else f" (written for the run of {written_for}, not this one)"
        lines += [f"## Conclusion{stale}", "", body.strip(), ""]
    return "\n".join(lines)


def write_results(report: dict, path: str) -> None:
    from sdmprune.storage.paths import atomic_write_file, write_json_atomic

    write_json_atomic(path, report)
    stem = os.path.splitext(path)[0]
    with atomic_write_file(stem + ".md") as tmp:
        tmp.write_text(render_markdown(report, stem + "-conclusion.md") + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------ the run
def run_shape(shape: dict, device, dtype, warmup: int, seed: int, report: dict, path: str) -> None:
    from sdmprune.widths import plan_width

    config = hf_config(shape["name"])
    t0 = time.perf_counter()
    base = build_random_model(config, device, dtype, seed)
    I, P, N = config.intermediate_size, shape["prompt"], shape["new"]
    entry = {"shape": shape["name"], "device": device.type, "dtype": str(dtype).replace("torch.", ""),
             "prompt": P, "new": N, "reps": shape["reps"], "warmup": warmup, "batches": list(shape["batches"]),
             "prefill_batches": list(shape["prefill_batches"]), "original_width": I,
             "config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "num_key_value_heads", "head_dim",
                                                        "vocab_size", "tie_word_embeddings")},
             "kept_channels": f"random sorted subset per layer (seed {seed}); speed does not depend on which",
             "build_s": time.perf_counter() - t0, "rows": [], "groups": []}
    report["shapes"].append(entry)
    base_flops = (prefill_flops(config, I, P), decode_flops(config, I, P, N))
    for ratio in RATIOS:
        plans = {rt: plan_width(base, ratio=ratio, round_to=rt) for rt in ROUNDINGS}
        widths = list(dict.fromkeys(p.width for p in plans.values()))  # distinct, in rounding order
        group = {"ratio": ratio, "load_start": _load()}
        entry["groups"].append(group)
        g = torch.Generator().manual_seed(seed + int(ratio * 100))
        models, keeps = {"baseline": base}, {}
        for w in widths:
            keeps[w] = {i: torch.randperm(I, generator=g)[:w].sort().values for i in range(config.num_hidden_layers)}
            models[w] = pruned_variant(base, keeps[w])
        rows = []
        for rt, plan in plans.items():
            first = next(r for r, p in plans.items() if p.width == plan.width)
            rows.append({
                "ratio": ratio, "round_to": rt, "width": plan.width, "rounding": plan.rounding,
                "params_before": plan.params_before, "params_after": plan.params_after,
                "param_reduction": plan.achieved_ratio,
                "flop_reduction": {"prefill": 1 - prefill_flops(config, plan.width, P) / base_flops[0],
                                   "decode": 1 - decode_flops(config, plan.width, P, N) / base_flops[1]},
                "measured_as": None if first == rt else f"round-to {first or '-'}",
                "max_abs_logit_diff_vs_masked_baseline": check_against_mask(base, models[plan.width],
                                                                            keeps[plan.width], config.vocab_size,
                                                                            device),
            })
        entry["rows"].extend(rows)

        def update(times, reps_done):
            for row in rows:
                row["speed"] = speeds(times[row["width"]], times["baseline"], shape)
                row["reps_done"] = reps_done
            group["load_end"] = _load()
            write_results(report, path)  # every repetition: a killed run keeps what it measured

        measure_group(models, shape, config.vocab_size, device, warmup, on_rep=update)
        print(f"{shape['name']} {ratio:.0%}: " + "; ".join(
            f"width {r['width']} decode B={b} {r['speed']['decode'][str(b)]['speedup']:.2f}x"
            for r in rows for b in shape["batches"][:1]), flush=True)
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, a few tokens: seconds (CPU)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    ap.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="shape specs name[:prompt=P][:new=N][:reps=R][:batches=1+8][:prefill_batches=1+8]")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="a .json path or a folder (default: benchmarks/results)")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="only rewrite the markdown beside an existing results JSON (e.g. after writing its "
                         "conclusion file, NAME-conclusion.md, whose first line is 'run: <started>')")
    args = ap.parse_args(argv)
    if args.render:
        import json

        from sdmprune.storage.paths import atomic_write_file

        with open(args.render, encoding="utf-8") as fh:
            report = json.load(fh)
        stem = os.path.splitext(args.render)[0]
        with atomic_write_file(stem + ".md") as tmp:
            tmp.write_text(render_markdown(report, stem + "-conclusion.md") + "\n", encoding="utf-8")
        print(f"wrote {stem}.md")
        return 0

    from sdmprune.loading import parse_dtype, resolve_device

    device = torch.device("cpu") if args.smoke and args.device == "auto" else resolve_device(args.device)
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    if args.threads or args.smoke:
        # smoke matrices are tiny: a second thread only adds synchronization (and waits on a busy machine)
        torch.set_num_threads(args.threads or 1)
    names, defaults = DEFAULTS["smoke" if args.smoke else device.type]
    shapes = [parse_shape(s, defaults) for s in (args.shapes or names)]
    path = out_path(args.out, device, args.smoke)
    report = {"benchmark": "inference", "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/bench_inference.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "versions": versions(device), "ratios": list(RATIOS), "round_to": [r for r in ROUNDINGS if r],
              "timing": {"prefill": "one forward of B x prompt tokens building the KV cache, last-position "
                                    "logits; tokens/s = B * prompt / median time",
                         "decode": "greedy generate of `new` tokens from a copy of the prompt's KV cache; "
                                   "tokens/s = B * new / median time"},
              "shapes": []}
    t0 = time.perf_counter()
    for shape in shapes:
        run_shape(shape, device, dtype, args.warmup, args.seed, report, path)
    report["wall_s"] = time.perf_counter() - t0
    write_results(report, path)
    print(f"wrote {path} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
