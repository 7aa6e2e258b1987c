"""prune_model: every method end to end, engines agree, batching keeps the per-sample abs, resume."""
import pytest
import torch

from conftest import tiny_model
from sdmprune import pipeline
from sdmprune.scoring import passes
from sdmprune.scoring import taylor
from sdmprune.errors import InputError
from sdmprune.kernels.utils import interpreter_enabled, triton_available
from sdmprune.models import find_gated_mlps
from sdmprune.scoring.selection import top_channels
from sdmprune.pipeline import PruneConfig, prune_model


def calib(n=4, L=16, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, L), generator=g)


def assert_same_selection(keep_a, keep_b, scores, rtol=1e-4):
    """Equal kept sets, except channels whose score ties the k-th score within rtol (float ties)."""
    for layer in keep_a:
        a, b = set(keep_a[layer].tolist()), set(keep_b[layer].tolist())
        if a == b:
            continue
        s = scores[layer]
        kth = s[keep_a[layer]].min()
        for c in a ^ b:
            assert abs(s[c] - kth) <= rtol * abs(kth), f"layer {layer}: channel {c} differs beyond a float tie"


def masked_logits(model, keep, x):
    """Logits of the unpruned model with every MLP channel outside ``keep`` zeroed in H."""
    hooks = []
    for m in find_gated_mlps(model):
        mask = torch.zeros(m.width)
        mask[keep[m.index]] = 1

        def hook(module, args, mask=mask):
            return (args[0] * mask,)
        hooks.append(m.down.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids=x).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("method", ["sdmprune", "taylor", "magnitude", "random", "wanda-sp"])
def test_every_method_end_to_end(family, method):
    model = tiny_model(family, seed=1)
    original = tiny_model(family, seed=1)
    x = calib(3, 12)
    result = prune_model(model, x, PruneConfig(ratio=0.25, method=method, batch_size=2, progress=False))
    plan = result.plan
    assert 1 <= plan.width < 160
    assert model.config.intermediate_size == plan.width
    assert all(m.width == plan.width for m in find_gated_mlps(model))
    assert result.stats["params_after"] == plan.params_after
    assert abs(plan.achieved_ratio - 0.25) <= plan.params_per_channel * plan.num_layers / plan.params_before
    for layer, k in result.keep.items():
        assert k.numel() == plan.width and torch.equal(k, k.sort().values) and k.unique().numel() == k.numel()
        # the selection is the top of the scores that were ranked
        assert torch.equal(k, top_channels(result.scores[layer], plan.width))
    if method == "sdmprune":
        for layer, k in result.keep.items():
            assert set(k.tolist()) <= set(result.stage1_keep[layer].tolist())
            assert result.stage1_keep[layer].numel() == int(0.975 * 160)
            assert torch.isinf(result.scores[layer]).sum() == 160 - int(0.975 * 160)
    # the pruned model computes exactly what the original computes with the other channels masked
    torch.testing.assert_close(model(input_ids=x).logits, masked_logits(original, result.keep, x),
                               rtol=1e-5, atol=1e-5)
    for key in ("time_s", "tokens_per_s", "peak_memory_bytes", "params_before"):
        assert key in result.stats
    assert model.training is False


