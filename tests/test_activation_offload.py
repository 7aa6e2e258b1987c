"""Checkpointed layer inputs in host memory (--offload-activations, sdmprune.scale.activation_offload):
the recompute really reads the offloaded copy, gradients and scores are unchanged, copies come back
in reverse layer order one layer ahead, nothing outlives the graph, and the memory model counts it."""
import contextlib
import gc

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from conftest import cuda, tiny_model
from sdmprune.scale.activation_offload import CheckpointInputOffload, offload_checkpoint_inputs
from sdmprune.errors import InputError
from sdmprune.models import set_activation_checkpointing


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _checkpointed(layers=3, seed=0, **kw):
    model = tiny_model(seed=seed, layers=layers, **kw).train()
    set_activation_checkpointing(model, True)
    return model


@pytest.mark.parametrize("shape", [(2, 16), (3, 13)])  # the second is ragged (odd batch and length)
def test_gradients_equal_and_every_layer_input_goes_out_and_back(shape):
    model = _checkpointed(layers=3)
    ids = torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(1))
    ref = _grads(model, ids)
    funcs = [layer._gradient_checkpointing_func for layer in model.model.layers]
    with offload_checkpoint_inputs(model) as off:
        got = _grads(model, ids)
    # exact copies: the recompute computes the same numbers bit for bit
    assert ref.keys() == got.keys() and len(ref) > 0
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    b, L = shape
    assert off.stats["offloaded"] == 3 and off.stats["bytes_offloaded"] == 3 * b * L * 64 * 4
    # backward visits the layers in reverse: the last one's input was sent back when the forward ended,
    # the others while the layer after them ran its backward; none had to be waited for on demand
    assert (off.stats["fetched"], off.stats["prefetched"], off.stats["fetched_on_demand"]) == (3, 3, 0)
    # the checkpoint functions are transformers' own again
    assert [layer._gradient_checkpointing_func for layer in model.model.layers] == funcs


def _toy(x, w):
    return torch.tanh(x @ w) @ w.t()


