"""Activation Taylor importance (HFPrune): the op (sdmprune_kernels/activation_taylor.py), the gated-MLP
backward with importance="activation" (sdmprune_kernels/gated_mlp.py) and TaylorImportance(kind="activation")
on a tiny LLaMA with the entropy loss, against float64 references and a naive per-sample loop.

Tolerances. The op's score is a sum of non-negative float32 products (bf16 x bf16 is exact in
float32), so against float64 on the same inputs: rtol 1e-5, atol 1e-6 x max|ref| (the in-place add
to a nonzero start). The gated MLP (float32): H and dH are float32 GEMM results, compared with
float64 autograd from the same float32 weights: rtol 1e-4. The model: the fused engine against the
naive hook loop, both float32: rtol 1e-5 (no cancellation in a sum of abs values; both are within
~7e-6 of a float64 run), 3e-5 for the padded batch (see there).
"""
import importlib

import pytest
import torch
from torch import nn

from conftest import compile_for_h100, tiny_model
from sdmprune import TaylorImportance
from sdmprune.errors import InputError
from sdmprune.kernels.activation_taylor import accumulate_activation_scores_, token_splits
from sdmprune.kernels.fused_linear_entropy_loss import fused_linear_entropy_loss
from sdmprune.kernels.gated_mlp import apply_activation, checkpoint_context_fn, gated_mlp_with_importance
from sdmprune.kernels.utils import interpreter_enabled, triton_available

amod = importlib.import_module("sdmprune.kernels.activation_taylor")

triton_cpu = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                reason="Triton on CPU needs TRITON_INTERPRET=1")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = [pytest.param("triton", marks=triton_cpu), "torch"]
VOCAB = 300


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(amod, "POISON_SCRATCH", True)  # a partial the kernel does not write is NaN


def reference64(h, dh, keep=None):
    """float64: sum over kept tokens of |h * dh| per channel."""
    prod = (h.double().cpu() * dh.double().cpu()).abs()
    if keep is not None:
        prod = prod[keep.cpu()]
    return prod.sum(0)


def make(T, I, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(T, I, generator=gen).to(device, dtype) for _ in range(2))


def check(backend, T, I, dtype, masked, seed, device="cpu", splits=None):
    h, dh = make(T, I, dtype, seed, device)
    keep = None
    if masked:
        keep = torch.rand(T, generator=torch.Generator().manual_seed(seed + 1)) < 0.7
        keep = keep.to(device)
        clean = (h.clone(), dh.clone())
        h[~keep] = float("nan")  # a dropped row must not reach the scores at all
        dh[~keep] = float("inf")
    # accumulated in place: start nonzero (reproducible), check the increment
    start = (torch.rand(I, generator=torch.Generator().manual_seed(seed + 2)) + 0.5).to(device)
    scores = start.clone()
    if splits is None:
        out = accumulate_activation_scores_(scores, h, dh, keep, backend=backend)
        assert out is scores
    else:
        amod.activation_scores_triton_(scores, h, dh, keep, splits=splits)
    ref = reference64(*(clean if masked else (h, dh)), keep)
    torch.testing.assert_close((scores - start).double().cpu(), ref, rtol=1e-5,
                               atol=1e-6 * max(ref.abs().max().item(), 1.0) if ref.numel() else 0.0)
    return scores


# (T, I, masked): ragged sizes, one token, one channel, no tokens; masked rows poisoned.
SHAPES = [(13, 40, False), (37, 45, True), (70, 33, True), (1, 1, False), (0, 8, False), (50, 70, False)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on poisoned rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}_I{s[1]}" + ("_masked" if s[2] else ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_op_matches_float64(backend, shape, dtype):
    T, I, masked = shape
    check(backend, T, I, dtype, masked, seed=T * 100 + I)


@triton_cpu
def test_kernel_splits_are_exact_and_deterministic():
    """1 split, uneven splits and more splits than token blocks all give the float64 result (every
    partial summed was written: the buffer starts as NaN); two runs give the same bits."""
    runs = [check("triton", 70, 45, torch.float32, True, seed=3, splits=s) for s in (1, 3, 7, 64)]
    again = check("triton", 70, 45, torch.float32, True, seed=3, splits=3)
    assert torch.equal(runs[1], again)


