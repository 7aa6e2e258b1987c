"""TaylorImportance (one batched backward, fused) against NaiveTaylorImportance (one backward per
sample, real weight gradients) on tiny random LLaMA-family models.

Tolerance: fp32 models, rtol 1e-4 on every channel score (atol 1e-6 x max score for channels whose
score is nearly 0 after cancellation); masked channels must score exactly 0 in both.
"""
import pytest
import torch

from conftest import tiny_model
from sdmprune import TaylorImportance
from sdmprune.errors import InputError
from sdmprune.scoring.importance import NaiveTaylorImportance
from sdmprune.kernels.utils import interpreter_enabled, triton_available

VOCAB = 300
triton_cpu = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                reason="Triton on CPU needs TRITON_INTERPRET=1")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = [pytest.param("triton", marks=triton_cpu), "torch"]


def batch(B=3, L=10, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, L), generator=gen).to(device)


def naive_scores(model, ids, mask=None):
    with NaiveTaylorImportance(model, channel_mask=mask) as nv:
        for s in range(ids.shape[0]):
            model(ids[s:s + 1], labels=ids[s:s + 1]).loss.backward()
            nv.accumulate()
    return nv.scores()


def fused_scores(model, ids, backend, mask=None):
    with TaylorImportance(model, backend=backend, channel_mask=mask) as imp:
        # sum over samples of each sample's mean CE = batch-mean CE x B (equal lengths, no padding)
        (model(ids, labels=ids).loss * ids.shape[0]).backward()
    return imp.scores(), imp


def assert_scores_close(got, want):
    assert set(got) == set(want)
    for i in want:
        assert got[i].dtype == torch.float32
        torch.testing.assert_close(got[i].cpu(), want[i].cpu(), rtol=1e-4, atol=1e-6 * want[i].abs().max().item())


def random_masks(model, keep=0.7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    from sdmprune.models import find_gated_mlps

    return {m.index: torch.rand(m.width, generator=gen) < keep for m in find_gated_mlps(model)}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=3).requires_grad_(False)


@pytest.mark.parametrize("masked", [False, True], ids=["teacher", "masked"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_per_sample_loop(llama, backend, masked):
    ids = batch()
    mask = random_masks(llama) if masked else None
    want = naive_scores(llama, ids, mask)
    got, imp = fused_scores(llama, ids, backend, mask)
    assert_scores_close(got, want)
    assert imp.samples == ids.shape[0]
    assert all(p.grad is None for p in llama.parameters())
    if masked:
        for i, m in mask.items():
            assert (got[i][~m] == 0).all() and (want[i][~m] == 0).all() and (got[i][m] > 0).all()


def test_state_restored_after_exit_and_exception():
    model = tiny_model("llama", layers=2)  # parameters require grad, as after from_pretrained
    ids = batch(2, 8)
    with torch.no_grad():
        before = model(ids).logits
    mlps = [layer.mlp for layer in model.model.layers]
    with pytest.raises(RuntimeError, match="boom"):
        with TaylorImportance(model, backend="torch"):
            assert all("forward" in m.__dict__ for m in mlps)
            assert not any(p.requires_grad for p in model.parameters())
            assert getattr(model, "_require_grads_hooks", None)
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in mlps)
    assert all(p.requires_grad for p in model.parameters())
    assert not getattr(model, "_require_grads_hooks", None)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_freeze_mlp_only_leaves_other_grads(llama):
    model = tiny_model("llama", layers=2)
    ids = batch(2, 8)
    with pytest.warns(UserWarning, match="outside the MLPs"):
        with TaylorImportance(model, backend="torch", freeze="mlp") as imp:
            (model(ids, labels=ids).loss * 2).backward()
    mlp_params = {id(p) for layer in model.model.layers for p in layer.mlp.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) in mlp_params)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    assert_scores_close(imp.scores(), naive_scores(model, ids))