@pytest.mark.parametrize("reentrant", [False, True])
def test_recompute_reads_the_offloaded_copy_not_the_device_tensor(reentrant):
    """Overwrite the checkpointed input's storage after forward (through .data, which the version
    counter does not see): the plain checkpoint recomputes from the garbage, the offloaded one from
    its copy. Both checkpoint flavours save their inputs where the hooks see them."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 8, generator=gen, requires_grad=True)
    x0 = torch.randn(5, 8, generator=gen)

    def grads(offload):
        w.grad = None
        x = x0.clone().requires_grad_()
        h = x * 2  # a non-leaf layer input, as the residual stream is
        with offload.hooks() if offload is not None else contextlib.nullcontext():
            y = checkpoint(_toy, h, w, use_reentrant=reentrant)
        h.data.normal_(generator=torch.Generator().manual_seed(9))
        y.square().sum().backward()  # (reentrant checkpoints refuse torch.autograd.grad)
        return x.grad, w.grad.clone()

    x = x0.clone().requires_grad_()
    expect = torch.autograd.grad(_toy(x * 2, w).square().sum(), (x, w))
    offload = CheckpointInputOffload(min_bytes=0, cpu_copies=True)
    got = grads(offload)
    # both positional tensors (h and w) were saved as inputs, and each came back once
    assert offload.stats["offloaded"] == 2 and offload.stats["fetched"] == 2
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    plain = grads(None)  # the control: this is what reading the device tensor would give
    assert not torch.allclose(plain[0], expect[0], rtol=1e-3, atol=1e-3)


def test_fetch_order_prefetch_off_and_small_tensors_stay():
    model = _checkpointed(layers=4)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(4))
    with offload_checkpoint_inputs(model) as off:
        # the layers' wrappers look up off.pack/off.unpack (and unpack off._fetch) at call time
        handles, order = [], []
        real_pack, real_fetch = off.pack, off._fetch

        def pack(t):
            handles.append(real_pack(t))
            return handles[-1]

        def fetch(h):
            order.append(next(i for i, k in enumerate(handles) if k is h))
            real_fetch(h)

        off.pack, off._fetch = pack, fetch
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        # the forward has ended: only the last layer's input is on its way back, before any backward
        assert order == [3] and handles[3].device_tensor is not None
        assert all(h.device_tensor is None for h in handles[:3])
        loss.backward()
    assert off.stats["offloaded"] == 4 and len(handles) == 4
    assert order == [3, 2, 1, 0]  # each fetch one layer ahead of the backward, in reverse layer order

    # prefetch off: every input comes back on demand
    with offload_checkpoint_inputs(model, prefetch=False) as off2:
        _grads(model, ids)
    assert (off2.stats["fetched"], off2.stats["prefetched"], off2.stats["fetched_on_demand"]) == (4, 0, 4)

    # tensors under min_bytes are not offloaded: pack returns the tensor itself
    small = CheckpointInputOffload(min_bytes=1 << 20, cpu_copies=True)
    t = torch.randn(4, 4)
    assert small.pack(t) is t and small.unpack(t) is t and small.stats["offloaded"] == 0
    # and on the CPU without the test mode nothing is copied either
    assert CheckpointInputOffload(min_bytes=0).pack(t) is t


def test_two_forwards_before_one_backward_keep_their_own_chains():
    """Each forward's inputs chain on their own (the body's pre-hook starts a new chain), so the first
    layer of the second forward does not prefetch the first forward's last input."""
    model = _checkpointed(layers=3)
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randint(0, 300, (2, 11), generator=gen), torch.randint(0, 300, (3, 9), generator=gen)

    def both():
        model.zero_grad(set_to_none=True)
        (model(input_ids=a, labels=a).loss + model(input_ids=b, labels=b).loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = both()
    with offload_checkpoint_inputs(model) as off:
        handles, real_pack = [], off.pack

        def pack(t):
            handles.append(real_pack(t))
            return handles[-1]

        off.pack = pack
        got = both()
    assert len(handles) == 6 and handles[0].prev is None and handles[3].prev is None
    assert [h.prev() for h in handles[4:]] == handles[3:5] and [h.prev() for h in handles[1:3]] == handles[0:2]
    assert (off.stats["fetched"], off.stats["prefetched"], off.stats["fetched_on_demand"]) == (6, 6, 0)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_host_copies_live_as_long_as_the_graph():
    model = _checkpointed(layers=2)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    with offload_checkpoint_inputs(model) as off:
        loss = model(input_ids=ids, labels=ids).loss
        last = off._last
        assert last is not None and last() is not None and last().host.shape == (2, 12, 64)
        loss.backward()
        del loss
        gc.collect()
        assert last() is None  # freed with the graph: no host copy outlives its backward


def test_host_buffers_are_reused_across_passes_and_gradients_stay_bit_identical():
    """Two forward+backward passes through one offload context: the second writes the layer inputs
    into the very host buffers of the first (same data_ptrs, nothing new allocated) and its gradients
    are bit-identical to the first pass's and to the run without offload. A ragged third pass (other
    shapes) gets new buffers, and the idle buffers never exceed the bytes one pass had in use."""
    model = _checkpointed(layers=3)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 300, (2, 16), generator=gen)
    ragged = torch.randint(0, 300, (3, 5), generator=gen)
    ref = _grads(model, ids)
    with offload_checkpoint_inputs(model) as off:
        ptrs, grads = [], []
        real_pack = off.pack

        def pack(t):
            h = real_pack(t)
            ptrs[-1].append(h.host.data_ptr())
            return h

        off.pack = pack
        for _ in range(2):
            ptrs.append([])
            grads.append(_grads(model, ids))
        assert len(ptrs[0]) == 3 and len(set(ptrs[0])) == 3  # one buffer per layer input, all distinct
        assert sorted(ptrs[1]) == sorted(ptrs[0])
        assert (off.stats["host_buffers_allocated"], off.stats["host_buffers_reused"]) == (3, 3)
        pool = off.pools[False]  # the CPU test mode's (unpinned) pool
        one_pass = 3 * 2 * 16 * 64 * 4
        assert pool.peak_in_use_bytes == one_pass and pool.in_use_bytes == 0 and pool.idle_bytes == one_pass
        ptrs.append([])
        _grads(model, ragged)
        assert not set(ptrs[2]) & set(ptrs[0]) and off.stats["host_buffers_allocated"] == 6
        assert pool.idle_bytes <= pool.peak_in_use_bytes == one_pass  # the older buffers were dropped
    assert pool.idle_bytes == 0  # freed on exit
    for got in grads:
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), k


def test_host_buffer_pool_bounds_and_close():
    """The pool hands a buffer back only for the same byte size and device, keeps at most the peak
    bytes in use as idle buffers (least recently returned dropped first) and keeps nothing once closed."""
    from sdmprune.scale.activation_offload import HostBufferPool

    pool = HostBufferPool(pin=False)
    cpu = torch.device("cpu")
    a, fresh_a = pool.take(64, cpu)
    b, fresh_b = pool.take(32, cpu)
    assert (fresh_a, fresh_b) == (False, False) and pool.peak_in_use_bytes == 96
    pool.give(a, cpu)
    pool.give(b, cpu)
    again, reused = pool.take(64, cpu)
    assert reused and again.data_ptr() == a.data_ptr()
    other, reused = pool.take(64, torch.device("meta"))  # another device's copy stream: not shared
    assert not reused
    assert pool.peak_in_use_bytes == 128  # again + other in use at once
    pool.give(again, cpu)
    pool.give(other, torch.device("meta"))
    # 32 + 64 + 64 = 160 idle bytes would pass the peak in use (128): the least recently returned
    # buffer (the 32-byte one, returned first) is dropped
    assert pool.idle_bytes == 128
    held = [pool.take(64, cpu), pool.take(64, torch.device("meta")), pool.take(32, cpu)]
    assert [reused for _, reused in held] == [True, True, False]
    pool.close()
    assert pool.idle_bytes == 0
    for (buf, _), dev in zip(held, (cpu, torch.device("meta"), cpu)):
        pool.give(buf, dev)  # returned after close (a graph that outlived the context): dropped
    assert pool.idle_bytes == 0 and pool.in_use_bytes == 0


