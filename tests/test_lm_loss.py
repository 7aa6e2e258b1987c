"""sdmprune.lm_loss: the model's own loss and gradients through the fused LM-head kernels.

Against the Hugging Face model's own loss in float32 (``model(ids, labels=ids).loss``: CE) and a
plain-PyTorch restatement from the full logits of a float64 copy (distillation, entropy: a float32
restatement of the entropy is itself 2e-5 off its float64 value on these near-uniform random models,
the fused loss 7e-7), on tiny random models, for every parameter's gradient (the LM head and a tied
embedding included), on the families whose logits are scaled (granite divides by logits_scaling,
cohere multiplies by logit_scale). Tolerances: loss 1e-5 relative; each gradient's max error over its
max magnitude 1e-5.
"""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from conftest import LargestTensor, tiny_config, tiny_model  # noqa: E402

from sdmprune import head_states, lm_loss  # noqa: E402
from sdmprune.errors import InputError  # noqa: E402
from sdmprune.kernels.utils import interpreter_enabled, triton_available  # noqa: E402

# the models here are on the CPU: the Triton kernels run on them only through the interpreter
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (triton_available() and interpreter_enabled()), reason="Triton on CPU needs TRITON_INTERPRET=1"))]
GRAD_TOL = 1e-5


def scaled_model(family, tie=False, seed=0, **extra):
    """A tiny model of ``family`` with config attributes ``extra`` (e.g. a logit scale)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, tie=tie)
    for k, v in extra.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def grads_of(model, loss_fn):
    """(loss, {name: grad}) of one backward of ``loss_fn(model)`` with every parameter requiring grad."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, want, loss_tol=1e-5):
    (l1, g1), (l2, g2) = got, want
    assert abs(float(l1) - float(l2)) <= loss_tol * abs(float(l2)), (float(l1), float(l2))
    assert set(g1) == set(g2)
    for n in g2:
        err = float((g1[n].double() - g2[n].double()).abs().max()) / max(float(g2[n].abs().max()), 1e-30)
        assert err <= GRAD_TOL, f"{n}: {err:.2e}"


def ids_for(model, b=2, L=24, seed=1):
    return torch.randint(0, model.config.vocab_size, (b, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,tie,extra", [("llama", False, {}), ("qwen2", True, {}),
                                              ("granite", False, {"logits_scaling": 8.0}),
                                              ("cohere", False, {"logit_scale": 0.25})],
                         ids=["llama", "qwen2-tied", "granite-scaling-8", "cohere-scale-0.25"])
def test_ce_is_the_models_own_loss_and_gradients(family, tie, extra, backend):
    model = scaled_model(family, tie=tie, **extra)
    ids = ids_for(model)
    want = grads_of(copy.deepcopy(model), lambda m: m(input_ids=ids, labels=ids).loss)
    got = grads_of(model, lambda m: lm_loss(m, ids, backend=backend, token_chunk=16))
    assert "lm_head.weight" in got[1] or tie  # the head's weight gets its gradient (tied: the embedding's)
    assert_same(got, want)


def test_head_states_are_the_models_logits():
    for family, extra in (("llama", {}), ("granite", {"logits_scaling": 8.0}), ("cohere", {"logit_scale": 0.25})):
        model = scaled_model(family, **extra)
        ids = ids_for(model)
        with torch.no_grad():
            z = head_states(model, ids) @ model.lm_head.weight.t()
            want = model(input_ids=ids).logits
        assert torch.allclose(z, want, rtol=1e-5, atol=1e-5), family


