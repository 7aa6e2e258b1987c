"""Ratio -> width arithmetic, calibration/eval data sources, distributed helpers, perplexity."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_byte_tokenizer, tiny_model
from sdmprune.scale import distributed as dist
from sdmprune.data import calibration_windows, eval_token_stream, resolve_source, sample_from_model
from sdmprune.errors import InputError
from sdmprune.evaluate import evaluate_perplexity
from sdmprune.models import count_parameters
from sdmprune.models import meta_model_from_config
from sdmprune.widths import plan_width, width_for_ratio


# ----------------------------------------------------------------------------------------- plan
def llama32_1b_meta():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                               tie_word_embeddings=True)
    return meta_model_from_config(cfg)


def test_llama32_1b_widths_from_config_only():
    model = llama32_1b_meta()
    assert count_parameters(model) == 1_235_814_400
    for ratio, width in ((0.2, 5678), (0.3, 4421), (0.4, 3163)):
        plan = plan_width(model, ratio=ratio)
        assert plan.width == width
        assert plan.params_after == plan.params_before - (8192 - width) * 3 * 2048 * 16
        assert abs(plan.achieved_ratio - ratio) < 98304 / 1_235_814_400  # within one channel per layer
        assert width_for_ratio(ratio, total_params=1_235_814_400, hidden_size=2048, num_layers=16,
                               intermediate_size=8192) == width


def test_plan_rounding_and_bounds():
    model = llama32_1b_meta()
    plan = plan_width(model, ratio=0.2, round_to=128)
    assert plan.width == 5632 and plan.rounding == {"multiple": 128, "width_before": 5678, "width_after": 5632,
                                                     "extra_channels_removed_per_layer": 46}
    assert plan_width(model, width=7987).width == 7987
    top = 8191 * 3 * 2048 * 16 / 1_235_814_400
    assert plan_width(model, ratio=top).width == 1
    for bad in (dict(ratio=0.0), dict(ratio=-0.1), dict(ratio=top + 1e-3), dict(ratio=0.9), dict(width=0),
                dict(width=8193), dict(ratio=0.2, width=10), dict(), dict(ratio=1e-9)):
        with pytest.raises(InputError):
            plan_width(model, **bad)


def test_plan_counts_mlp_biases():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=300, mlp_bias=True)
    model = meta_model_from_config(cfg)
    plan = plan_width(model, width=100)
    assert plan.params_per_channel == 3 * 64 + 2
    assert plan.params_before - plan.params_after == 60 * (3 * 64 + 2) * 2


# ------------------------------------------------------------------------------- distributed
def test_distributed_single_process():
    assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_main_process()
    assert dist.shard_indices(5) == [0, 1, 2, 3, 4]
    scores = {0: torch.ones(3, dtype=torch.bfloat16), 1: torch.arange(2.0)}
    out = dist.all_reduce_scores_(scores)
    assert out is scores and out[0].dtype == torch.float32 and torch.equal(out[1], torch.arange(2.0))


def test_shard_indices_disjoint(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    shards = []
    for r in range(3):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        shards.append(dist.shard_indices(7))
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(InputError):
        dist.shard_indices(2)


# -------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def byte_tokenizer():
    return make_byte_tokenizer()


def test_text_windows_seeded(tmp_path, byte_tokenizer):
    path = tmp_path / "a.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    a, desc = calibration_windows(str(path), byte_tokenizer, 5, 32, seed=3)
    b, _ = calibration_windows(str(path), byte_tokenizer, 5, 32, seed=3)
    c, _ = calibration_windows(str(path), byte_tokenizer, 5, 32, seed=4)
    assert a.shape == (5, 32) and a.dtype == torch.long and torch.equal(a, b) and not torch.equal(a, c)
    full = torch.tensor(byte_tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    for row in a:  # every window is a contiguous piece of the text
        starts = [i for i in range(full.numel() - 31) if torch.equal(full[i:i + 32], row)]
        assert starts
    assert "random windows" in desc["mode"]
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(InputError, match="shorter than one window"):
        calibration_windows(str(short), byte_tokenizer, 2, 32)


def test_jsonl_documents_one_window_each(tmp_path, byte_tokenizer):
    docs = [f"document {i} " + chr(65 + i) * (40 + 10 * i) for i in range(6)] + ["tiny"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    win, desc = calibration_windows(str(path), byte_tokenizer, 4, 32, seed=0)
    assert win.shape == (4, 32) and "one random window each" in desc["mode"]
    letters = [max(set(byte_tokenizer.decode(w)), key=byte_tokenizer.decode(w).count) for w in win]
    assert len(set(letters)) == 4  # four different documents
    # more samples than long documents: falls back to windows of the concatenation
    win, desc = calibration_windows(str(path), byte_tokenizer, 10, 32, seed=0)
    assert win.shape == (10, 32) and "mode_note" in desc


def test_token_file_exact(tmp_path):
    toks = torch.randint(0, 300, (6, 20))
    torch.save(toks, tmp_path / "t.pt")
    win, _ = calibration_windows(str(tmp_path / "t.pt"), None, 4, 16)
    assert torch.equal(win, toks[:4, :16])
    with pytest.raises(InputError):
        calibration_windows(str(tmp_path / "t.pt"), None, 7, 16)
    stream, _ = eval_token_stream(str(tmp_path / "t.pt"), None)
    assert torch.equal(stream, toks.reshape(-1))


def test_self_sampling_seeded():
    """generate() with plain multinomial sampling: seeded, the caller's RNG untouched, full length even
    when EOS is sampled, and nothing deprecated on the way."""
    import warnings

    model = tiny_model("llama")
    model.config.eos_token_id = 7
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        a = sample_from_model(model, None, 3, 10, seed=5, batch_size=2)
    assert torch.equal(rng, torch.get_rng_state())
    b = sample_from_model(model, None, 3, 10, seed=5, batch_size=2)
    assert a.shape == (3, 10) and torch.equal(a, b)
    assert (a[:, 0] == model.config.bos_token_id).all()
    assert not torch.equal(a, sample_from_model(model, None, 3, 10, seed=6, batch_size=2))
    # EOS does not end a row: with the EOS logit raised, EOS is sampled mid-row and the rows go on
    model.lm_head.weight.data[7] *= 40
    c = sample_from_model(model, None, 2, 12, seed=5, batch_size=2)
    assert c.shape == (2, 12) and (c[:, 1:-1] == 7).any(dim=1).all()


def test_resolve_source_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.txt"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InputError, match="no network"):
        resolve_source("c4")
    with pytest.raises(InputError, match="unknown"):
        resolve_source("some-unknown-dataset")
    assert resolve_source("self").kind == "self"


# ------------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_perplexity_fused_matches_logits(family):
    torch.manual_seed(0)
    model = tiny_model(family, vocab=257)
    stream = torch.randint(0, 257, (5 * 24 + 7,))  # a trailing partial window is dropped
    fused = evaluate_perplexity(model, stream, seq_len=24, batch_size=2)
    logits = evaluate_perplexity(model, stream, seq_len=24, batch_size=3, backend="logits")
    assert fused.backend == "fused-torch" and logits.backend == "logits"
    # float64 reference: exp(mean NLL over the 5 * 23 predicted tokens)
    with torch.no_grad():
        w = stream[:120].view(5, 24)
        z = model(input_ids=w).logits.double()
        nll = F.cross_entropy(z[:, :-1].reshape(-1, 257), w[:, 1:].reshape(-1))
    ref = math.exp(nll.item())
    assert fused.tokens == logits.tokens == 5 * 23 and fused.windows == 5
    assert abs(fused - ref) / ref < 1e-4 and abs(logits - ref) / ref < 1e-4
    assert float(evaluate_perplexity(model, stream, seq_len=24, max_windows=2)) != float(fused)
    with pytest.raises(InputError):
        evaluate_perplexity(model, stream[:10], seq_len=24)


def _gloo_worker(rank, world, path, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        scores = {0: torch.full((3,), float(rank + 1), dtype=torch.bfloat16), 2: torch.arange(2.0) * (rank + 1)}
        dist.all_reduce_scores_(scores)
        torch.save({"rank": dist.rank(), "world": dist.world_size(), "main": dist.is_main_process(),
                    "shard": dist.shard_indices(5), "scores": scores}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_distributed_helpers_under_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "r")), nprocs=2, join=True)
    got = [torch.load(f"{tmp_path / 'r'}.{r}") for r in range(2)]
    assert [g["shard"] for g in got] == [[0, 2, 4], [1, 3]]
    assert [g["main"] for g in got] == [True, False] and all(g["world"] == 2 for g in got)
    for g in got:
        assert g["scores"][0].dtype == torch.float32 and torch.equal(g["scores"][0], torch.full((3,), 3.0))
        assert torch.equal(g["scores"][2], torch.arange(2.0) * 3)
