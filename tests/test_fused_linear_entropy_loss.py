"""fused_linear_entropy_loss against a float64 materialized-logits reference.

Backends: "triton" (torch chunk GEMMs + the Triton row kernel; on CPU only under TRITON_INTERPRET=1)
and "torch" (the chunked PyTorch path). Devices: cpu, and cuda when present.
Tolerances (error normalized by the reference's max magnitude, |a - b|.max() / |b|.max()):
  float32 inputs: loss 1e-5, grads 1e-4 (float32 statistics vs float64)
  bf16 inputs:    loss 1e-4 on CPU (float32 logits from the same bf16 values), 1e-3 on GPU (logits of a
                  bf16 GEMM); grads 2e-2 (the returned gradients, and on GPU dz, are rounded to bf16)
"""
import importlib
import math
import zlib

import pytest
import torch

from sdmprune.kernels.fused_linear_entropy_loss import fused_linear_entropy_loss, reference_linear_entropy_loss
from sdmprune.kernels.utils import interpreter_enabled, triton_available

from conftest import compile_for_h100

# The package re-exports the function under the module's name: take the module from sys.modules.
mod = importlib.import_module("sdmprune.kernels.fused_linear_entropy_loss")

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]
BACKENDS = ["torch", "triton"]


def tolerances(dtype, device):
    if dtype == torch.float32:
        return 1e-5, 1e-4
    return (1e-4 if device == "cpu" else 1e-3), 2e-2


def _triton_ok(device):
    return triton_available() and (device == "cuda" or interpreter_enabled())


def _skip_unless_runnable(backend, device):
    if backend == "triton" and not _triton_ok(device):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # dz is NaN before the row kernel / the torch rows write it: a column either misses shows up in
    # the gradients.
    assert hasattr(mod, "POISON_SCRATCH")
    monkeypatch.setattr(mod, "POISON_SCRATCH", True)


def entropy64(h, w, row_mask=None):
    """float64 reference straight from the definition: -sum p log p per row, mean over counted rows."""
    z = h.double() @ w.double().t()
    ent = torch.distributions.Categorical(logits=z).entropy()
    if row_mask is None:
        return ent.mean() if ent.numel() else ent.sum()
    return ent[row_mask].sum() / max(int(row_mask.sum()), 1) if row_mask.any() else z.sum() * 0


