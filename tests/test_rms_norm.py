"""RMSNorm op (sdmprune_kernels/rms_norm.py): Triton kernels (interpreter on CPU, compiled for sm_90) and the
PyTorch path against a float64 reference; the transformers modules it replaces; what it keeps for
backward; swapping a model's norms.

Tolerances, against the float64 reference on the same (already rounded) inputs:
  float32: rtol 1e-5, atol 1e-5 x max|ref| (float32 statistics, a different summation order);
  bf16 / fp16 outputs: 2 units in the last place of the output dtype (rtol 2^-6 / 2^-9) plus
  atol 1e-2 / 2e-3 x max|ref|. The forward rounds twice, n to the input dtype and then the weight
  product, as transformers does, and the reference rounds at the same points; a last-bit difference
  in rstd can flip the first rounding, hence 2 ulp. Gradients are computed in float32 from the
  rounded inputs and rounded once.
"""
import pytest
import torch
from torch import nn

from sdmprune.kernels import rms_norm as rmod
from sdmprune.kernels.rms_norm import find_rms_norms, patch_rms_norms, rms_norm, rms_norm_reference
from sdmprune.kernels.utils import interpreter_enabled, triton_available

from conftest import compile_for_h100, loss_and_embedding_grad, tiny_model

triton_cpu = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                reason="Triton on CPU needs TRITON_INTERPRET=1")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2 ** -6, 1e-2), torch.float16: (2 ** -9, 2e-3)}
SHAPES = [(1, 8), (5, 48), (3, 7, 96), (4, 130), (0, 16), (2, 1, 1000)]


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(rmod, "POISON_OUTPUTS", True)


def _close(got, ref, dtype, what):
    rtol, atol_rel = TOL[dtype]
    ref = ref.double()
    atol = atol_rel * max(ref.abs().max().item(), 1.0) if ref.numel() else 0.0
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check(shape, dtype, mode, device="cpu", weight_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = (torch.randn(*shape, generator=gen) * 2.0).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(D, generator=gen) * 0.5 + (0.0 if mode == "gemma" else 1.0)).to(device=device, dtype=dtype)
    w.requires_grad_(weight_grad)
    dy = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    eps = 1e-5
    y = rms_norm(x, w, eps, mode)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    y.backward(dy)
    # float64 reference on the same rounded inputs, rounding n to the input dtype as transformers does
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(weight_grad)
    n = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    if mode == "gemma":
        y64 = n * (1.0 + w64)
    else:
        y64 = w64 * (n.detach().to(dtype).double() + (n - n.detach()))  # forward rounded, gradient straight through
    y64.backward(dy.double())
    _close(y, y64.detach(), dtype, "y")
    _close(x.grad, x64.grad, dtype, "dx")
    if weight_grad:
        # dw sums over all rows: compare relative to the scale of the sum
        _close(w.grad, w64.grad, dtype, "dw")
    else:
        assert w.grad is None


@triton_cpu
@pytest.mark.parametrize("mode", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_float64_reference(shape, dtype, mode, poisoned):
    _check(shape, dtype, mode, weight_grad=(dtype == torch.float32))


@pytest.mark.parametrize("mode", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 48), (3, 7, 96), (0, 16)])
def test_torch_path_matches_float64_reference(shape, dtype, mode, monkeypatch):
    monkeypatch.setattr(rmod, "use_triton", lambda *t: False)
    _check(shape, dtype, mode)


@triton_cpu
def test_triton_path_is_taken_and_matches_torch_path(monkeypatch):
    calls = []
    real = rmod._fwd_triton
    monkeypatch.setattr(rmod, "_fwd_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(6, 40, dtype=torch.bfloat16)
    w = torch.randn(40, dtype=torch.bfloat16)
    y = rms_norm(x, w, 1e-6)
    assert calls, "the Triton kernel did not run"
    monkeypatch.setattr(rmod, "use_triton", lambda *t: False)
    torch.testing.assert_close(y, rms_norm(x, w, 1e-6), rtol=2 ** -6, atol=1e-2)


def test_strided_input_and_mixed_weight_dtype():
    x = torch.randn(4, 2 * 24, dtype=torch.bfloat16)[:, ::2]  # last-dim stride 2
    w = torch.randn(24, dtype=torch.float32)
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32  # promote(w, x), as `w * n.to(x.dtype)` gives
    # n is rounded to bf16 before the float32 product: bf16 tolerance (see the top of the file)
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-6), rtol=2 ** -6, atol=1e-2)


