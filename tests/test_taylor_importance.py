"""Fused Taylor-importance accumulation (sdmprune_kernels/taylor_importance.py) and the gated-MLP Function
(sdmprune_kernels/gated_mlp.py), against float64 references.

Tolerances. The kernel reads its inputs as given (bf16 values are exact in fp32/fp64) and
accumulates in fp32, so against a float64 reference on the same (already rounded) inputs both dtypes
get rtol 1e-4 with atol 1e-5 x max|ref| (cancellation inside S can make small entries relatively
worse). The gated-MLP dX: fp32 rtol 1e-5 vs autograd in fp32; bf16 compared with autograd run in
bf16 (same op order), atol 2e-2 x max|ref|.
"""
import pytest
import torch
from torch import nn

from sdmprune.kernels.gated_mlp import (ACTIVATIONS, activation_backward, activation_grad, apply_activation,
                                        gated_mlp_with_importance)
from sdmprune.kernels import taylor_importance as tmod
from sdmprune.kernels.taylor_importance import accumulate_taylor_scores_
from sdmprune.kernels.utils import interpreter_enabled, triton_available

from conftest import compile_for_h100, ptxas_usage

TAYLOR_PTRS = ("x_ptr", "dg_ptr", "du_ptr", "h_ptr", "dy_ptr", "wg_ptr", "wu_ptr", "wd_ptr")
TAYLOR_INTS = ["I", "D", "s_xt", "s_xd", "s_gt", "s_gi", "s_ut", "s_ui", "s_ht", "s_hi", "s_yt", "s_yd",
               "s_wgi", "s_wgd", "s_wui", "s_wud", "s_wdd", "s_wdi"]

TOL = {torch.float32: dict(rtol=1e-4, atol_rel=1e-5), torch.bfloat16: dict(rtol=1e-4, atol_rel=1e-5)}

triton_cpu = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                reason="Triton on CPU needs TRITON_INTERPRET=1")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference_scores(x, d_gate, d_up, h, dy, w_gate, w_up, w_down, seg, keep=None):
    """float64: sum over segments of sum_j |S_s[c, j]| / d, S_s built from explicit weight gradients."""
    x, d_gate, d_up, h, dy, w_gate, w_up, w_down = (t.double().cpu() for t in (x, d_gate, d_up, h, dy, w_gate, w_up, w_down))
    out = torch.zeros(w_gate.shape[0], dtype=torch.float64)
    for a, b in zip(seg[:-1].tolist(), seg[1:].tolist()):
        rows = torch.arange(a, b)
        if keep is not None:
            rows = rows[keep.cpu()[a:b]]
        g_gate = d_gate[rows].t() @ x[rows]
        g_up = d_up[rows].t() @ x[rows]
        g_down = dy[rows].t() @ h[rows]  # [d, I], the true layout of W_down's gradient
        S = g_up * w_up + g_gate * w_gate + (g_down * w_down).t()
        out += S.abs().sum(1) / x.shape[1]
    return out


def make_inputs(T, I, d, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return dict(x=r(T, d), d_gate=r(T, I), d_up=r(T, I), h=r(T, I), dy=r(T, d),
                w_gate=r(I, d), w_up=r(I, d), w_down=r(d, I))


def check_increment(backend, T, I, d, seg, dtype, keep=None, device="cpu", **kw):
    inp = make_inputs(T, I, d, dtype, device)
    seg_t = torch.tensor(seg, device=device)
    keep_t = None if keep is None else torch.tensor(keep, device=device)
    start = torch.rand(I, device=device) + 0.5  # accumulated in place: start nonzero, check the increment
    scores = start.clone()
    out = accumulate_taylor_scores_(scores, seg_offsets=seg_t, token_mask=keep_t, backend=backend, **inp, **kw)
    assert out is scores
    ref = reference_scores(*inp.values(), seg_t, keep_t)
    tol = TOL[dtype]
    inc = (scores - start).double().cpu()
    torch.testing.assert_close(inc, ref, rtol=tol["rtol"], atol=tol["atol_rel"] * ref.abs().max().item())
    return inp, ref


# (T, I, d, segment offsets): ragged sizes, 1..4 segments, empty and 1-token segments, and tokens
# outside every segment (leading/trailing rows).
SHAPES = [
    (13, 40, 24, [0, 13]),
    (37, 45, 29, [0, 10, 11, 30, 37]),
    (50, 33, 70, [3, 3, 26, 47]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}_I{s[1]}_d{s[2]}_S{len(s[3]) - 1}")
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=triton_cpu), "torch"])
def test_kernel_matches_float64_reference(backend, shape, dtype):
    T, I, d, seg = shape
    check_increment(backend, T, I, d, seg, dtype)


