"""benchmarks/bench_inference.py: the --smoke run end to end (JSON fields, markdown) and its FLOP count
checked against the model itself. The GPU run uses the same code with another device and dtype."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    spec = importlib.util.spec_from_file_location("bench_inference", os.path.join(ROOT, "benchmarks",
                                                                                  "bench_inference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "inference-smoke.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_inference.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads(out.read_text())


def test_smoke_json_fields(smoke):
    _, report = smoke
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["device"].startswith("cpu")
    assert report["versions"]["threads"] == 1 and report["wall_s"] > 0
    (shape,) = report["shapes"]
    assert shape["shape"] == "smoke" and shape["dtype"] == "float32" and shape["device"] == "cpu"
    reps, width = shape["reps"], shape["original_width"]
    rows = shape["rows"]
    assert [(r["ratio"], r["round_to"]) for r in rows] == [(a, b) for a in (0.2, 0.3, 0.4) for b in (None, 64, 128)]
    for ratio in (0.2, 0.3, 0.4):
        plain, r64, r128 = (r for r in rows if r["ratio"] == ratio)
        # the planned width removes the ratio to within one channel per layer; rounding only removes more
        one_channel_every_layer = 3 * shape["config"]["hidden_size"] * shape["config"]["num_hidden_layers"]
        assert abs(plain["param_reduction"] - ratio) * plain["params_before"] <= one_channel_every_layer / 2
        assert r64["width"] == plain["width"] // 64 * 64 and r128["width"] == plain["width"] // 128 * 128
        assert r128["param_reduction"] >= r64["param_reduction"] >= plain["param_reduction"]
        assert r64["rounding"]["width_before"] == plain["width"] and plain["rounding"] is None
    for r in rows:
        assert 0 < r["width"] < width
        assert 0 < r["flop_reduction"]["decode"] < 1 and 0 < r["flop_reduction"]["prefill"] < 1
        # the measured model is the baseline with the other channels removed (float32 summation order only)
        assert r["max_abs_logit_diff_vs_masked_baseline"] <= 1e-5
        assert r["reps_done"] == reps
        for kind, batches, per_token in (("prefill", shape["prefill_batches"], shape["prompt"]),
                                         ("decode", shape["batches"], shape["new"])):
            for b in batches:
                e = r["speed"][kind][str(b)]
                assert len(e["times_s"]) == len(e["baseline_times_s"]) == reps
                assert e["tokens_per_s"] > 0 and e["baseline_tokens_per_s"] > 0
                assert e["speedup"] == pytest.approx(e["tokens_per_s"] / e["baseline_tokens_per_s"])
                median = sorted(e["times_s"])[(reps - 1) // 2] if reps % 2 else None
                if median is not None:
                    assert e["tokens_per_s"] == pytest.approx(b * per_token / median)
        # a width planned twice (e.g. round-to 64 and 128 agree) is measured once and says so
        same = [o for o in rows if o["ratio"] == r["ratio"] and o["width"] == r["width"]]
        assert [o["measured_as"] is None for o in same].count(True) == 1


def test_smoke_markdown(smoke):
    path, report = smoke
    md = path.with_suffix(".md").read_text()
    assert report["versions"]["device"] in md and "same-run baseline" in md
    rows = [line for line in md.splitlines() if line.startswith(("| 20%", "| 40%"))]
    table = [line for line in rows if " -> " in line]
    assert len(table) == 6 and all(line.count("x)") == 4 for line in table)  # 2 prefill + 2 decode batches
    # the rounding table: rounded against planned width, measured (FLOP-expected), one row per distinct width
    rounding = [line for line in rows if " -> " not in line]
    assert md.count("Rounding: tokens/s of the rounded width") == 1
    assert rounding and all(line.count("x (") == 4 for line in rounding)


def test_conclusion_is_rendered_and_marked_stale(tmp_path, smoke):
    bi = load()
    _, report = smoke
    concl = tmp_path / "c.md"
    concl.write_text(f"run: {report['started']}\nRounding helps here.\n")
    assert "## Conclusion\n\nRounding helps here." in bi.render_markdown(report, str(concl))
    concl.write_text("run: 2000-01-01T00:00:00\nRounding helps here.\n")
    assert "written for the run of 2000-01-01T00:00:00, not this one" in bi.render_markdown(report, str(concl))


def test_flop_count_matches_the_model():
    bi = load()
    config = bi.hf_config("smoke")
    model = bi.build_random_model(config, torch.device("cpu"), torch.float32)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    H, hd, L = config.num_attention_heads, config.head_dim, config.num_hidden_layers
    # one token, no context: every linear layer once (2 FLOPs per weight) + attention over 1 key
    assert bi.forward_flops(config, config.intermediate_size, 1, 0, 1) == 2 * linear + 4 * L * H * hd
    # a prefill with logits everywhere costs what the same tokens cost one at a time over a growing cache
    P = 7
    assert bi.forward_flops(config, 300, P, 0, P) == sum(bi.forward_flops(config, 300, 1, t, 1) for t in range(P))


def test_shape_specs_and_output_paths():
    bi = load()
    s = bi.parse_shape("llama-3.2-1b:prompt=64:new=4:batches=1+8:prefill_batches=1", dict(reps=3))
    assert (s["name"], s["prompt"], s["new"], s["batches"], s["prefill_batches"], s["reps"]) == \
        ("llama-3.2-1b", 64, 4, (1, 8), (1,), 3)
    for bad in ("x:prompt", "x:foo=1", "x:new=two"):
        with pytest.raises(SystemExit):
            bi.parse_shape(bad, {})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bi.out_path(None, cpu, False).endswith(os.path.join("results", "inference.json"))
    assert bi.out_path(None, cuda, False).endswith(os.path.join("results", "inference-gpu.json"))
    assert "results" not in bi.out_path(None, cpu, True)  # smoke numbers never land in the results files