def _nerr(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _inputs(N, V, d, dtype, device, seed, masked=False, w_grad=True, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    # logit scale ~scale: softmaxes neither uniform nor one-hot (scale 4), or nearly one-hot (30)
    h = torch.randn(N, d, generator=g) / math.sqrt(d) * scale
    w = torch.randn(V, d, generator=g)
    m = (torch.rand(N, generator=g) < 0.6) if masked else None
    return (h.to(device, dtype).requires_grad_(True), w.to(device, dtype).requires_grad_(w_grad),
            None if m is None else m.to(device))


def _check(backend, device, h, w, m, dtype, **kw):
    _skip_unless_runnable(backend, device)
    loss = fused_linear_entropy_loss(h, w, m, backend=backend, **kw)
    loss.backward()
    h64 = h.detach().double().cpu().requires_grad_(True)
    w64 = w.detach().double().cpu().requires_grad_(w.requires_grad)
    m_cpu = None if m is None else m.cpu()
    ref = entropy64(h64, w64, m_cpu)
    ref.backward()
    # the reference function the tests of other modules use agrees with the definition
    assert abs(reference_linear_entropy_loss(h64.detach(), w64.detach(), m_cpu).item() - ref.item()) < 1e-12
    tl_, tg = tolerances(dtype, device)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref.item()) <= tl_ * max(1.0, abs(ref.item())), (loss.item(), ref.item())
    assert h.grad.dtype == dtype and h.grad.shape == h.shape
    assert _nerr(h.grad, h64.grad) <= tg
    if m is not None:
        assert (h.grad[~m] == 0).all()  # rows that do not count get no gradient at all
    if w.requires_grad:
        assert w.grad.dtype == dtype and _nerr(w.grad, w64.grad) <= tg
    else:
        assert w.grad is None


# (N, V, d, dtype, options): N, V, d not multiples of any block; token_chunk / vocab_block force
# several chunks and a ragged vocabulary tail; scale 30 makes near one-hot rows (entropy ~ 0).
CASES = [
    (1, 37, 16, torch.float32, dict()),
    (13, 300, 24, torch.float32, dict(masked=True, token_chunk=5, vocab_block=64)),
    (29, 1000, 40, torch.bfloat16, dict(masked=True, token_chunk=8)),
    (16, 37, 72, torch.float32, dict(w_grad=False, vocab_block=16, scale=30.0)),
    (7, 130, 16, torch.bfloat16, dict(token_chunk=3, vocab_block=16)),
]
_INPUT_KEYS = ("masked", "w_grad", "scale")


def _case_id(c):
    N, V, d, dt, o = c
    return f"N{N}-V{V}-d{d}-{str(dt)[6:]}" + "".join(f"-{k}" for k in o)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_float64(case, backend, device):
    N, V, d, dtype, opts = case
    seed = zlib.crc32(_case_id(case).encode()) % 10_000  # fresh per case, reproducible
    h, w, m = _inputs(N, V, d, dtype, device, seed, **{k: v for k, v in opts.items() if k in _INPUT_KEYS})
    _check(backend, device, h, w, m, dtype, **{k: v for k, v in opts.items() if k not in _INPUT_KEYS})


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_max_moves_late_and_early(backend):
    """Online rescaling: the row maximum in the last vocabulary block, in the first, or tied
    everywhere (uniform: entropy log V exactly), with blocks of 16 over V = 75."""
    _skip_unless_runnable(backend, "cpu")
    V = 75
    z = torch.stack([torch.linspace(-5, 25, V), torch.linspace(25, -5, V), torch.zeros(V)])
    # hidden = I (3 x 3) and weight = z^T (V x 3): the logits of row r are exactly z[r]
    weight = z.t().contiguous()
    hidden = torch.eye(3).requires_grad_(True)
    loss = fused_linear_entropy_loss(hidden, weight, backend=backend, vocab_block=16)
    loss.backward()
    h64 = torch.eye(3, dtype=torch.float64).requires_grad_(True)
    ref = entropy64(h64, weight.double())
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-6
    assert _nerr(hidden.grad, h64.grad) <= 1e-5
    one = fused_linear_entropy_loss(torch.eye(3)[2:], weight, backend=backend, vocab_block=16)
    assert abs(one.item() - math.log(V)) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_counted_rows_and_empty_input(backend):
    _skip_unless_runnable(backend, "cpu")
    # every row masked out: loss 0, zero gradients (exactly), never NaN
    h, w, _ = _inputs(5, 37, 16, torch.float32, "cpu", 2)
    loss = fused_linear_entropy_loss(h, w, torch.zeros(5, dtype=torch.bool), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all() and (w.grad == 0).all()
    # N = 0: loss 0 and empty gradients
    h, w, _ = _inputs(0, 37, 16, torch.float32, "cpu", 3)
    loss = fused_linear_entropy_loss(h, w, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 16) and (w.grad == 0).all()
    # no mask = every row counted
    h, w, _ = _inputs(6, 37, 16, torch.float32, "cpu", 4)
    a = fused_linear_entropy_loss(h, w, backend=backend)
    b = fused_linear_entropy_loss(h, w, torch.ones(6, dtype=torch.bool), backend=backend)
    assert a.item() > 0 and torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the NaN rows
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_rows_never_count_even_if_poisoned(backend):
    """Masked rows hold NaN / inf hidden states (padding garbage): the loss and both gradients equal
    the reference on the counted rows alone, finite."""
    _skip_unless_runnable(backend, "cpu")
    h, w, m = _inputs(11, 300, 24, torch.float32, "cpu", 5, masked=True)
    clean = h.detach().clone()
    bad = h.detach().clone()
    bad[~m] = float("nan")
    bad[torch.nonzero(~m)[0]] = float("inf")
    bad.requires_grad_(True)
    loss = fused_linear_entropy_loss(bad, w, m, backend=backend, token_chunk=4)
    loss.backward()
    h64 = clean.double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    ref = entropy64(h64, w64, m)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert (bad.grad[~m] == 0).all() and _nerr(bad.grad, h64.grad) <= 1e-4
    assert _nerr(w.grad, w64.grad) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scaling_and_no_grad(backend, monkeypatch):
    _skip_unless_runnable(backend, "cpu")
    h, w, m = _inputs(9, 37, 16, torch.float32, "cpu", 6, masked=True, w_grad=False)
    h1 = h.detach().clone().requires_grad_(True)
    (3.0 * fused_linear_entropy_loss(h1, w, m, backend=backend)).backward()  # a scaled loss
    h2 = h.detach().clone().requires_grad_(True)
    l2 = fused_linear_entropy_loss(h2, w, m, backend=backend)
    l2.backward()
    assert torch.allclose(h1.grad, 3.0 * h2.grad, rtol=1e-6, atol=0)
    assert not torch.allclose(h1.grad, h2.grad, rtol=1e-2)  # the factor 3 is really there
    # forward only under no_grad: no logit gradient is formed (dz would be filled with NaN first)
    fills = []
    real_full = torch.Tensor.fill_
    monkeypatch.setattr(torch.Tensor, "fill_", lambda t, v: fills.append(t.shape) or real_full(t, v))
    with torch.no_grad():
        l3 = fused_linear_entropy_loss(h2, w, m, backend=backend)
    assert torch.equal(l3, l2.detach()) and fills == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_allocates_n_by_v(backend):
    """Every tensor made during forward+backward is at most one float32 chunk of logits (token_chunk
    x V), far below N x V. Counted in bytes: the interpreter copies storages as uint8."""
    _skip_unless_runnable(backend, "cpu")
    from conftest import LargestTensor as Biggest

    N, V, d = 64, 1000, 16
    h, w, m = _inputs(N, V, d, torch.float32, "cpu", 7, masked=True)
    with Biggest():
        loss = fused_linear_entropy_loss(h, w, m, backend=backend, token_chunk=16)
        loss.backward()
    assert 0 < Biggest.biggest <= 16 * V * 4 < N * V * 4


def test_auto_backend_and_bad_inputs(monkeypatch):
    h, w, m = _inputs(4, 37, 16, torch.float32, "cpu", 8, masked=True)
    ran = []
    monkeypatch.setattr(mod, "_rows_triton", lambda *a: ran.append("triton"))
    monkeypatch.setattr(mod, "_rows_torch", lambda *a: ran.append("torch"))
    fused_linear_entropy_loss(h, w, m)
    assert ran == ["triton" if _triton_ok("cpu") else "torch"]
    with pytest.raises(ValueError, match="backend"):
        fused_linear_entropy_loss(h, w, backend="cuda")
    if not _triton_ok("cpu"):
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            fused_linear_entropy_loss(h, w, backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_entropy_loss(h, w.detach().double())
    with pytest.raises(ValueError, match="row_mask"):
        fused_linear_entropy_loss(h, w, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        fused_linear_entropy_loss(h[None], w)


def test_entropy_rows_kernel_compiles_for_h100():
    """The row kernel compiles to sm_90 (no GPU needed), with and without the gradient pass, for the
    dz dtypes the launcher uses (bf16 on GPU for half models, float32 otherwise)."""
    for dz in ("*bf16", "*fp32"):
        sig = {"z_ptr": "*fp32", "c_ptr": "*fp32", "dz_ptr": dz, "ent_ptr": "*fp32", "V": "i32",
               "stride_z": "i32", "stride_dz": "i32"}
        for need_grad in (True, False):
            compile_for_h100(mod._entropy_rows_kernel, sig, {"NEED_GRAD": need_grad, "BLOCK_V": 2048}, num_warps=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_triton_matches_torch_backend_at_llama_vocab():
    """A real vocabulary size (V = 128256, several 2048-wide blocks and a ragged tail) and chunks."""
    h, w, m = _inputs(300, 128256, 256, torch.bfloat16, "cuda", 9, masked=True, w_grad=False)
    out = {}
    for backend in BACKENDS:
        hh = h.detach().clone().requires_grad_(True)
        loss = fused_linear_entropy_loss(hh, w, m, backend=backend, token_chunk=128)
        loss.backward()
        out[backend] = (loss.item(), hh.grad)
    assert abs(out["triton"][0] - out["torch"][0]) <= 1e-4 * max(1.0, abs(out["torch"][0]))
    assert _nerr(out["triton"][1], out["torch"][1]) <= 2e-2
