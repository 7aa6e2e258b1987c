"""fused_linear_distill_loss against a float64 materialized-logits implementation written here.

Backends: "triton" (cuBLAS/torch chunk GEMMs + the Triton row kernel), "triton_tiled" (the fully fused
tile kernels; both Triton backends run on CPU only under TRITON_INTERPRET=1) and "torch" (the chunked
PyTorch reference, the package's CPU path). Devices: cpu, and cuda when present.
Tolerances (error normalized by the reference's max magnitude, |a - b|.max() / |b|.max()):
  float32 inputs: loss 1e-5, grads 1e-4 (float32 statistics vs float64)
  bf16 inputs:    loss 1e-3 (float32 logits from the same bf16 values), grads 2e-2 (dz and the
                  returned gradients are rounded to bf16 on GPU: ~2^-8 relative)
"""
import importlib
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from sdmprune.kernels.fused_linear_distill_loss import (
    FusedLinearDistillLoss,
    fused_linear_distill_loss,
    plan_chunks,
    reference_linear_distill_loss,
)
from sdmprune.kernels.utils import interpreter_enabled, triton_available

from conftest import compile_for_h100

# The package re-exports the function under the module's name: take the module from sys.modules.
mod = importlib.import_module("sdmprune.kernels.fused_linear_distill_loss")

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-3, 2e-2)}
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def _triton_ok(device):
    return triton_available() and (device == "cuda" or interpreter_enabled())