def test_needs_checkpointing():
    model = tiny_model(layers=2).train()  # checkpointing off
    with pytest.raises(InputError, match="gradient checkpointing"):
        with offload_checkpoint_inputs(model):
            pass


@pytest.mark.parametrize("kw,match", [
    (dict(gradient_checkpointing=False), "needs gradient checkpointing"),
    (dict(engine="reference"), "fused or torch engine"),
    (dict(method="magnitude"), "sdmprune/taylor"),
])
def test_prune_config_rejects_offload_without_a_checkpointed_gradient_pass(kw, match):
    from sdmprune.pipeline import PruneConfig

    with pytest.raises(InputError, match=match):
        PruneConfig(width=8, offload_activations=True, **kw).validate()


@pytest.mark.parametrize("weights", [{}, {"offload": "cpu", "offload_device": "cpu"}], ids=["resident", "streamed"])
def test_prune_model_with_offloaded_activations_equals_resident(weights):
    """Alone and together with layer streaming (--offload cpu): the same scores and channels."""
    from sdmprune.pipeline import prune_model

    pipe = dict(width=100, stage1_keep=0.8, engine="torch", batch_size=2, progress=False, temperature=0.5)
    x = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(2))
    ref = prune_model(tiny_model(seed=3, layers=3), x, **pipe)
    got = prune_model(tiny_model(seed=3, layers=3), x, offload_activations=True, **weights, **pipe)
    # 2 stages x 2 batches x 3 layers, each input out once and back once
    st = got.stats["activation_offload"]
    assert st["offloaded"] == st["fetched"] == 12 and st["fetched_on_demand"] == 0
    assert "activation_offload" not in ref.stats
    for layer in ref.keep:
        assert torch.equal(got.stage1_scores[layer], ref.stage1_scores[layer])
        assert torch.equal(got.scores[layer], ref.scores[layer])
        assert torch.equal(got.keep[layer], ref.keep[layer])


def test_cli_flag_reaches_the_config():
    import argparse

    from sdmprune.commands.prune import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["m", "--out", "o", "--ratio", "0.2", "--offload-activations"])
    assert args.offload_activations is True
    assert p.parse_args(["m", "--out", "o", "--ratio", "0.2"]).offload_activations is False
    # with --recover-steps the recovery steps checkpoint and offload as well
    from sdmprune.commands.prune import _recovery_options

    for flag in (True, False):
        extra = ["--offload-activations"] if flag else []
        rcfg = _recovery_options(p.parse_args(["m", "--out", "o", "--ratio", "0.2", "--recover-steps", "2"] + extra))
        rcfg = rcfg["recover_config"]
        assert rcfg.offload_activations is flag and rcfg.gradient_checkpointing is flag


def test_memory_model_counts_two_resident_layer_inputs():
    from sdmprune.memory import BUILTIN_SHAPES, GiB, largest_batch, predict_peak_memory

    s = BUILTIN_SHAPES["llama-3.2-1b"]
    T, d, n = 16 * 1024, s.hidden_size, s.num_hidden_layers
    base = predict_peak_memory(s, 1024, 16, loss_token_chunk=128)
    off = predict_peak_memory(s, 1024, 16, loss_token_chunk=128, offload_activations=True)
    assert base["activations"] - off["activations"] == (n - 2) * T * d * 2
    assert off["host_activations"] == n * T * d * 2 and base["host_activations"] == 0
    assert off["total"] < base["total"]
    # the 8B shape in 18 GiB: offloading the inputs buys a larger batch
    s8 = BUILTIN_SHAPES["llama-3.1-8b"]
    assert largest_batch(s8, 1024, 18 * GiB, offload_activations=True) > largest_batch(s8, 1024, 18 * GiB)
    with pytest.raises(InputError, match="checkpointing"):
        predict_peak_memory(s, 1024, 4, gradient_checkpointing=False, offload_activations=True)


@cuda
def test_cuda_offload_equal_gradients_and_lower_peak():
    """On the GPU: pinned host copies on a side stream, gradients bit-equal, and the peak between
    forward and backward drops by about the offloaded layer inputs."""
    torch.manual_seed(0)
    model = tiny_model(seed=1, layers=6, hidden=256, width=512, dtype=torch.bfloat16).cuda().train()
    set_activation_checkpointing(model, True)
    ids = torch.randint(0, 300, (16, 256), device="cuda")

    def run(offload):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with (offload_checkpoint_inputs(model) if offload else contextlib.nullcontext()) as off:
            loss = model(input_ids=ids, labels=ids).loss
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # frees the blocks whose copies out have finished (record_stream)
            held = torch.cuda.memory_allocated()
            loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads, held, off

    ref, held_ref, _ = run(False)
    got, held_off, off = run(True)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    layer_input = 16 * 256 * 256 * 2
    assert off.stats["offloaded"] == 6 and off.stats["prefetched"] == 6 and off.stats["fetched_on_demand"] == 0
    # between forward and backward five of the six inputs are in host memory (their device blocks are
    # free once the copies ran; the last one is already on its way back); one input of slack for rounding
    assert held_ref - held_off >= 4 * layer_input