@pytest.mark.parametrize("mode", ["nonreentrant", "reentrant", "skip_mlp_recompute"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_checkpointing(backend, mode):
    from sdmprune.kernels.gated_mlp import checkpoint_context_fn

    model = tiny_model("llama", layers=2).requires_grad_(False)
    ids = batch(2, 9, seed=3)
    mask = random_masks(model, seed=4)
    want = naive_scores(model, ids, mask)
    model.train()  # HF checkpoints only in training mode (the tiny configs have no dropout)
    kwargs = {"use_reentrant": mode == "reentrant"}
    if mode == "skip_mlp_recompute":  # what the pipeline installs: the recompute runs no MLP matmul
        kwargs["context_fn"] = checkpoint_context_fn(skip_output_in_recompute=True)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.model.gradient_checkpointing
    calls = []
    orig = model.model.layers[0].mlp.forward
    with TaylorImportance(model, backend=backend, channel_mask=mask) as imp:
        patched = model.model.layers[0].mlp.forward

        def counting(x):
            calls.append(x.requires_grad)
            return patched(x)
        model.model.layers[0].mlp.forward = counting
        (model(ids, labels=ids).loss * 2).backward()
        model.model.layers[0].mlp.forward = patched
    assert len(calls) == 2  # forward + recompute: the scores below prove one accumulation
    assert model.model.layers[0].mlp.forward == orig
    assert_scores_close(imp.scores(), want)
    assert imp.samples == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen2_gelu_tanh(backend):
    model = tiny_model("qwen2", layers=2, act="gelu_pytorch_tanh").requires_grad_(False)
    from sdmprune.models import find_gated_mlps

    assert find_gated_mlps(model)[0].activation == "gelu_tanh"
    ids = batch(2, 8, seed=5)
    mask = random_masks(model, seed=6)
    got, _ = fused_scores(model, ids, backend, mask)
    assert_scores_close(got, naive_scores(model, ids, mask))


def test_padding_excluded_with_attention_mask(llama):
    """Right-padded batch, loss = sum of per-sample mean CE over real tokens: the scores equal the
    per-sample loop over the unpadded samples."""
    lengths = [10, 6, 8]
    ids = batch(3, 10, seed=7)
    attn = torch.zeros(3, 10, dtype=torch.long)
    for b, n in enumerate(lengths):
        attn[b, :n] = 1
    with NaiveTaylorImportance(llama) as nv:
        for b, n in enumerate(lengths):
            llama(ids[b:b + 1, :n], labels=ids[b:b + 1, :n]).loss.backward()
            nv.accumulate()
    with TaylorImportance(llama, backend="torch") as imp:
        imp.set_attention_mask(attn)
        logits = llama(ids, attention_mask=attn).logits.float()
        loss = 0
        for b, n in enumerate(lengths):
            loss = loss + torch.nn.functional.cross_entropy(logits[b, :n - 1], ids[b, 1:n])
        loss.backward()
        with pytest.raises(InputError, match="attention mask"):
            imp.set_attention_mask(attn[:, :5])
            llama(ids, labels=ids).loss.backward()
    assert_scores_close(imp.scores(), nv.scores())


def test_paused_reset_and_state_dict(llama):
    ids = batch(2, 8, seed=8)
    with TaylorImportance(llama, backend="torch") as imp:
        with imp.paused():
            (llama(ids, labels=ids).loss * 2).backward()
        assert imp.samples == 0 and all((s == 0).all() for s in imp.scores().values())
        (llama(ids, labels=ids).loss * 2).backward()
        once = imp.scores()
        state = imp.state_dict()
        (llama(ids, labels=ids).loss * 2).backward()
        twice = imp.scores()
        imp.reset()
        assert imp.samples == 0 and all((s == 0).all() for s in imp.scores().values())
        imp.load_state_dict(state)
        assert imp.samples == 2
        for i in once:
            assert torch.equal(imp.scores()[i], once[i])
            torch.testing.assert_close(twice[i], 2 * once[i], rtol=1e-5, atol=0)
        with pytest.raises(InputError):
            imp.load_state_dict({"scores": {0: torch.zeros(3)}})
    assert_scores_close(once, naive_scores(llama, ids))


def test_set_channel_mask_switches_student_and_teacher(llama):
    ids = batch(2, 8, seed=9)
    mask = random_masks(llama, seed=10)
    with TaylorImportance(llama, backend="torch") as imp:
        imp.set_channel_mask(mask)
        (llama(ids, labels=ids).loss * 2).backward()
        student = imp.scores()
        imp.reset()
        imp.set_channel_mask(None)
        (llama(ids, labels=ids).loss * 2).backward()
        teacher = imp.scores()
        with pytest.raises(InputError):
            imp.set_channel_mask({0: torch.ones(3, dtype=torch.bool)})
    assert_scores_close(student, naive_scores(llama, ids, mask))
    assert_scores_close(teacher, naive_scores(llama, ids))


def test_accelerate_hooked_mlp_patches_old_forward(llama):
    """Under accelerate hooks the engine patches _old_forward, so the hook still wraps the call."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    ids = batch(2, 8, seed=11)
    want = naive_scores(llama, ids)
    mlps = [layer.mlp for layer in llama.model.layers]
    for m in mlps:
        add_hook_to_module(m, Counting())
    try:
        originals = [m._old_forward for m in mlps]
        got, _ = fused_scores(llama, ids, "torch")
        assert Counting.calls == len(mlps)
        assert all(m._old_forward == o for m, o in zip(mlps, originals))
    finally:
        for m in mlps:
            remove_hook_from_module(m)
    assert_scores_close(got, want)


def test_bad_arguments(llama):
    with pytest.raises(InputError):
        TaylorImportance(llama, backend="cuda")
    with pytest.raises(InputError):
        TaylorImportance(llama, channel_mask={7: torch.ones(160, dtype=torch.bool)})


# ------------------------------------------------------------------------------------------- GPU
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True])
def test_gpu_batched_equals_per_sample_loop(masked):
    model = tiny_model("llama", layers=3).requires_grad_(False).cuda()
    ids = batch(4, 16, device="cuda")
    mask = random_masks(model) if masked else None
    got, _ = fused_scores(model, ids, "triton", mask)
    assert all(s.is_cuda for s in got.values())
    assert_scores_close(got, naive_scores(model, ids, mask))


@cuda
@pytest.mark.gpu
def test_gpu_bf16_triton_matches_torch_path():
    model = tiny_model("llama", layers=2, dtype=torch.bfloat16).requires_grad_(False).cuda()
    ids = batch(4, 32, device="cuda")
    got, _ = fused_scores(model, ids, "triton")
    want, _ = fused_scores(model, ids, "torch")
    for i in want:
        torch.testing.assert_close(got[i], want[i], rtol=1e-3, atol=1e-4 * want[i].abs().max().item())
