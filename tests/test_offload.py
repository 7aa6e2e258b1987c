"""Layer streaming (--offload cpu): weights are really released and reloaded, scores equal the
resident run (float32: the same ops on the same values, so rtol 1e-6), with and without gradient
checkpointing; bad input is one InputError."""
import pytest
import torch

from conftest import cuda, tiny_model
from sdmprune.errors import InputError
from sdmprune.scoring.importance import TaylorImportance
from sdmprune.models import get_adapter, set_activation_checkpointing
from sdmprune.scale.offload import LayerStreamer, check_offload


def ce_scores(model, x, checkpointing, streamer=None, device="cpu"):
    """Stage-1 style CE Taylor scores {layer: float32 [I]} of ``model`` on tokens x [B, L]."""
    adapter = get_adapter(model)
    body, head = adapter.body(model), adapter.lm_head(model)
    if checkpointing:
        set_activation_checkpointing(model, True)
    model.train()
    with TaylorImportance(model, backend="torch") as imp:
        h = body(input_ids=x.to(device), use_cache=False).last_hidden_state
        if streamer is not None:  # after forward only the last layer (backward starts there) is resident
            assert [streamer.is_resident(i) for i in range(streamer.n)] == [False] * (streamer.n - 1) + [True]
        logits = head(h).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1).to(device), reduction="sum")
        loss.backward()
        scores = {k: v.detach().cpu().clone() for k, v in imp.scores().items()}
    if checkpointing:
        set_activation_checkpointing(model, False)
    return scores, float(loss.detach())


@pytest.mark.parametrize("checkpointing", [True, False])
def test_streamed_scores_equal_resident(checkpointing):
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    ref, ref_loss = ce_scores(tiny_model(seed=3, layers=3), x, checkpointing)
    model = tiny_model(seed=3, layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    streamer = LayerStreamer(model, "cpu")
    layers = get_adapter(model).decoder_layers(model)
    # released: every layer weight is a zero-stride NaN placeholder of the right shape (never meta)
    w = layers[1].mlp.up_proj.weight
    assert w.device.type == "cpu" and w.shape == (160, 64) and w.stride() == (0, 0) and torch.isnan(w).all()
    got, loss = ce_scores(model, x, checkpointing, streamer)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for k in ref:
        assert torch.count_nonzero(ref[k]) > 0
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=0)
    # each layer copied in for forward and again for backward (the last one stays resident between)
    assert streamer.load_counts == [2, 2, 1]
    assert not any(streamer.is_resident(i) for i in range(streamer.n))
    streamer.remove()
    after = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)


def test_no_grad_forward_releases_every_layer():
    model = tiny_model(seed=0, layers=2)
    x = torch.randint(0, 300, (1, 8))
    ref = model(x).logits
    with LayerStreamer(model, "cpu") as s:
        with torch.no_grad():
            got = model(x).logits
        assert s.stats["loads"] == 2 and s.stats["releases"] == 2
        assert not s.is_resident(0) and not s.is_resident(1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_copy_pass_counts_loads():
    model = tiny_model(seed=0, layers=3)
    with LayerStreamer(model, "cpu") as s:
        s.copy_pass()
        assert s.load_counts == [2, 2, 2] and s.stats["releases"] == 6


@pytest.mark.parametrize("offload,device", [("disk", "cpu"), ("cpu", "meta"), ("cpu", "mps")])
def test_bad_offload_input(offload, device):
    with pytest.raises(InputError):
        check_offload(offload, device)


def test_unsupported_device_errors_before_touching_the_model():
    model = tiny_model(seed=0, layers=2)
    w = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(InputError):
        LayerStreamer(model, "meta")
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, w, rtol=0, atol=0)


@cuda
def test_streamed_scores_equal_resident_cuda():
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    ref, _ = ce_scores(tiny_model(seed=3, layers=4).cuda(), x, True, device="cuda")
    model = tiny_model(seed=3, layers=4)
    with LayerStreamer(model, "cuda") as s:
        got, _ = ce_scores(model, x, True, s, device="cuda")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=0)


# ------------------------------------------------------------------ through the pipeline (prune_model, CLI)
PIPE = dict(width=100, stage1_keep=0.8, engine="torch", batch_size=2, progress=False, temperature=0.5)


