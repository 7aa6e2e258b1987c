"""sdmprune.integrations.torch_pruning against the real torch-pruning package (the extra
``sdmprune[torch-pruning]``; skipped when it is not installed, except the tests that need it absent).

Tiny random Llamas in float32: torch-pruning driven by ChannelImportance keeps exactly the channels
prune_model keeps and gives its logits bit for bit; awkward widths, round_to, frozen models, wrong-length
scores, saving for plain from_pretrained, the build finishing in seconds, one backward serving sdmprune's
importance engine and torch-pruning's, and the README's recipes run as written.
"""
import copy
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_model  # noqa: E402

from sdmprune.errors import InputError, importable  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tp = pytest.mark.skipif(not importable("torch_pruning"),
                              reason="torch-pruning is not installed (pip install 'sdmprune[torch-pruning]')")
I = 160  # the tiny models' MLP width


def calib_tokens(n=4, L=16, seed=7):
    return torch.randint(0, 300, (n, L), generator=torch.Generator().manual_seed(seed))


def random_scores(n_layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {i: torch.rand(I, generator=g) for i in range(n_layers)}


def assert_kept(pruned, original, keep):
    """Every MLP of ``pruned`` is ``original``'s restricted to ``keep[layer]`` (rows of gate/up, columns of
    down), bit for bit."""
    for i, (a, b) in enumerate(zip(pruned.model.layers, original.model.layers)):
        k = keep[i]
        assert torch.equal(a.mlp.gate_proj.weight, b.mlp.gate_proj.weight[k]), i
        assert torch.equal(a.mlp.up_proj.weight, b.mlp.up_proj.weight[k]), i
        assert torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight[:, k]), i


@needs_tp
@pytest.mark.parametrize("method", ["sdmprune", "hfprune", "taylor", "wanda-sp"])
def test_torch_pruning_keeps_prune_models_channels(method):
    from sdmprune import PruneConfig, prune_model, score_channels
    from sdmprune.integrations.torch_pruning import ChannelImportance, mlp_pruner

    model = tiny_model("llama", seed=5)
    original = copy.deepcopy(model)
    theirs = copy.deepcopy(model)
    cfg = PruneConfig(width=97, method=method, stage1_keep=0.9, batch_size=2, progress=False)
    ours = prune_model(model, calib_tokens(), cfg)
    result = score_channels(theirs, calib_tokens(), cfg)
    pruner = mlp_pruner(theirs, ChannelImportance(theirs, result), width=result.width)
    pruner.step()
    assert {k: v.tolist() for k, v in result.keep.items()} == {k: v.tolist() for k, v in ours.keep.items()}
    assert_kept(theirs, original, ours.keep)
    assert theirs.config.intermediate_size == model.config.intermediate_size == 97
    x = calib_tokens(2, 12, seed=9)
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=x).logits, model(input_ids=x).logits)


