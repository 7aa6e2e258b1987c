"""Slicing pruned channels in place and saving a model that plain from_pretrained loads.

Tolerance: none. Slicing moves weights bit for bit, so the pruned model, a copy sliced with
index_select and the reloaded model run the same float32 math on the same weights: logits are
compared with torch.equal.
"""
import copy
import json
import os

import pytest
import torch
from torch import nn

from conftest import tiny_config, tiny_model
from sdmprune.errors import InputError
from sdmprune.models import count_parameters, find_gated_mlps
from sdmprune.storage.paths import MANIFEST, atomic_output_dir, is_package_output, write_json_atomic
from sdmprune.storage.save import load_pruned, save_pruned
from sdmprune.slicing import prune_mlp_, prune_model_, reclaim_memory

WIDTH = 160


def random_keep(n_layers, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {i: torch.randperm(WIDTH, generator=gen)[:k] for i in range(n_layers)}


def slice_with_index_select(model, keep):
    """The reference: a copy whose MLP Linear weights are replaced by index_select results."""
    ref = copy.deepcopy(model)
    for g in find_gated_mlps(ref):
        idx = keep[g.index].sort().values
        for lin in (g.gate, g.up):
            lin.weight = nn.Parameter(lin.weight.data.index_select(0, idx))
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.data.index_select(0, idx))
            lin.out_features = idx.numel()
        g.down.weight = nn.Parameter(g.down.weight.data.index_select(1, idx))
        g.down.in_features = idx.numel()
    return ref


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("reclaim", ["none", "resize"])
def test_prune_save_reload_matches(tmp_path, tie, reclaim):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_model("llama", seed=1, tie=tie)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(5))
    keep = random_keep(2, 97)
    ref = slice_with_index_select(model, keep)
    n_before = count_parameters(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}

    widths = prune_model_(model, keep, reclaim=reclaim)

    assert widths == {0: 97, 1: 97} and model.config.intermediate_size == 97
    assert count_parameters(model) == n_before - 2 * 3 * 64 * (WIDTH - 97)
    if reclaim == "none":  # sliced inside the same storages
        assert all(p.data_ptr() == ptrs[n] for n, p in model.named_parameters())
    else:
        for p in model.parameters():
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    y = logits(model, ids)
    assert torch.equal(y, logits(ref, ids))

    out = tmp_path / "pruned"
    report = {"widths": widths, "scores": torch.tensor([1.5, 2.0]), "nan": float("nan")}
    save_pruned(model, tiny_tokenizer(), out, report)
    assert {"config.json", "model.safetensors", "sdmprune.json", "tokenizer.json"} <= set(os.listdir(out))
    saved = json.loads((out / "sdmprune.json").read_text())
    assert saved == {"widths": {"0": 97, "1": 97}, "scores": [1.5, 2.0], "nan": "NaN"}
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.intermediate_size == 97
    assert torch.equal(logits(reloaded, ids), y)
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [1, 2]
    # Nothing left beside the output directory.
    assert sorted(os.listdir(tmp_path)) == ["pruned"]


def test_mlp_bias_and_prune_mlp_module(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.mlp_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for g in find_gated_mlps(model):  # random (non-zero) biases so slicing them matters
        for lin in (g.gate, g.up, g.down):
            nn.init.normal_(lin.bias)
    keep = random_keep(2, 50, seed=3)
    ref = slice_with_index_select(model, keep)
    for g in find_gated_mlps(model):  # the nn.Module form of prune_mlp_, unsorted keep
        assert prune_mlp_(g.module, keep[g.index]) == 50
    model.config.intermediate_size = 50
    ids = torch.randint(0, 300, (1, 7))
    assert torch.equal(logits(model, ids), logits(ref, ids))
    save_pruned(model, None, tmp_path / "m", {})
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), ids), logits(ref, ids))


def test_nonuniform_widths(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", seed=2, layers=3)
    keep = {0: torch.arange(0, 160, 2), 1: torch.arange(100), 2: torch.tensor([5, 7, 150])}
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(InputError, match="non-uniform MLP widths"):
        prune_model_(model, keep)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # untouched

    ref = slice_with_index_select(model, keep)
    assert prune_model_(model, keep, allow_nonuniform=True) == {0: 80, 1: 100, 2: 3}
    assert model.config.sdmprune_intermediate_sizes == [80, 100, 3] and model.config.intermediate_size == 100
    ids = torch.randint(0, 300, (2, 9))
    y = logits(model, ids)
    assert torch.equal(y, logits(ref, ids))
    save_pruned(model, None, tmp_path / "m", {"note": "nonuniform"})
    with pytest.raises(Exception, match="mismatch"):  # plain loading fails loudly, never silently
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    loaded = load_pruned(tmp_path / "m")
    assert torch.equal(logits(loaded, ids), y)


def test_bad_keep_raises_and_leaves_model_untouched():
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    for keep, msg in [({0: [1, 1, 2], 1: [1, 2, 3]}, "duplicate channel 1"),
                      ({0: [0, 160], 1: [1, 2]}, "outside"),
                      ({0: [], 1: []}, "empty"),
                      ({0: [1.0], 1: [1]}, "integer"),
                      ({5: [1]}, "do not exist")]:
        with pytest.raises(InputError, match=msg):
            prune_model_(model, keep)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(InputError, match="reclaim"):
        prune_model_(model, {0: [1], 1: [1]}, reclaim="later")


def test_reclaim_memory_after_slicing():
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (1, 5))
    prune_model_(model, random_keep(2, 40))
    y = logits(model, ids)
    freed = reclaim_memory(model)
    assert freed == 2 * 3 * 64 * (WIDTH - 40) * 4
    assert torch.equal(logits(model, ids), y)