BACKENDS = ["torch", "triton", "triton_tiled"]
TRITON_BACKENDS = ("triton", "triton_tiled")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Scratch is NaN before a kernel writes it: dz of "triton" (any column the row kernel misses
    # shows up in the grads) and the per-(row, split) partial statistics of "triton_tiled" (an entry
    # the forward kernel misses, e.g. of an empty split, makes the loss NaN).
    assert hasattr(mod, "POISON_SCRATCH")
    monkeypatch.setattr(mod, "POISON_SCRATCH", True)


def ref64(h_s, w, labels, h_t=None, w_t=None, alpha=0.5, T=1.0, ignore_index=-100, kl_mask=None):
    """Materialized float64 logits; the teacher path is detached (it never gets gradients)."""
    zs = h_s.double() @ w.double().t()
    valid = labels != ignore_index
    n_ce = int(valid.sum())
    ce = F.cross_entropy(zs[valid], labels[valid], reduction="sum") / n_ce if n_ce else zs.sum() * 0
    if h_t is None:
        return ce, ce.detach(), torch.zeros((), dtype=torch.float64)
    wt = (w if w_t is None else w_t).detach()
    logp = torch.log_softmax(h_t.detach().double() @ wt.double().t() / T, dim=1)
    logq = torch.log_softmax(zs, dim=1)
    kl_rows = (logp.exp() * (logp - logq)).sum(1)
    m = torch.ones_like(valid) if kl_mask is None else kl_mask
    n_kl = int(m.sum())
    kl = kl_rows[m].sum() / n_kl if n_kl else zs.sum() * 0
    return (1 - alpha) * ce + alpha * kl, ce.detach(), kl.detach()


def _nerr(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _inputs(N, V, d, dtype, device, seed, ignored=0, separate_teacher_w=False, teacher=True,
            kl_mask=False, w_grad=True):
    g = torch.Generator().manual_seed(seed)
    # Logit scale ~3-4 so that softmaxes are neither uniform nor one-hot.
    h_s = torch.randn(N, d, generator=g) / math.sqrt(d) * 4
    w = torch.randn(V, d, generator=g)
    h_t = h_s + 0.5 * torch.randn(N, d, generator=g) if teacher else None
    w_t = w + 0.2 * torch.randn(V, d, generator=g) if separate_teacher_w else None
    labels = torch.randint(0, V, (N,), generator=g)
    if ignored:
        labels[torch.randperm(N, generator=g)[:ignored]] = -100
    m = (torch.rand(N, generator=g) < 0.6) if kl_mask else None

    def dev(t, grad=False):
        if t is None:
            return None
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return t.requires_grad_(grad) if t.is_floating_point() else t

    return dict(h_s=dev(h_s, True), w=dev(w, w_grad), labels=dev(labels), h_t=dev(h_t),
                w_t=dev(w_t), kl_mask=None if m is None else m.to(device))


def _run(backend, x, alpha, T, **kw):
    h_s = x["h_s"].detach().clone().requires_grad_(True)
    w = x["w"].detach().clone().requires_grad_(x["w"].requires_grad)
    fn = fused_linear_distill_loss if backend in TRITON_BACKENDS else reference_linear_distill_loss
    extra = dict(backend=backend) if backend in TRITON_BACKENDS else {}
    loss, ce, kl = fn(h_s, w, x["labels"], x["h_t"], teacher_weight=x["w_t"], alpha=alpha,
                      temperature=T, kl_mask=x["kl_mask"], return_parts=True, **extra, **kw)
    loss.backward()
    return loss, ce, kl, h_s.grad, w.grad


def _check(backend, device, x, alpha, T, dtype, **kw):
    if backend in TRITON_BACKENDS and not _triton_ok(device):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    loss, ce, kl, gh, gw = _run(backend, x, alpha, T, **kw)
    h64 = x["h_s"].detach().double().cpu().requires_grad_(True)
    w64 = x["w"].detach().double().cpu().requires_grad_(x["w"].requires_grad)
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    rl, rce, rkl = ref64(h64, w64, cpu(x["labels"]), cpu(x["h_t"]), cpu(x["w_t"]), alpha, T,
                         kl_mask=cpu(x["kl_mask"]))
    rl.backward()
    tl_, tg = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - rl.item()) <= tl_ * max(1.0, abs(rl.item())), (loss.item(), rl.item())
    assert abs(ce.item() - rce.item()) <= tl_ * max(1.0, abs(rce.item()))
    assert abs(kl.item() - rkl.item()) <= tl_ * max(1.0, abs(rkl.item()))
    assert gh.dtype == dtype and gh.shape == x["h_s"].shape
    if h64.grad is None:  # the loss does not depend on h_s (alpha = 1 with KL masked out, ...)
        assert (gh == 0).all()
    else:
        assert _nerr(gh, h64.grad) <= tg
    if x["w"].requires_grad:
        assert gw.dtype == dtype and _nerr(gw, w64.grad) <= tg
    else:
        assert gw is None


# Each axis value appears at least once; the interpreter cost stays small (few rows x blocks).
# (N, V, d, alpha, T, dtype, options); token_chunk / vocab_block drive the chunked backends,
# vocab_splits the tiled one (default 2 under the interpreter; 16 > the 8 vocabulary tiles of
# BLOCK_V = 128 at V = 1000 leaves empty splits; V = 37 is one tile, so split 2 is empty too) and
# the split row pass of "triton" (default 1 off CUDA; 3 and 16 here, 16 with spans of 63 columns).
CASES = [
    (1, 37, 16, 0.4, 1.0, torch.float32, dict()),
    (7, 1000, 72, 0.0, 0.2, torch.bfloat16, dict(ignored=2, kl_mask=True, vocab_splits=3)),
    (64, 37, 72, 1.0, 2.0, torch.float32, dict(ignored=5, kl_mask=True, separate_teacher_w=True,
                                                token_chunk=16, vocab_block=16)),
    (64, 1000, 16, 0.4, 0.2, torch.bfloat16, dict(ignored=9, token_chunk=24, vocab_splits=16)),
    (7, 37, 72, 0.4, 2.0, torch.bfloat16, dict(ignored=1, token_chunk=3, vocab_block=16)),
    (64, 1000, 72, 0.4, 1.0, torch.float32, dict(kl_mask=True, w_grad=False, token_chunk=40,
                                                  vocab_splits=1)),
    (7, 1000, 16, 0.0, 1.0, torch.float32, dict(teacher=False, ignored=3, token_chunk=4)),  # fused CE
    (64, 37, 16, 1.0, 0.2, torch.bfloat16, dict(teacher=False)),  # alpha ignored without teacher
]
_INPUT_KEYS = ("ignored", "separate_teacher_w", "teacher", "kl_mask", "w_grad")


def _case_id(c):
    N, V, d, a, T, dt, o = c
    return f"N{N}-V{V}-d{d}-a{a}-T{T}-{str(dt)[6:]}" + "".join(f"-{k}" for k in o)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_float64(case, backend, device):
    N, V, d, alpha, T, dtype, opts = case
    seed = zlib.crc32(_case_id(case).encode()) % 10_000  # fresh per case, reproducible
    inp = {k: v for k, v in opts.items() if k in _INPUT_KEYS}
    kw = {k: v for k, v in opts.items() if k not in _INPUT_KEYS}
    if backend == "torch":
        kw.pop("vocab_block", None)
        kw.pop("vocab_splits", None)
    if backend == "triton_tiled":  # the chunk knobs would be ignored: drop them for clarity
        kw.pop("vocab_block", None)
        kw.pop("token_chunk", None)
    x = _inputs(N, V, d, dtype, device, seed, **inp)
    _check(backend, device, x, alpha, T, dtype, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, device):
    if backend in TRITON_BACKENDS and not _triton_ok(device):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    kw = dict(backend=backend)
    # N = 0: loss 0, empty grads, no NaN.
    x = _inputs(0, 37, 16, torch.float32, device, 1)
    loss = fused_linear_distill_loss(x["h_s"], x["w"], x["labels"], x["h_t"], **kw)
    loss.backward()
    assert loss.item() == 0.0 and x["h_s"].grad.shape == (0, 16) and (x["w"].grad == 0).all()
    # Every label ignored and no KL row counted: loss 0 and zero grads, not NaN.
    x = _inputs(5, 37, 16, torch.float32, device, 2, ignored=5)
    loss, ce, kl = fused_linear_distill_loss(x["h_s"], x["w"], x["labels"], x["h_t"], alpha=0.4,
                                             kl_mask=torch.zeros(5, dtype=torch.bool, device=device),
                                             return_parts=True, **kw)
    loss.backward()
    assert loss.item() == 0.0 and ce.item() == 0.0 and kl.item() == 0.0
    assert (x["h_s"].grad == 0).all() and (x["w"].grad == 0).all()
    # All labels ignored, KL counted: loss = alpha * KL exactly.
    x = _inputs(5, 37, 16, torch.float32, device, 3, ignored=5)
    loss, ce, kl = fused_linear_distill_loss(x["h_s"], x["w"], x["labels"], x["h_t"], alpha=0.4,
                                             return_parts=True, **kw)
    assert ce.item() == 0.0 and kl.item() > 0 and torch.allclose(loss, 0.4 * kl)
    # Student == teacher at T = 1: KL = 0 and its gradient is 0 (why SDMPrune needs two stages).
    x = _inputs(6, 37, 16, torch.float32, device, 4)
    loss, ce, kl = fused_linear_distill_loss(x["h_s"], x["w"], x["labels"], x["h_s"].detach(),
                                             alpha=1.0, return_parts=True, **kw)
    loss.backward()
    assert abs(kl.item()) < 1e-5 and x["h_s"].grad.abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scaling_and_module(backend, monkeypatch):
    if backend in TRITON_BACKENDS and not _triton_ok("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    x = _inputs(9, 37, 16, torch.float32, "cpu", 5, ignored=2)
    h1 = x["h_s"].detach().clone().requires_grad_()
    l1 = fused_linear_distill_loss(h1, x["w"].detach(), x["labels"], x["h_t"], alpha=0.3,
                                   temperature=0.5, backend=backend)
    (3.0 * l1).backward()  # the pipeline scales batch losses: grads must follow grad_output
    h2 = x["h_s"].detach().clone().requires_grad_()
    crit = FusedLinearDistillLoss(alpha=0.3, temperature=0.5, backend=backend)
    l2 = crit(h2, x["w"].detach(), x["labels"], x["h_t"])
    l2.backward()
    assert torch.allclose(l1, l2)
    if backend == "triton_tiled":
        # grad_output scales the row coefficients before the dz @ W products: rounding differs
        # in the last bits, so near-zero entries get an absolute tolerance
        atol = 1e-6 * h1.grad.abs().max().item()
        assert torch.allclose(h1.grad, 3.0 * h2.grad, rtol=1e-5, atol=atol)
        assert not torch.allclose(h1.grad, h2.grad, rtol=1e-2)  # the factor 3 is really there
    else:
        assert torch.allclose(h1.grad, 3.0 * h2.grad, rtol=1e-6, atol=0)
    # forward only under no_grad: the same loss, and no logit gradient is formed although h2 requires
    # grad (the chunked backends poison dz before writing it, so a formed dz shows as a [9, 37] fill)
    fills = []
    real_fill = torch.Tensor.fill_
    monkeypatch.setattr(torch.Tensor, "fill_", lambda t, v: fills.append(tuple(t.shape)) or real_fill(t, v))
    with torch.no_grad():
        l3 = fused_linear_distill_loss(h2, x["w"], x["labels"], x["h_t"], alpha=0.3, temperature=0.5,
                                       backend=backend)
    assert torch.allclose(l3, l2) and (9, 37) not in fills
    if backend != "triton_tiled":  # the check can fail: with grad enabled the chunk's dz is poisoned
        fused_linear_distill_loss(h2, x["w"], x["labels"], x["h_t"], alpha=0.3, temperature=0.5, backend=backend)
        assert (9, 37) in fills


def test_tiled_splits_and_shared_head():
    """triton_tiled: the split combine is exact up to float32 rounding for any number of splits
    (1, uneven, more splits than vocabulary tiles), and an explicit teacher_weight aliasing weight
    (the shared-W kernel path) gives the same result as teacher_weight=None."""
    if not _triton_ok("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    x = _inputs(9, 300, 24, torch.float32, "cpu", 8, ignored=2)
    h64 = x["h_s"].detach().double().requires_grad_(True)
    w64 = x["w"].detach().double().requires_grad_(True)
    rl, _, _ = ref64(h64, w64, x["labels"], x["h_t"], alpha=0.3, T=0.7)
    rl.backward()
    for splits, tw in ((1, None), (2, "alias"), (5, None)):
        h = x["h_s"].detach().clone().requires_grad_(True)
        w = x["w"].detach().clone().requires_grad_(True)
        loss = fused_linear_distill_loss(h, w, x["labels"], x["h_t"], alpha=0.3, temperature=0.7,
                                         teacher_weight=w if tw else None, backend="triton_tiled",
                                         vocab_splits=splits)
        loss.backward()
        assert abs(loss.item() - rl.item()) <= 1e-5 * max(1.0, abs(rl.item())), (splits, tw)
        assert _nerr(h.grad, h64.grad) <= 1e-4 and _nerr(w.grad, w64.grad) <= 1e-4, (splits, tw)
    with pytest.raises(ValueError, match="vocab_splits"):
        fused_linear_distill_loss(x["h_s"], x["w"], x["labels"], x["h_t"], backend="triton_tiled",
                                  vocab_splits=0)


def test_plan_is_bounded():
    """Scratch is token_chunk * bytes_per_row, far below one N x V float32 tensor at real sizes."""
    N, V, d = 8192, 128256, 4096
    for dev, budget in (("cuda", 768 << 20), ("cpu", 256 << 20)):
        for has_t in (True, False):
            p = plan_chunks(N, V, d, torch.bfloat16, dev, has_teacher=has_t)
            assert p.scratch_bytes <= budget and p.scratch_bytes < N * V * 4
            assert 1 <= p.token_chunk < N and p.token_chunk % 16 == 0
            assert p.num_chunks == math.ceil(N / p.token_chunk)
            assert p.bytes_per_row == V * (4 + 4 * has_t + (2 if dev == "cuda" else 4))
    p = plan_chunks(8192, 128256, 4096, torch.bfloat16, "cuda")
    assert p.token_chunk == 512 and p.vocab_block == 2048  # the documented choice (656 MB)
    p = plan_chunks(7, 37, 16, torch.float32, "cpu")
    assert p.token_chunk == 7 and p.num_chunks == 1 and p.vocab_block == 64
    assert plan_chunks(0, 37, 16, torch.float32, "cpu").num_chunks == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_allocates_n_by_v(backend):
    """Every tensor any op creates during forward+backward is at most one float32 chunk of logits
    (token_chunk x V), far below N x V. Counted in bytes: the interpreter copies storages as uint8."""
    if backend in TRITON_BACKENDS and not _triton_ok("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    from conftest import LargestTensor as Biggest

    N, V, d = 64, 1000, 16
    x = _inputs(N, V, d, torch.float32, "cpu", 6)
    with Biggest():
        loss = fused_linear_distill_loss(x["h_s"], x["w"], x["labels"], x["h_t"], backend=backend,
                                         token_chunk=16)
        loss.backward()
    if backend == "triton_tiled":
        # no logits at all: the float32 dW [V, d] (and the interpreter's copy of W) is the largest
        bound = max(V * d * 4, N * d * 4, mod._NSTAT * 2 * N * 4)
        assert 0 < Biggest.biggest <= bound < N * V * 4
    else:
        assert 0 < Biggest.biggest <= 16 * V * 4 < N * V * 4


def test_bad_inputs():
    x = _inputs(4, 37, 16, torch.float32, "cpu", 7)
    with pytest.raises(ValueError, match="labels"):
        reference_linear_distill_loss(x["h_s"], x["w"], torch.tensor([0, 1, 37, 2]), x["h_t"])
    with pytest.raises(ValueError, match="temperature"):
        reference_linear_distill_loss(x["h_s"], x["w"], x["labels"], x["h_t"], temperature=0.0)
    with pytest.raises(ValueError, match="dtype"):
        reference_linear_distill_loss(x["h_s"], x["w"].detach().double(), x["labels"])
    with pytest.raises(ValueError, match="backend"):
        fused_linear_distill_loss(x["h_s"], x["w"], x["labels"], backend="cuda")


def test_kernel_compiles_for_h100():
    """The Triton kernel compiles to sm_90 code on this machine (no GPU needed), so a GPU-only
    type error cannot hide behind the interpreter."""
    sig = {"zs_ptr": "*fp32", "zt_ptr": "*fp32", "labels_ptr": "*i64", "cce_ptr": "*fp32",
           "ckl_ptr": "*fp32", "dz_ptr": "*bf16", "ce_ptr": "*fp32", "kl_ptr": "*fp32", "V": "i32",
           "stride_zs": "i32", "stride_zt": "i32", "stride_dz": "i32", "inv_T": "fp32",
           "ignore_index": "i32"}
    for has_t in (True, False):
        compile_for_h100(mod._distill_rows_kernel, sig, {"HAS_TEACHER": has_t, "NEED_GRAD": True, "BLOCK_V": 2048},
                         num_warps=8)
    # the split row pass (chunks of few rows on a GPU)
    stats = {"zs_ptr": "*fp32", "zt_ptr": "*fp32", "part_ptr": "*fp32", "C": "i32", "V": "i32", "SPAN": "i32",
             "stride_zs": "i32", "stride_zt": "i32", "inv_T": "fp32"}
    finish = {"zs_ptr": "*fp32", "zt_ptr": "*fp32", "labels_ptr": "*i64", "cce_ptr": "*fp32", "ckl_ptr": "*fp32",
              "part_ptr": "*fp32", "dz_ptr": "*bf16", "ce_ptr": "*fp32", "kl_ptr": "*fp32", "C": "i32", "V": "i32",
              "SPAN": "i32", "stride_zs": "i32", "stride_zt": "i32", "stride_dz": "i32", "inv_T": "fp32",
              "ignore_index": "i32"}
    for has_t in (True, False):
        compile_for_h100(mod._split_rows_stats_kernel, stats, {"HAS_TEACHER": has_t, "BLOCK_V": 2048}, num_warps=8)
        compile_for_h100(mod._split_rows_finish_kernel, finish, {"HAS_TEACHER": has_t, "NEED_GRAD": True,
                                                                 "BLOCK_S": 8, "BLOCK_V": 2048}, num_warps=8)


def test_tiled_kernels_compiles_for_h100():
    """The fused tile kernels (forward statistics, backward with dH/dW atomics) compile to sm_90
    for the flag combinations the launcher uses, at the largest autotune tile."""
    ptrs = {"hs_ptr": "*bf16", "w_ptr": "*bf16", "ht_ptr": "*bf16", "wt_ptr": "*bf16", "labels_ptr": "*i64"}
    strides = ["s_hs_n", "s_hs_d", "s_w_v", "s_w_d", "s_ht_n", "s_ht_d", "s_wt_v", "s_wt_d"]
    fwd_sig = dict(ptrs, part_ptr="*fp32", N="i32", V="i32", D="i32", S="i32", inv_T="fp32",
                   **{k: "i32" for k in strides})
    bwd_sig = dict(ptrs, lse_s_ptr="*fp32", lse_t_ptr="*fp32", cce_ptr="*fp32", ckl_ptr="*fp32",
                   dh_ptr="*fp32", dw_ptr="*fp32", N="i32", V="i32", D="i32", inv_T="fp32",
                   **{k: "i32" for k in strides + ["s_dh_n", "s_dh_d", "s_dw_v", "s_dw_d"]})
    tiles = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32)
    flag_sets = [dict(HAS_TEACHER=True, SHARED_W=True), dict(HAS_TEACHER=True, SHARED_W=False),
                 dict(HAS_TEACHER=False, SHARED_W=True)]
    jobs = []
    for f, need_w in zip(flag_sets, (True, False, True)):  # 6 compiles: each flag and dW on/off
        common = dict(f, UPCAST=False, PRECISION="tf32", **tiles)
        jobs.append((mod._tiled_fwd_kernel, fwd_sig, common))
        jobs.append((mod._tiled_bwd_kernel, bwd_sig,
                     dict(common, NEED_DH=True, NEED_DW=need_w, GROUP_N=mod._BWD_GROUP_N)))
    for fn, sig, cx in jobs:
        compiled = compile_for_h100(fn, sig, cx, num_warps=8, num_stages=3)
        assert "ptx" in compiled.asm and "cubin" in compiled.asm
        if fn is mod._tiled_bwd_kernel:
            assert "atom" in compiled.asm["ptx"] or "red." in compiled.asm["ptx"]  # the float32 atomics


def test_tiled_autotune_configs_compiles_without_spills(monkeypatch):
    """Every config of both autotune lists (the default and SDMPRUNE_TILED_AUTOTUNE=full) compiles to
    sm_90 without register spills. A representative subset keeps it near 20 s: every config with the
    flag set that holds the most registers (teacher with its own W: forward, and backward with dW),
    the default list also with a shared W (forward, backward without dW). The other combinations
    (no teacher; dW off with a separate W) hold fewer live tiles and were checked by hand."""
    from conftest import ptxas_usage

    if not triton_available():
        pytest.skip("needs triton")
    ptrs = {"hs_ptr": "*bf16", "w_ptr": "*bf16", "ht_ptr": "*bf16", "wt_ptr": "*bf16", "labels_ptr": "*i64"}
    strides = ["s_hs_n", "s_hs_d", "s_w_v", "s_w_d", "s_ht_n", "s_ht_d", "s_wt_v", "s_wt_d"]
    fwd_sig = dict(ptrs, part_ptr="*fp32", N="i32", V="i32", D="i32", S="i32", inv_T="fp32",
                   **{k: "i32" for k in strides})
    bwd_sig = dict(ptrs, lse_s_ptr="*fp32", lse_t_ptr="*fp32", cce_ptr="*fp32", ckl_ptr="*fp32",
                   dh_ptr="*fp32", dw_ptr="*fp32", N="i32", V="i32", D="i32", inv_T="fp32",
                   **{k: "i32" for k in strides + ["s_dh_n", "s_dh_d", "s_dw_v", "s_dw_d"]})

    def tiles(configs):
        return {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages)
                for c in configs}

    default = tiles(mod._tiled_configs())
    monkeypatch.setenv("SDMPRUNE_TILED_AUTOTUNE", "full")
    full = tiles(mod._tiled_configs())
    assert default and full
    jobs = [(t, dict(HAS_TEACHER=True, SHARED_W=False), need_w) for t in sorted(default | full) for need_w in (None, True)]
    jobs += [(t, dict(HAS_TEACHER=True, SHARED_W=True), need_w) for t in sorted(default) for need_w in (None, False)]
    spilled = []
    for (bn, bv, bd, warps, stages), flags, need_w in jobs:
        cx = dict(flags, UPCAST=False, PRECISION="tf32", BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd)
        if need_w is None:  # the forward kernel
            fn, sig = mod._tiled_fwd_kernel, fwd_sig
        else:
            fn, sig = mod._tiled_bwd_kernel, bwd_sig
            cx.update(NEED_DH=True, NEED_DW=need_w, GROUP_N=mod._BWD_GROUP_N)
        regs, spills = ptxas_usage(monkeypatch, fn, sig, cx, num_warps=warps, num_stages=stages)
        assert 0 < regs <= 255
        if spills:
            spilled.append(((bn, bv, bd, warps, stages), flags, need_w, regs, spills))
    assert not spilled, f"configs that spill registers on sm_90 (tile, flags, dW, regs, bytes): {spilled}"


@pytest.mark.skipif(not (triton_available() and interpreter_enabled()), reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("V,splits", [(37, 16), (300, 7), (1000, 2)])
def test_split_row_pass_equals_one_program_per_row(V, splits, monkeypatch):
    """(row, split) programs (empty splits included at V = 37, S = 16) give the one-program-per-row
    result: float32, loss and gradients to 1e-6 relative (only the summation order differs)."""
    launched = []
    real = mod._split_rows_stats_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(mod, "_split_rows_stats_kernel", Spy())
    x = _inputs(11, V, 24, torch.float32, "cpu", 3, ignored=2, kl_mask=True)
    out = {}
    for s in (1, splits):
        h = x["h_s"].detach().clone().requires_grad_(True)
        w = x["w"].detach().clone().requires_grad_(True)
        loss, ce, kl = fused_linear_distill_loss(h, w, x["labels"], x["h_t"], alpha=0.4, temperature=0.5,
                                                 kl_mask=x["kl_mask"], return_parts=True, backend="triton",
                                                 token_chunk=4, vocab_splits=s)
        loss.backward()
        out[s] = (loss.detach(), ce, kl, h.grad, w.grad)
    assert len(launched) == 3 and all(g == (n, splits) for g, n in zip(launched, (4, 4, 3)))
    for a, b in zip(out[1], out[splits]):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * max(1.0, a.abs().max().item()))


def test_default_row_splits_policy(monkeypatch):
    """CUDA (132 SMs faked): chunks under 2 rows per SM split to about 4 programs per SM, at least 4
    vocabulary blocks a split; larger chunks and other devices keep one program per row."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: type("P", (), {"multi_processor_count": 132}))
    splits = mod.default_row_splits
    assert splits(128, 128256, 2048, "cuda") == 5  # ceil(4 * 132 / 128)
    assert splits(16, 128256, 2048, "cuda") == 15  # capped: 128256 // (4 * 2048)
    assert splits(264, 128256, 2048, "cuda") == 1 and splits(512, 128256, 2048, "cuda") == 1
    assert splits(128, 4000, 2048, "cuda") == 1  # a short vocabulary is not split
    assert splits(128, 128256, 2048, "cpu") == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the NaN rows
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_gradient_never_count_even_if_poisoned(backend):
    """Rows with an ignored label outside the KL mask hold NaN / inf hidden states (padding garbage):
    the loss and both gradients equal the float64 reference of the clean inputs, finite. (dW once took
    0 * inf = NaN from such a row.)"""
    if backend in TRITON_BACKENDS and not _triton_ok("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    x = _inputs(11, 300, 24, torch.float32, "cpu", 5, kl_mask=True)
    dropped = torch.zeros(11, dtype=torch.bool)
    dropped[[1, 4, 9]] = True
    x["labels"][dropped] = -100
    x["kl_mask"][dropped] = False
    bad = x["h_s"].detach().clone()
    bad[dropped] = float("nan")
    bad[1] = float("inf")
    bad.requires_grad_(True)
    w = x["w"].detach().clone().requires_grad_(True)
    loss = fused_linear_distill_loss(bad, w, x["labels"], x["h_t"], alpha=0.4, temperature=0.7,
                                     kl_mask=x["kl_mask"], backend=backend, token_chunk=4)
    loss.backward()
    h64 = x["h_s"].detach().double().requires_grad_(True)
    w64 = x["w"].detach().double().requires_grad_(True)
    ref, _, _ = ref64(h64, w64, x["labels"], x["h_t"].double(), None, 0.4, 0.7, kl_mask=x["kl_mask"])
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert (bad.grad[dropped] == 0).all() and torch.isfinite(bad.grad).all()
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(bad.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
