"""Layer streaming (--offload cpu): weights are really released and reloaded, scores equal the
resident run (float32: the same ops on the same values, so rtol 1e-6), with and without gradient
checkpointing; bad input is one InputError."""
import pytest
import torch

from conftest import cuda, tiny_model
from sdmprune.errors import InputError
from sdmprune.importance import TaylorImportance
from sdmprune.models import get_adapter
from sdmprune.offload import LayerStreamer, check_offload


def ce_scores(model, x, checkpointing, streamer=None, device="cpu"):
    """Stage-1 style CE Taylor scores {layer: float32 [I]} of ``model`` on tokens x [B, L]."""
    adapter = get_adapter(model)
    body, head = adapter.body(model), adapter.lm_head(model)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
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
        model.activation_checkpointing_disable()
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
