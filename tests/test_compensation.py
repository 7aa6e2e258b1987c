"""The refit of the kept down_proj columns (sdmprune.compensation) on tiny random models, float32 on the CPU.

Reference: the closed form W' = (W G[:, S] + lam W[:, S]) (G_SS + lam I)^-1 written here in float64 with
torch.linalg.solve, with G = A^T A of the full-width down_proj inputs A captured from the masked model
(for layer 1: with layer 0 already refit) over the fit windows. Tolerance: the refit is solved in float64
and stored in float32, so rtol 1e-5 / atol 1e-6 against the float64 reference.
"""
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_model
from sdmprune import pipeline
from sdmprune.compensation import STRENGTHS, refit_down_proj_, split_windows
from sdmprune.errors import InputError, SdmpruneError
from sdmprune.models import ChannelMasks, find_gated_mlps

WIDTH, KEPT = 160, 100


def calib(n=8, length=16, seed=1):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def random_keep(k=KEPT, layers=2, width=WIDTH):
    return {i: torch.randperm(width, generator=torch.Generator().manual_seed(10 + i))[:k].sort().values
            for i in range(layers)}


def down_inputs(model, tokens, keep, layer):
    """A [tokens, I] float64: the full-width down_proj input of ``layer`` in the masked model."""
    acts = []
    mlp = find_gated_mlps(model)[layer]
    handle = mlp.down.register_forward_pre_hook(
        lambda mod, args: acts.append(args[0].reshape(-1, args[0].shape[-1]).double()), prepend=True)
    try:
        with ChannelMasks(model, keep), torch.no_grad():
            model(input_ids=tokens)
    finally:
        handle.remove()
    return torch.cat(acts)


def closed_form(w, gram, kept, strength):
    """The refit in plain float64: (W G[:, S] + lam W_S) (G_SS + lam I)^-1, lam = strength * mean diag G_SS."""
    w = w.double()
    g_kept = gram[kept][:, kept]
    lam = strength * g_kept.diagonal().mean()
    system = g_kept + lam * torch.eye(len(kept), dtype=torch.float64)
    return torch.linalg.solve(system, (w @ gram[:, kept] + lam * w[:, kept]).T).T


def test_refit_equals_the_float64_closed_form():
    model, tokens, keep = tiny_model(seed=0), calib(), random_keep()
    original = {m.index: m.down.weight.detach().clone() for m in find_gated_mlps(model)}
    report = refit_down_proj_(model, tokens, keep, strength=0.1, batch_size=3, progress=False)
    fit, held = split_windows(tokens.shape[0])
    assert (report["fit_windows"], report["held_out_windows"]) == (len(fit), len(held)) == (6, 2)
    for m in find_gated_mlps(model):  # layer 1 sees layer 0's refit: the stream is the pruned model's
        a = down_inputs(model, tokens[fit], keep, m.index)
        want = closed_form(original[m.index], a.T @ a, keep[m.index], 0.1)
        got = m.down.weight.detach()
        torch.testing.assert_close(got[:, keep[m.index]].double(), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[:, keep[m.index]], original[m.index][:, keep[m.index]], atol=1e-3)
        pruned = torch.ones(WIDTH, dtype=torch.bool)
        pruned[keep[m.index]] = False
        assert torch.equal(got[:, pruned], original[m.index][:, pruned])  # the pruned columns untouched
        assert report["layers"][str(m.index)]["strength"] == "0.1"


def test_the_chosen_strength_has_the_least_held_out_error():
    """strength=None: every candidate's held-out error, computed here from the held-out activations
    themselves, matches the report, and the chosen one is the smallest (inf: the kept weights)."""
    model, tokens, keep = tiny_model(seed=0, layers=1), calib(n=12), random_keep(layers=1)
    w = find_gated_mlps(model)[0].down.weight.detach().clone()
    fit, held = split_windows(tokens.shape[0])
    a_fit = down_inputs(model, tokens[fit], keep, 0)
    a_held = down_inputs(model, tokens[held], keep, 0)
    report = refit_down_proj_(model, tokens, keep, progress=False)["layers"]["0"]
    target = a_held @ w.double().T
    errors = {}
    for s in STRENGTHS:
        refit = w[:, keep[0]].double() if math.isinf(s) else closed_form(w, a_fit.T @ a_fit, keep[0], s)
        errors[str(s)] = float(((target - a_held[:, keep[0]] @ refit.T) ** 2).sum() / (target ** 2).sum())
    assert sorted(report["candidates"]) == sorted(errors)
    for s, err in errors.items():
        assert report["candidates"][s] == pytest.approx(err, rel=1e-6)
    assert report["strength"] == min(errors, key=errors.get)
    assert report["held_out_loss"] == {"before": report["candidates"]["inf"],
                                       "after": report["candidates"][report["strength"]]}