def test_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="mode"):
        rms_norm(x, torch.ones(8), mode="layernorm")
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(7))


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3"])
def test_reference_is_the_transformers_module(family):
    """rms_norm_reference in the mode find_rms_norms picks reproduces the module bit for bit."""
    model = tiny_model(family, dtype=torch.bfloat16)
    found = find_rms_norms(model)
    # input + post-attention norm per layer, the final norm (+ q/k norms in qwen3)
    assert len(found) == 2 * 2 + 1 + (4 if family == "qwen3" else 0)
    assert {mode for _, mode, _ in found} == {"gemma" if family == "gemma" else "llama"}
    x = torch.randn(3, 5, model.config.hidden_size).to(torch.bfloat16)
    for mod, mode, eps in found:
        if mod.weight.shape[0] != x.shape[-1]:
            continue  # qwen3's per-head q/k norms
        with torch.no_grad():
            mod.weight.normal_()
            assert torch.equal(rms_norm_reference(x, mod.weight, eps, mode), mod(x))


class _ScaledRMSNorm(nn.Module):
    """A variant no mode reproduces (an extra factor 2): must be left alone."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = 1e-6

    def forward(self, x):
        return 2.0 * self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_unknown_variant_is_left_alone():
    model = nn.Sequential(_ScaledRMSNorm(16))
    assert find_rms_norms(model) == []
    with patch_rms_norms(model) as n:
        assert n == 0


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while fn() runs."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_keeps_only_input_and_rstd_for_backward():
    T, D = 256, 512
    x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    mod = tiny_model("llama", hidden=D, dtype=torch.bfloat16).model.norm
    _, hf = _saved_bytes(lambda: mod(x * 1))
    _, ours = _saved_bytes(lambda: rms_norm(x * 1, mod.weight, mod.variance_epsilon))
    weight = D * 2
    assert ours == T * D * 2 + T * 4 + weight  # x (bf16), rstd (float32 per row), the weight
    assert hf >= T * D * (4 + 2)  # a float32 copy of x and the rounded n, at least
    assert ours < hf / 2


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_patched_model_matches_and_is_restored(family):
    """Whole-model loss and input-embedding gradients agree with the model's own norms (float32)."""
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    loss0, g0 = loss_and_embedding_grad(model, ids)
    with patch_rms_norms(model) as n:
        assert n == 2 * 2 + 1
        assert all("forward" in m.__dict__ for m, _, _ in find_rms_norms_all(model))
        loss1, g1 = loss_and_embedding_grad(model, ids)
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


def find_rms_norms_all(model):
    """Every module named like an RMSNorm, as (module, None, None)."""
    return [(m, None, None) for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def test_compiles_for_h100():
    """Both kernels compile to sm_90 at the widest row of the built-in shapes (no GPU needed)."""
    for gemma in (False, True):
        for block in (2048, 8192):
            cx = dict(GEMMA=gemma, BLOCK_D=block)
            fwd = dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", rstd_ptr="*fp32", D="i32", x_stride="i32",
                       y_stride="i32", eps="fp32")
            bwd = dict(dy_ptr="*bf16", x_ptr="*bf16", w_ptr="*bf16", rstd_ptr="*fp32", dx_ptr="*bf16", D="i32",
                       dy_stride="i32", x_stride="i32", dx_stride="i32")
            warps = rmod._launch_config(block)[1]
            compile_for_h100(rmod._rms_norm_fwd_kernel, fwd, cx, num_warps=warps)
            compile_for_h100(rmod._rms_norm_bwd_kernel, bwd, cx, num_warps=warps)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["llama", "gemma"])
@pytest.mark.parametrize("shape", [(3, 1024, 2048), (777, 4096), (5, 96)])
def test_gpu_matches_float64_reference(shape, mode, poisoned):
    _check(shape, torch.bfloat16, mode, device="cuda", weight_grad=False)
    _check(shape, torch.float32, mode, device="cuda")