@needs_tp
def test_awkward_widths_and_round_to():
    """The widths where torch-pruning's own ratio keeps one channel too few, and round_to as plan_width
    rounds it."""
    import torch_pruning as tp

    from sdmprune.integrations.torch_pruning import ChannelImportance, mlp_pruner
    from sdmprune.scoring.selection import top_channels
    from sdmprune.widths import plan_width

    awkward = [w for w in range(1, I) if int(I * (1 - (I - w) / I)) != w]
    assert len(awkward) == 20  # 20 of the 159 widths at I = 160 (a sixth at SmolLM2's I = 1536)

    plain = tiny_model("llama")  # torch-pruning left to itself, with ratio (I - W) / I
    w = awkward[-1]
    ignored = [m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." not in n]
    tp.pruner.BasePruner(plain, calib_tokens(1, 8), ChannelImportance(plain, random_scores()),
                         pruning_ratio=(I - w) / I, ignored_layers=ignored,
                         forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits).step()
    assert plain.model.layers[0].mlp.up_proj.out_features == w - 1

    scores = random_scores()
    for width, round_to in [(awkward[0], None), (awkward[7], None), (w, None), (115, 8), (100, 64)]:
        model = tiny_model("llama")
        original = copy.deepcopy(model)
        expect = plan_width(model, width=width, round_to=round_to).width
        mlp_pruner(model, ChannelImportance(model, scores), width=width, round_to=round_to).step()
        assert expect == (width if round_to is None else width // round_to * round_to)
        assert_kept(model, original, {i: top_channels(s, expect) for i, s in scores.items()})
        assert model.config.intermediate_size == expect


@needs_tp
def test_frozen_model_is_pruned_and_left_as_it_was():
    from sdmprune.integrations.torch_pruning import ChannelImportance, mlp_pruner

    model = tiny_model("llama")
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    pruner = mlp_pruner(model, ChannelImportance(model, random_scores()), width=120)
    assert [m.training for m in model.modules()] == modes  # building traced in eval mode; modes are back
    assert not any(p.requires_grad for p in model.parameters())
    pruner.step()
    assert [layer.mlp.up_proj.out_features for layer in model.model.layers] == [120, 120]
    assert not any(p.requires_grad for p in model.parameters())  # torch-pruning's new Parameters too


@needs_tp
def test_bad_scores_and_settings_are_one_clear_error():
    from sdmprune.integrations.torch_pruning import ChannelImportance, mlp_pruner

    model = tiny_model("llama")
    cases = [
        (lambda: ChannelImportance(model, {0: torch.rand(I - 1), 1: torch.rand(I)}),
         r"scores of layer 0 have shape \(159,\); its MLP has 160 channels"),
        (lambda: ChannelImportance(model, {5: torch.rand(I)}), r"scores name layers \[5\]"),
        (lambda: mlp_pruner(model, ChannelImportance(model, {0: torch.rand(I)}), width=100),
         r"no scores for layers \[1\] and no fallback"),
        (lambda: mlp_pruner(model, ChannelImportance(model, random_scores()), width=100, global_pruning=True),
         "global_pruning=True"),
        (lambda: mlp_pruner(model, ChannelImportance(model, random_scores()), width=100, pruning_ratio=0.5),
         "mlp_pruner sets pruning_ratio itself"),
        (lambda: mlp_pruner(model, ChannelImportance(model, random_scores()), width=I), "removes nothing"),
    ]
    for make, message in cases:
        with pytest.raises(InputError, match=message) as err:
            make()
        assert "\n" not in str(err.value)
    # scores of the model as it was, used after it was pruned
    stale = ChannelImportance(model, random_scores())
    mlp_pruner(model, ChannelImportance(model, random_scores(seed=1)), width=120).step()
    with pytest.raises(InputError, match="has 120 MLP channels now but was scored with 160"):
        mlp_pruner(model, stale, width=100).step()


@needs_tp
def test_saved_result_loads_in_plain_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    from sdmprune.integrations.torch_pruning import ChannelImportance, mlp_pruner

    model = tiny_model("llama")
    mlp_pruner(model, ChannelImportance(model, random_scores()), width=101).step()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.intermediate_size == 101
    x = calib_tokens(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


def run_python(code, timeout):
    """Run ``code`` in a fresh interpreter from the repository root; returns (seconds, stdout)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests")))
    assert out.returncode == 0, out.stderr[-3000:]
    return time.perf_counter() - t0, out.stdout


@needs_tp
def test_building_the_pruner_takes_seconds():
    """On a Llama whose attention groups torch-pruning never finishes building, mlp_pruner builds and
    steps in seconds (a hang ends in the timeout)."""
    _, out = run_python("""
        import time, torch
        from conftest import tiny_model
        from sdmprune.integrations.torch_pruning import ChannelImportance, mlp_pruner
        model = tiny_model("llama", layers=4)
        t0 = time.perf_counter()
        pruner = mlp_pruner(model, ChannelImportance(model, {i: torch.rand(160) for i in range(4)}), width=100)
        pruner.step()
        assert model.config.intermediate_size == 100
        print(f"built and stepped in {time.perf_counter() - t0:.2f} s")
    """, timeout=300)
    seconds = float(re.search(r"stepped in ([\d.]+) s", out).group(1))
    assert seconds < 30, out


def test_nothing_imports_torch_pruning_until_the_integration_is():
    """Every module of sdmprune imports without torch_pruning; a run of the pipeline loads none of it;
    with the package hidden, the integration module is one InputError line naming the extra."""
    _, out = run_python("""
        import importlib, pkgutil, sys, torch
        import sdmprune
        from sdmprune.errors import OPTIONAL_DEPENDENCIES
        skipped = []
        for info in pkgutil.walk_packages(sdmprune.__path__, "sdmprune."):
            if info.name in ("sdmprune.__main__", "sdmprune.integrations.torch_pruning"):
                continue
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as e:  # another optional extra that is not installed here
                assert e.name.split(".")[0] in OPTIONAL_DEPENDENCIES, (info.name, e)
                skipped.append(info.name)
        from conftest import tiny_model
        from sdmprune import PruneConfig, lm_loss, prune_model
        model = tiny_model("llama")
        lm_loss(model, torch.randint(0, 300, (1, 8))).backward()
        prune_model(model, torch.randint(0, 300, (2, 8)), PruneConfig(width=100, method="taylor", progress=False))
        assert "torch_pruning" not in sys.modules, "imported torch_pruning"
        sys.modules["torch_pruning"] = None  # as if it were not installed
        try:
            import sdmprune.integrations.torch_pruning
        except sdmprune.errors.InputError as e:
            print("ERROR:", e)
        print("skipped:", skipped)
    """, timeout=300)
    line = next(x for x in out.splitlines() if x.startswith("ERROR:"))
    assert "pip install 'sdmprune[torch-pruning]'" in line and "sdmprune.integrations.torch_pruning" in line


@needs_tp
def test_llm_pruner_loop_with_lm_loss_is_the_loops_own():
    """Swapping the loop's loss line for lm_loss: the same loss and .grad of every parameter (float32
    rounding), hence the same torch-pruning Taylor importance and the same pruned model."""
    import torch_pruning as tp

    from sdmprune import lm_loss
    from sdmprune.integrations.torch_pruning import mlp_pruner

    def loop(model, loss_of):
        pruner = mlp_pruner(model, tp.importance.GroupTaylorImportance(), width=97)
        model.zero_grad()
        losses = []
        for batch in calib_tokens(4, 16).split(2):
            loss = loss_of(model, batch)
            loss.backward()
            losses.append(float(loss.detach()))
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        pruner.step()
        return losses, grads, model

    theirs = loop(tiny_model("llama", seed=2), lambda m, b: m(input_ids=b, labels=b).loss)
    ours = loop(tiny_model("llama", seed=2), lambda m, b: lm_loss(m, b, backend="torch"))
    assert ours[0] == pytest.approx(theirs[0], rel=1e-6)
    for n, g in theirs[1].items():
        assert float((ours[1][n] - g).abs().max()) <= 1e-5 * float(g.abs().max()), n
    for a, b in zip(ours[2].model.layers, theirs[2].model.layers):
        assert torch.equal(a.mlp.up_proj.weight, b.mlp.up_proj.weight)


@needs_tp
def test_one_backward_serves_sdmprunes_importance_and_torch_prunings():
    """TaylorImportance(freeze="mlp"): from one backward, sdmprune's MLP scores equal a run that freezes
    everything, and every other weight's .grad equals a plain backward's, so torch-pruning's Taylor gets
    the values it gets without sdmprune; ChannelImportance hands sdmprune's groups its ranks and the rest
    to that fallback."""
    import torch_pruning as tp

    from sdmprune import TaylorImportance, lm_loss
    from sdmprune.integrations.torch_pruning import ChannelImportance
    from sdmprune.scoring.selection import channel_order

    batches = calib_tokens(4, 16).split(2)

    def backward(model):
        for b in batches:
            (lm_loss(model, b, backend="torch") * len(b)).backward()

    model = tiny_model("llama", seed=4)
    plain = copy.deepcopy(model)
    alone = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # freeze="mlp" warns that the other weights get .grad: the point here
        with TaylorImportance(model, freeze="mlp", backend="torch") as both:
            backward(model)
    with TaylorImportance(alone, freeze="all", backend="torch") as only:
        backward(alone)
    backward(plain)

    mlp = {n for n, _ in model.named_parameters() if ".mlp." in n}
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n in mlp), n  # no MLP weight gradient was formed, every other one was
        if n not in mlp:
            ref = dict(plain.named_parameters())[n].grad
            assert float((p.grad - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), n
    ours, want = both.scores(), only.scores()
    for i in want:
        assert torch.allclose(ours[i], want[i], rtol=1e-5, atol=0)

    def group_of(m, module, fn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch-pruning names the norms' weights it will treat per feature
            dg = tp.DependencyGraph().build_dependency(
                m, calib_tokens(1, 8), forward_fn=lambda mm, x: mm(input_ids=x, use_cache=False).logits)
        mod = dict(m.named_modules())[module]
        return dg.get_pruning_group(mod, fn, list(range(fn.__self__.get_out_channels(mod))))

    theirs = tp.importance.GroupTaylorImportance()
    importance = ChannelImportance(model, ours, fallback=theirs)
    head = group_of(model, "lm_head", tp.prune_linear_out_channels)  # a group sdmprune does not own
    assert torch.allclose(importance(head), theirs(group_of(plain, "lm_head", tp.prune_linear_out_channels)),
                          rtol=1e-5, atol=0)
    mlp_group = group_of(model, "model.layers.1.mlp.up_proj", tp.prune_linear_out_channels)
    rank = importance(mlp_group)
    assert torch.equal(torch.argsort(rank, descending=True, stable=True), channel_order(ours[1]))


@needs_tp
def test_readme_recipes_run_as_written(tmp_path, monkeypatch):
    """The three Python blocks of the README section "Dropping into other pruning codebases", on a tiny
    model with ``model`` and ``calib`` defined as the section says."""
    from transformers import AutoModelForCausalLM

    from sdmprune.widths import plan_width

    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Dropping into other pruning codebases", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        model = tiny_model("llama", seed=6)
        expect = plan_width(model, ratio=0.2).width
        scope = {"model": model, "calib": calib_tokens(8, 16)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(block, "README.md", "exec"), scope)
        assert [layer.mlp.up_proj.out_features for layer in model.model.layers] == [expect, expect]
        assert model.config.intermediate_size == expect
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "tp-pruned")
    assert loaded.config.intermediate_size == expect