def test_every_channel_kept_gives_the_original_weights():
    model, tokens = tiny_model(seed=0), calib()
    original = {m.index: m.down.weight.detach().clone() for m in find_gated_mlps(model)}
    keep = {i: torch.arange(WIDTH) for i in range(2)}
    report = refit_down_proj_(model, tokens, keep, progress=False)
    for m in find_gated_mlps(model):
        torch.testing.assert_close(m.down.weight.detach(), original[m.index], rtol=1e-5, atol=1e-6)
        assert report["layers"][str(m.index)]["held_out_loss"]["before"] == 0.0


def test_a_huge_strength_gives_the_sliced_weights():
    model, tokens, keep = tiny_model(seed=0), calib(), random_keep()
    original = {m.index: m.down.weight.detach().clone() for m in find_gated_mlps(model)}
    refit_down_proj_(model, tokens, keep, strength=1e12, progress=False)
    for m in find_gated_mlps(model):
        torch.testing.assert_close(m.down.weight.detach(), original[m.index], rtol=1e-6, atol=1e-7)


def test_a_non_finite_gram_is_one_error_not_a_nan_model():
    model, tokens = tiny_model(seed=0), calib()
    with torch.no_grad():
        find_gated_mlps(model)[1].up.weight[3] = float("inf")  # layer 1's activations overflow
    with pytest.raises(SdmpruneError, match="layer 1: the Gram .* is not finite"):
        pipeline.prune_model(model, tokens, method="random", width=KEPT, refit="ls", progress=False)
    assert all(torch.isfinite(m.down.weight).all() for m in find_gated_mlps(model))


def test_refit_settings_are_input_errors():
    model = tiny_model(seed=0)
    for kw, fragment in ((dict(refit="lsq"), "--refit 'lsq' is unknown"),
                         (dict(refit_strength=0.1), "--refit-strength applies to --refit ls"),
                         (dict(refit="ls", refit_strength=-1.0), "must be a positive number")):
        with pytest.raises(InputError, match=fragment):
            pipeline.prune_model(model, calib(), width=KEPT, progress=False, **kw)
    with pytest.raises(InputError, match="at least 2 calibration samples"):
        pipeline.prune_model(model, calib(n=1), method="magnitude", width=KEPT, refit="ls", progress=False)
    with pytest.raises(InputError, match="needs calibration tokens"):  # magnitude reads none, the refit does
        pipeline.prune_model(model, None, method="magnitude", width=KEPT, refit="ls", progress=False)