def check_tile(tile, T, I, d, seg, dtype, keep=None, device="cpu"):
    """taylor_scores_triton_ at a given tile (None: the interpreter's fixed tile), on fresh inputs,
    against float64; rows dropped by ``keep`` are poisoned with NaN first."""
    inp = make_inputs(T, I, d, dtype, device, seed=T + I)
    keep_t = None if keep is None else torch.tensor(keep, device=device)
    clean = dict(inp)
    if keep_t is not None:
        for name in ("x", "d_gate", "d_up", "h", "dy"):
            inp[name] = inp[name].clone()
            inp[name][~keep_t] = float("nan")
    seg_t = torch.tensor(seg, device=device)
    start = torch.rand(I, device=device) + 0.5
    scores = start.clone()
    tmod.taylor_scores_triton_(scores, *inp.values(), seg_t, keep_t, tile=tile)
    ref = reference_scores(*clean.values(), seg_t, keep_t)
    tol = TOL[dtype]
    torch.testing.assert_close((scores - start).double().cpu(), ref, rtol=tol["rtol"],
                               atol=tol["atol_rel"] * ref.abs().max().item())


@triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_with_token_mask_matches_float64_reference(dtype):
    """The kernel on a ragged shape, 4 segments, with and without a token mask (NaN in dropped rows),
    at the interpreter's tile and at a forced one (the path the GPU tests take for every autotuned tile;
    BLOCK_D 16 gives more d blocks than the default tile)."""
    T, I, d, seg = 37, 45, 29, [0, 10, 11, 30, 37]
    check_tile(None, T, I, d, seg, dtype)
    check_tile(None, T, I, d, seg, dtype, keep=[i % 4 != 2 for i in range(T)])
    check_tile((16, 16, 32, 4, 3), T, I, d, seg, dtype, keep=[i % 3 != 1 for i in range(T)])


@triton_cpu
def test_kernel_partials_poisoned_grouped_and_deterministic(monkeypatch):
    """The kernel writes every partial it reads back (the buffer starts as NaN), segments beyond one
    launch's buffer go to further launches, and two runs give the same bits (no atomics)."""
    T, I, d, seg = 45, 40, 70, [0, 7, 15, 15, 30, 44]  # ragged: an empty segment, a trailing row
    monkeypatch.setattr(tmod, "POISON_SCRATCH", True)
    monkeypatch.setattr(tmod, "PARTIAL_BYTES", 2 * 3 * I * 4)  # 2 segments of ceil(70 / 32) d blocks
    launches = []
    real = tmod._taylor_scores_kernel

    class Counting:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(args[1].numel() - 1)
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(tmod, "_taylor_scores_kernel", Counting())
    inp = make_inputs(T, I, d, torch.float32, seed=11)
    seg_t = torch.tensor(seg)
    runs = []
    for _ in range(2):
        scores = torch.zeros(I)
        tmod.taylor_scores_triton_(scores, *inp.values(), seg_t)
        runs.append(scores)
    assert launches == [2, 2, 1] * 2
    assert torch.equal(runs[0], runs[1])
    ref = reference_scores(*inp.values(), seg_t)
    torch.testing.assert_close(runs[0].double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=triton_cpu), "torch"])
