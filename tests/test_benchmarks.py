"""The GPU benchmarks' host-side logic (run specs, budgets) and the CPU smoke run of bench_pipeline:
the GPU session runs these scripts unchanged, so what can break on the CPU is checked here. The CPU
quality benchmark (quality.py) and the HFPrune parity check (hfprune_parity.py) run end to end on a
tiny random model: their real runs on SmolLM2-135M take tens of minutes on a CPU."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pipeline_run_specs_and_reference_budgets():
    bp = load("bench_pipeline")
    runs = [bp.parse_run(r) for r in bp.DEFAULT_RUNS.split(",")]
    assert runs[0]["engine"] == "reference"
    r = bp.parse_run("1b:fused:b=12:chunk=128:n=48:ckpt=0")
    assert (r["b"], r["chunk"], r["n"], r["ckpt"], r["act"], r["mem"]) == (12, 128, 48, False, False, None)
    assert bp.parse_run("1b:fused:act=1")["act"] is True and bp.parse_run("1b:fused:act=0")["act"] is False
    assert any(r["act"] and r["shape"] == "1b" for r in runs) and any(r["act"] and r["shape"] == "8b" for r in runs)
    r = bp.parse_run("1b:fused:mem=ref/3")
    assert r["mem_ref_divisor"] == 3.0 and r["m"] == "sdmprune"
    # a third of the reference's measured peak, in bytes; no reference measured yet -> an error entry
    got = bp.resolve_budget(r, {("1b", "sdmprune"): 12.0})
    assert int(got["mem"]) == 4 * 2**30 and got["mem_spec"] == "ref/3"
    assert "no measured 1b:reference run" in bp.resolve_budget(r, {})["error"]
    assert bp.resolve_budget(bp.parse_run("8b:fused:mem=18GiB"), {})["mem"] == "18GiB"
    # another method measures against its own reference loop
    hf = bp.parse_run("1b:fused:m=hfprune:mem=ref/3")
    assert hf["m"] == "hfprune" and "no measured 1b:reference:m=hfprune run" in bp.resolve_budget(
        hf, {("1b", "sdmprune"): 12.0})["error"]
    assert int(bp.resolve_budget(hf, {("1b", "hfprune"): 6.0})["mem"]) == 2 * 2**30
    assert {r["m"] for r in runs} == {"sdmprune", "hfprune"}
    assert bp.parse_run("8b:fused:b=2:refit=ls")["refit"] == "ls" and runs[0]["refit"] == "none"
    assert {(r["shape"], r["refit"]) for r in runs if r["refit"] != "none"} == {("1b", "ls"), ("8b", "ls")}
    for bad in ("1b", "1b:fused:x=1", "1b:fused:b=two", "1b:fused:mem=ref/x", "1b:fused:m=wanda-sp",
                "1b:fused:refit=bias"):
        with pytest.raises(SystemExit):
            bp.parse_run(bad)


def test_pipeline_smoke_run_writes_results(tmp_path):
    out = tmp_path / "pipeline-smoke.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_pipeline.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    run, offloaded, hf, refit = report["runs"]
    for r in (run, offloaded):
        assert r["samples"] == 2 and r["stage_s"]["stage1"] > 0 and r["stage_s"]["stage2"] > 0
        assert r["peak_memory_gib"] is None  # CPU: no GPU peak is claimed
        assert r["method"] == "sdmprune"
    # hfprune: one stage, predicted with its own terms (no teacher states)
    assert hf["method"] == "hfprune" and hf["stage_s"]["stage1"] > 0 and hf["stage_s"]["stage2"] is None
    assert hf["predicted"]["teacher_cache"] == 0 < run["predicted"]["teacher_cache"]
    # smoke: 2 layers, one batch a stage, two stages -> four layer inputs out and back
    assert not run["offload_activations"] and run["activation_offload"] is None
    assert offloaded["offload_activations"] and offloaded["activation_offload"]["offloaded"] == 4
    assert offloaded["predicted"]["host_activations"] > 0
    assert "on, offloaded" in (tmp_path / "pipeline-smoke.md").read_text()
    # the refit stage: timed in the same run as its scoring, predicted by the memory model, the held-out
    # loss it chose its strengths on no worse than the sliced weights'
    assert "refit" not in run and refit["refit"] == "ls" and refit["refit_s"] > 0
    assert refit["refit_vs_scoring"] == pytest.approx(
        refit["refit_s"] / (refit["stage_s"]["stage1"] + refit["stage_s"]["stage2"]))
    assert refit["refit_peak_gib"] is None and refit["refit_predicted_gib"] > 0
    assert refit["refit_held_out_loss"]["after"] <= refit["refit_held_out_loss"]["before"]
    assert "| smoke:torch:refit=ls |" in (tmp_path / "pipeline-smoke.md").read_text().split("Refit stage")[1]


def test_layer_ops_smoke_run_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_layer_ops.py"), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "layer_ops.json").read_text())
    assert report["smoke"] and report["device"].startswith("CPU")
    ops = {r["op"]: r for r in report["rows"]}
    assert ops["rms_norm"]["transformers_ms"] > 0 and ops["rms_norm"]["sdmprune_saved_bytes"] > 0
    assert ops["gated_activation"]["torch_bwd_ms"] > 0 and ops["gated_activation"]["sdmprune_bwd_ms"] > 0
    assert ops["rotary"]["transformers_ms"] > 0 and ops["rotary"]["sdmprune_ms"] > 0


def test_recovery_summary_judges_the_same_settings_row_and_shows_the_offloaded_one():
    report = load("report")
    rows = [{"method": "one-copy fused (sdmprune)", "tokens_per_s": 300.0, "peak_memory_gib": 4.0},
            {"method": "separate teacher + logits (usual)", "tokens_per_s": 200.0, "peak_memory_gib": 10.0},
            {"method": "one-copy fused, checkpointed + offloaded inputs (sdmprune)", "tokens_per_s": 150.0,
             "peak_memory_gib": 2.0}]
    text, verdict = report._recovery_summary({"results": rows})
    assert text == "1.50x tokens/s, 0.40x peak memory; checkpointed + offloaded inputs: 0.75x, 0.20x"
    assert verdict == report._yes(True)
    # an earlier results file (two rows) reads as before; a miss on memory is a miss
    rows[0]["peak_memory_gib"] = 6.0
    text, verdict = report._recovery_summary({"results": rows[:2]})
    assert text == "1.50x tokens/s, 0.60x peak memory" and verdict == report._yes(False)


# ------------------------------------------------------------------------- benchmarks/run_gpu.sh
# The device tool: at most 600 s a command, 900 s of device time a session, the machine's start
# (60-120 s) included; tiers 1 and 2 are the session's two commands.
COMMAND_LIMIT_S, SESSION_S, MACHINE_START_S = 600, 900, 120


def gpu_plan(*args, env=None):
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "run_gpu.sh"), *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def parse_gpu_plan(text):
    import re

    grace = int(re.search(r"kill grace (\d+)s", text).group(1))
    tiers, runs = {}, {}
    for line in text.splitlines():
        if m := re.match(r"tier (\d+): deadline (\d+)s$", line):
            tier = tiers.setdefault(int(m.group(1)), {"deadline": int(m.group(2)), "steps": []})
        elif m := re.match(r"\s+step (\S+)\s+cap\s+(\d+)s\s+(always|cold)\s+(\S+)\s+(.+)$", line):
            tier["steps"].append(dict(name=m.group(1), cap=int(m.group(2)), kind=m.group(3), path=m.group(4)))
        elif m := re.match(r"bench_pipeline runs: (\S+) (\S+)$", line):
            runs[m.group(1)] = m.group(2).split(",")
    return grace, tiers, runs


def test_gpu_plan_tiers_fit_their_deadlines_and_name_real_paths():
    """PLAN=1 (or --plan) prints each tier's steps without running anything: every tier's steps that
    always run, each capped, fit its deadline with the kill grace, tiers 1 and 2 fit one session with
    the machine's start, every step names an existing script or test path, and the bench_pipeline runs
    split over the tiers are exactly its DEFAULT_RUNS."""
    text = gpu_plan("--plan")
    assert gpu_plan(env={"PLAN": "1"}) == text
    grace, tiers, runs = parse_gpu_plan(text)
    assert sorted(tiers) == [1, 2, 3, 4, 5]
    for n, tier in tiers.items():
        steps = tier["steps"]
        assert steps and steps[0]["name"] == "build", n  # everything after it needs the extension
        always = sum(s["cap"] for s in steps if s["kind"] == "always")
        assert always + grace <= tier["deadline"] <= COMMAND_LIMIT_S - 60, (n, always, tier["deadline"])
        for s in steps:
            assert 0 < s["cap"] <= tier["deadline"], (n, s)
            assert os.path.exists(os.path.join(ROOT, s["path"])), (n, s)
            if s["path"].endswith(".py") and s["path"].startswith("benchmarks/"):
                assert os.path.basename(s["path"]).startswith("bench_"), s
    assert tiers[1]["deadline"] <= 480 and tiers[2]["deadline"] <= 300
    assert tiers[1]["deadline"] + tiers[2]["deadline"] + MACHINE_START_S <= SESSION_S
    assert tiers[1]["steps"][0]["kind"] == "always" and any(s["name"] == "tests_cuda" for s in tiers[1]["steps"])
    # the tier-1 benchmarks and the 8B / offload / gather / recovery ones, where the issue put them
    paths = {n: {s["path"] for s in t["steps"]} for n, t in tiers.items()}
    assert {"benchmarks/bench_fused_linear_distill_loss.py", "benchmarks/bench_taylor_importance.py",
            "benchmarks/bench_pipeline.py"} <= paths[1]
    assert {"benchmarks/bench_pipeline.py", "benchmarks/bench_offload.py", "benchmarks/bench_gather.py",
            "benchmarks/bench_recovery.py"} <= paths[2]
    bp = load("bench_pipeline")
    specs = [spec for name in ("pipeline_1b", "pipeline_8b", "pipeline_1b_rest", "pipeline_hfprune", "pipeline_refit")
             for spec in runs[name]]
    for spec in specs:
        bp.parse_run(spec)  # SystemExit on a bad spec
    assert set(specs) == set(bp.DEFAULT_RUNS.split(","))
    assert {bp.parse_run(s)["shape"] for s in runs["pipeline_1b"]} == {"1b"}
    assert {bp.parse_run(s)["shape"] for s in runs["pipeline_8b"]} == {"8b"}
    for name, specs in runs.items():  # a mem=ref/K run needs its shape and method's reference before it
        for i, spec in enumerate(specs):
            if "mem=ref/" in spec:
                assert bp.reference_spec(bp.parse_run(spec)) in specs[:i], (name, spec)
    # without a tier it runs nothing and says how to call it
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "run_gpu.sh")], capture_output=True,
                          text=True, timeout=60, env={k: v for k, v in os.environ.items() if k not in ("TIER", "PLAN")})
    assert proc.returncode == 2 and "TIER=1" in proc.stderr


def test_gpu_test_selection_splits_the_suite(tmp_path):
    """The pytest plugin of run_gpu.sh's test steps: SDM_SELECT=cuda keeps the tests that need CUDA (the
    gpu mark, a skipif whose reason says it needs CUDA or a GPU, a "cuda" parameter), SDM_SELECT=rest
    the others; on the real suite it finds the conftest `cuda` mark."""
    plug = tmp_path / "plugin"
    plug.mkdir()
    subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "run_gpu.sh"), "--select-plugin", str(plug)],
                   check=True, timeout=60)
    (tmp_path / "test_sel.py").write_text(
        "import pytest\n"
        "cuda = pytest.mark.skipif(False, reason='needs a CUDA GPU')\n"
        "def test_plain(): pass\n"
        "@pytest.mark.gpu\ndef test_marked(): pass\n"
        "@cuda\ndef test_skipif_reason(): pass\n"
        "@pytest.mark.skipif(False, reason='checks the no-GPU message')\ndef test_no_gpu_message(): pass\n"
        "@pytest.mark.parametrize('device', ['cpu', 'cuda'])\ndef test_param(device): pass\n")

    def collect(select, target, cwd):
        path = os.pathsep.join(p for p in (str(plug), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "SDM_SELECT": select, "PYTHONPATH": path}
        proc = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "sdm_gpu_select", "-p",
                               "no:cacheprovider", target], capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return {line.split("::", 1)[1] for line in proc.stdout.splitlines() if "::" in line}

    assert collect("cuda", "test_sel.py", tmp_path) == {"test_marked", "test_skipif_reason", "test_param[cuda]"}
    assert collect("rest", "test_sel.py", tmp_path) == {"test_plain", "test_no_gpu_message", "test_param[cpu]"}
    real = collect("cuda", "tests/test_activation_offload.py", ROOT)
    assert real == {"test_cuda_offload_equal_gradients_and_lower_peak"}


def test_pipeline_summary_compares_each_method_with_its_own_reference():
    """The README's pipeline line: sdmprune's targets on its stage 2 against its reference loop; hfprune's
    fused rows against hfprune's reference loop (its one stage), never against sdmprune's."""
    report = load("report")

    def row(spec, shape, engine, method, peak, s1, s2=None, batch=1):
        r = dict(spec=spec, shape=shape, engine=engine, peak_memory_gib=peak, batch_size=batch,
                 stage_s_per_sample={"stage1": s1, "stage2": s2})
        if method:  # older files carry no method: sdmprune
            r["method"] = method
        return r

    d = {"runs": [row("8b:reference", "llama-3.1-8b", "reference", None, 45.0, 1.0, 3.0),
                  row("8b:fused:mem=18GiB", "llama-3.1-8b", "fused", None, 16.5, 0.5, 1.0, 4),
                  row("1b:reference", "llama-3.2-1b", "reference", "sdmprune", 12.0, 0.2, 0.8),
                  row("1b:fused:b=12", "llama-3.2-1b", "fused", "sdmprune", 3.0, 0.05, 0.1, 12),
                  row("8b:reference:m=hfprune", "llama-3.1-8b", "reference", "hfprune", 20.0, 0.6),
                  row("8b:fused:m=hfprune:mem=18GiB", "llama-3.1-8b", "fused", "hfprune", 16.0, 0.2, None, 4)],
         "iou_1b_hfprune": {"0": 0.99, "1": 1.0}}
    text, verdict = report._pipeline_summary(d)
    assert "8B 8b:fused:mem=18GiB (batch 4): 16.50 GiB, stage 2 3.00x" in text
    assert "1B 1b:fused:b=12 (batch 12) 8.00x, 0.25x peak" in text and verdict == f"8B {report._yes(True)}, 1B {report._yes(True)}"
    assert ("hfprune: 8B 8b:fused:m=hfprune:mem=18GiB (batch 4): 16.00 GiB = 0.80x its reference's peak, "
            "3.00x its samples/s; 1B kept-channel IoU vs its reference min 0.990") in text
    assert report._method_summary(d, "taylor") is None


def test_pipeline_merge_keeps_the_first_measurement_of_a_run(tmp_path):
    """--merge: the runs of the 1B and 8B tiers in one pipeline.json (+ .md), a run measured twice
    (the reference a later tier repeats for its mem=ref/K budget) kept once, the IoU of the first file."""
    head = {"versions": {"device": "GPU"}, "smoke": False, "samples": 16, "seq_len": 1024}
    row = dict(batch_size=1, peak_memory_gib=2.0, predicted_peak_gib=2.5, tokens_per_s=1000.0,
               stage_s_per_sample={"stage1": 0.1, "stage2": 0.2})
    a = dict(head, runs=[dict(row, spec="1b:reference"), dict(row, spec="1b:fused:b=12:chunk=128:n=48")],
             iou_1b={"0": 0.9})
    b = dict(head, runs=[dict(row, spec="8b:reference"), dict(row, spec="8b:fused:mem=18GiB")],
             iou_1b_hfprune={"0": 1.0})
    c = dict(head, runs=[dict(row, spec="1b:reference", tokens_per_s=5.0), dict(row, spec="1b:fused:b=4")],
             iou_1b={"0": 0.1})
    paths = []
    for name, rep in (("a", a), ("b", b), ("c", c)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(rep))
    out = tmp_path / "results" / "pipeline.json"
    assert load("bench_pipeline").main(["--merge", *map(str, paths), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert [r["spec"] for r in merged["runs"]] == ["1b:reference", "1b:fused:b=12:chunk=128:n=48", "8b:reference",
                                                   "8b:fused:mem=18GiB", "1b:fused:b=4"]
    assert merged["runs"][0]["tokens_per_s"] == 1000.0 and merged["iou_1b"] == {"0": 0.9}
    assert merged["iou_1b_hfprune"] == {"0": 1.0}
    assert {k: merged[k] for k in head} == head
    assert "8b:fused:mem=18GiB" in (tmp_path / "results" / "pipeline.md").read_text()


# ------------------------------------------------------------------------- benchmarks/quality.py
@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """A tiny random LLaMA with a byte tokenizer saved as a model folder, and a text file standing in for
    the WikiText files (the real model and data take minutes per run on this CPU)."""
    import random

    from conftest import make_byte_tokenizer, tiny_model

    root = tmp_path_factory.mktemp("quality")
    tiny_model(seed=0).save_pretrained(root / "model")
    make_byte_tokenizer().save_pretrained(root / "model")
    words = "the of a river city king song army game film north year first was were and in to".split()
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(2000)))
    return root


@pytest.fixture
def restore_threads():
    """The scripts run in this process here, and --threads 1 sets torch's global thread count."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_quality_smoke_run_has_both_domains_before_after_and_seed_spreads(tiny_inputs, tmp_path, restore_threads):
    """quality.py end to end on a tiny model: a seeded method over three calibration seeds and an
    unseeded one once, both ratios, without and with the refit of one selection, one recovery step; the
    JSON holds every domain before and after recovery for every run, the seed spreads, the refit's
    report and ratio to no refit, the data it used, and the markdown table beside it."""
    text = str(tiny_inputs / "text.txt")
    out = tmp_path / "quality.json"
    code = load("quality").main([
        "--model", str(tiny_inputs / "model"), "--methods", "hfprune,magnitude", "--ratios", "0.2,0.3",
        "--seeds", "0,1,2", "--calib", text, "--wikitext", text, "--recover-data", text, "--samples", "2",
        "--seq-len", "16", "--batch-size", "2", "--eval-windows", "2", "--eval-seq-len", "16", "--recover-steps",
        "1", "--recover-batch", "2", "--recover-seq-len", "16", "--stdlib-files", "abc.py,bisect.py",
        "--refits", "none,ls", "--threads", "1", "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["complete"] and res["planned_runs"] == len(res["runs"]) == (2 * 3 + 2) * 2
    # every method at the first seed before any repetition, so a cut run has the whole table once;
    # both refit variants of one selection side by side
    assert [(r["seed"], r["method"], r["refit"]) for r in res["runs"][:8]] == [
        (0, "hfprune", "none"), (0, "hfprune", "ls"), (0, "magnitude", "none"), (0, "magnitude", "ls")] * 2
    for none, ls in zip(res["runs"][::2], res["runs"][1::2]):
        assert none["prune"] == ls["prune"] and none["refit_report"] is None  # one selection for both
        assert set(ls["refit_report"]["strengths"]) == {"0", "1"} and ls["refit_report"]["held_out_loss"]
    domains = res["evaluation"]["domains"]
    assert set(domains) == {"wikitext2", "stdlib"}
    assert domains["stdlib"]["files"] == ["abc.py", "bisect.py"] and domains["stdlib"]["python"]
    assert len(domains["wikitext2"]["window_starts"]) == 2
    for r in res["runs"]:
        for phase in ("before", "after"):
            for d in ("wikitext2", "stdlib"):
                ppl = r[phase][d]
                assert 1 < ppl["perplexity"] < float("inf") and ppl["windows"] == 2 and ppl["seq_len"] == 16
        assert r["recovery"]["steps"] == 1 and r["recovery"]["time_s"] > 0
        assert r["prune"]["peak_memory_bytes"] >= r["prune"]["memory_at_start_bytes"] > 0
    assert res["recovery"]["tokens"] == 1 * 2 * 16 and res["calibration"]["seeds"] == [0, 1, 2]
    summary = {(s["ratio"], s["method"], s["refit"]): s for s in res["summary"]}
    assert set(summary) == {(q, m, v) for q in (0.2, 0.3) for m in ("hfprune", "magnitude") for v in ("none", "ls")}
    for (ratio, method, refit), s in summary.items():
        runs = [r for r in res["runs"] if r["ratio"] == ratio and r["method"] == method and r["refit"] == refit]
        if refit == "ls":
            none = [r for r in res["runs"] if r["ratio"] == ratio and r["method"] == method and r["refit"] == "none"]
            ratios = [a["before"]["stdlib"]["perplexity"] / b["before"]["stdlib"]["perplexity"] for a, b in zip(runs, none)]
            assert s["vs_none"]["before"]["stdlib"]["mean"] == pytest.approx(sum(ratios) / len(ratios))
        for phase in ("before", "after"):
            for d in ("wikitext2", "stdlib"):
                st, values = s[phase][d], [r[phase][d]["perplexity"] for r in runs]
                assert st["n"] == len(values) == (3 if method == "hfprune" else 1)
                assert st["min"] == min(values) and st["max"] == max(values)
                assert st["mean"] == pytest.approx(sum(values) / len(values))
                assert (st["std"] is None) == (st["n"] == 1)
    # the three calibration seeds draw different windows, so hfprune's perplexities differ between them
    spread = summary[(0.2, "hfprune", "none")]["before"]["wikitext2"]
    assert spread["max"] > spread["min"] and spread["std"] > 0
    md = (tmp_path / "quality.md").read_text()
    assert "WikiText-2 before | WikiText-2 after | stdlib code before | stdlib code after" in md
    assert "`abc.py`, `bisect.py`" in md and "| hfprune | none | 3 |" in md and "| magnitude | ls | 1 |" in md
    assert "Partial run" not in md
    # a run cut short says how much of the plan it measured
    res["runs"], res["summary"], res["complete"] = res["runs"][:3], load("quality").summarize(res["runs"][:3]), False
    assert "Partial run**: 3 of 16 runs measured" in load("report").quality_markdown(res)


def test_quality_evaluation_windows_cover_the_whole_text():
    q = load("quality")
    stream, starts = q.spread_windows(torch.arange(1000), 4, 100)
    assert starts == [0, 200, 500, 700] and torch.equal(stream[100:200], torch.arange(200, 300))
    with pytest.raises(SystemExit):
        q.spread_windows(torch.arange(350), 4, 100)


def test_hfprune_parity_smoke_run(tiny_inputs, tmp_path, restore_threads):
    """hfprune_parity.py on a tiny model: the torch and reference engines against its own statement of
    the official loop, per-layer IoU written with the settings."""
    out = tmp_path / "parity.json"
    code = load("hfprune_parity").main(["--model", str(tiny_inputs / "model"), "--calib",
                                        str(tiny_inputs / "text.txt"), "--samples", "3", "--seq-len", "12",
                                        "--engines", "torch,reference,fused", "--batch-size", "2", "--threads",
                                        "1", "--fused-budget-s", "0.003", "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert [e["engine"] for e in res["engines"]] == ["torch", "reference", "fused"]
    # the fused engine runs in a child under the Triton interpreter; a budget no layer fits skips it
    # after (or during) its one-layer probe, and the JSON says so instead of a result
    from sdmprune.kernels.utils import triton_available

    fused = res["engines"].pop()
    if triton_available():
        assert fused["status"].startswith("skipped: one decoder layer on one sample") and not fused["ran"]
    else:
        assert fused["status"].startswith("failed")
    for e in res["engines"]:
        assert len(e["iou_per_layer"]) == res["settings"]["layers"] == 2
        assert e["meets_target"] and e["iou_min"] >= 0.98 and e["score_max_rel_diff"] < 1e-3
    assert res["settings"]["width"] < res["settings"]["original_width"]
    assert "| torch | ran |" in load("report").parity_markdown(res)


def test_quality_resume_keeps_measured_runs_and_refuses_other_settings(tiny_inputs, tmp_path, restore_threads):
    """--resume goes on from a cut run: the runs already in --out stay as measured, only the missing
    (seed, ratio, method, refit) are run (here the refit variant of a kept selection: the selection runs
    again, deterministic, so its perplexities match the uncut run's); a file measured with other
    settings is refused with one line naming them, and left as it was."""
    text = str(tiny_inputs / "text.txt")
    out = tmp_path / "quality.json"
    argv = ["--model", str(tiny_inputs / "model"), "--methods", "hfprune", "--ratios", "0.2", "--seeds", "0",
            "--calib", text, "--wikitext", text, "--samples", "2", "--seq-len", "16", "--batch-size", "2",
            "--eval-windows", "2", "--eval-seq-len", "16", "--recover-steps", "0", "--stdlib-files", "abc.py",
            "--refits", "none,ls", "--threads", "1", "--out", str(out)]
    quality = load("quality")
    assert quality.main(argv) == 0
    whole = json.loads(out.read_text())
    cut = dict(whole, runs=whole["runs"][:1], complete=False)
    out.write_text(json.dumps(cut))
    assert quality.main(argv + ["--resume"]) == 0
    resumed = json.loads(out.read_text())
    assert resumed["complete"] and resumed["resumed"] == {
        "runs_kept": 1, "earlier_calls": [{"device": whole["device"], "wall_s": whole["wall_s"], "runs": 1}]}
    assert "**Resumed** (`--resume`): 1 runs kept" in out.with_suffix(".md").read_text()
    assert resumed["runs"][0] == whole["runs"][0]  # kept as measured, times included
    assert [(r["refit"]) for r in resumed["runs"]] == ["none", "ls"]
    for d in ("wikitext2", "stdlib"):
        assert resumed["runs"][1]["before"][d]["perplexity"] == pytest.approx(
            whole["runs"][1]["before"][d]["perplexity"], rel=1e-5)
    kept = out.read_text()
    with pytest.raises(SystemExit, match="other settings .*samples"):
        quality.main([a if a != "2" or argv[i - 1] != "--samples" else "3" for i, a in enumerate(argv)]
                     + ["--resume"])
    assert out.read_text() == kept


def png_size(path) -> tuple:
    """(width, height) in pixels from a PNG's header; fails unless the file is a PNG."""
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.mark.parametrize("results, methods", [("quality", 6), ("refit_self", 3)])
def test_quality_plot_draws_one_column_per_method(results, methods, tmp_path):
    """report.py --plot's figure from the committed results: one column of panels per method (2.6 inches
    at 100 dpi each), with and without recovery (refit_self ran none, so it has no after-recovery points)."""
    pytest.importorskip("matplotlib", reason="the plot extra is not installed (pip install 'sdmprune[plot]')")
    report = load("report")
    res = json.loads(open(os.path.join(ROOT, "benchmarks", "results", f"{results}.json")).read())
    assert len({r["method"] for r in res["summary"]}) == methods
    png = report.quality_plot(res, tmp_path / "plot.png")
    assert png_size(png) == (round(100 * (2.6 * methods + 0.6)), 640)


def test_plot_without_matplotlib_is_one_line(monkeypatch, capsys):
    """report.py --plot where matplotlib is missing: one line naming the extra, no traceback."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    with pytest.raises(SystemExit) as exit_:
        load("report").main(["report.py", "--plot"])
    out = capsys.readouterr()
    assert exit_.value.code == 2 and not out.out, out.err
    assert out.err.count("\n") == 1 and "pip install 'sdmprune[plot]'" in out.err, out.err
