"""The GPU benchmarks' host-side logic (run specs, budgets) and the CPU smoke run of bench_pipeline:
the GPU session runs these scripts unchanged, so what can break on the CPU is checked here."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

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
    assert r["mem_ref_divisor"] == 3.0
    # a third of the reference's measured peak, in bytes; no reference measured yet -> an error entry
    got = bp.resolve_budget(r, {"1b": 12.0})
    assert int(got["mem"]) == 4 * 2**30 and got["mem_spec"] == "ref/3"
    assert "no measured 1b:reference" in bp.resolve_budget(r, {})["error"]
    assert bp.resolve_budget(bp.parse_run("8b:fused:mem=18GiB"), {})["mem"] == "18GiB"
    for bad in ("1b", "1b:fused:x=1", "1b:fused:b=two", "1b:fused:mem=ref/x"):
        with pytest.raises(SystemExit):
            bp.parse_run(bad)


def test_pipeline_smoke_run_writes_results(tmp_path):
    out = tmp_path / "pipeline-smoke.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_pipeline.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    run, offloaded = report["runs"]
    for r in (run, offloaded):
        assert r["samples"] == 2 and r["stage_s"]["stage1"] > 0 and r["stage_s"]["stage2"] > 0
        assert r["peak_memory_gib"] is None  # CPU: no GPU peak is claimed
    # smoke: 2 layers, one batch a stage, two stages -> four layer inputs out and back
    assert not run["offload_activations"] and run["activation_offload"] is None
    assert offloaded["offload_activations"] and offloaded["activation_offload"]["offloaded"] == 4
    assert offloaded["predicted"]["host_activations"] > 0
    assert "on, offloaded" in (tmp_path / "pipeline-smoke.md").read_text()


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
