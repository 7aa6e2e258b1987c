"""The method registry: built-in methods are entries of one shape; a user's own method registered with
``sdmprune.register_method`` is planned, selected, sliced and reported exactly like a built-in one,
from Python and from the command line (``--plugin``)."""
import json
import textwrap

import pytest
import torch

from conftest import make_byte_tokenizer, tiny_model

import sdmprune
from sdmprune.cli import main
from sdmprune.errors import InputError, SdmpruneError
from sdmprune.models import find_gated_mlps


def calib(n=3, L=12, seed=0):
    return torch.randint(0, 300, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def registered():
    """Register methods for one test and remove them afterwards."""
    from sdmprune.scoring import registry as methods

    names = []

    def register(name, fn, **kw):
        sdmprune.register_method(name, fn, **kw)
        names.append(name)

    yield register
    for n in names:
        methods.unregister_method(n)


def test_builtin_methods_are_registry_entries():
    from sdmprune.scoring.registry import available_methods, get_method

    assert {"sdmprune", "taylor", "wanda-sp", "magnitude", "random"} <= set(available_methods())
    assert get_method("sdmprune").gradient and get_method("sdmprune").needs_calibration
    assert not get_method("magnitude").needs_calibration and not get_method("magnitude").gradient
    assert get_method("wanda-sp").needs_calibration and not get_method("wanda-sp").gradient
    with pytest.raises(InputError, match="unknown method 'nope'.*sdmprune"):
        get_method("nope")


def test_a_registered_method_runs_through_prune_model(registered):
    seen = {}

    def down_norm(model, calib_tokens, config):
        seen["tokens"], seen["config"] = calib_tokens, config
        return [m.down.weight.float().norm(dim=0) for m in find_gated_mlps(model)]

    registered("down-norm", down_norm)
    model, reference = tiny_model(seed=4), tiny_model(seed=4)
    tokens = calib()
    result = sdmprune.prune_model(model, tokens, sdmprune.PruneConfig(width=96, method="down-norm", progress=False))
    assert torch.equal(seen["tokens"], tokens) and seen["config"].method == "down-norm"
    for m in find_gated_mlps(reference):
        want = torch.argsort(m.down.weight.float().norm(dim=0), descending=True, stable=True)[:96].sort().values
        assert torch.equal(result.keep[m.index], want)
    assert all(m.width == 96 for m in find_gated_mlps(model))
    assert result.stats["method"] == "down-norm" and result.stats["params_after"] == result.plan.params_after


def test_a_method_without_calibration(registered):
    registered("first-channels", lambda model, tokens, cfg: [torch.arange(m.width, 0, -1).float()
                                                             for m in find_gated_mlps(model)],
               needs_calibration=False)
    model = tiny_model(seed=4)
    result = sdmprune.prune_model(model, None, width=100, method="first-channels", progress=False)
    assert all(torch.equal(k, torch.arange(100)) for k in result.keep.values())


@pytest.mark.parametrize("bad,message", [
    (lambda model, t, c: [torch.zeros(3)], "one score tensor per gated MLP"),
    (lambda model, t, c: [torch.zeros(7) for _ in find_gated_mlps(model)], "shape"),
    (lambda model, t, c: [torch.full((m.width,), float("nan")) for m in find_gated_mlps(model)], "NaN"),
    (lambda model, t, c: None, "list"),
])
def test_a_registered_method_returning_the_wrong_shape_is_one_error(registered, bad, message):
    registered("bad", bad)
    model = tiny_model(seed=4)
    before = [m.down.weight.clone() for m in find_gated_mlps(model)]
    with pytest.raises(SdmpruneError, match=message):
        sdmprune.prune_model(model, calib(), width=96, method="bad", progress=False)
    assert all(torch.equal(a, m.down.weight) for a, m in zip(before, find_gated_mlps(model)))  # nothing sliced


def test_registration_errors(registered):
    with pytest.raises(InputError, match="already"):
        sdmprune.register_method("sdmprune", lambda m, t, c: [])
    with pytest.raises(InputError, match="callable"):
        sdmprune.register_method("x", 3)
    with pytest.raises(InputError, match="name"):
        sdmprune.register_method("", lambda m, t, c: [])


PLUGIN = textwrap.dedent('''
    import torch
    import sdmprune
    from sdmprune.models import find_gated_mlps

    def up_norm(model, calib_tokens, config):
        return [m.up.weight.float().norm(dim=1) for m in find_gated_mlps(model)]

    sdmprune.register_method("up-norm", up_norm, needs_calibration=False)
''')


def test_plugin_method_from_the_command_line(tmp_path, capsys, monkeypatch):
    from sdmprune.scoring import registry as methods

    model = tiny_model(seed=6)
    model.save_pretrained(tmp_path / "tiny")
    make_byte_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "my_methods.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code = main(["prune", str(tmp_path / "tiny"), "--out", str(tmp_path / "o"), "--width", "96",
                     "--plugin", "my_methods", "--method", "up-norm", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 0, err
        report = json.loads((tmp_path / "o" / "sdmprune.json").read_text())
        assert report["method"] == "up-norm" and report["width"] == 96
        for m in find_gated_mlps(model):
            want = torch.argsort(m.up.weight.float().norm(dim=1), descending=True, stable=True)[:96].sort().values
            assert report["kept_indices"][str(m.index)] == want.tolist()
        # a plugin given as a file path works too, and a missing one is one line
        methods.unregister_method("up-norm")
        code = main(["prune", str(tmp_path / "tiny"), "--out", str(tmp_path / "o2"), "--width", "96",
                     "--plugin", str(tmp_path / "my_methods.py"), "--method", "up-norm", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 0, err
        code = main(["prune", str(tmp_path / "tiny"), "--out", str(tmp_path / "o3"), "--width", "96",
                     "--plugin", "no_such_plugin_module", "--method", "up-norm", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "no_such_plugin_module" in err[0]
        code = main(["prune", str(tmp_path / "tiny"), "--out", str(tmp_path / "o3"), "--width", "96",
                     "--method", "not-registered", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "unknown method 'not-registered'" in err[0]
    finally:
        if "up-norm" in methods.available_methods():
            methods.unregister_method("up-norm")
