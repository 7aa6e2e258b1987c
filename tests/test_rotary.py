"""Rotary op (sdmprune_kernels/rotary.py): the Triton kernel (interpreter on CPU, compiled for sm_90) and the
PyTorch path against a float64 reference; transformers' apply_rotary_pos_emb; swapping it in a model.

Tolerances, against float64 on the same (already rounded) inputs: float32 rtol 1e-5 with atol 1e-5 x
max|ref|; bf16 one rounding of a float32 result, rtol 2^-7 (one ulp) with atol 1e-2 x max|ref|.
"""
import pytest
import torch

from sdmprune.kernels import rotary as rmod
from sdmprune.kernels.rotary import apply_rotary, patch_rotary, rotary_reference
from sdmprune.kernels.utils import interpreter_enabled, triton_available

from conftest import compile_for_h100, loss_and_embedding_grad, tiny_model

triton_cpu = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                reason="Triton on CPU needs TRITON_INTERPRET=1")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2 ** -7, 1e-2)}
# (B, H, Hk, L, D, cos batch): ragged heads, odd lengths, broadcast and per-sample cos/sin
SHAPES = [(1, 1, 1, 1, 2, 1), (2, 3, 1, 5, 8, 1), (2, 4, 2, 7, 20, 2), (1, 6, 3, 9, 64, 1), (2, 2, 2, 0, 8, 1)]


def _close(got, ref, dtype, what):
    rtol, atol_rel = TOL[dtype]
    atol = atol_rel * max(ref.abs().max().item(), 1.0) if ref.numel() else 0.0
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _inputs(B, H, Hk, L, D, CB, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    # q, k as transformers makes them: [B, L, H, D] projections viewed as [B, H, L, D]
    q = r(B, L, H, D).transpose(1, 2).requires_grad_(True)
    k = r(B, L, Hk, D).transpose(1, 2).requires_grad_(True)
    ang = torch.rand(CB, L, D // 2, generator=gen) * 6.28
    ang = torch.cat((ang, ang), dim=-1)
    return q, k, ang.cos().to(device, dtype), ang.sin().to(device, dtype), r(B, H, L, D), r(B, Hk, L, D)


def _check(shape, dtype, backend, device="cpu"):
    q, k, cos, sin, dq, dk = _inputs(*shape, dtype, device)
    qe, ke = apply_rotary(q, k, cos, sin, backend=backend)
    assert qe.shape == q.shape and qe.stride() == q.stride() and qe.dtype == dtype
    ((qe * dq).sum() + (ke * dk).sum()).backward()
    q64, k64 = (t.detach().double().requires_grad_(True) for t in (q, k))
    c64, s64 = cos.double(), sin.double()
    qr, kr = rotary_reference(q64, c64, s64), rotary_reference(k64, c64, s64)
    ((qr * dq.double()).sum() + (kr * dk.double()).sum()).backward()
    _close(qe, qr.detach(), dtype, "q_embed")
    _close(ke, kr.detach(), dtype, "k_embed")
    _close(q.grad, q64.grad, dtype, "dq")
    _close(k.grad, k64.grad, dtype, "dk")


@triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_float64_reference(shape, dtype, monkeypatch):
    monkeypatch.setattr(rmod, "POISON_OUTPUTS", True)
    calls = []
    real = rmod._rotary_triton
    monkeypatch.setattr(rmod, "_rotary_triton", lambda *a: calls.append(1) or real(*a))
    _check(shape, dtype, "triton")
    assert len(calls) == 4  # q, k forward and backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_torch_path_matches_float64_reference(shape, dtype):
    _check(shape, dtype, "torch")


def test_bsld_layout_and_bad_arguments():
    q, k, cos, sin, _, _ = _inputs(2, 3, 1, 5, 8, 1, torch.float32)
    qe, ke = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2, backend="torch")
    torch.testing.assert_close(qe.transpose(1, 2), rotary_reference(q, cos, sin))
    with pytest.raises(ValueError, match="even"):
        apply_rotary(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rotary(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="backend"):
        apply_rotary(q, k, cos, sin, backend="cuda")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma"])
def test_reference_is_transformers_apply_rotary_pos_emb(family):
    model = tiny_model(family)
    mod = rmod._attention_module(model)
    assert mod is not None
    q, k, cos, sin, _, _ = _inputs(2, 4, 2, 6, 16, 1, torch.float32)
    qe, ke = mod.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(qe, rotary_reference(q, cos, sin)) and torch.equal(ke, rotary_reference(k, cos, sin))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_patched_model_matches_and_is_restored(family):
    model = tiny_model(family)
    mod = rmod._attention_module(model)
    original = mod.apply_rotary_pos_emb
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    loss0, g0 = loss_and_embedding_grad(model, ids)
    with patch_rotary(model) as swapped:
        assert swapped and mod.apply_rotary_pos_emb is not original
        loss1, g1 = loss_and_embedding_grad(model, ids)
    assert mod.apply_rotary_pos_emb is original
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


def test_a_different_rotary_is_left_alone(monkeypatch):
    """An interleaved (GPT-J style) rotary under the same name and signature fails the probe."""
    model = tiny_model("llama")
    mod = rmod._attention_module(model)

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        def rot(x):
            x1, x2 = x[..., ::2], x[..., 1::2]
            return torch.stack((-x2, x1), dim=-1).flatten(-2)
        c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * c + rot(q) * s, k * c + rot(k) * s

    monkeypatch.setattr(mod, "apply_rotary_pos_emb", interleaved)
    with patch_rotary(model) as swapped:
        assert not swapped and mod.apply_rotary_pos_emb is interleaved


def test_hub_kernel_wrapper_is_seen_through_and_a_users_kernel_is_kept():
    """transformers >= 5.25 wraps apply_rotary_pos_emb in Hugging Face kernels' function module (a
    signature of ``(*args, **kwargs)``): the swap still applies, and says so. When ``kernels.kernelize``
    has given the attention its own rotary (the per-model wrapper then has a forward of its own, as
    kernelize sets one), the user's kernel is kept."""
    import types

    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    mod, why = rmod.rotary_status(model)
    wrappers = attn.__dict__.get("_kernel_funcs")
    if not isinstance(wrappers, dict) or not wrappers:
        pytest.skip("this transformers release does not wrap the rotary in a hub-kernel function")
    assert mod is not None and "hub-kernel wrapper" in why
    wrapper = next(iter(wrappers.values()))
    wrapper.forward = types.MethodType(lambda self, *a, **k: rotary_reference(a[0], a[2], a[3]), wrapper)
    try:
        mod, why = rmod.rotary_status(model)
        assert mod is None and "kernelize" in why
        with patch_rotary(model) as swapped:
            assert not swapped
    finally:
        del wrapper.forward


def test_compiles_for_h100():
    """The kernel compiles to sm_90 both ways at Llama-3.1-8B's q heads (no GPU needed)."""
    ints = ["L", "H", "HALF", "sxb", "sxh", "sxl", "sxd", "sob", "soh", "sol", "sod", "scb", "scl", "scd",
            "ssb", "ssl", "ssd"]
    sig = dict(x_ptr="*bf16", out_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16", **{k: "i32" for k in ints})
    for backward in (False, True):
        compile_for_h100(rmod._rotary_kernel, sig, dict(BACKWARD=backward, BLOCK_H=32, BLOCK_HALF=64), num_warps=4)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 32, 8, 1024, 64, 1), (3, 32, 8, 77, 128, 3)])
def test_gpu_matches_float64_reference(shape):
    _check(shape, torch.bfloat16, "triton", device="cuda")
    _check(shape, torch.float32, "triton", device="cuda")
