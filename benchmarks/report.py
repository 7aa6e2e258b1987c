"""Render benchmarks/results/ into markdown: the full page (stdout) or the README's results block.

Results are kept as data; these pages are generated from them, never edited by hand.
  python benchmarks/report.py                  # every results/*.json as markdown, to stdout
  python benchmarks/report.py --readme         # rewrite the block between the results markers in README.md
  python benchmarks/report.py --plot           # redraw results/refit.png from results/quality.json (the plot extra)
Each JSON file is a dict; scalar fields (device, versions, ...) are listed, and every list of dicts
becomes a table, except the files with their own page (RENDERERS: the quality method table, the
HFPrune parity table), which quality.py also writes beside its JSON as it runs.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# GPU benchmarks: results file -> (what it measures, the target of its issue)
GPU_BENCHMARKS = {
    "fused_linear_distill_loss": ("fused LM-head distillation loss, fwd+bwd, N x d x V up to 8192 x 4096 x 128256, bf16",
                                  "<= 0.7x Liger chunked time, <= 1 GB extra memory"),
    "taylor_importance": ("MLP fwd+bwd with fused Taylor importance, d x I 2048 x 8192 and 4096 x 14336",
                          "<= 1.15x plain autograd MLP, >= 2x faster than the naive path, 0 weight-grad bytes"),
    "gather": ("in-place channel gather, Llama-3.1-8B MLP, keep 10035 of 14336, bf16",
               "rows >= 0.8x, columns >= 0.7x device-copy bandwidth"),
    "pipeline": ("stage-1 + stage-2 importance pass, Llama-3.2-1B and 3.1-8B shapes, 1024-token samples",
                 "8B: <= 18 GiB, >= 2x reference samples/s; 1B: >= 4x samples/s, <= 1/3 peak"),
    "pipeline_1b_batch": ("the 1B shape at larger batches with a 128-row loss chunk (its own reference run)",
                          "1B: >= 4x samples/s and <= 1/3 peak in one run"),
    "offload": ("--offload cpu on the Llama-3.1-8B shape vs the resident fused engine",
                "<= 6 GiB peak GPU memory, >= 0.6x resident samples/s"),
    "recovery": ("one distilled LoRA step, Llama-3.2-1B shape, 2048-token packed rows, one-copy fused vs usual",
                 ">= 1.3x tokens/s, <= 0.5x peak memory"),
}


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)[:80]
    return str(v)


def render(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [f"## {path.stem}", ""]
    tables = []
    for k, v in data.items():
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            tables.append((k, v))
        else:
            lines.append(f"- **{k}**: {_fmt(v)}")
    for name, rows in tables:
        cols = []
        for r in rows:
            cols += [c for c in r if c not in cols]
        lines += ["", f"{name}:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ quality (CPU)
DOMAIN_TITLES = {"wikitext2": "WikiText-2", "stdlib": "stdlib code"}


def _ppl(v: float) -> str:
    """Perplexity to read at a glance: two decimals, or mantissa-exponent once it is past 10^4."""
    if not math.isfinite(v):
        return str(v)
    return f"{v:.2f}" if v < 1e4 else f"{v:.2e}".replace("e+0", "e").replace("e+", "e")


def _spread(st: dict, fmt=_ppl) -> str:
    """One seed: the value; several: the mean and [min-max] over the seeds."""
    if st["n"] == 1:
        return fmt(st["mean"])
    return f"{fmt(st['mean'])} [{fmt(st['min'])}-{fmt(st['max'])}]"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def _peak(row: dict, step: str) -> str:
    """'peak (+above the step's start)' in MiB: the second is what the step itself needed."""
    above = row.get(f"{step}_peak_above_start_bytes")
    return _mib(row[f"{step}_peak_memory_bytes"]) + (f" (+{_mib(above)})" if above is not None else "")


def _versions(v: dict) -> str:
    return ", ".join(f"{k} {x}" for k, x in v.items())


def _ratio(st: dict) -> str:
    return f"{st['mean']:.3f}x"