def test_pipeline_refits_every_method_and_score_channels_does_not():
    """A registered method gets the refit too: prune_model's model = score_channels' channels, refit by
    refit_down_proj_ with the same settings, sliced; score_channels leaves the weights untouched."""
    from sdmprune.scoring.registry import register_method, unregister_method
    from sdmprune.slicing import prune_model_

    register_method("test-first-channels", lambda model, tokens, cfg: [-torch.arange(m.width, dtype=torch.float32)
                                                                        for m in find_gated_mlps(model)])
    try:
        tokens = calib()
        model = tiny_model(seed=0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        r = pipeline.score_channels(model, tokens, method="test-first-channels", width=KEPT, refit="ls",
                                    progress=False)
        assert "refit" not in r.stats
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        refit_down_proj_(model, tokens, r.keep, progress=False)
        prune_model_(model, r.keep)
        pruned = tiny_model(seed=0)
        result = pipeline.prune_model(pruned, tokens, method="test-first-channels", width=KEPT, refit="ls",
                                      progress=False)
        assert result.stats["refit"]["refit"] == "ls" and "refit" in result.stats["time_s"]
        assert set(result.stats["refit"]["layers"]) == {"0", "1"}
        for k, v in model.state_dict().items():
            assert torch.equal(pruned.state_dict()[k], v), k
    finally:
        unregister_method("test-first-channels")


def test_the_recovery_teacher_stays_the_unpruned_model():
    """After a refit, ChannelMasks with the replaced columns: masks off = the unpruned model's logits,
    masks on = the refit pruned model's."""
    from sdmprune.compensation import kept_columns
    from sdmprune.slicing import prune_model_

    model, tokens, keep = tiny_model(seed=0), calib(), random_keep()
    with torch.no_grad():
        unpruned = model(input_ids=tokens[:2]).logits
    unrefit = kept_columns(model, keep)
    refit_down_proj_(model, tokens, keep, strength=0.1, progress=False)
    masks = ChannelMasks(model, keep, unrefit).install()
    with torch.no_grad():
        student = model(input_ids=tokens[:2]).logits
        with masks.off():
            teacher = model(input_ids=tokens[:2]).logits
    masks.remove()
    torch.testing.assert_close(teacher, unpruned, rtol=1e-5, atol=1e-5)
    prune_model_(model, keep)
    with torch.no_grad():
        torch.testing.assert_close(student, model(input_ids=tokens[:2]).logits, rtol=1e-5, atol=1e-5)


def test_recovery_after_the_refit_runs_in_the_pipeline():
    pytest.importorskip("peft")
    tokens = calib()
    r = pipeline.prune_model(tiny_model(seed=0), tokens, method="magnitude", width=KEPT, refit="ls",
                             recover_steps=1, recover_data=tokens, progress=False)
    assert r.stats["recover"]["steps"] == 1 and r.stats["refit"]["layers"]


def test_offload_gives_the_resident_result():
    """--offload cpu: the refit moves each layer to the run's device for its turn (the streamer is gone by
    then); on the CPU that is the resident computation, bit for bit."""
    tokens = calib()
    kw = dict(method="taylor", engine="torch", width=KEPT, refit="ls", batch_size=2, progress=False)
    resident, streamed = tiny_model(seed=0), tiny_model(seed=0)
    a = pipeline.prune_model(resident, tokens, **kw)
    b = pipeline.prune_model(streamed, tokens, offload="cpu", offload_device="cpu", **kw)
    assert a.stats["refit"]["layers"] == b.stats["refit"]["layers"]
    for k, v in resident.state_dict().items():
        assert torch.equal(streamed.state_dict()[k], v), k


class Stop(Exception):
    pass


def test_resume_mid_refit_equals_uninterrupted(tmp_path, monkeypatch):
    from sdmprune import compensation

    tokens = calib()
    kw = dict(method="taylor", engine="torch", width=KEPT, refit="ls", batch_size=2, progress=False)
    whole = tiny_model(seed=0)
    want = pipeline.prune_model(whole, tokens, **kw)

    real = compensation._solve_layer_

    def stop_at_layer_1(m, *args):
        if m.index == 1:
            raise Stop
        return real(m, *args)

    monkeypatch.setattr(compensation, "_solve_layer_", stop_at_layer_1)
    with pytest.raises(Stop):
        pipeline.prune_model(tiny_model(seed=0), tokens, checkpoint_dir=tmp_path / "work", **kw)
    monkeypatch.setattr(compensation, "_solve_layer_", real)
    assert (tmp_path / "work" / "sdmprune-refit-layer0-rank0.pt").exists()
    resumed = tiny_model(seed=0)
    got = pipeline.prune_model(resumed, tokens, checkpoint_dir=tmp_path / "work", resume=True, **kw)
    assert got.stats["refit"]["resumed_layers"] == 1
    assert got.stats["refit"]["layers"] == want.stats["refit"]["layers"]
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    with pytest.raises(InputError, match="--refit-strength"):  # another refit setting is another run
        pipeline.prune_model(tiny_model(seed=0), tokens, checkpoint_dir=tmp_path / "work", resume=True,
                             refit_strength=0.5, **kw)


class LiveBytes(TorchDispatchMode):
    """The peak bytes of tensor storages created inside the block and still alive (a storage counted once,
    released when its last tensor is collected)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t)
        return out

    def _track(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.seen:
            return
        nbytes = storage.nbytes()
        self.seen[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def release(key=key):
            self.live -= self.seen.pop(key, 0)

        weakref.finalize(t, release)


@pytest.mark.parametrize("kept", [256, 448])
def test_the_memory_model_predicts_the_stage(kept):
    """predict_refit_memory (CPU: float64 Grams) against the peak of the storages the stage allocates, at
    shapes where its I x I and k x k terms dominate (256 of 512 kept: forming W G[:, S] is the peak; 448:
    solving the candidates): within 5 %."""
    from sdmprune.memory import predict_refit_memory

    width, n, length = 512, 8, 16
    model = tiny_model(seed=0, width=width)
    keep = random_keep(kept, width=width)
    with LiveBytes() as live:
        refit_down_proj_(model, calib(n, length), keep, batch_size=2, progress=False)
    pred = predict_refit_memory(model.config, length, 2, width=kept, dtype="fp32", gram_bytes=8, samples=n)
    predicted = pred["total"] - pred["weights"] - pred["overhead"] + pred["host_stream"]
    assert pred["grams"] == 2 * width * width * 8
    assert predicted == pytest.approx(live.peak, rel=0.05), (live.peak, pred)


def test_plan_and_max_memory_count_the_stage(capsys):
    """`sdmprune plan --refit ls` prints the stage's terms; --max-memory refuses a budget the stage does not
    fit (the 8B shape resident: 15 GiB of weights beside the float64 solve) and accepts it under --offload."""
    from sdmprune.cli import main
    from sdmprune.memory import BUILTIN_SHAPES, GiB, batch_size_for_memory, predict_refit_memory

    s = BUILTIN_SHAPES["llama-3.1-8b"]
    assert main(["plan", "llama-3.1-8b", "--refit", "ls", "--width", "11468", "--offload", "cpu"]) == 0
    out = capsys.readouterr().out
    pred = predict_refit_memory(s, 1024, 1, width=11468, offload="cpu", samples=1024)
    assert pred["grams"] == 2 * 14336 ** 2 * 4  # two float32 I x I Grams: 0.77 GiB each
    assert "refit stage" in out and f"{pred['total'] / GiB:8.2f} GiB" in out
    assert main(["plan", "llama-3.1-8b", "--width", "100"]) == 2
    cfg = pipeline.PruneConfig(ratio=0.2, refit="ls")
    with pytest.raises(InputError, match="refit stage .* try --offload cpu"):
        batch_size_for_memory(s, cfg, "fused", 1024, "18GiB", 1024, width=11468)
    cfg.offload = "cpu"
    batch, note = batch_size_for_memory(s, cfg, "fused", 1024, "18GiB", 1024, width=11468)
    assert note["refit_predicted_peak_bytes"] <= 18 * GiB


def test_prune_command_refits_and_says_so(tmp_path, capsys):
    """`sdmprune prune --refit ls`: the report, the model card and a stderr line say what was refit;
    --refit ls with one calibration sample is one line (exit 2) before the model loads."""
    import json

    from conftest import save_byte_model
    from sdmprune.cli import main

    save_byte_model(tmp_path / "model")
    capsys.readouterr()  # the save's own progress bar
    args = ["prune", str(tmp_path / "model"), "--width", "100", "--method", "magnitude", "--calib", "self",
            "--seq-len", "16", "--no-progress", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "one"), "--refit", "ls", "--samples", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "at least 2 calibration samples" in lines[0], lines
    assert main(args + ["--out", str(tmp_path / "out"), "--refit", "ls", "--samples", "4"]) == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "sdmprune.json").read_text())
    refit = report["stats"]["refit"]
    assert refit["strength"] == "chosen per layer on the held-out windows" and set(refit["layers"]) == {"0", "1"}
    assert "refit: down_proj kept columns" in err
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**Refit:**" in card and f"{refit['held_out_loss']['after']:.4f} after" in card
