"""HFPrune (label-free entropy Taylor at the down_proj input) through the registry: every engine keeps
the channels of a plain re-statement of the official loop (autograd hooks on down_proj, one sample
per backward, full logits), batching and checkpointing change nothing, resume equals an uninterrupted
run, and the command line runs it.

Tolerance: kept sets equal (IoU 1.0) except channels whose scores tie the k-th within 1e-4 relative.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_byte_tokenizer, tiny_model
from sdmprune.scoring import taylor
from sdmprune.cli import main
from sdmprune.kernels.utils import interpreter_enabled, triton_available
from sdmprune.models import find_gated_mlps
from sdmprune.pipeline import PruneConfig, prune_model


def official_loop_scores(model, tokens):
    """Re-statement of HFPrune's prune.py: per sample, loss = mean over positions of -sum p log p of the
    model's logits; every down_proj input H keeps its gradient; score += sum_t |H * dL/dH|."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)  # as a training script leaves them
    seen, scores = {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, i=i):
            args[0].retain_grad()
            seen[i] = args[0]
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    for s in range(tokens.shape[0]):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens[s:s + 1]).logits[0].double()
        p = F.softmax(logits, -1)
        (-(p * torch.log(p)).sum(-1).mean()).backward()
        for i, h in seen.items():
            scores[i] = scores.get(i, 0) + (h.detach().double() * h.grad.double()).abs().sum((0, 1))
    for h in hooks:
        h.remove()
    return scores


def assert_same_keep(keep, scores, width, rtol=1e-4):
    for layer, s in scores.items():
        want = set(torch.argsort(s, descending=True, stable=True)[:width].tolist())
        got = set(keep[layer].tolist())
        kth = s[list(want)].min()
        for c in want ^ got:
            assert abs(float(s[c] - kth)) <= rtol * abs(float(kth)), f"layer {layer}: channel {c} is not a tie"


def calib(n=4, L=12, seed=0):
    return torch.randint(0, 300, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("engine,batch,checkpointing", [("torch", 1, True), ("torch", 2, False), ("torch", 4, True),
                                                         ("reference", 1, True), ("fused", 2, True)])
def test_every_engine_keeps_the_official_loops_channels(engine, batch, checkpointing):
    if engine == "fused" and not (triton_available() and (interpreter_enabled() or torch.cuda.is_available())):
        pytest.skip("needs Triton (TRITON_INTERPRET=1 on the CPU)")
    x = calib()
    want = official_loop_scores(tiny_model(seed=3), x)
    cfg = PruneConfig(width=100, method="hfprune", engine=engine, batch_size=batch, progress=False,
                      gradient_checkpointing=checkpointing)
    result = prune_model(tiny_model(seed=3), x, cfg)
    assert_same_keep(result.keep, want, 100)
    for layer, s in want.items():  # the scores themselves, float32 against float64
        torch.testing.assert_close(result.scores[layer].double(), s, rtol=2e-4, atol=1e-6 * float(s.max()))
    assert result.stage1_keep is None and result.stats["method"] == "hfprune"


def test_a_logit_scale_family_uses_its_own_logits():
    from transformers import AutoConfig, AutoModelForCausalLM

    def granite():
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("granite", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, logits_scaling=8.0)
        return AutoModelForCausalLM.from_config(cfg).eval()

    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    want = official_loop_scores(granite(), x)
    result = prune_model(granite(), x, PruneConfig(width=80, method="hfprune", engine="torch", progress=False))
    assert_same_keep(result.keep, want, 80)


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    x = calib(6)
    cfg = PruneConfig(width=100, method="hfprune", engine="torch", batch_size=2, checkpoint_every=1, progress=False)
    full = prune_model(tiny_model(seed=4), x, cfg)

    def stop(stage, done):
        if done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(taylor, "_after_batch_hook", stop)
    with pytest.raises(KeyboardInterrupt):
        prune_model(tiny_model(seed=4), x, cfg, checkpoint_dir=str(tmp_path / "w"))
    monkeypatch.setattr(taylor, "_after_batch_hook", None)
    resumed = prune_model(tiny_model(seed=4), x, cfg, checkpoint_dir=str(tmp_path / "w"), resume=True)
    assert resumed.stats["resumed_from"] == {"stage": 1, "batch": 2}
    for k in full.keep:
        assert torch.equal(full.keep[k], resumed.keep[k])
        torch.testing.assert_close(full.scores[k], resumed.scores[k], rtol=1e-6, atol=0)
    # a checkpoint of another method is refused, naming it
    from sdmprune.errors import InputError

    with pytest.raises(InputError, match="--method hfprune"):
        prune_model(tiny_model(seed=4), x, cfg, checkpoint_dir=str(tmp_path / "w"), resume=True, method="taylor")


def test_command_line(tmp_path, capsys):
    model = tiny_model(seed=6)
    model.save_pretrained(tmp_path / "m")
    make_byte_tokenizer().save_pretrained(tmp_path / "m")
    code = main(["prune", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--width", "96", "--method", "hfprune",
                 "--engine", "torch", "--samples", "2", "--seq-len", "8", "--batch-size", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "sdmprune.json").read_text())
    assert report["method"] == "hfprune" and report["stats"]["method"] == "hfprune" and report["width"] == 96
    assert all(m.width == 96 for m in find_gated_mlps(__import__("transformers").AutoModelForCausalLM
                                                      .from_pretrained(tmp_path / "o")))


def test_streamed_layers_and_offloaded_activations_change_nothing():
    """--offload cpu (layers streamed through the device; here the CPU itself) and --offload-activations
    run hfprune through the same passes: the same channels and scores as the resident run."""
    x = calib()
    base = dict(width=100, method="hfprune", engine="torch", batch_size=2, progress=False)
    plain = prune_model(tiny_model(seed=5), x, PruneConfig(**base))
    streamed = prune_model(tiny_model(seed=5), x, PruneConfig(offload="cpu", offload_device="cpu", **base))
    offloaded = prune_model(tiny_model(seed=5), x, PruneConfig(offload_activations=True, **base))
    for other in (streamed, offloaded):
        for k in plain.keep:
            assert torch.equal(plain.keep[k], other.keep[k])
            torch.testing.assert_close(plain.scores[k], other.scores[k], rtol=1e-6, atol=0)
