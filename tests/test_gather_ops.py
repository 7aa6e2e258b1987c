"""In-place channel gather (sdmprune.ops / torch.ops.sdmprune): exact against index_select.

Tolerance: none. The ops move bytes, so results are compared bit for bit (through an integer view,
so NaN payloads count too) for every dtype.
"""
import pytest
import torch

from sdmprune import ops

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

needs_ext = pytest.mark.skipif(not ops.extension_available(), reason="sdmprune._C not built")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 1), (1, 9), (9, 1), (13, 29), (64, 48), (130, 33)]
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t):
    """Bitwise view (NaN-safe equality); complex128 (16 bytes) as two int64 per element."""
    t = t.contiguous()
    if t.element_size() == 16:
        return torch.view_as_real(t).view(torch.int64)
    return t.view(INT_VIEW[t.element_size()])


def random_w(R, C, dtype, device="cpu", gen=None):
    if dtype.is_floating_point:
        w = torch.randn(R, C, generator=gen).to(dtype)
        w.view(-1)[:: 7] = float("nan")  # payload bits must survive the move too
    elif dtype.is_complex:
        w = torch.randn(R, C, generator=gen, dtype=dtype)
    else:
        w = torch.randint(-100, 100, (R, C), generator=gen).to(dtype)
    return w.to(device)