def test_token_mask_drops_rows_even_if_poisoned(backend):
    T, I, d, seg = 29, 36, 20, [0, 9, 29]
    keep = [bool(v) for v in (torch.arange(T) % 3 != 1)]
    inp = make_inputs(T, I, d, torch.float32)
    dropped = torch.tensor([not k for k in keep])
    for name in ("x", "d_gate", "d_up", "h", "dy"):
        inp[name][dropped] = float("nan")  # a dropped row must not reach the scores at all
    start = torch.rand(I)
    scores = start.clone()
    accumulate_taylor_scores_(scores, seg_offsets=torch.tensor(seg), token_mask=torch.tensor(keep), backend=backend, **inp)
    clean = {k: torch.where(torch.isnan(v), torch.zeros_like(v), v) for k, v in inp.items()}
    ref = reference_scores(*clean.values(), torch.tensor(seg), torch.tensor(keep))
    assert torch.isfinite(scores).all()
    torch.testing.assert_close((scores - start).double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=triton_cpu), "torch"])
def test_rows_outside_segments_are_ignored(backend):
    T, I, d = 20, 18, 16
    inp = make_inputs(T, I, d, torch.float32)
    for name in ("x", "d_gate", "d_up", "h", "dy"):
        inp[name][:2] = float("nan")
        inp[name][15:] = float("nan")
    scores = torch.zeros(I)
    accumulate_taylor_scores_(scores, seg_offsets=torch.tensor([2, 7, 15]), backend=backend, **inp)
    assert torch.isfinite(scores).all() and (scores > 0).all()


def test_torch_path_chunks_channels():
    """The torch path in channel chunks of 7 rows equals the float64 reference (bounded memory)."""
    check_increment("torch", 21, 50, 12, [0, 5, 21], torch.float32)  # default chunk: one chunk
    from sdmprune.kernels.taylor_importance import taylor_scores_torch_

    inp = make_inputs(21, 50, 12, torch.float32)
    seg = torch.tensor([0, 5, 21])
    a, b = torch.zeros(50), torch.zeros(50)
    taylor_scores_torch_(a, *inp.values(), seg)
    taylor_scores_torch_(b, *inp.values(), seg, chunk_elems=7 * 12)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_abs_is_per_segment_not_of_the_batch_sum():
    """Two segments give more than one segment over the same tokens whenever signs disagree."""
    inp = make_inputs(16, 8, 8, torch.float64)
    two, one = torch.zeros(8, dtype=torch.float32), torch.zeros(8, dtype=torch.float32)
    accumulate_taylor_scores_(two, seg_offsets=torch.tensor([0, 8, 16]), backend="torch", **inp)
    accumulate_taylor_scores_(one, seg_offsets=torch.tensor([0, 16]), backend="torch", **inp)
    assert (two >= one - 1e-5).all() and (two > one + 1e-3).any()


def test_launcher_rejects_bad_inputs():
    inp = make_inputs(6, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="float32"):
        accumulate_taylor_scores_(torch.zeros(8, dtype=torch.float64), **inp)
    with pytest.raises(ValueError, match="d_up"):
        accumulate_taylor_scores_(torch.zeros(8), **{**inp, "d_up": torch.zeros(6, 7)})
    with pytest.raises(ValueError, match="meta"):
        accumulate_taylor_scores_(torch.zeros(8), **{**inp, "w_up": torch.empty(8, 4, device="meta")})
    with pytest.raises(ValueError, match="backend"):
        accumulate_taylor_scores_(torch.zeros(8), backend="cuda", **inp)