def _recovery_line(rec: dict) -> str:
    if not rec["steps"]:
        return "- **Recovery**: not run (`--recover-steps 0`): before-recovery columns only."
    return (f"- **Recovery** (the same for every run): {rec['steps']} steps x {rec['sequences_per_step']} windows x "
            f"{rec['seq_len']} tokens ({rec['tokens']:,} tokens) of `{os.path.basename(rec['data']['source'])}` "
            f"(seed {rec['data']['seed']}), LoRA {rec['lora']}, lr {rec['lr']:g} ({rec['schedule']}), "
            f"{rec['loss']}" + (f", alpha {rec['alpha']:g}, T {rec['temperature']:g}" if rec["alpha"] else "")
            + f"; {rec['how']}.")


def _refit_cell(r: dict, phases: tuple) -> str:
    """x none per phase (mean over seeds), held-out loss, strengths chosen, refit seconds: for a refit row."""
    if r.get("refit", "none") == "none":
        return " |" * (len(phases) + 3)
    ratios = []
    for phase in phases:
        vs = r.get("vs_none", {}).get(phase)
        ratios.append(" / ".join(_ratio(vs[d]) for d in DOMAIN_TITLES) if vs else "")
    loss = r["held_out_loss"]
    chosen = ", ".join(f"{s} x{n}" for s, n in r["strengths_chosen"].items())
    secs = _spread(r["refit_time_s"], lambda v: f"{v:.1f}") if "refit_time_s" in r else ""
    return ("".join(f" {x} |" for x in ratios)
            + f" {loss['before']['mean']:.3f} -> {loss['after']['mean']:.3f} | {chosen} | {secs} |")