def keep_sets(n, gen):
    """keep-all, keep-one (first, last), a prefix, drop-first, random half, random 70%."""
    out = [torch.arange(n), torch.tensor([0]), torch.tensor([n - 1]), torch.arange(max(1, n // 2))]
    if n > 1:
        out.append(torch.arange(1, n))
        out.append(torch.randperm(n, generator=gen)[: max(1, n // 2)].sort().values)
        out.append(torch.randperm(n, generator=gen)[: max(1, (7 * n) // 10)].sort().values)
    return out


def run_case(w, idx, dim, scratch=None):
    ref = w.index_select(dim, idx).clone()
    storage_ptr, nbytes = w.untyped_storage().data_ptr(), w.untyped_storage().nbytes()
    out = ops.gather_rows_(w, idx, scratch) if dim == 0 else ops.gather_cols_(w, idx, scratch)
    assert out.shape == ref.shape and out.is_contiguous()
    assert torch.equal(bits(out), bits(ref))
    # In place: same storage, same pointer, result at the front of it.
    assert out.untyped_storage().data_ptr() == storage_ptr and out.data_ptr() == w.data_ptr()
    assert w.untyped_storage().nbytes() == nbytes
    return out


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("scratch", [None, 0, 64])
def test_cpu_matches_index_select(dtype, shape, dim, scratch):
    gen = torch.Generator().manual_seed(hash((shape, dim)) % 1000)
    for idx in keep_sets(shape[dim], gen):
        w = random_w(*shape, dtype, gen=gen)
        run_case(w, idx, dim, scratch)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.float64, torch.int64, torch.complex64,
                                   torch.complex128, torch.bool])
@pytest.mark.parametrize("dim", [0, 1])
def test_any_dtype_is_a_byte_move(dtype, dim):
    gen = torch.Generator().manual_seed(3)
    w = random_w(37, 23, torch.int64 if dtype == torch.bool else dtype, gen=gen)
    if dtype == torch.bool:
        w = w > 0
    idx = torch.randperm(w.shape[dim], generator=gen)[:11].sort().values
    run_case(w, idx, dim, scratch=32)


@needs_ext
@settings(max_examples=60, deadline=None)
@given(R=st.integers(1, 40), C=st.integers(1, 40), dim=st.integers(0, 1), seed=st.integers(0, 2**31 - 1),
       scratch=st.sampled_from([None, 0, 1, 16, 100]))
def test_random_masks_property(R, C, dim, seed, scratch):
    gen = torch.Generator().manual_seed(seed)
    n = (R, C)[dim]
    mask = torch.rand(n, generator=gen) < torch.rand(1, generator=gen)
    mask[torch.randint(n, (1,), generator=gen)] = True
    run_case(random_w(R, C, torch.float32, gen=gen), mask.nonzero().view(-1), dim, scratch)


@needs_ext
def test_wave_plans_cover_units_and_bound_scratch():
    """The planner's waves tile [first moved unit, n) in order, mix direct and scratch waves, and a
    scratch wave never exceeds the budget (or one unit)."""
    from sdmprune import _C

    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(1000, generator=gen)[:700].sort().values
    for unit, budget in [(32, 2048), (32, 0), (8, -1), (4096, 100)]:
        plan = _C.plan_rows(idx, unit, budget)
        assert plan[0][0] == int((idx != torch.arange(700)).nonzero()[0]) and plan[-1][1] == 700
        assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
        cap = max(1, (budget if budget >= 0 else _C.DEFAULT_SCRATCH_BYTES) // unit)
        assert all(e - b <= cap for b, e, direct in plan if not direct)
        for b, e, direct in plan:
            if direct:  # every destination below every source
                assert e <= int(idx[b])
    plan = _C.plan_rows(idx, 32, 2048)
    assert {d for _, _, d in plan} == {True, False}
    cols = torch.randperm(300, generator=gen)[:200].sort().values
    plan = _C.plan_cols(cols, 500, 300, 200 * 2, 4096)
    assert plan[0][0] == 0 and plan[-1][1] == 500 and {d for _, _, d in plan} == {True, False}
    for b, e, direct in plan:
        if direct:
            assert e * 200 <= b * 300 + int(cols[0])
    assert _C.plan_rows(torch.arange(5), 8) == [] and _C.plan_cols(torch.arange(5), 3, 5, 10) == []


def _execute_plan_adversarially(flat, plan, src_of, dst_of):
    """Run a wave plan on a flat buffer the way a GPU may: within a direct wave, units go in REVERSE
    order reading the live buffer (any overlap of one unit's write with another unit's read of the
    same wave would corrupt the result); a scratch wave reads everything, then writes."""
    for b, e, direct in plan:
        units = range(b, e)
        if direct:
            for u in reversed(units):
                flat[dst_of(u)] = flat[src_of(u)].clone()
        else:
            scratch = [flat[src_of(u)].clone() for u in units]
            for u, val in zip(units, scratch):
                flat[dst_of(u)] = val


@needs_ext
@pytest.mark.parametrize("budget", [0, 40, 400, -1])
def test_plans_are_safe_in_any_order_within_a_wave(budget):
    """The CUDA path runs each wave's units in parallel in no fixed order; emulate the worst order."""
    from sdmprune import _C

    gen = torch.Generator().manual_seed(budget + 7)
    R, C = 61, 47
    for trial in range(6):
        w = torch.randn(R * C, generator=gen)
        keep = torch.randperm(R, generator=gen)[: int(torch.randint(1, R + 1, (1,), generator=gen))].sort().values
        ref = w.view(R, C).index_select(0, keep).reshape(-1)
        flat = w.clone()
        plan = _C.plan_rows(keep, C * 4, budget)
        _execute_plan_adversarially(flat, plan, lambda i: slice(int(keep[i]) * C, int(keep[i]) * C + C),
                                    lambda i: slice(i * C, i * C + C))
        assert torch.equal(flat[: ref.numel()], ref)

        cols = torch.randperm(C, generator=gen)[: int(torch.randint(1, C + 1, (1,), generator=gen))].sort().values
        k = cols.numel()
        ref = w.view(R, C).index_select(1, cols).reshape(-1)
        flat = w.clone()
        plan = _C.plan_cols(cols, R, C, k * 4, budget)
        _execute_plan_adversarially(flat, plan, lambda r: r * C + cols, lambda r: slice(r * k, r * k + k))
        assert torch.equal(flat[: ref.numel()], ref)


@needs_ext
def test_torch_ops_and_pybind_paths():
    from sdmprune import _C

    gen = torch.Generator().manual_seed(1)
    for fn, dim in [(torch.ops.sdmprune.gather_rows_, 0), (_C.gather_rows_, 0),
                    (torch.ops.sdmprune.gather_cols_, 1), (_C.gather_cols_, 1)]:
        w = random_w(21, 18, torch.bfloat16, gen=gen)
        idx = torch.tensor([0, 3, 4, 10, 17])
        ref = w.index_select(dim, idx)
        out = fn(w, idx)
        assert torch.equal(bits(out), bits(ref)) and out.data_ptr() == w.data_ptr()


def _fallback(monkeypatch):
    monkeypatch.setattr(ops, "extension_available", lambda device=None: False)


@pytest.mark.parametrize("dim", [0, 1])
def test_fallback_matches(monkeypatch, dim):
    _fallback(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    for idx in keep_sets(19, gen):
        w = random_w(19, 19, torch.bfloat16, gen=gen)
        run_case(w, idx, dim)


BAD = [
    (lambda: (torch.zeros(4, 4), torch.tensor([0, 1], dtype=torch.int32)), "idx must be int64"),
    (lambda: (torch.zeros(4, 4), torch.tensor([[0, 1]])), "idx must be 1-D"),
    (lambda: (torch.zeros(4, 4), torch.tensor([2, 1])), "must be sorted"),
    (lambda: (torch.zeros(4, 4), torch.tensor([1, 1])), "duplicate index 1"),
    (lambda: (torch.zeros(4, 4), torch.tensor([0, 4])), "out of range"),
    (lambda: (torch.zeros(4, 4), torch.tensor([-1, 2])), "out of range"),
    (lambda: (torch.zeros(4, 4), torch.tensor([], dtype=torch.long)), "idx is empty"),
    (lambda: (torch.zeros(4, 4).t(), torch.tensor([0])), "must be contiguous"),
    (lambda: (torch.zeros(4), torch.tensor([0])), "must be 2-D"),
    (lambda: (torch.zeros(2, 4, 4), torch.tensor([0])), "must be 2-D"),
    (lambda: (torch.zeros(4, 4), torch.tensor([0], device="meta")), "device mismatch"),
]


@pytest.mark.parametrize("path", ["extension", "fallback"])
@pytest.mark.parametrize("fn", ["gather_rows_", "gather_cols_"])
@pytest.mark.parametrize("make,msg", BAD)
def test_bad_input_raises(monkeypatch, path, fn, make, msg):
    if path == "extension" and not ops.extension_available():
        pytest.skip("sdmprune._C not built")
    if path == "fallback":
        _fallback(monkeypatch)
    w, idx = make()
    before = w.clone()
    with pytest.raises(RuntimeError, match=msg):
        getattr(ops, fn)(w, idx)
    assert torch.equal(w, before)  # checked before anything moves


@pytest.mark.parametrize("path", ["extension", "fallback"])
def test_autograd_safety(monkeypatch, path):
    """A w that requires grad is refused under grad mode; the version counter is bumped."""
    if path == "extension" and not ops.extension_available():
        pytest.skip("sdmprune._C not built")
    if path == "fallback":
        _fallback(monkeypatch)
    p = torch.nn.Parameter(torch.randn(6, 5))
    with pytest.raises(RuntimeError, match="w requires grad"):
        ops.gather_rows_(p, torch.tensor([1, 2]))
    x = torch.randn(6, 5, requires_grad=True)
    y = x * 1
    z = (y * y).sum()
    version = y._version
    ops.gather_cols_(y.detach(), torch.tensor([0, 3]))
    assert y._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
    with torch.no_grad():
        assert ops.gather_rows_(p, torch.tensor([4])).shape == (1, 5)


@needs_ext
def test_bad_input_raises_through_torch_ops():
    with pytest.raises(RuntimeError, match="duplicate index 2"):
        torch.ops.sdmprune.gather_cols_(torch.zeros(3, 5), torch.tensor([1, 2, 2]))


@cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.int8, torch.float64, torch.complex128])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape", [(1, 1), (13, 29), (130, 33), (257, 1024), (1030, 515)])
@pytest.mark.parametrize("scratch", [None, 0, 4096])
def test_cuda_matches_index_select(dtype, dim, shape, scratch):
    if not ops.extension_available("cuda"):
        pytest.skip("extension built without CUDA")
    gen = torch.Generator().manual_seed(shape[0] * 7 + dim)
    for idx in keep_sets(shape[dim], gen):
        w = random_w(*shape, dtype, device="cuda", gen=gen)
        run_case(w, idx.cuda(), dim, scratch)
    torch.cuda.synchronize()


@cuda
def test_cuda_unaligned_storage_offset():
    """A w that starts at an odd element offset takes the narrow (non-16-byte) access path."""
    if not ops.extension_available("cuda"):
        pytest.skip("extension built without CUDA")
    base = torch.randn(1 + 64 * 40, device="cuda").to(torch.bfloat16)
    for dim in (0, 1):
        w = base[1:].view(64, 40)
        idx = torch.tensor([1, 2, 5, 30, 31, 39], device="cuda")
        ref = w.index_select(dim, idx).clone()
        out = ops.gather_rows_(w, idx) if dim == 0 else ops.gather_cols_(w, idx)
        assert torch.equal(bits(out), bits(ref))


@cuda
def test_cuda_scratch_memory_is_bounded():
    if not ops.extension_available("cuda"):
        pytest.skip("extension built without CUDA")
    w = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(4096, device="cuda")[:2867].sort().values
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ops.gather_rows_(w, idx, 1 << 20)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= (1 << 20) + 2 * 2048 * 2 + 4096 * 8, extra


# ----------------------------------------------------- the ordered single-launch CUDA algorithm
def _ordered_schedule(idx, R, C, dim, chunk, slots, rng, skip_waits=False):
    """Run a model of gather_cuda.cu's ordered kernels under a random interleaving and return the
    memory. Units (rows of the result) are taken in increasing order by at most ``slots`` blocks; a
    unit's element loads run any time after it is taken, its stores only after its waits and its own
    load of that element, and (columns overlapping their own source row) chunk by chunk with the
    kernel's barriers. The rules are the kernel's; the interleaving is adversarial."""
    mem = list(range(R * C))  # distinct values: a wrong read shows up in the result
    k = len(idx)
    if dim == 0:
        reader = {int(t): j for j, t in enumerate(idx) if t < k}
        units = k
    else:
        units = R
    done, active, next_unit = set(), {}, 0

    def make(u):
        if dim == 0:
            s = int(idx[u])
            pairs = [] if s == u else [(s * C + e, u * C + e) for e in range(C)]
            j = reader.get(u, -1)
            waits = [j] if 0 <= j < u else []
            barriers = False
        else:
            pairs = [(u * C + int(idx[j]), u * k + j) for j in range(k)]
            first, last = (u * k) // C, (u * k + k - 1) // C
            waits = [q for q in range(first, last + 1) if q < u]
            barriers = last >= u
        return {"pairs": pairs, "waits": [] if skip_waits else waits, "barriers": barriers,
                "loaded": {}, "stored": set(), "waited": False}

    while len(done) < units:
        while len(active) < slots and next_unit < units:
            active[next_unit] = make(next_unit)
            next_unit += 1
        choices = []
        for u, st_ in active.items():
            n = len(st_["pairs"])
            if not st_["waited"] and all(q in done for q in st_["waits"]):
                choices.append((u, "wait", None))
            for e in range(n):
                c = e // chunk
                if e not in st_["loaded"]:
                    # with barriers, chunk c loads only after chunk c-1 is stored
                    if not st_["barriers"] or all(x in st_["stored"] for x in range(min(n, c * chunk))):
                        choices.append((u, "load", e))
                elif e not in st_["stored"] and st_["waited"]:
                    if not st_["barriers"] or all(x in st_["loaded"] for x in range(c * chunk, min(n, (c + 1) * chunk))):
                        choices.append((u, "store", e))
            if st_["waited"] and len(st_["stored"]) == n:
                choices.append((u, "done", None))
        u, op, e = choices[rng.randrange(len(choices))]
        st_ = active[u]
        if op == "wait":
            st_["waited"] = True
        elif op == "load":
            st_["loaded"][e] = mem[st_["pairs"][e][0]]
        elif op == "store":
            mem[st_["pairs"][e][1]] = st_["loaded"][e]
            st_["stored"].add(e)
        else:
            done.add(u)
            del active[u]
    return mem


@pytest.mark.parametrize("dim", [0, 1])
def test_ordered_algorithm_rules_under_adversarial_schedules(dim):
    """The dependency rules of the ordered kernels give index_select's result under any interleaving
    of up to four blocks, on random and edge keep sets (a model of the CUDA code; the GPU test below
    runs the kernels themselves). Without the waits the same schedules go wrong (the check can fail)."""
    import random

    rng = random.Random(7)
    gen = torch.Generator().manual_seed(3)
    failures_without_waits = 0
    for R, C in ((6, 7), (9, 5), (4, 12)):
        extent = R if dim == 0 else C
        for idx in keep_sets(extent, gen):
            idx = [int(i) for i in idx]
            expect = torch.arange(R * C).view(R, C).index_select(dim, torch.tensor(idx)).reshape(-1).tolist()
            for trial in range(12):
                slots, chunk = rng.randint(1, 4), rng.randint(1, 3)
                got = _ordered_schedule(idx, R, C, dim, chunk, slots, rng)
                assert got[:len(expect)] == expect, (R, C, idx, slots, chunk)
                bad = _ordered_schedule(idx, R, C, dim, chunk, slots, rng, skip_waits=True)
                failures_without_waits += bad[:len(expect)] != expect
    assert failures_without_waits > 0


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.complex128])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape", [(1, 1), (13, 29), (257, 1024), (1030, 515), (4096, 1433)])
def test_cuda_ordered_gather_matches_index_select(monkeypatch, dtype, dim, shape):
    """SDMPRUNE_CUDA_GATHER=ordered: the single-launch kernels, bit-exact, every keep set."""
    if not ops.extension_available("cuda"):
        pytest.skip("extension built without CUDA")
    monkeypatch.setenv("SDMPRUNE_CUDA_GATHER", "ordered")
    gen = torch.Generator().manual_seed(shape[0] * 5 + dim)
    for idx in keep_sets(shape[dim], gen):
        w = random_w(*shape, dtype, device="cuda", gen=gen)
        run_case(w, idx.cuda(), dim)
    torch.cuda.synchronize()
