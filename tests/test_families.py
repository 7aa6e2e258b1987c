"""Every family the adapter accepts gets the model's own loss, or a clear refusal.

For every causal-LM model type of the installed transformers whose tiny random config builds (at most
MAX_PARAMS parameters at the sizes below) and whose layers the adapter accepts:

* stage 1: the project's CE Taylor scores (method taylor, torch engine, batch 1, float32) equal the
  scores from autograd weight gradients of the HF model's OWN causal-LM loss (``model(ids,
  labels=ids).loss``: logit scaling and all), max relative difference <= RTOL;
* stage 2: the project's self-distillation scores (method sdmprune, torch engine: one weight copy, the
  student masked, cached teacher states) equal those of the two-copy reference loop (the original
  model as teacher and a sliced copy as student, both through their own logits), <= RTOL.

Families the adapter refuses are listed with the reason. The README's family list is generated from
this test (``python tests/test_families.py --readme``) and checked against it for the transformers
version it names. The fused kernels run the same stage-1 comparison under the Triton interpreter on
a plain family and one with a logit scale (Granite's softcapping cousins are refused).
"""
import json
import os
import re
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
MAX_PARAMS = 2_000_000  # a config that ignores the tiny sizes is not built for real
RTOL = 1e-4
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"


def build(model_type):
    """(model or None, status, detail) for one model type at the tiny sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sdmprune.models import UnsupportedModelError, count_parameters, find_gated_mlps

    try:
        config = AutoConfig.for_model(model_type, **TINY)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - a family that does not build at these sizes is only listed
        return None, "not built", type(exc).__name__
    try:
        find_gated_mlps(meta)
    except UnsupportedModelError as exc:
        return None, "refused", str(exc).split(";")[0]
    if count_parameters(meta) > MAX_PARAMS:
        return None, "not built", "ignores the tiny sizes"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    try:
        find_gated_mlps(model)  # with real weights the MLP's forward is probed too
    except UnsupportedModelError as exc:
        return None, "refused", str(exc).split(";")[0]
    return model, "checked", ""


def hf_loss_scores(model, ids):
    """Stage-1 Taylor scores from autograd weight gradients of the HF model's own causal-LM loss."""
    from sdmprune.models import find_gated_mlps

    mlps = find_gated_mlps(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in mlps:
        for lin in (m.gate, m.up, m.down):
            lin.weight.requires_grad_(True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    out = {}
    for m in mlps:
        wg, wu, wd = m.gate.weight, m.up.weight, m.down.weight
        out[m.index] = (wu.grad * wu + wg.grad * wg + (wd.grad * wd).t()).abs().mean(1).detach()
        for w in (wg, wu, wd):
            w.grad = None
            w.requires_grad_(False)
    return out


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_family(model_type):
    """(status, detail, stage-1 error, stage-2 error) of one model type."""
    import copy

    from sdmprune.pipeline import PruneConfig, prune_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, status, detail = build(model_type)
        if model is None:
            return status, detail, None, None
        ids = torch.randint(3, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(1))
        try:
            want = hf_loss_scores(copy.deepcopy(model), ids)
        except Exception as exc:  # noqa: BLE001
            return "not built", f"does not run at the tiny sizes ({type(exc).__name__})", None, None
        cfg = PruneConfig(width=80, method="taylor", engine="torch", batch_size=1, progress=False)
        got = prune_model(copy.deepcopy(model), ids, cfg).scores
        e1 = max(rel(got[k], want[k]) for k in want)
        x = torch.randint(3, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
        two = dict(width=80, method="sdmprune", batch_size=1, stage1_keep=0.9, alpha=0.5, temperature=0.5,
                   progress=False)
        lean = prune_model(copy.deepcopy(model), x, PruneConfig(engine="torch", **two))
        ref = prune_model(copy.deepcopy(model), x, PruneConfig(engine="reference", **two))
        e2 = 0.0
        for k in ref.scores:
            live = torch.isfinite(ref.scores[k])
            if not torch.equal(live, torch.isfinite(lean.scores[k])):
                return "checked", "stage-1 survivors differ", e1, float("inf")
            e2 = max(e2, rel(lean.scores[k][live], ref.scores[k][live]))
        scale = "" if model.config.__dict__.get("logits_scaling") is None and \
            model.config.__dict__.get("logit_scale") is None else "logit scale"
        return status, scale, e1, e2


def model_types():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.fixture(scope="module")
def families():
    from transformers.utils import logging

    logging.set_verbosity_error()
    return {t: check_family(t) for t in model_types()}


def test_every_accepted_family_gets_its_own_loss(families):
    checked = {t: r for t, r in families.items() if r[0] == "checked"}
    assert len(checked) >= 10, families
    bad = {t: r for t, r in checked.items() if not (r[2] <= RTOL and r[3] <= RTOL)}
    assert not bad, f"families whose scores differ from the model's own loss: {bad}"


def test_logit_scale_families_and_softcaps(families):
    for t in ("granite", "cohere"):  # logits_scaling 8 (divide) and logit_scale 0.0625 (multiply) at defaults
        assert families[t][0] == "checked" and families[t][1] == "logit scale", families[t]
    for t in ("gemma2",):  # final_logit_softcapping: refused with the attribute named
        assert families[t][0] == "refused" and "final_logit_softcapping" in families[t][1], families[t]


def test_granite_and_cohere_at_the_issue_settings():
    """Granite with logits_scaling 8 and Cohere with logit_scale 0.25: scores equal the HF loss's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sdmprune.pipeline import PruneConfig, prune_model

    for model_type, extra in (("granite", {"logits_scaling": 8.0}), ("cohere", {"logit_scale": 0.25})):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY, **extra)).eval()
        ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
        import copy

        want = hf_loss_scores(copy.deepcopy(model), ids)
        got = prune_model(model, ids, PruneConfig(width=80, method="taylor", engine="torch", progress=False)).scores
        assert max(rel(got[k], want[k]) for k in want) <= RTOL


@pytest.mark.parametrize("model_type", ["llama", "granite"])
def test_fused_kernels_on_families(model_type):
    """The fused engine (Triton under the interpreter on the CPU) gives the HF loss's stage-1 scores too."""
    import copy

    from sdmprune.kernels.utils import interpreter_enabled, triton_available
    from sdmprune.pipeline import PruneConfig, prune_model

    if not triton_available() or not (interpreter_enabled() or torch.cuda.is_available()):
        pytest.skip("needs Triton (TRITON_INTERPRET=1 on the CPU)")
    model, status, _ = build(model_type)
    assert status == "checked"
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    want = hf_loss_scores(copy.deepcopy(model), ids)
    cfg = PruneConfig(width=80, method="taylor", engine="fused", progress=False, gradient_checkpointing=False)
    got = prune_model(model, ids, cfg).scores
    assert max(rel(got[k], want[k]) for k in want) <= 2e-4


# Which fused layer ops apply to each accepted family at the tiny sizes, on the transformers versions
# this package supports: (RMSNorms swapped, rotary swapped). A release that changes how a family's norms
# or rotary are written (e.g. hub-kernel decorators) fails here instead of silently slowing users down.
EXPECTED_LAYER_OPS = {
    "code_llama": (5, True),  # transformers 5.0 (the floor) has it as a family of its own
    "cohere": (0, False), "cohere2": (0, False), "cwm": (5, True), "diffllama": (5, True), "doge": (9, True),
    "ernie4_5": (5, False), "exaone": (5, True), "exaone4": (9, True), "flint": (9, True), "gemma": (5, True),
    "gemma3_text": (13, True), "gemma4_unified_text": (13, False), "granite": (5, True), "granite_swa": (5, True),
    "helium": (5, False), "hunyuan_v1_dense": (9, True), "hyperclovax": (9, True), "internlm3": (5, True),
    "iquestcoder": (5, True), "llama": (5, True), "minicpm3": (9, False), "ministral": (5, True),
    "ministral3": (5, True), "mistral": (5, True), "olmo": (0, True), "olmo2": (9, True), "olmo3": (9, True),
    "qwen2": (5, True), "qwen3": (9, True), "seed_oss": (5, True), "stablelm": (0, True),
}


@pytest.fixture(scope="module")
def layer_ops(families):
    from sdmprune.models import find_layer_ops

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t, r in families.items():
            if r[0] == "checked":
                out[t] = find_layer_ops(build(t)[0]).report()
    return out


def test_fused_layer_ops_per_family(layer_ops):
    """Per accepted family: how many RMSNorms and whether the rotary go through sdmprune's kernels."""
    import transformers

    got = {t: (r["rms_norm"]["applied"], r["rotary"]["applied"]) for t, r in layer_ops.items()}
    changed = {t: {"expected": EXPECTED_LAYER_OPS[t], "now": got[t], "why": layer_ops[t]["rotary"]["why"],
                   "norms left alone": layer_ops[t]["rms_norm"]["left_alone"]}
               for t in got if t in EXPECTED_LAYER_OPS and got[t] != EXPECTED_LAYER_OPS[t]}
    assert not changed, (f"transformers {transformers.__version__} changed which fused layer ops apply "
                         f"(rms_norm count, rotary): {changed}")
    new = sorted(set(got) - set(EXPECTED_LAYER_OPS))
    if new:
        warnings.warn(f"transformers {transformers.__version__}: families without an expected layer-ops entry "
                      f"(add them to EXPECTED_LAYER_OPS): {', '.join(f'{t} {got[t]}' for t in new)}")
    assert got.get("llama") == (5, True), "the plain llama family must get every fused layer op"


def render(families) -> str:
    import transformers

    checked = sorted(t + (" (logit scale)" if r[1] == "logit scale" else "") for t, r in families.items()
                     if r[0] == "checked")
    groups = {}
    for t, r in sorted(families.items()):
        if r[0] == "refused":
            groups.setdefault(refusal_kind(r[1]), []).append(t)
    lines = [f"- **refused, {kind}:** {', '.join(names)}" for kind, names in sorted(groups.items())]
    return (f"Checked with transformers {transformers.__version__} by `tests/test_families.py` (stage-1 scores "
            f"equal the model's own loss gradient, stage-2 scores the two-copy reference, within {RTOL:g}):\n\n"
            f"- **supported:** {', '.join(checked)}\n" + "\n".join(lines) + "\n")


def refusal_kind(reason: str) -> str:
    """A short name for a refusal reason (the README groups refused families by it)."""
    for needle, kind in (("final_logit_softcapping", "logit softcap"), ("is not a gated MLP", "mixture-of-experts "
                         "or other non-gated layers"), ("does not compute", "MLP not of the form down(act(gate) * up)"),
                         ("activation", "activation"), ("has no gated MLP", "no gate/up/down MLP")):
        if needle in reason:
            return kind
    return reason


def test_readme_lists_the_checked_families(families):
    import transformers

    text = open(README).read()
    block = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    version = re.search(r"transformers (\S+) by", block)
    if version is None or version.group(1) != transformers.__version__:
        pytest.skip(f"README lists the families of transformers {version and version.group(1)}; this is "
                    f"{transformers.__version__} (regenerate: python tests/test_families.py --readme)")
    assert block == render(families).strip()


if __name__ == "__main__" and "--readme" in sys.argv:
    from transformers.utils import logging

    logging.set_verbosity_error()
    found = {t: check_family(t) for t in model_types()}
    text = open(README).read()
    head, tail = text[:text.index(BEGIN) + len(BEGIN)], text[text.index(END):]
    open(README, "w").write(head + "\n" + render(found) + tail)
    print(json.dumps({t: r for t, r in found.items() if r[0] != "not built"}, indent=1))