def quality_markdown(res: dict, source: str = "quality.json", level: int = 1) -> str:
    """The method table of benchmarks/quality.py: per ratio, every method and refit variant's perplexity
    on both domains before and after the same recovery (mean and [min-max] over the calibration seeds),
    the refit's ratio to no refit and its held-out loss, prune and recovery time and peak memory, with
    the device, versions and data it was measured with."""
    h = "#" * level
    cal, ev, rec = res["calibration"], res["evaluation"], res["recovery"]
    std = ev["domains"]["stdlib"]
    base = res["base"]["perplexity"]
    seeded = ", ".join(cal["seeded_methods"]) or "none"
    once = ", ".join(cal["first_seed_only"])
    refits = [v for v in res.get("refits", ["none"]) if v != "none"]
    lines = [f"{h} Quality: {res['model']['spec']}, "
             + (", ".join(cal["seeded_methods"] + cal["first_seed_only"]) if refits else "every method")
             + (f", with and without the refit ({', '.join(refits)})" if refits else "")
             + (", before and after recovery" if rec["steps"] else ", before recovery"), "",
             f"Device: {res['device']}, {res['dtype']}. Versions: {_versions(res['versions'])}.", "",
             f"- **Calibration**: {cal['samples']} x {cal['seq_len']} tokens of `{os.path.basename(cal['source'])}` "
             f"({cal['name']}; {cal['mode']}), seeds {', '.join(map(str, cal['seeds']))} for {seeded}"
             + (f"; {once} at seed {cal['seeds'][0]} only (they read no calibration text)" if once else "")
             + f". Scoring batch {cal['scoring_batch_size']}, engine {cal['engine']}; sdmprune alpha/T as in the "
             "paper per ratio.",
             f"- **Evaluation**: {ev['windows']} windows x {ev['seq_len']} tokens per domain, {ev['selection']}: "
             f"WikiText-2 = `{os.path.basename(ev['domains']['wikitext2']['source'])}` "
             f"({ev['domains']['wikitext2']['name']}); stdlib code = {len(std['files'])} files of the Python "
             f"{std['python']} standard library, never in calibration (listed below).",
             _recovery_line(rec),
             *(["- **Refit** (`--refit ls`, sdmprune.compensation) after the same selection: "
                + "; ".join(f"`{v}`: " + (f"the fixed strength {v.split(':')[1]} for every layer" if ":" in v
                                          else res["refit"]["variants"].get(v, v)) for v in res["refits"])
                + f"; {res['refit']['how']}. x none: the perplexity ratio to the same selection without refit "
                  "(mean over seeds), WikiText-2 / stdlib code, " + ("before and after the same recovery"
                                                                     if rec["steps"] else "before recovery")
                + "; held-out loss: the relative "
                  "reconstruction error of the MLP output on the held-out calibration windows, before -> after "
                  "(mean over layers and seeds)."] if "refits" in res else []),
             f"- **Unpruned**: {res['model']['params']:,} parameters; perplexity "
             + ", ".join(f"{DOMAIN_TITLES[d]} **{base[d]['perplexity']:.2f}**" for d in DOMAIN_TITLES) + ".", ""]
    if not res.get("complete", True):
        lines += [f"**Partial run**: {len(res['runs'])} of {res['planned_runs']} runs measured.", ""]
    if res.get("resumed"):
        calls = res["resumed"].get("earlier_calls", [])
        lines += [f"**Resumed** (`--resume`): {res['resumed']['runs_kept']} runs kept from earlier calls with the same "
                  "settings" + (": " + "; ".join(f"{c['runs']} runs on {c['device']} in {c['wall_s']:.0f} s"
                                                  for c in calls) if calls else "")
                  + f"; the device line and the total wall time are this call's.", ""]
    ratios = []
    for row in res["summary"]:
        if row["ratio"] not in ratios:
            ratios.append(row["ratio"])
    cols = [f"{DOMAIN_TITLES[d]} {phase}" for d in DOMAIN_TITLES for phase in ("before", "after")]
    secs = lambda v: f"{v:.1f}"  # noqa: E731
    phases = ("before", "after") if rec["steps"] else ("before",)
    vs_cols = " | ".join(f"x none ({phase})" for phase in phases)
    for ratio in ratios:
        rows = [r for r in res["summary"] if r["ratio"] == ratio]
        r0 = rows[0]
        lines += [f"{h}# {ratio:.0%} of all parameters removed: width {r0['width']}, {r0['params_after']:,} "
                  f"parameters ({r0['removed']:.2%} removed)", "",
                  "| method | refit | seeds | " + " | ".join(cols) + f" | {vs_cols} | held-out loss | strengths "
                  "chosen | refit (s) | prune (s) | prune peak (MiB) | recovery (s) | recovery peak (MiB) |",
                  "|---" * (len(cols) + 10 + len(phases)) + "|"]
        for r in rows:
            cells = [_spread(r[phase][d]) if phase in r else "not run" for d in DOMAIN_TITLES
                     for phase in ("before", "after")]
            recovered = "recovery_time_s" in r
            lines.append(f"| {r['method']} | {r.get('refit', 'none')} | {len(r['seeds'])} | " + " | ".join(cells)
                         + f" |{_refit_cell(r, phases)} {_spread(r['prune_time_s'], secs)} | {_peak(r, 'prune')} | "
                         + (f"{_spread(r['recovery_time_s'], secs)} | {_peak(r, 'recovery')} |" if recovered
                            else "not run | |"))
        lines.append("")
    runs = res["runs"]
    if runs:
        kind = runs[0]["prune"]["peak_memory_kind"]
        start = min(r["prune"]["memory_at_start_bytes"] for r in runs)
        lines += [f"Perplexity cells: the mean over the seeds and [min-max]. Times are wall seconds of the whole call "
                  f"on a shared machine: prune (s) the selection, refit (s) the refit after it (reported by "
                  f"refit_down_proj_). Peak memory (MiB, the largest over the seeds): {kind}; it includes the "
                  f"unpruned model the benchmark keeps for the next run and the step's working copy ({_mib(start)} MiB "
                  "or more at each step's start); (+N) is the peak above the step's start, what the step itself "
                  "needed.", ""]
    lines += [f"stdlib files ({std['stdlib_dir']}, in this order): " + ", ".join(f"`{f}`" for f in std["files"]) + ".",
              "", f"Generated by `benchmarks/report.py` from `{source}` (written by `benchmarks/quality.py`); total "
              f"wall time {res.get('wall_s', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def quality_plot(res: dict, png: Path, title: str = "") -> Path:
    """Perplexity against the ratio removed: one row of panels per domain, one column per method (a log
    scale each, so the methods that break the model do not flatten the others). In each panel: the mean over
    the seeds (bars: min-max), solid lines and filled markers without refit, dashed and hollow with ``ls``
    (drawn a little to the right, so the two never hide each other); circles before recovery, squares and
    dotted lines after it, when it ran; the unpruned model as a grey line. Needs matplotlib (the
    ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["summary"] if r.get("refit", "none") in ("none", "ls")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(DOMAIN_TITLES), len(methods), figsize=(2.6 * len(methods) + 0.6, 6.4),
                             squeeze=False)
    colors = {"none": "#1f77b4", "ls": "#d62728"}
    for row, (domain, name) in enumerate(DOMAIN_TITLES.items()):
        base = res["base"]["perplexity"][domain]["perplexity"]
        for col, method in enumerate(methods):
            ax = axes[row][col]
            for refit, style, shift in (("none", "-", -0.3), ("ls", "--", 0.3)):
                for phase, marker in (("before", "o"), ("after", "s")):
                    pts = sorted((r["ratio"], r[phase][domain]) for r in rows
                                 if r["method"] == method and r.get("refit", "none") == refit and phase in r)
                    if not pts:
                        continue
                    x = [100 * p[0] + shift for p in pts]
                    y = [p[1]["mean"] for p in pts]
                    err = [[p[1]["mean"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["mean"] for p in pts]]
                    ax.errorbar(x, y, yerr=err, color=colors[refit], marker=marker, capsize=3, markersize=5,
                                markerfacecolor="white" if refit == "ls" else colors[refit],
                                linestyle=style if phase == "before" else ":",
                                label=("refit ls" if refit == "ls" else "no refit")
                                      + ("" if phase == "before" else ", after recovery"))
            ax.axhline(base, color="grey", linewidth=0.8)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.tick_params(labelsize=7)
            ax.set_title(f"{method}: {name}", fontsize=8)
            if row == len(DOMAIN_TITLES) - 1:
                ax.set_xlabel("parameters removed (%)", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"perplexity (unpruned {base:.1f})", fontsize=8)
    axes[0][0].legend(fontsize=6)
    seeds = ", ".join(map(str, res["calibration"]["seeds"]))
    fig.suptitle(title or f"{res['model']['spec']}, calibration seed(s) {seeds} (mean, bars min-max): perplexity "
                 f"with and without --refit ls" + (", before and after the same recovery" if res["recovery"]["steps"]
                                                   else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def parity_markdown(res: dict, level: int = 2) -> str:
    """benchmarks/hfprune_parity.py: per engine, the per-layer IoU of its kept channels against the
    official loop."""
    h = "#" * level
    st = res["settings"]
    cal = st["calibration"]
    lines = [f"{h} HFPrune parity: kept channels of each engine vs the official loop", "",
             f"Device: {res['device']}. Versions: {_versions(res['versions'])}. {st['model']} {st['dtype']}, "
             f"{cal['samples']} x {cal['seq_len']} tokens of `{os.path.basename(cal['source'])}` (seed {cal['seed']}), "
             f"ratio {st['ratio']:g}: width {st['width']} of {st['original_width']} in each of {st['layers']} layers. "
             f"Official loop: {st['official_loop']} ({res.get('official_loop_s', 0):.0f} s). Target: {res['target']}.",
             "", "| engine | status | IoU min | IoU mean | layers below target | channels swapped (all layers) | "
             "largest swapped gap to the k-th score | score max rel. diff | time (s) | verdict |", "|---" * 10 + "|"]
    for e in res["engines"]:
        if "iou_min" in e:
            lines.append(f"| {e['engine']} | {e['status']} | {e['iou_min']:.4f} | {e['iou_mean']:.4f} | "
                         f"{len(e['layers_below_target'])} | {e['channels_swapped_all_layers']} | "
                         f"{e['swapped_max_rel_gap_to_kth']:.1e} | {e['score_max_rel_diff']:.1e} | "
                         f"{e.get('seconds', 0):.0f} | {_yes(e['meets_target'])} |")
        else:
            lines.append(f"| {e['engine']} | {e['status']} | | | | | | | | not measured |")
    lines += ["", f"Generated by `benchmarks/report.py` from `hfprune_parity.json`; total wall time "
              f"{res.get('wall_s', 0):.0f} s."]
    return "\n".join(lines) + "\n"


RENDERERS = {"quality": lambda data, name: quality_markdown(data, f"{name}.json", level=2),
             "refit": lambda data, name: quality_markdown(data, f"{name}.json", level=2),
             "refit_self": lambda data, name: quality_markdown(data, f"{name}.json", level=2),
             "hfprune_parity": lambda data, name: parity_markdown(data, level=2)}


def _load(name: str):
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if str(data.get("status", "")).startswith("not yet measured"):
        return None
    return data


def _device(data: dict) -> str:
    """The GPU's name: some files keep it under versions, some at the top (where "cuda" is a type)."""
    name = (data.get("versions") or {}).get("device") or data.get("device") or "?"
    return str(name)


def _yes(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _loss_summary(d):
    rows = {(r["N"], r["d"], r["V"], r["impl"]): r for r in d["rows"] if r.get("status") == "ok"}
    ours, liger = rows.get((8192, 4096, 128256, "sdmprune_triton")), rows.get((8192, 4096, 128256, "liger_chunked_jsd"))
    if not ours or not liger:
        return "incomplete", "?"
    ratio = ours["median_ms"] / liger["median_ms"]
    ok = ratio <= 0.7 and ours["extra_peak_mb"] <= 1024
    return (f"8192x4096x128256: {ours['median_ms']:.1f} ms vs Liger chunked {liger['median_ms']:.1f} ms "
            f"({ratio:.2f}x), extra {ours['extra_peak_mb']:.0f} MB"), _yes(ok)


def _taylor_summary(d):
    r = max(d["rows"], key=lambda r: (r["d"] * r["I"], r["T"]))
    ok = r["meets_plain_target"] and r["meets_naive_target"] and r["meets_bytes_target"]
    return (f"{r['d']}x{r['I']}, T {r['T']}: fused {r['fused_ms']:.2f} ms = {r['fused_over_plain']:.2f}x plain, "
            f"naive {r['naive_over_fused']:.2f}x slower, 0 weight-grad bytes"), _yes(ok)


def _gather_summary(d):
    rows, cols = d["rows"], d["cols"]
    ok = rows["meets_target"] and cols["meets_target"]
    text = (f"rows {rows['inplace_vs_copy_bandwidth']:.2f}x, columns {cols['inplace_vs_copy_bandwidth']:.2f}x copy "
            f"bandwidth; extra memory {rows['extra_bytes']['inplace'] / 2**20:.0f} MiB vs "
            f"{rows['extra_bytes']['index_select'] / 2**20:.0f} MiB (index_select)")
    if "ordered_vs_copy_bandwidth" in rows:  # the opt-in single-launch algorithm, measured beside it
        text += (f"; ordered (SDMPRUNE_CUDA_GATHER=ordered): rows {rows['ordered_vs_copy_bandwidth']:.2f}x, "
                 f"columns {cols['ordered_vs_copy_bandwidth']:.2f}x")
    return text, _yes(ok)


def _fused_vs_reference(d, shape, method="sdmprune"):
    """[(run, speed-up, peak ratio)] of every fused run of ``shape`` and ``method`` against the reference
    run of the same file and method (None when there is none): sdmprune's stage 2, the one stage of the
    others. Runs written before the method was recorded are sdmprune's."""
    runs = [r for r in d["runs"] if "error" not in r and r["shape"] == shape and r.get("method", "sdmprune") == method]
    ref = next((r for r in runs if r["engine"] == "reference"), None)
    if ref is None:
        return None
    stage = "stage2" if method == "sdmprune" else "stage1"
    return [(r, ref["stage_s_per_sample"][stage] / r["stage_s_per_sample"][stage],
             r["peak_memory_gib"] / ref["peak_memory_gib"]) for r in runs if r["engine"] == "fused"]


def _method_summary(d, method):
    """One line on ``method``'s fused runs against its own reference loop (no target: for reading)."""
    parts = []
    for shape, label in (("llama-3.1-8b", "8B"), ("llama-3.2-1b", "1B")):
        for r, sp, mem in _fused_vs_reference(d, shape, method) or []:
            parts.append(f"{label} {r['spec']} (batch {r['batch_size']}): {r['peak_memory_gib']:.2f} GiB = "
                         f"{mem:.2f}x its reference's peak, {sp:.2f}x its samples/s")
    iou = d.get(f"iou_1b_{method}") or {}
    if iou:
        parts.append(f"1B kept-channel IoU vs its reference min {min(iou.values()):.3f}")
    return f"{method}: " + "; ".join(parts) if parts else None


def _best_1b(d):
    """(text, met) for the 1B target (>= 4x and <= 1/3 of the peak in one run): the run that meets it
    with the highest speed-up, else the fastest run within 1/3 of the peak and the leanest run."""
    rows = _fused_vs_reference(d, "llama-3.2-1b")
    if not rows:
        return None, False
    fmt = lambda r, sp, m: f"{r['spec']} (batch {r['batch_size']}) {sp:.2f}x, {m:.2f}x peak"  # noqa: E731
    met = [x for x in rows if x[1] >= 4 and x[2] <= 1 / 3]
    if met:
        return "1B " + fmt(*max(met, key=lambda x: x[1])), True
    lean = [x for x in rows if x[2] <= 1 / 3]
    picks = ([max(lean, key=lambda x: x[1])] if lean else []) + [max(rows, key=lambda x: x[1])]
    return "1B " + "; ".join(dict.fromkeys(fmt(*x) for x in picks)), False


def _pipeline_summary(d):
    rows8 = _fused_vs_reference(d, "llama-3.1-8b")
    text1, ok1 = _best_1b(d)
    if not rows8 or text1 is None:
        return "incomplete", "?"
    fit = [x for x in rows8 if x[0]["peak_memory_gib"] <= 18]
    if fit:
        r, sp8, _ = max(fit, key=lambda x: x[1])
        text8 = f"8B {r['spec']} (batch {r['batch_size']}): {r['peak_memory_gib']:.2f} GiB, stage 2 {sp8:.2f}x"
        ok8 = sp8 >= 2
    else:
        text8, ok8 = "8B: no fused run within 18 GiB", False
    iou = d.get("iou_1b") or {}
    iou_s = f"; 1B kept-channel IoU vs reference min {min(iou.values()):.3f}" if iou else ""
    hf = _method_summary(d, "hfprune")
    return (f"{text8}; {text1} (stage 2, against the same-run reference){iou_s}" + (f". {hf}" if hf else ""),
            f"8B {_yes(ok8)}, 1B {_yes(ok1)}")


def _pipeline_1b_summary(d):
    text, ok = _best_1b(d)
    return (text, _yes(ok)) if text else ("incomplete", "?")


def _offload_summary(d):
    r = next((r for r in d["runs"] if r.get("run") == "offload cpu"), None)
    if not r:
        return "incomplete", "?"
    ok = r["peak_gib"] <= 6 and r["speed_vs_resident"] >= 0.6
    return f"{r['peak_gib']:.2f} GiB peak, {r['speed_vs_resident']:.2f}x resident samples/s", _yes(ok)


def _recovery_summary(d):
    res = d["results"]
    ours = next(r for r in res if r["method"] == "one-copy fused (sdmprune)")  # the same checkpointing as usual
    usual = next(r for r in res if not r["method"].startswith("one-copy"))
    sp, mem = ours["tokens_per_s"] / usual["tokens_per_s"], ours["peak_memory_gib"] / usual["peak_memory_gib"]
    text = f"{sp:.2f}x tokens/s, {mem:.2f}x peak memory"
    off = next((r for r in res if "offloaded" in r["method"] and "tokens_per_s" in r), None)
    if off is not None:  # checkpointed with offloaded inputs (a later run; not the same-settings comparison)
        text += (f"; checkpointed + offloaded inputs: {off['tokens_per_s'] / usual['tokens_per_s']:.2f}x, "
                 f"{off['peak_memory_gib'] / usual['peak_memory_gib']:.2f}x")
    return text, _yes(sp >= 1.3 and mem <= 0.5)


SUMMARIES = {"fused_linear_distill_loss": _loss_summary, "taylor_importance": _taylor_summary,
             "gather": _gather_summary, "pipeline": _pipeline_summary, "pipeline_1b_batch": _pipeline_1b_summary,
             "offload": _offload_summary,
             "recovery": _recovery_summary}


def readme_block() -> str:
    out = []
    quality = _load("quality")
    if quality is not None:
        out += [quality_markdown(quality, "quality.json", level=3)]
    if (RESULTS / "refit.png").exists():  # drawn from quality.json (--plot)
        out += ["![perplexity vs parameters removed, with and without --refit ls](benchmarks/results/refit.png)", ""]
    # the refit's strength probe before recovery (benchmarks/quality.py --refits none,ls,ls:0.1,ls:1);
    # refit_self.md (calibration on text sampled from the model) stays beside its JSON
    probe = _load("refit")
    if probe is not None:
        out += [quality_markdown(probe, "refit.json", level=3)]
    parity = _load("hfprune_parity")
    if parity is not None:
        out += [parity_markdown(parity, level=3)]
    loaded = {name: _load(name) for name in GPU_BENCHMARKS}
    devices = sorted({_device(data) for data in loaded.values() if data})
    out += ["### GPU speed and memory", "",
            f"Measured with `bash benchmarks/run_gpu.sh` on: {', '.join(devices) or 'no GPU yet'}. Each ratio is "
            "against the baseline of the same run; full tables (versions, medians) in benchmarks/RESULTS.md.", "",
            "| benchmark | what | target | measured | verdict |", "|---|---|---|---|---|"]
    for name, (what, target) in GPU_BENCHMARKS.items():
        data = loaded[name]
        if data is None:
            out.append(f"| `{name}` | {what} | {target} | not yet measured | |")
            continue
        measured, verdict = SUMMARIES[name](data)
        out.append(f"| `{name}` | {what} | {target} | {measured} | {verdict} |")
    pipe = RESULTS / "pipeline.md"
    if pipe.exists():
        out += ["", "Pipeline runs (`benchmarks/bench_pipeline.py`, 16 samples of 1024 tokens, random weights):", "",
                pipe.read_text().strip()]
    return "\n".join(out) + "\n"


def update_readme() -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(head + BEGIN + "\n" + readme_block() + END + tail)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=RESULTS, help="folder of results/*.json (default %(default)s)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--readme", action="store_true", help="rewrite the results block of README.md")
    what.add_argument("--plot", action="store_true", help="redraw results/refit.png from results/quality.json")
    args = parser.parse_args(argv[1:])
    if args.readme:
        update_readme()
        return
    if args.plot:
        from sdmprune.errors import InputError, require_extra

        try:
            require_extra("matplotlib", "report.py --plot")
        except InputError as e:  # one line and exit 2, as the package's command line
            parser.exit(2, f"report.py: error: {e}\n")
        print(quality_plot(json.loads((RESULTS / "quality.json").read_text()), RESULTS / "refit.png"))
        return
    root = args.root
    if not root.is_dir():
        parser.error(f"{root} is not a folder")
    print("# Benchmark results\n")
    print("Generated by `python benchmarks/report.py` from the JSON files in benchmarks/results/.")
    print("GPU rows carry the device they were measured on (e.g. NVIDIA H100); CPU rows say CPU.\n")
    files = sorted(root.glob("*.json"))
    if not files:
        print("No results yet.")
    for f in files:
        special = RENDERERS.get(f.stem)
        print(special(json.loads(f.read_text()), f.stem) if special else render(f))


if __name__ == "__main__":
    main(sys.argv)