def test_save_replaces_only_an_earlier_output(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for overwrite in (False, True):  # a folder of the user's is never replaced
        with pytest.raises(InputError, match="not written by sdmprune"):
            save_pruned(model, None, out, {}, overwrite=overwrite)
    assert os.listdir(out) == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        save_pruned(model, None, tmp_path / "file", {})
    earlier = tmp_path / "earlier"
    save_pruned(model, None, earlier, {"v": 0})
    with pytest.raises(InputError, match="--overwrite"):
        save_pruned(model, None, earlier, {"v": 1})
    save_pruned(model, None, earlier, {"v": 1}, overwrite=True)
    assert json.loads((earlier / "sdmprune.json").read_text()) == {"v": 1}
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pruned(model, None, empty, {})  # an existing empty directory is fine
    assert "config.json" in os.listdir(empty)
    with pytest.raises(InputError, match="input"):  # never over the model it was loaded from
        save_pruned(model, None, earlier, {}, overwrite=True, inputs=[earlier])
    assert sorted(os.listdir(tmp_path)) == ["earlier", "empty", "file", "out"]


def test_exception_mid_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    real = model.save_pretrained

    def failing(path, **kw):
        real(path, **kw)  # weights already written...
        raise OSError("disk full")  # ...then the save dies

    save_pruned(model, None, tmp_path / "old", {"v": "old"})
    before = sorted(os.listdir(tmp_path / "old"))
    monkeypatch.setattr(model, "save_pretrained", failing)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, tmp_path / "new", {})
    assert os.listdir(tmp_path) == ["old"]
    # An earlier output being overwritten survives a failed save unchanged.
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, tmp_path / "old", {}, overwrite=True)
    assert os.listdir(tmp_path) == ["old"] and sorted(os.listdir(tmp_path / "old")) == before
    assert json.loads((tmp_path / "old" / "sdmprune.json").read_text()) == {"v": "old"}


def test_atomic_output_dir_and_write_json_atomic(tmp_path):
    with atomic_output_dir(tmp_path / "a" / "b") as tmp:
        assert tmp.parent == tmp_path / "a" and not (tmp_path / "a" / "b").exists()
        write_json_atomic(tmp / "r.json", {"x": torch.tensor(3), "inf": float("inf"), "p": tmp_path})
    data = json.loads((tmp_path / "a" / "b" / "r.json").read_text())
    assert data == {"x": 3, "inf": "Infinity", "p": str(tmp_path)}
    listed = json.loads((tmp_path / "a" / "b" / MANIFEST).read_text())
    assert list(listed) == ["r.json"] and listed["r.json"]["bytes"] == (tmp_path / "a" / "b" / "r.json").stat().st_size
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "bad.json", {"o": object()})
    assert not (tmp_path / "bad.json").exists() and os.listdir(tmp_path) == ["a"]
    assert is_package_output(tmp_path / "a" / "b") and not is_package_output(tmp_path / "a")


def test_the_output_carries_a_model_card(tmp_path):
    """README.md in the model-card format: front matter, parameter counts, widths, the run's perplexity
    and how to load it; listed in the manifest like every other file."""
    model = tiny_model("llama")
    report = {"model": "org/base-model", "method": "hfprune", "config": {"alpha": 0.4, "seed": 3},
              "plan": {"params_before": 1000, "params_after": 800, "original_width": 160, "width": 120,
                       "achieved_ratio": 0.2, "requested_ratio": 0.2, "rounding": None},
              "eval": {"data": {"source": "wiki.test.raw"}, "before": {"perplexity": 10.0},
                       "after": {"perplexity": 12.5, "windows": 4, "seq_len": 64}}}
    out = save_pruned(model, None, tmp_path / "card", report)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "base_model: org/base-model" in card
    assert "- hfprune" in card and "| parameters | 1,000 | 800 |" in card and "| MLP width | 160 | 120 |" in card
    assert "10.000 before pruning, 12.500 after" in card and 'from_pretrained("card")' in card
    assert "README.md" in json.loads((out / MANIFEST).read_text())