def restated_distill(model, ids, teacher_logits, alpha, T):
    """(1 - alpha) CE + alpha KL(softmax(z_t / T) || softmax(z_s)), KL summed over the vocabulary and
    averaged over every position, from the full logits (DESIGN section 1)."""
    z = model(input_ids=ids).logits
    V = z.shape[-1]
    ce = F.cross_entropy(z[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    log_p = F.log_softmax(teacher_logits.to(z.dtype) / T, -1)
    kl = (log_p.exp() * (log_p - F.log_softmax(z, -1))).sum(-1).mean()
    return (1 - alpha) * ce + alpha * kl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,extra", [("llama", {}), ("granite", {"logits_scaling": 8.0})])
def test_distill_against_the_restated_loss(family, extra, backend):
    """Self-distillation against a teacher that shares the head (the MLPs perturbed), and against a separate
    teacher with its own head (teacher_weight)."""
    model = scaled_model(family, **extra)
    ids = ids_for(model)
    shared = copy.deepcopy(model)
    with torch.no_grad():
        for layer in shared.model.layers:
            layer.mlp.up_proj.weight.mul_(1.5)
    other = scaled_model(family, seed=3, **extra)
    for teacher, w_t in ((shared, None), (other, other.lm_head.weight)):
        with torch.no_grad():
            t_hidden = head_states(teacher, ids)
            t_logits = copy.deepcopy(teacher).double()(input_ids=ids).logits
        want = grads_of(copy.deepcopy(model).double(), lambda m: restated_distill(m, ids, t_logits, 0.4, 0.5))
        got = grads_of(model, lambda m: lm_loss(m, ids, "distill", teacher_hidden=t_hidden, teacher_weight=w_t,
                                                alpha=0.4, temperature=0.5, backend=backend, token_chunk=16))
        assert_same(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_against_the_restated_loss(backend):
    model = scaled_model("cohere", logit_scale=0.25)
    ids = ids_for(model)

    def restated(m):
        logp = F.log_softmax(m(input_ids=ids).logits, -1)
        return -(logp.exp() * logp).sum(-1).mean()

    want = grads_of(copy.deepcopy(model).double(), restated)
    got = grads_of(model, lambda m: lm_loss(m, ids, "entropy", backend=backend, token_chunk=16))
    assert_same(got, want)


def test_padding_counts_in_no_term():
    """Right padding with its attention mask: CE equals the HF loss with the padded labels ignored, and every
    objective on a padded row equals the objective on the row without its padding."""
    model = tiny_model("llama")
    ids = ids_for(model, b=1, L=20)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 20, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)], 1)
    hf = model(input_ids=padded, attention_mask=mask, labels=padded.masked_fill(mask == 0, -100)).loss
    with torch.no_grad():
        teacher_hidden = head_states(model, padded, attention_mask=mask) * 0.5
    for objective, kw in (("ce", {}), ("entropy", {}),
                          ("distill", dict(teacher_hidden=teacher_hidden, alpha=0.4, temperature=0.5))):
        full = lm_loss(model, padded, objective, attention_mask=mask, backend="torch", **kw)
        kw_short = dict(kw, teacher_hidden=teacher_hidden[:, :20]) if objective == "distill" else kw
        short = lm_loss(model, ids, objective, backend="torch", **kw_short)
        assert torch.allclose(full, short, rtol=1e-5, atol=1e-6), objective
        if objective == "ce":
            assert torch.allclose(full, hf, rtol=1e-5, atol=1e-6)


def test_no_tensor_of_n_by_v_elements():
    """Forward and backward of lm_loss make no tensor as large as the [N, V] logits; the model's own loss
    does (so the check can fail)."""
    model = tiny_model("llama", vocab=1000)
    for p in model.parameters():
        p.requires_grad_(True)
    ids = ids_for(model, b=2, L=64)
    nv_bytes = ids.numel() * model.config.vocab_size * 4
    with LargestTensor():
        lm_loss(model, ids, backend="torch", token_chunk=16).backward()
    ours = LargestTensor.biggest
    model.zero_grad(set_to_none=True)
    with LargestTensor():
        model(input_ids=ids, labels=ids).loss.backward()
    theirs = LargestTensor.biggest
    assert 0 < ours < nv_bytes <= theirs, (ours, nv_bytes, theirs)


def test_bad_input_is_one_clear_error():
    model = tiny_model("llama")
    ids = ids_for(model)
    cases = [
        (dict(objective="kl"), "objective must be one of ce, distill, entropy"),
        (dict(objective="distill"), "needs teacher_hidden"),
        (dict(objective="ce", teacher_hidden=torch.zeros(2, 24, 64)), "takes no teacher"),
        (dict(objective="entropy", return_parts=True), "takes no labels"),
        (dict(labels=ids[:, :5]), r"labels must be \[B, L\]"),
        (dict(objective="distill", teacher_hidden=torch.zeros(2, 24, 8), alpha=0.4, temperature=1.0),
         r"teacher_hidden must be \[B, L, d\]"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message) as err:
            lm_loss(model, ids, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="integer token ids"):
        lm_loss(model, ids.float())