# ----------------------------------------------------------------------------- gated MLP Function
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_grad_matches_autograd(act):
    g = torch.linspace(-6, 6, 301, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(apply_activation(act, g).sum(), g)
    torch.testing.assert_close(activation_grad(act, g.detach()), grad, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(301, dtype=torch.float64)
    torch.testing.assert_close(activation_backward(act, upstream, g.detach()), upstream * grad, rtol=1e-12, atol=1e-12)


def make_mlp(d, I, bias, dtype, seed=0):
    torch.manual_seed(seed)
    mods = (nn.Linear(d, I, bias=bias), nn.Linear(d, I, bias=bias), nn.Linear(I, d, bias=bias))
    return [m.to(dtype).requires_grad_(False) for m in mods]


def naive_scores(x, dy, gate, up, down, act, mask=None):
    """float64 autograd weight gradients, one backward per batch row, |S| summed, mean over d."""
    total = torch.zeros(gate.weight.shape[0], dtype=torch.float64)
    params = [m.weight.detach().double().requires_grad_(True) for m in (gate, up, down)]
    biases = [None if m.bias is None else m.bias.detach().double() for m in (gate, up, down)]
    wg, wu, wd = params
    for b in range(x.shape[0]):
        xs = x[b].detach().double()
        h = apply_activation(act, nn.functional.linear(xs, wg, biases[0])) * nn.functional.linear(xs, wu, biases[1])
        if mask is not None:
            h = h * mask.double()
        y = nn.functional.linear(h, wd, biases[2])
        gg, gu, gd = torch.autograd.grad((y * dy[b].double()).sum(), params)
        total += (gu * wu + gg * wg + (gd * wd).t()).detach().abs().sum(1) / x.shape[-1]
    return total



@pytest.mark.parametrize("act,bias,masked,backend", [
    ("silu", False, False, "torch"), ("gelu", True, True, "torch"), ("gelu_tanh", False, True, "torch"),
    ("relu", True, False, "torch"),
    pytest.param("silu", True, True, "triton", marks=triton_cpu),
    pytest.param("gelu_tanh", False, False, "triton", marks=triton_cpu),
])
def test_gated_mlp_function_fp32(act, bias, masked, backend):
    B, L, d, I = 3, 7, 24, 40
    gate, up, down = make_mlp(d, I, bias, torch.float32)
    mask = (torch.rand(I) > 0.3) if masked else None
    x = torch.randn(B, L, d, requires_grad=True)
    dy = torch.randn(B, L, d)
    scores = torch.rand(I)  # nonzero start: the increment is checked
    start = scores.clone()
    y = gated_mlp_with_importance(x, gate, up, down, act, scores=scores, channel_mask=mask, backend=backend)
    (dx,) = torch.autograd.grad(y, x, dy)

    # reference forward/backward: plain autograd through the same math
    xr = x.detach().clone().requires_grad_(True)
    h = apply_activation(act, gate(xr)) * up(xr)
    if masked:
        h = h * mask.float()
    yr = down(h)
    (dxr,) = torch.autograd.grad(yr, xr, dy)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dxr, rtol=1e-5, atol=1e-6)
    ref = naive_scores(x, dy, gate, up, down, act, mask)
    torch.testing.assert_close((scores - start).double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    if masked:
        assert torch.equal(scores[~mask], start[~mask])  # a masked channel gains nothing
    assert all(m.weight.grad is None for m in (gate, up, down))


def test_gated_mlp_function_bf16_dx_and_scores():
    B, L, d, I = 2, 9, 32, 48
    gate, up, down = make_mlp(d, I, False, torch.bfloat16)
    x = torch.randn(B, L, d, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(B, L, d, dtype=torch.bfloat16)
    scores = torch.zeros(I)
    y = gated_mlp_with_importance(x, gate, up, down, "silu", scores=scores, backend="torch")
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().clone().requires_grad_(True)
    yr = down(nn.functional.silu(gate(xr)) * up(xr))
    (dxr,) = torch.autograd.grad(yr, xr, dy)
    assert torch.equal(y, yr)  # same ops in the same dtype
    torch.testing.assert_close(dx.float(), dxr.float(), rtol=0, atol=2e-2 * dxr.float().abs().max().item())
    # bf16 activations/gradients rounded differently from the float64 reference: loose bound
    ref = naive_scores(x, dy, gate, up, down, "silu")
    torch.testing.assert_close(scores.double(), ref, rtol=5e-2, atol=1e-2 * ref.abs().max().item())


def test_backward_chunks_cut_at_sample_boundaries():
    from sdmprune.kernels.gated_mlp import backward_chunks

    # four samples of 5 tokens, at most 12 tokens per chunk: two samples per chunk
    assert backward_chunks(20, [0, 5, 10, 15, 20], 12) == [(0, 10, 0, 2), (10, 20, 2, 4)]
    # a sample longer than the chunk is one range on its own; tokens after the last sample join a range
    assert backward_chunks(23, [0, 3, 13, 20], 5) == [(0, 3, 0, 1), (3, 13, 1, 2), (13, 20, 2, 3), (20, 23, 0, 0)]
    # no samples: plain cuts; one range when everything fits
    assert backward_chunks(7, None, 3) == [(0, 3, 0, 0), (3, 6, 0, 0), (6, 7, 0, 0)]
    assert backward_chunks(20, [0, 5, 10, 15, 20], 100) == [(0, 20, 0, 4)]


@pytest.mark.parametrize("save,chunk,seg,masked,backend", [
    ("activations", 6, None, False, "torch"),     # batch rows, two rows per chunk
    ("input", 7, None, True, "torch"),            # gate/up recomputed in backward, one row per chunk
    ("input", 4, [0, 5, 9, 9, 21], True, "torch"),  # explicit ragged samples (one empty) on the CPU
    ("input", None, [0, 4, 16, 21], False, "torch"),  # default chunk: one range
    pytest.param("input", 5, [0, 5, 9, 9, 21], True, "triton", marks=triton_cpu),
])
def test_gated_mlp_chunked_backward_and_input_only_save(save, chunk, seg, masked, backend):
    """Chunked backward and the input-only save give the dX and scores of the one-shot path, and both
    match float64 autograd weight gradients (scores: rtol 1e-4; dX fp32: rtol 1e-5)."""
    B, L, d, I = 3, 7, 16, 24
    gate, up, down = make_mlp(d, I, True, torch.float32, seed=3)
    mask = (torch.rand(I, generator=torch.Generator().manual_seed(1)) > 0.3) if masked else None
    x = torch.randn(B, L, d, requires_grad=True)
    dy = torch.randn(B, L, d)
    seg_t = None if seg is None else torch.tensor(seg)
    scores = torch.rand(I)
    start = scores.clone()
    y = gated_mlp_with_importance(x, gate, up, down, "silu", scores=scores, seg_offsets=seg_t, channel_mask=mask,
                                  backend=backend, save=save, backward_chunk=chunk)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().clone().requires_grad_(True)
    h = apply_activation("silu", gate(xr)) * up(xr)
    yr = down(h * mask.float() if masked else h)
    (dxr,) = torch.autograd.grad(yr, xr, dy)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dxr, rtol=1e-5, atol=1e-6)
    if seg is None:
        ref = naive_scores(x, dy, gate, up, down, "silu", mask)
    else:  # float64 reference over the explicit samples of the flattened tokens
        xs, dys = x.detach().reshape(-1, d), dy.reshape(-1, d)
        ref = torch.zeros(I, dtype=torch.float64)
        for a, b in zip(seg[:-1], seg[1:]):
            if b > a:
                ref += naive_scores(xs[a:b][None], dys[a:b][None], gate, up, down, "silu", mask)
    torch.testing.assert_close((scores - start).double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_checkpoint_context_saves_input_and_skips_recompute(monkeypatch):
    """Inside torch.utils.checkpoint with checkpoint_context_fn: the recompute runs no MLP matmul when
    skipping is on, and dX / scores equal the uncheckpointed op's."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from sdmprune.kernels import gated_mlp as gm

    B, L, d, I = 2, 6, 16, 24
    gate, up, down = make_mlp(d, I, False, torch.float32, seed=5)
    x = torch.randn(B, L, d, requires_grad=True)
    dy = torch.randn(B, L, d)

    def layer(inp):  # a LLaMA-style residual block around the MLP: only the residual add follows it
        return inp + gated_mlp_with_importance(inp * 1.5, gate, up, down, "silu", scores=scores, backend="torch",
                                               backward_chunk=L)

    scores = torch.zeros(I)
    (want_dx,) = torch.autograd.grad(layer(x), x, dy)
    want = scores.clone()

    calls = []
    real_linear = F.linear
    monkeypatch.setattr(gm.F, "linear", lambda *a: calls.append(a[1].shape) or real_linear(*a))
    for skip in (False, True):
        scores = torch.zeros(I)
        calls.clear()
        out = checkpoint(layer, x, use_reentrant=False, context_fn=gm.checkpoint_context_fn(skip))
        assert len(calls) == 3  # the original forward: gate, up, down
        (dx,) = torch.autograd.grad(out, x, dy)
        # skip: no recompute, backward recomputes gate and up once per sample chunk (2 chunks);
        # no skip: the recompute runs all three and backward reads the saved gate/up outputs
        assert len(calls) == (3 + 0 + 4 if skip else 3 + 3 + 0)
        torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-7)


def test_gated_mlp_function_checks():
    gate, up, down = make_mlp(8, 12, False, torch.float32)
    x = torch.randn(2, 3, 8, requires_grad=True)
    up.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="require grad"):
        gated_mlp_with_importance(x, gate, up, down, "silu", scores=torch.zeros(12))
    up.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="activation"):
        gated_mlp_with_importance(x, gate, up, down, "tanh")
    meta_down = nn.Linear(12, 8, bias=False, device="meta").requires_grad_(False)
    with pytest.raises(RuntimeError, match="meta"):
        gated_mlp_with_importance(x, gate, up, meta_down, "silu", scores=torch.zeros(12))
    with pytest.raises(ValueError, match="channel_mask"):
        gated_mlp_with_importance(x, gate, up, down, "silu", channel_mask=torch.ones(5, dtype=torch.bool))
    # without scores: dX only, scores untouched by construction; under no_grad: the plain forward
    y = gated_mlp_with_importance(x, gate, up, down, "silu")
    y.sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()
    with torch.no_grad():
        assert not gated_mlp_with_importance(x, gate, up, down, "silu").requires_grad


# ------------------------------------------------------------------------------------------- GPU
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(300, 700, 260, [0, 100, 101, 300])],
                         ids=lambda s: f"T{s[0]}_I{s[1]}_d{s[2]}")
def test_kernel_gpu(shape, dtype):
    T, I, d, seg = shape
    check_increment("triton", T, I, d, seg, dtype, device="cuda")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_autotuned_tile_gpu(dtype):
    """The autotuner may pick any tile of its list: each one, with and without a token mask."""
    tiles = tmod.FP32_TILES if dtype == torch.float32 else tmod.HALF_TILES
    for tile in tiles:
        check_tile(tile, 300, 700, 260, [0, 100, 101, 300], dtype, device="cuda")
        check_tile(tile, 300, 700, 260, [0, 100, 101, 300], dtype, keep=[i % 5 != 3 for i in range(300)],
                   device="cuda")


@cuda
@pytest.mark.gpu
def test_kernel_gpu_is_deterministic():
    """The autotuned kernel (tuned on the first call) gives the same bits on repeated calls."""
    inp = make_inputs(3 * 512, 1024, 512, torch.bfloat16, device="cuda", seed=5)
    seg = torch.tensor([0, 512, 1024, 1536], device="cuda")
    runs = []
    for _ in range(3):
        scores = torch.zeros(1024, device="cuda")
        accumulate_taylor_scores_(scores, seg_offsets=seg, backend="triton", **inp)
        runs.append(scores)
    assert torch.equal(runs[1], runs[2]) and torch.equal(runs[0], runs[1])


def test_autotune_tiles_compiles_without_spills(monkeypatch):
    """Every tile the GPU autotuner tries compiles to sm_90 without register spills (a spilling tile
    is slow and costs compile time on every first use): the bf16 list with and without a token mask,
    fp16 with one, and the float32 (IEEE dot) list with and without: 21 compiles, ~20 s."""
    jobs = [("bf16", "tf32", tile, keep) for tile in tmod.HALF_TILES for keep in (True, False)]
    jobs += [("fp16", "tf32", tile, True) for tile in tmod.HALF_TILES]
    jobs += [("fp32", "ieee", tile, keep) for tile in tmod.FP32_TILES for keep in (True, False)]
    spilled = []
    for dt, precision, (bi, bd, bt, warps, stages), keep in jobs:
        sig = dict(part_ptr="*fp32", seg_ptr="*i32", keep_ptr="*i8", inv_d="fp32",
                   **{k: f"*{dt}" for k in TAYLOR_PTRS}, **{k: "i32" for k in TAYLOR_INTS})
        cx = dict(HAS_KEEP=keep, PRECISION=precision, UPCAST=False, BLOCK_I=bi, BLOCK_D=bd, BLOCK_T=bt)
        regs, spills = ptxas_usage(monkeypatch, tmod._taylor_scores_kernel, sig, cx, num_warps=warps,
                                   num_stages=stages)
        assert 0 < regs <= 255
        if spills:
            spilled.append((dt, (bi, bd, bt, warps, stages), keep, regs, spills))
    assert not spilled, f"tiles that spill registers on sm_90 (dtype, tile, mask, regs, bytes): {spilled}"


@cuda
@pytest.mark.gpu
def test_kernel_gpu_matches_torch_path_bf16_large():
    inp = make_inputs(1024, 1024, 512, torch.bfloat16, device="cuda")
    seg = torch.tensor([0, 256, 512, 1024], device="cuda")
    a, b = torch.zeros(1024, device="cuda"), torch.zeros(1024, device="cuda")
    accumulate_taylor_scores_(a, seg_offsets=seg, backend="triton", **inp)
    accumulate_taylor_scores_(b, seg_offsets=seg, backend="torch", **inp)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


# ------------------------------------------------------------ fused elementwise part of the gated MLP
# Reference: float64 from the same (rounded) inputs. The kernels compute in float32 and round each
# output once: float32 rtol 1e-5 (atol 1e-6 x max|ref|), bf16 2 ulp (rtol 2^-6, atol 1e-2 x max|ref|).
EW_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2 ** -6, 1e-2)}


def _ew_reference(g, u, dh, act, mask):
    g, u, dh = g.double(), u.double(), dh.double()
    m = torch.ones(g.shape[-1], dtype=torch.float64) if mask is None else mask.double()
    a, da = apply_activation(act, g), activation_grad(act, g)
    return a * u * m, dh * m * a, dh * m * u * da  # H, dU, dG


def _ew_close(got, ref, dtype, what):
    rtol, atol_rel = EW_TOL[dtype]
    atol = atol_rel * max(ref.abs().max().item(), 1.0) if ref.numel() else 0.0
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@triton_cpu
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,masked", [((3, 40), False), ((7, 1000), True), ((1, 1), True), ((0, 8), False),
                                          ((5, 1025), False), ((2, 96), True)])
def test_gated_activation_kernels_match_float64(act, dtype, shape, masked, monkeypatch):
    from sdmprune.kernels import gated_mlp as gmod

    monkeypatch.setattr(gmod, "POISON_OUTPUTS", True)
    calls = []
    real_fwd, real_bwd = gmod._gated_act_fwd_kernel, gmod._gated_act_bwd_kernel

    class Spy:  # records that the Triton kernels (not the PyTorch path) ran
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            calls.append(grid)
            return self.k[grid]

    monkeypatch.setattr(gmod, "_gated_act_fwd_kernel", Spy(real_fwd))
    monkeypatch.setattr(gmod, "_gated_act_bwd_kernel", Spy(real_bwd))
    gen = torch.Generator().manual_seed(7)
    g, u, dh = (torch.randn(*shape, generator=gen).mul(2.5).to(dtype) for _ in range(3))
    mask = (torch.rand(shape[-1], generator=gen) > 0.3).to(dtype) if masked else None
    h_ref, du_ref, dg_ref = _ew_reference(g, u, dh, act, mask)
    h = gmod.gated_activation_forward(g, u, act, mask, backend="triton")
    dh_in = dh.clone()
    d_up, d_gate, h2 = gmod.gated_activation_backward(g, u, dh_in, act, mask, backend="triton")
    assert d_gate.data_ptr() == dh_in.data_ptr()  # written over dH's buffer
    for got, ref, what in ((h, h_ref, "H fwd"), (h2, h_ref, "H bwd"), (d_up, du_ref, "dU"), (d_gate, dg_ref, "dG")):
        assert got.dtype == dtype and got.shape == ref.shape
        _ew_close(got, ref, dtype, what)
    if g.numel():
        assert len(calls) == 2


def test_gated_activation_torch_path_and_fallbacks():
    """The PyTorch path (exact GELU always takes it) gives the same three tensors."""
    from sdmprune.kernels import gated_mlp as gmod

    gen = torch.Generator().manual_seed(3)
    g, u, dh = (torch.randn(4, 33, generator=gen) for _ in range(3))
    mask = (torch.rand(33, generator=gen) > 0.5).float()
    for act in ACTIVATIONS:
        h_ref, du_ref, dg_ref = _ew_reference(g, u, dh, act, mask)
        d_up, d_gate, h = gmod.gated_activation_backward(g, u, dh.clone(), act, mask, backend="torch")
        for got, ref in ((h, h_ref), (d_up, du_ref), (d_gate, dg_ref)):
            _ew_close(got, ref, torch.float32, act)
        _ew_close(gmod.gated_activation_forward(g, u, act, mask, backend="torch"), h_ref, torch.float32, act)
    assert not gmod._fusable("gelu", "triton", g, u)
    assert not gmod._fusable("silu", "triton", g.t(), u.t())  # not contiguous


def test_gated_activation_kernels_compiles_for_h100():
    """Both elementwise kernels compile to sm_90 for every Triton activation (no GPU needed)."""
    from sdmprune.kernels import gated_mlp as gmod

    fwd = dict(g_ptr="*bf16", u_ptr="*bf16", m_ptr="*bf16", h_ptr="*bf16", N="i64", I="i32")
    bwd = dict(g_ptr="*bf16", u_ptr="*bf16", dh_ptr="*bf16", m_ptr="*bf16", h_ptr="*bf16", dup_ptr="*bf16",
               dg_ptr="*bf16", N="i64", I="i32")
    for act in gmod.TRITON_ACTIVATIONS.values():
        cx = dict(ACT=act, HAS_MASK=True, BLOCK=gmod._EW_BLOCK)
        compile_for_h100(gmod._gated_act_fwd_kernel, fwd, cx, num_warps=4)
        compile_for_h100(gmod._gated_act_bwd_kernel, bwd, cx, num_warps=4)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_activation_kernels_gpu(act):
    from sdmprune.kernels import gated_mlp as gmod

    gen = torch.Generator().manual_seed(5)
    g, u, dh = (torch.randn(1000, 8192, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    mask = (torch.rand(8192, generator=gen) > 0.3).to("cuda", torch.bfloat16)
    h_ref, du_ref, dg_ref = _ew_reference(g.cpu(), u.cpu(), dh.cpu(), act, mask.cpu())
    d_up, d_gate, h = gmod.gated_activation_backward(g, u, dh.clone(), act, mask, backend="triton")
    for got, ref, what in ((h, h_ref, "H"), (d_up, du_ref, "dU"), (d_gate, dg_ref, "dG")):
        _ew_close(got.cpu(), ref, torch.bfloat16, what)