def test_token_splits_policy(monkeypatch):
    """CUDA (132 SMs faked): about 4 programs per SM, each split at least 4 token blocks; 2 (or
    fewer when there are fewer token blocks) elsewhere."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: type("P", (), {"multi_processor_count": 132}))
    assert token_splits(8192, 8192, 32, 256, "cuda") == 17  # ceil(528 / 32 I blocks)
    assert token_splits(64, 8192, 32, 256, "cuda") == 1  # 2 token blocks: one split
    assert token_splits(8192, 256, 32, 256, "cuda") == 64  # 1 I block: capped by 256 token blocks / 4
    assert token_splits(100, 40, 16, 32, "cpu") == 2 and token_splits(10, 40, 16, 32, "cpu") == 1


def test_torch_path_chunks_tokens():
    h, dh = make(21, 50, torch.float32, 4)
    a, b = torch.zeros(50), torch.zeros(50)
    amod.activation_scores_torch_(a, h, dh)
    amod.activation_scores_torch_(b, h, dh, chunk_elems=7 * 50)  # 3 chunks of 7 tokens
    torch.testing.assert_close(a.double(), reference64(h, dh), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_op_rejects_bad_inputs():
    h, dh = make(6, 8, torch.float32, 5)
    with pytest.raises(ValueError, match="float32"):
        accumulate_activation_scores_(torch.zeros(8, dtype=torch.float64), h, dh)
    with pytest.raises(ValueError, match="dh"):
        accumulate_activation_scores_(torch.zeros(8), h, dh[:, :7])
    with pytest.raises(ValueError, match="token_mask"):
        accumulate_activation_scores_(torch.zeros(8), h, dh, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        accumulate_activation_scores_(torch.zeros(8), h, dh, backend="cuda")


def test_activation_kernel_compiles_for_h100():
    """The kernel compiles to sm_90 at the GPU tiles, bf16 and float32 inputs, with and without a mask."""
    for dt in ("*bf16", "*fp32"):
        sig = dict(part_ptr="*fp32", h_ptr=dt, dh_ptr=dt, keep_ptr="*i8", T="i32", I="i32", TOKENS_PER_SPLIT="i32",
                   s_ht="i32", s_hi="i32", s_dt="i32", s_di="i32")
        blocks = {k: v for k, v in amod._GPU_BLOCKS.items() if k != "num_warps"}
        for keep in (True, False):
            compile_for_h100(amod._activation_scores_kernel, sig, dict(HAS_KEEP=keep, **blocks),
                             num_warps=amod._GPU_BLOCKS["num_warps"])


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_gpu(dtype):
    check("triton", 3000, 1100, dtype, True, seed=6, device="cuda")
    a = check("triton", 3000, 1100, dtype, False, seed=7, device="cuda")
    b = check("triton", 3000, 1100, dtype, False, seed=7, device="cuda")
    assert torch.equal(a, b)


# --------------------------------------------------------------------- gated MLP, importance="activation"
def make_mlp(d, I, bias, seed):
    torch.manual_seed(seed)
    return [m.requires_grad_(False) for m in (nn.Linear(d, I, bias=bias), nn.Linear(d, I, bias=bias),
                                               nn.Linear(I, d, bias=bias))]


def mlp_reference(x, dy, gate, up, down, mask=None, keep=None):
    """float64 autograd: H = act(G) * U [* mask] (the down_proj input), dH = its gradient; returns
    (dX, sum over kept tokens of |H * dH|)."""
    x64 = x.detach().double().requires_grad_(True)
    g = nn.functional.linear(x64, gate.weight.double(), None if gate.bias is None else gate.bias.double())
    u = nn.functional.linear(x64, up.weight.double(), None if up.bias is None else up.bias.double())
    h = apply_activation("silu", g) * u
    if mask is not None:
        h = h * mask.double()
    h.retain_grad()
    y = nn.functional.linear(h, down.weight.double(), None if down.bias is None else down.bias.double())
    y.backward(dy.double())
    return x64.grad, reference64(h.detach().reshape(-1, h.shape[-1]), h.grad.reshape(-1, h.shape[-1]), keep)


@pytest.mark.parametrize("save,chunk,seg,masked,tokmask,backend", [
    ("activations", 6, None, False, False, "torch"),      # batch rows, two rows per backward chunk
    ("input", 7, None, True, True, "torch"),              # gate/up recomputed in backward, padding dropped
    ("input", 4, [2, 5, 9, 9, 19], True, False, "torch"),  # explicit samples (one empty), tokens outside
    ("activations", None, [2, 12, 5, 19, 17], False, False, "torch"),  # unsorted offsets, overlapping samples
    pytest.param("input", 5, [2, 5, 9, 9, 19], True, True, "triton", marks=triton_cpu),
])
def test_gated_mlp_activation_importance(save, chunk, seg, masked, tokmask, backend):
    """dX is the usual one and the scores are sum |H * dH| over the tokens inside the samples and
    kept by the token mask, whatever the chunking and save mode."""
    B, L, d, I = 3, 7, 16, 24
    gate, up, down = make_mlp(d, I, True, seed=3)
    gen = torch.Generator().manual_seed(11)
    mask = (torch.rand(I, generator=gen) > 0.3) if masked else None
    tm = (torch.rand(B * L, generator=gen) > 0.25) if tokmask else None
    x = torch.randn(B, L, d, generator=gen).requires_grad_(True)
    dy = torch.randn(B, L, d, generator=gen)
    seg_t = None if seg is None else torch.tensor(seg)
    scores = torch.rand(I)
    start = scores.clone()
    y = gated_mlp_with_importance(x, gate, up, down, "silu", scores=scores, seg_offsets=seg_t, channel_mask=mask,
                                  token_mask=tm, backend=backend, save=save, backward_chunk=chunk,
                                  importance="activation")
    (dx,) = torch.autograd.grad(y, x, dy)
    # tokens that count: inside some sample (once, even where samples overlap) and kept by the mask
    inside = torch.zeros(B * L, dtype=torch.bool)
    bounds = [0, B * L] if seg is None else seg
    for a, b in zip(bounds[:-1], bounds[1:]):
        inside[a:b] = True
    keep = inside if tm is None else inside & tm
    dx_ref, ref = mlp_reference(x, dy, gate, up, down, mask, keep)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-4, atol=1e-5 * dx_ref.abs().max().item())
    torch.testing.assert_close((scores - start).double(), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    if masked:
        assert ((scores - start)[~mask] == 0).all() and ((scores - start)[mask] > 0).all()


@pytest.mark.parametrize("skip", [False, True], ids=["recompute", "skip_mlp_recompute"])
def test_gated_mlp_activation_importance_under_checkpoint(skip):
    """Inside torch.utils.checkpoint with checkpoint_context_fn the activation scores and dX equal
    the uncheckpointed op's (one accumulation, not two)."""
    from torch.utils.checkpoint import checkpoint

    B, L, d, I = 2, 6, 16, 24
    gate, up, down = make_mlp(d, I, False, seed=5)
    x = torch.randn(B, L, d, requires_grad=True)
    dy = torch.randn(B, L, d)

    def layer(inp):  # a LLaMA-style residual block: only the residual add follows the MLP
        return inp + gated_mlp_with_importance(inp * 1.5, gate, up, down, "silu", scores=scores, backend="torch",
                                               backward_chunk=L, importance="activation")

    scores = torch.zeros(I)
    (want_dx,) = torch.autograd.grad(layer(x), x, dy)
    want = scores.clone()
    _, ref = mlp_reference(x * 1.5, dy, gate, up, down)
    torch.testing.assert_close(want.double(), ref, rtol=1e-4, atol=0)
    scores = torch.zeros(I)
    out = checkpoint(layer, x, use_reentrant=False, context_fn=checkpoint_context_fn(skip))
    (dx,) = torch.autograd.grad(out, x, dy)
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_activation_backward_keeps_dh(backend, masked, monkeypatch):
    """keep_dh: dH survives (the activation importance reads it after) and dU, dG, H are the
    overwriting call's, bit for bit (dG in a buffer of its own, poisoned first)."""
    from sdmprune.kernels import gated_mlp as gmod

    monkeypatch.setattr(gmod, "POISON_OUTPUTS", True)
    gen = torch.Generator().manual_seed(2)
    g, u, dh = (torch.randn(5, 70, generator=gen) for _ in range(3))
    mask = (torch.rand(70, generator=gen) > 0.3).float() if masked else None
    want = gmod.gated_activation_backward(g, u, dh.clone(), "silu", mask, backend)
    dh_in = dh.clone()
    got = gmod.gated_activation_backward(g, u, dh_in, "silu", mask, backend, keep_dh=True)
    assert torch.equal(dh_in, dh)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_gated_mlp_rejects_unknown_importance():
    gate, up, down = make_mlp(8, 12, False, seed=0)
    with pytest.raises(ValueError, match="importance"):
        gated_mlp_with_importance(torch.randn(2, 3, 8), gate, up, down, "silu", importance="gradient")


