"""`sdmprune prune` / `sdmprune eval` on tiny local models: outputs, reload, and bad input (exit 2, nothing written)."""
import importlib.util
import json
import os

import pytest
import torch

from conftest import save_byte_model
from sdmprune.cli import main

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_byte_model(root / "tiny")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(
        root / "gpt2")
    (root / "calib.txt").write_text(TEXT)
    (root / "short.txt").write_text("far too short")
    return root


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_prune_saves_a_plain_hf_model(files, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, scores = tmp_path / "pruned", tmp_path / "scores.safetensors"
    code, cap = run_cli(["prune", files / "tiny", "--out", out, "--ratio", 0.2, "--calib", files / "calib.txt",
                         "--samples", 3, "--seq-len", 16, "--engine", "torch", "--batch-size", 2,
                         "--save-scores", scores, "--eval-ppl", files / "calib.txt", "--eval-seq-len", 16,
                         "--eval-windows", 2, "--no-progress", "--stage1-keep", 0.9], capsys)
    assert code == 0, cap.err
    summary = json.loads(cap.out.strip().splitlines()[-1])
    report = json.loads((out / "sdmprune.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no sdmprune code
    from sdmprune.models import count_parameters

    assert count_parameters(reloaded) == report["params_after"] == summary["params_after"]
    assert reloaded.config.intermediate_size == report["width"] == 160 - round(0.2 * 124736 / 384)
    assert report["method"] == "sdmprune" and report["calibration"]["samples"] == 3
    assert report["config"]["alpha"] == 0.4 and report["config"]["stage1_keep"] == 0.9
    assert set(report["kept_indices"]) == {"0", "1"} and len(report["kept_indices"]["0"]) == report["width"]
    assert report["eval"]["before"]["windows"] == 2 and report["eval"]["after"]["perplexity"] > 1
    assert "torch" in report["versions"] and "total" in report["stats"]["time_s"]
    tensors = load_file(str(scores))
    assert tensors["keep.0"].tolist() == report["kept_indices"]["0"]
    assert tensors["stage1.keep.1"].numel() == int(0.9 * 160) and tensors["scores.1"].dtype == torch.float32
    assert not os.path.exists(str(out) + ".sdmprune-work")
    # the tokenizer travels with the model, and `sdmprune eval` reads the result
    code, cap = run_cli(["eval", out, "--ppl", files / "calib.txt", "--seq-len", 16, "--max-windows", 2,
                         "--json", tmp_path / "ev.json"], capsys)
    assert code == 0, cap.err
    ev = json.loads((tmp_path / "ev.json").read_text())
    # same dtype and device as the prune's own evaluation (fp32 on CPU; bf16 on CUDA, where the
    # sliced views and the reloaded contiguous weights may take different GEMM algorithms)
    rel = 2e-3 if torch.cuda.is_available() else 1e-5
    assert ev["perplexity"]["perplexity"] == pytest.approx(report["eval"]["after"]["perplexity"], rel=rel)


@pytest.mark.parametrize("method", ["taylor", "wanda-sp", "magnitude"])
def test_prune_self_calibration(files, tmp_path, capsys, method):
    out = tmp_path / "o"
    code, cap = run_cli(["prune", files / "tiny", "--out", out, "--width", 96, "--method", method,
                         "--samples", 2, "--seq-len", 8, "--no-progress", "--round-to", 32], capsys)
    assert code == 0, cap.err
    report = json.loads((out / "sdmprune.json").read_text())
    assert report["width"] == 96 and report["plan"]["rounding"]["width_after"] == 96
    if method != "magnitude":
        assert report["calibration"]["kind"] == "self"


def test_prune_with_offloaded_activations(files, tmp_path, capsys):
    out = tmp_path / "o"
    code, cap = run_cli(["prune", files / "tiny", "--out", out, "--width", 96, "--method", "taylor",
                         "--samples", 2, "--seq-len", 8, "--batch-size", 2, "--no-progress",
                         "--engine", "torch", "--offload-activations", "--device", "cpu", "--dtype", "fp32"], capsys)
    assert code == 0, cap.err
    report = json.loads((out / "sdmprune.json").read_text())
    assert report["config"]["offload_activations"] is True
    # one stage, one batch, two layers: each layer input out to host memory and back once
    st = report["stats"]["activation_offload"]
    assert st["offloaded"] == st["fetched"] == 2 and st["bytes_offloaded"] == 2 * 2 * 8 * 64 * 4


def test_prune_max_memory_picks_the_batch(files, tmp_path, capsys):
    """--max-memory: the batch size is the largest the memory model predicts to fit, capped by the
    samples; it is what the run used (config) and the report says why."""
    from transformers import AutoConfig

    from sdmprune.memory import GiB, predict_peak_memory
    from sdmprune.memory import batch_size_for_memory
    from sdmprune.pipeline import PruneConfig

    config = AutoConfig.from_pretrained(files / "tiny")
    kw = dict(dtype="fp32", engine="torch", seq_len=16, samples=64)
    one = predict_peak_memory(config, 16, 1, dtype="fp32", engine="torch")["total"]
    four = predict_peak_memory(config, 16, 4, dtype="fp32", engine="torch")["total"]
    five = predict_peak_memory(config, 16, 5, dtype="fp32", engine="torch")["total"]
    assert one < four < five
    batch, note = batch_size_for_memory(config, PruneConfig(width=96), budget=f"{(four + five) // 2}", **kw)
    assert batch == 4 and note["predicted_peak_bytes"] == four and note["budget_bytes"] == (four + five) // 2
    assert batch_size_for_memory(config, PruneConfig(width=96), budget="1TiB", **dict(kw, samples=6))[0] == 6
    assert batch_size_for_memory(config, PruneConfig(width=96), budget="1TiB", **dict(kw, engine="reference"))[0] == 1
    # at 8B in 18 GiB (the memory model's own figures): offloading the layer inputs fits a larger batch
    from sdmprune.memory import BUILTIN_SHAPES, largest_batch

    big = BUILTIN_SHAPES["llama-3.1-8b"]
    resident = batch_size_for_memory(big, PruneConfig(ratio=0.2), "fused", 1024, "18GiB", 1024)[0]
    offloaded = batch_size_for_memory(big, PruneConfig(ratio=0.2, offload_activations=True), "fused", 1024, "18GiB",
                                      1024)[0]
    assert resident == largest_batch(big, 1024, 18 * GiB, max_batch=1024, engine="fused") >= 1
    assert offloaded > resident

    out = tmp_path / "o"
    # the run's own method: taylor holds no teacher states
    one, two = (predict_peak_memory(config, 16, b, dtype="fp32", engine="torch", method="taylor")["total"] for b in (1, 2))
    assert one < predict_peak_memory(config, 16, 1, dtype="fp32", engine="torch")["total"]
    budget = f"{(one + two) // 2 / GiB:.6f}GiB"
    code, cap = run_cli(["prune", files / "tiny", "--out", out, "--width", 96, "--method", "taylor", "--samples", 3,
                         "--seq-len", 16, "--engine", "torch", "--device", "cpu", "--max-memory", budget,
                         "--no-progress"], capsys)
    assert code == 0, cap.err
    report = json.loads((out / "sdmprune.json").read_text())
    assert report["config"]["batch_size"] == 1 and report["batch_size_from_max_memory"]["batch_size"] == 1
    assert "batch size 1: the largest predicted to fit" in cap.err


def test_existing_output_needs_overwrite(files, tmp_path, capsys):
    out = tmp_path / "exists"
    argv = ["prune", files / "tiny", "--out", out, "--width", 100, "--method", "random", "--no-progress"]
    code, cap = run_cli(argv, capsys)
    assert code == 0, cap.err
    code, cap = run_cli(argv, capsys)
    assert code == 2 and "use --overwrite" in cap.err
    assert run_cli(argv + ["--overwrite"], capsys)[0] == 0


def test_prune_with_one_copy_recovery(files, tmp_path, capsys, monkeypatch):
    """--recover-steps: LoRA recovery of the masked model on the calibration windows, merged, then sliced;
    the output is a plain HF model whose weights moved away from the unrecovered prune's."""
    import sdmprune.recovery.trainer as trainer
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(trainer, "LOSS_BACKEND", "torch")
    common = ["prune", files / "tiny", "--ratio", 0.2, "--calib", files / "calib.txt", "--samples", 2,
              "--seq-len", 16, "--engine", "torch", "--no-progress"]
    code, cap = run_cli(common + ["--out", tmp_path / "plain"], capsys)
    assert code == 0, cap.err
    code, cap = run_cli(common + ["--out", tmp_path / "rec", "--recover-steps", 2, "--recover-lr", 1e-2], capsys)
    assert code == 0, cap.err
    plain = json.loads((tmp_path / "plain" / "sdmprune.json").read_text())
    rec = json.loads((tmp_path / "rec" / "sdmprune.json").read_text())
    assert rec["kept_indices"] == plain["kept_indices"]  # recovery comes after selection
    assert rec["stats"]["recover"]["steps"] == 2 and rec["stats"]["recover"]["base_storage_unchanged"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "rec")
    assert b.config.intermediate_size == a.config.intermediate_size
    moved = (a.model.layers[0].mlp.down_proj.weight - b.model.layers[0].mlp.down_proj.weight).abs().max()
    assert moved > 0
