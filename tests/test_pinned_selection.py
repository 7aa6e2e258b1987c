"""The kept channels of every built-in method on the test models, pinned.

``tests/data/pinned_selection.json`` was written by ``python tests/test_pinned_selection.py --write``
from the code before the orchestration layer was rebuilt around the method registry; a rebuild must
keep the same selections. Kept sets must be equal, except channels whose pinned score ties the k-th
kept score within 1e-4 relative (float sums on another CPU may order a tie differently).
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_model  # noqa: E402

PINNED = os.path.join(os.path.dirname(__file__), "data", "pinned_selection.json")
# (case name, model family, tie embeddings, method, engine)
CASES = [
    ("sdmprune-torch-llama", "llama", False, "sdmprune", "torch"),
    ("sdmprune-reference-llama", "llama", False, "sdmprune", "reference"),
    ("sdmprune-torch-qwen2-tied", "qwen2", True, "sdmprune", "torch"),
    ("taylor-torch-llama", "llama", False, "taylor", "torch"),
    ("taylor-reference-qwen2-tied", "qwen2", True, "taylor", "reference"),
    ("wanda-sp-llama", "llama", False, "wanda-sp", "auto"),
    ("magnitude-llama", "llama", False, "magnitude", "auto"),
    ("random-llama", "llama", False, "random", "auto"),
]


def select(family, tie, method, engine):
    from sdmprune.pipeline import PruneConfig, prune_model

    model = tiny_model(family, seed=5, tie=tie)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 300, (4, 16), generator=g)
    cfg = PruneConfig(width=96, method=method, engine=engine, stage1_keep=0.9, batch_size=2, seed=3,
                      progress=False)
    result = prune_model(model, tokens, cfg)
    return {str(k): v.tolist() for k, v in result.keep.items()}, {str(k): v.tolist() for k, v in result.scores.items()}


@pytest.mark.parametrize("name,family,tie,method,engine", CASES, ids=[c[0] for c in CASES])
def test_selection_is_pinned(name, family, tie, method, engine):
    with open(PINNED) as fh:
        pinned = json.load(fh)[name]
    keep, _ = select(family, tie, method, engine)
    assert set(keep) == set(pinned["keep"])
    for layer, kept in pinned["keep"].items():
        a, b = set(kept), set(keep[layer])
        scores = pinned["scores"][layer]
        kth = min(scores[c] for c in kept)
        for c in a ^ b:
            assert abs(scores[c] - kth) <= 1e-4 * abs(kth), f"{name} layer {layer}: channel {c} is not a float tie"


@pytest.mark.parametrize("name,family,tie,method,engine", [c for c in CASES if "reference" not in c[0]],
                         ids=[c[0] for c in CASES if "reference" not in c[0]])
def test_score_channels_chooses_the_pinned_channels_and_leaves_the_weights(name, family, tie, method, engine):
    """score_channels keeps what prune_model keeps (the pins) and hands the model back untouched."""
    from sdmprune.pipeline import PruneConfig, score_channels

    model = tiny_model(family, seed=5, tie=tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    tokens = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(7))
    result = score_channels(model, tokens, PruneConfig(width=96, method=method, engine=engine, stage1_keep=0.9,
                                                       batch_size=2, seed=3, progress=False))
    with open(PINNED) as fh:
        pinned = json.load(fh)[name]
    assert {str(k) for k in result.keep} == set(pinned["keep"])
    for layer, kept in pinned["keep"].items():
        scores = pinned["scores"][layer]
        kth = min(scores[c] for c in kept)
        for c in set(kept) ^ set(result.keep[int(layer)].tolist()):
            assert abs(scores[c] - kth) <= 1e-4 * abs(kth)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert result.stats["params_after"] == result.stats["params_before"]
    assert all(int(v.numel()) == 96 for v in result.keep.values())


if __name__ == "__main__" and "--write" in sys.argv:
    out = {}
    for name, family, tie, method, engine in CASES:
        keep, scores = select(family, tie, method, engine)
        scores = {k: [s if s != float("-inf") else -1e30 for s in v] for k, v in scores.items()}
        out[name] = {"keep": keep, "scores": scores}
    with open(PINNED, "w") as fh:
        json.dump(out, fh)
    print("wrote", PINNED)