# ---------------------------------------------------------- TaylorImportance(kind="activation"), HFPrune
def batch(B=2, L=10, seed=0):
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


def naive_hfprune_scores(model, ids, lengths=None):
    """The official loop: one sample per backward, loss = mean over positions of the entropy of the
    model's full logits, score += sum over tokens of |H * dL/dH| at each down_proj input H (a
    forward pre-hook keeps H and retains its gradient)."""
    model.requires_grad_(True)  # as in the official code: gradients reach H through the weights too
    held, scores = {}, {}
    layers = list(model.model.layers)

    def keep_input(i):
        def hook(module, args):
            args[0].retain_grad()
            held[i] = args[0]
        return hook

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(keep_input(i)) for i, layer in enumerate(layers)]
    try:
        for s in range(ids.shape[0]):
            n = ids.shape[1] if lengths is None else lengths[s]
            logits = model(ids[s:s + 1, :n]).logits.float()
            p = torch.softmax(logits, dim=-1)
            entropy = -(p * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
            entropy.backward()
            with torch.no_grad():
                for i, h in held.items():
                    scores[i] = scores.get(i, 0) + (h * h.grad).abs().sum(dim=(0, 1))
            model.zero_grad(set_to_none=True)
    finally:
        for hk in hooks:
            hk.remove()
        model.requires_grad_(False)
    return scores


def entropy_backward(model, ids, attention_mask=None):
    """One forward + backward of loss = sum over samples of each sample's mean entropy
    (fused_linear_entropy_loss per sample, float32, padding left out by row_mask)."""
    hidden = model.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    loss = 0
    for b in range(ids.shape[0]):
        rows = None if attention_mask is None else attention_mask[b].bool()
        loss = loss + fused_linear_entropy_loss(hidden[b], model.lm_head.weight, rows, backend="torch")
    loss.backward()


def fused_hfprune_scores(model, ids, backend, attention_mask=None):
    with TaylorImportance(model, backend=backend, kind="activation") as imp:
        imp.set_attention_mask(attention_mask)
        entropy_backward(model, ids, attention_mask)
    return imp.scores(), imp


def assert_close_scores(got, want, rtol=1e-5):
    assert set(got) == set(want)
    for i in want:
        assert got[i].dtype == torch.float32 and (want[i] > 0).all()
        torch.testing.assert_close(got[i], want[i].float(), rtol=rtol, atol=1e-7 * want[i].abs().max().item())


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=2).requires_grad_(False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_equals_official_loop(llama, backend):
    ids = batch()
    want = naive_hfprune_scores(llama, ids)
    got, imp = fused_hfprune_scores(llama, ids, backend)
    assert_close_scores(got, want)
    assert imp.samples == 2 and all(p.grad is None for p in llama.parameters())
    # the weight kind on the same loss scores something else (the switch is not ignored)
    with TaylorImportance(llama, backend="torch") as wimp:
        entropy_backward(llama, ids)
    assert not torch.allclose(wimp.scores()[0], got[0], rtol=1e-2)


def test_engine_with_gradient_checkpointing_equals_official_loop():
    from sdmprune.models import set_activation_checkpointing

    model = tiny_model("llama", layers=2).requires_grad_(False)
    ids = batch(seed=3)
    want = naive_hfprune_scores(model, ids)
    model.train()  # HF checkpoints only in training mode (the tiny configs have no dropout)
    set_activation_checkpointing(model, True, checkpoint_context_fn())
    calls = []
    with TaylorImportance(model, backend="torch", kind="activation") as imp:
        patched = model.model.layers[0].mlp.forward
        model.model.layers[0].mlp.forward = lambda x: calls.append(1) or patched(x)
        entropy_backward(model, ids)
        model.model.layers[0].mlp.forward = patched
    got = imp.scores()
    assert len(calls) == 2  # forward + the checkpoint's recompute: the scores prove one accumulation
    assert_close_scores(got, want)


def test_engine_drops_padding(llama):
    """Right-padded batch (lengths 10 and 6): per-sample entropy means over the real tokens, padding
    out of the scores; equals the official loop on the unpadded samples."""
    ids = batch(seed=5)
    lengths = [10, 6]
    attn = torch.zeros(2, 10, dtype=torch.long)
    for b, n in enumerate(lengths):
        attn[b, :n] = 1
    want = naive_hfprune_scores(llama, ids, lengths)
    got, _ = fused_hfprune_scores(llama, ids, "torch", attention_mask=attn)
    # the padded batch runs attention with an explicit mask (another SDPA path than the unpadded
    # samples): float32 rounding differs more, measured 1.1e-5
    assert_close_scores(got, want, rtol=3e-5)


def test_engine_kind_checks(llama):
    with pytest.raises(InputError, match="kind"):
        TaylorImportance(llama, kind="gradient")
    # scores of one kind are never resumed as the other
    with TaylorImportance(llama, backend="torch", kind="activation") as imp:
        state = imp.state_dict()
    assert state["kind"] == "activation"
    with TaylorImportance(llama, backend="torch") as wimp:
        with pytest.raises(InputError, match="activation"):
            wimp.load_state_dict(state)
        wimp.load_state_dict({k: v for k, v in state.items() if k != "kind"})  # older states: weight scores