def test_baseline_scores_match_their_definitions():
    model = tiny_model("llama", seed=2)
    mlps = find_gated_mlps(model)
    x = calib(3, 10)
    want_mag = {m.index: m.gate.weight.norm(dim=1) + m.up.weight.norm(dim=1) + m.down.weight.norm(dim=0) for m in mlps}
    sq = {m.index: torch.zeros(m.width, dtype=torch.float64) for m in mlps}

    def record(mod, args, i):
        sq[i].add_(args[0].double().reshape(-1, args[0].shape[-1]).pow(2).sum(0))

    hooks = [m.down.register_forward_pre_hook(lambda mod, a, i=m.index: record(mod, a, i)) for m in mlps]
    with torch.no_grad():
        model(input_ids=x)
    for h in hooks:
        h.remove()
    want_wanda = {m.index: (m.down.weight.double().abs().sum(0) * sq[m.index].sqrt()).float() for m in mlps}
    mag = prune_model(tiny_model("llama", seed=2), None, PruneConfig(width=50, method="magnitude", progress=False))
    wanda = prune_model(tiny_model("llama", seed=2), x, PruneConfig(width=50, method="wanda-sp", batch_size=2,
                                                                    progress=False))
    r1 = prune_model(tiny_model("llama", seed=2), None, PruneConfig(width=50, method="random", seed=7, progress=False))
    r2 = prune_model(tiny_model("llama", seed=2), None, PruneConfig(width=50, method="random", seed=7, progress=False))
    r3 = prune_model(tiny_model("llama", seed=2), None, PruneConfig(width=50, method="random", seed=8, progress=False))
    for i in want_mag:
        torch.testing.assert_close(mag.scores[i], want_mag[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(wanda.scores[i], want_wanda[i], rtol=1e-4, atol=1e-6)
        assert torch.equal(r1.keep[i], r2.keep[i]) and not torch.equal(r1.keep[i], r3.keep[i])


@pytest.mark.parametrize("method", ["sdmprune", "taylor"])
@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True)])
def test_torch_and_reference_engines_agree(method, family, tie):
    x = calib(3, 12)
    cfg = PruneConfig(width=90, method=method, stage1_keep=0.8, alpha=0.4, temperature=0.5, progress=False)
    lean_model = tiny_model(family, seed=3, tie=tie)
    ref_model = tiny_model(family, seed=3, tie=tie)
    original = tiny_model(family, seed=3, tie=tie)
    lean = prune_model(lean_model, x, cfg, engine="torch", batch_size=2)
    ref = prune_model(ref_model, x, cfg, engine="reference")
    assert lean.stats["engine"] == "torch" and ref.stats["engine"] == "reference"
    for layer in lean.keep:
        torch.testing.assert_close(lean.stage1_scores[layer], ref.stage1_scores[layer], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(lean.scores[layer], ref.scores[layer], rtol=1e-4, atol=1e-9)
        assert lean.scores[layer].abs().max() > 0
    if method == "sdmprune":
        assert_same_selection(lean.stage1_keep, ref.stage1_keep, lean.stage1_scores)
    assert_same_selection(lean.keep, ref.keep, lean.scores)
    # the reference path slices in two steps: its result is still addressed in original indices
    torch.testing.assert_close(ref_model(input_ids=x).logits, masked_logits(original, ref.keep, x),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_model(input_ids=x).logits, lean_model(input_ids=x).logits,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not triton_available() or not (interpreter_enabled() or torch.cuda.is_available()),
                    reason="the fused engine needs CUDA or TRITON_INTERPRET=1")
def test_fused_engine_agrees_with_torch():
    # tiny: the Triton interpreter is slow on CPU
    kw = dict(layers=1, hidden=32, width=48, vocab=96, heads=2, kv_heads=1)
    x = calib(2, 8, vocab=96)
    cfg = PruneConfig(width=30, stage1_keep=0.8, batch_size=2, progress=False)
    # the kernels run on CUDA tensors, or on CPU tensors under the interpreter (float32 both: IEEE dots)
    dev = "cpu" if interpreter_enabled() else "cuda"
    fused = prune_model(tiny_model("llama", seed=4, **kw).to(dev), x, cfg, engine="fused")
    lean = prune_model(tiny_model("llama", seed=4, **kw).to(dev), x, cfg, engine="torch")
    assert fused.stats["backend"] == "triton" and lean.stats["backend"] == "torch"
    for layer in fused.keep:
        torch.testing.assert_close(fused.stage1_scores[layer], lean.stage1_scores[layer], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(fused.scores[layer], lean.scores[layer], rtol=1e-4, atol=1e-9)
    assert_same_selection(fused.keep, lean.keep, lean.scores)


def test_batching_keeps_the_per_sample_abs():
    x = calib(4, 12)
    cfg = PruneConfig(width=100, stage1_keep=0.9, engine="torch", progress=False)
    one = prune_model(tiny_model("llama", seed=5), x, cfg, batch_size=1)
    four = prune_model(tiny_model("llama", seed=5), x, cfg, batch_size=4)
    three = prune_model(tiny_model("llama", seed=5), x, cfg, batch_size=3, gradient_checkpointing=False)
    for layer in one.keep:
        torch.testing.assert_close(one.scores[layer], four.scores[layer], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(one.scores[layer], three.scores[layer], rtol=1e-5, atol=1e-9)
    # and equal the sum of one-sample runs (abs per sample, then summed)
    parts = [prune_model(tiny_model("llama", seed=5), x[i:i + 1], PruneConfig(width=100, method="taylor",
             engine="torch", progress=False)) for i in range(2)]
    two = prune_model(tiny_model("llama", seed=5), x[:2], PruneConfig(width=100, method="taylor", engine="torch",
                      batch_size=2, progress=False))
    for layer in two.keep:
        torch.testing.assert_close(two.scores[layer], parts[0].scores[layer] + parts[1].scores[layer],
                                   rtol=1e-5, atol=1e-9)


def test_checkpoint_recompute_skips_the_mlp(monkeypatch):
    """With checkpointing on (the default), the recompute of a LLaMA layer runs no MLP math and the
    scores equal those of a run without checkpointing."""
    from sdmprune.kernels import gated_mlp

    phases = []
    real = gated_mlp.apply_activation
    monkeypatch.setattr(gated_mlp, "apply_activation",
                        lambda *a: phases.append((getattr(gated_mlp._mode, "value", None) or ("none",))[0]) or real(*a))
    x = calib(4, 12)
    cfg = PruneConfig(width=100, stage1_keep=0.9, engine="torch", batch_size=2, progress=False)
    ckpt = prune_model(tiny_model("llama", seed=6), x, cfg)
    assert "forward" in phases and "recompute" not in phases
    phases.clear()
    plain = prune_model(tiny_model("llama", seed=6), x, cfg, gradient_checkpointing=False)
    assert "forward" not in phases
    for layer in ckpt.keep:
        torch.testing.assert_close(ckpt.stage1_scores[layer], plain.stage1_scores[layer], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(ckpt.scores[layer], plain.scores[layer], rtol=1e-5, atol=1e-9)


def test_gradient_pass_runs_the_fused_norms_and_restores_them(monkeypatch):
    """Inside the importance passes every RMSNorm runs kernels.rms_norm; afterwards the model's own
    forwards are back."""
    model = tiny_model("llama", seed=7)
    seen = []

    def during(stage_no, done):
        seen.append([type(m).__name__ for m in model.modules() if "forward" in m.__dict__ and "Norm" in type(m).__name__])

    monkeypatch.setattr(taylor, "_after_batch_hook", during)
    prune_model(model, calib(2, 10), PruneConfig(width=100, stage1_keep=0.9, engine="torch", batch_size=2,
                                                 progress=False))
    assert len(seen) == 2 and all(s == ["LlamaRMSNorm"] * 5 for s in seen)  # 2 layers x 2 + the final norm
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_stage_timer_waits_for_the_device(monkeypatch):
    """The fused loop never waits on the GPU: a stage's time is read after a device synchronize."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    t = passes.seconds_since(0.0, torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)] and t > 0
    passes.seconds_since(0.0, torch.device("cpu"))
    assert len(calls) == 1


def test_round_to_and_stage1_width_floor():
    x = calib(2, 10)
    r = prune_model(tiny_model("llama"), x, PruneConfig(ratio=0.2, round_to=16, engine="torch", progress=False))
    assert r.width % 16 == 0 and r.plan.rounding["width_before"] >= r.width
    # stage1_keep below the target width would leave stage 2 nothing to choose: refused before any pass
    with pytest.raises(InputError, match="--stage1-keep 0.5 keeps 80 of 160 channels.*at least 0.938"):
        prune_model(tiny_model("llama"), x, PruneConfig(width=150, stage1_keep=0.5, engine="torch", progress=False))
    r = prune_model(tiny_model("llama"), x, PruneConfig(width=150, stage1_keep=0.938, engine="torch", progress=False))
    assert r.stage1_keep[0].numel() == 150 and r.width == 150


@pytest.mark.parametrize("stop_at", [(1, 2), (2, 1)])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, stop_at):
    x = calib(5, 10)
    cfg = PruneConfig(width=80, stage1_keep=0.85, batch_size=2, engine="torch", checkpoint_every=1, progress=False)
    full = prune_model(tiny_model("llama", seed=6), x, cfg)

    class Stop(Exception):
        pass

    def hook(stage, done):
        if (stage, done) == stop_at:
            raise Stop

    monkeypatch.setattr(taylor, "_after_batch_hook", hook)
    model = tiny_model("llama", seed=6)
    with pytest.raises(Stop):
        prune_model(model, x, cfg, checkpoint_dir=str(tmp_path / "ck"))
    monkeypatch.setattr(taylor, "_after_batch_hook", None)
    assert all(m.width == 160 for m in find_gated_mlps(model))  # nothing sliced on interruption
    resumed = prune_model(model, x, cfg, checkpoint_dir=str(tmp_path / "ck"), resume=True)
    assert resumed.stats["resumed_from"] == {"stage": stop_at[0], "batch": stop_at[1]}
    for layer in full.keep:
        assert torch.equal(full.keep[layer], resumed.keep[layer])
        assert torch.equal(full.stage1_keep[layer], resumed.stage1_keep[layer])
        assert torch.equal(full.scores[layer], resumed.scores[layer])
        assert torch.equal(full.stage1_scores[layer], resumed.stage1_scores[layer])
    # a checkpoint of a different run is refused
    with pytest.raises(InputError, match=r"--alpha 0.4 \(now 0.3\)"):
        prune_model(tiny_model("llama", seed=6), x, cfg, checkpoint_dir=str(tmp_path / "ck"), resume=True, alpha=0.3)


def test_bad_config():
    x = calib(2, 8)
    for bad in (dict(method="obs"), dict(engine="cuda"), dict(alpha=1.5), dict(temperature=0),
                dict(stage1_keep=0), dict(batch_size=0), dict(ratio=0.2, width=10), dict(ratio=0.95)):
        kw = {"width": 100, **bad} if "ratio" not in bad and "width" not in bad else bad
        with pytest.raises(InputError):
            prune_model(tiny_model("llama"), x, PruneConfig(**kw))
    with pytest.raises(InputError):
        prune_model(tiny_model("llama"), torch.randint(300, 400, (2, 8)), PruneConfig(width=100))
    with pytest.raises(InputError):
        prune_model(tiny_model("llama"), None, PruneConfig(width=100))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_teacher_cache_pins_exactly_what_it_holds():
    """The host teacher cache is page-locked at its own size: torch's pinned allocator (which rounds
    every request up to a power of two and keeps the block cached) is not used for it."""
    from sdmprune.scoring.taylor import TeacherCache

    before = torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0)
    n, L, d = 3, 1000, 1031  # 6.2 MB of bf16: a power-of-two allocator would take 8 MiB
    cache = TeacherCache(n, L, d, torch.bfloat16, pin=True)
    assert cache.data.is_pinned() and cache.data.numel() == n * L * d
    assert torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0) == before
    h = torch.randn(2, L, d, device="cuda", dtype=torch.bfloat16)
    cache.put(0, h)
    assert torch.equal(cache.get(0, 2, "cuda"), h)
    cache.close()