def test_prune_model_offload_equals_resident():
    from sdmprune.pipeline import prune_model

    x = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(2))
    resident_model = tiny_model(seed=3, layers=3)
    ref = prune_model(resident_model, x, **PIPE)
    model = tiny_model(seed=3, layers=3)
    got = prune_model(model, x, offload="cpu", offload_device="cpu", **PIPE)
    assert got.stats["offload"] == "cpu" and got.stats["device"] == "cpu"
    # both stages streamed: 2 passes x 2 batches x (forward + backward) loads per layer, minus the
    # last layer's backward load (it stays resident between forward and backward)
    assert got.stats["offload_stats"]["loads"] == 2 * 2 * (2 * 3 - 1)
    for layer in ref.keep:
        for a, b in ((got.stage1_scores, ref.stage1_scores), (got.scores, ref.scores)):
            finite = torch.isfinite(b[layer])
            assert torch.equal(finite, torch.isfinite(a[layer])) and torch.count_nonzero(b[layer][finite]) > 0
            torch.testing.assert_close(a[layer][finite], b[layer][finite], rtol=1e-6, atol=0)
        assert torch.equal(got.stage1_keep[layer], ref.stage1_keep[layer])
        assert torch.equal(got.keep[layer], ref.keep[layer])
    # the streamer is gone: plain parameters (no placeholders), sliced, computing what the resident result does
    assert all(p.device.type == "cpu" and 0 not in p.stride() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, resident_model(input_ids=x).logits, rtol=1e-6,
                                   atol=1e-6)


def test_offload_device_follows_the_asked_device(monkeypatch):
    from sdmprune.pipeline import PruneConfig, offload_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert offload_device(PruneConfig(offload="cpu", offload_device="cpu")) == torch.device("cpu")
    assert offload_device(PruneConfig(offload="cpu")).type == "cuda"  # the default: the GPU when there is one


def test_cli_offload_with_device_cpu_never_touches_cuda(tmp_path, monkeypatch, capsys):
    """--offload cpu --device cpu on a machine that (pretends to) have a GPU: the layers stream on the
    CPU and nothing asks CUDA for anything (any CUDA call would fail here: there is no driver)."""
    import json

    from sdmprune.scale import offload
    from sdmprune.cli import main

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (a CUDA call must fail to prove none was made)")
    tiny_model(seed=0, layers=2).save_pretrained(tmp_path / "model")
    torch.save(torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0)), tmp_path / "t.pt")
    devices = []
    real = offload.LayerStreamer.__init__

    def spy(self, model, device="cuda", prefetch=True):
        devices.append(str(device))
        real(self, model, device, prefetch)

    monkeypatch.setattr(offload.LayerStreamer, "__init__", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "out"
    code = main([str(a) for a in ["prune", tmp_path / "model", "--out", out, "--width", 100, "--calib",
                                  tmp_path / "t.pt", "--samples", 2, "--seq-len", 10, "--engine", "torch",
                                  "--device", "cpu", "--offload", "cpu", "--no-progress"]])
    assert code == 0, capsys.readouterr().err
    assert devices == ["cpu"]
    report = json.loads((out / "sdmprune.json").read_text())
    assert report["config"]["offload"] == "cpu" and report["stats"]["offload_stats"]["loads"] > 0


@pytest.mark.parametrize("bad", [dict(offload="disk"), dict(offload="cpu", offload_device="meta"),
                                 dict(offload="cpu", offload_device="mps"),
                                 dict(offload="cpu", offload_device="nonsense"),
                                 dict(offload_device="cpu"), dict(offload="cpu", engine="reference"),
                                 dict(offload="cpu", method="wanda-sp"), dict(offload="cpu", recover_steps=1)])
def test_bad_offload_config_is_input_error_before_work(bad, tmp_path):
    from sdmprune.pipeline import prune_model

    model = tiny_model(seed=0, layers=2)
    w = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(InputError):
        prune_model(model, torch.randint(0, 300, (2, 8)), checkpoint_dir=str(tmp_path / "ck"),
                    **{**PIPE, "offload_device": None, **bad})
    assert not (tmp_path / "ck").exists() and model.model.layers[0].mlp.up_proj.weight is w


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_offload_to_cuda_without_gpu_is_input_error():
    from sdmprune.pipeline import PruneConfig

    with pytest.raises(InputError, match="no CUDA GPU"):
        PruneConfig(offload="cpu", offload_device="cuda", **PIPE).validate()


@cuda
def test_prune_model_offload_equals_resident_cuda():
    from sdmprune.pipeline import prune_model

    x = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    ref = prune_model(tiny_model(seed=3, layers=4).cuda(), x, **PIPE)
    model = tiny_model(seed=3, layers=4)
    got = prune_model(model, x, offload="cpu", offload_device="cuda", **PIPE)
    assert got.stats["device"].startswith("cuda") and got.stats["offload_stats"]["loads"] > 0
    for layer in ref.keep:
        finite = torch.isfinite(ref.scores[layer])
        torch.testing.assert_close(got.scores[layer][finite], ref.scores[layer][finite], rtol=1e-5, atol=0)
        assert torch.equal(got.keep[layer], ref.keep[layer])
    assert all(p.device.type == "cpu" for p in model.parameters())
