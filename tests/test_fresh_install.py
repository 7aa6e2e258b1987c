"""What a newcomer's fresh install meets: nothing at the repository root shadows an installed package,
the commands work from the repository root (where ``python -m`` puts it first on sys.path), and the
versions in use are the ones ``pyproject.toml`` declares.

The repository root is on ``sys.path`` for ``python -m pytest``, ``python -m sdmprune``, ``python -c``
and every ``torchrun -m`` rank; a regular package there named like an installed distribution wins
that name (transformers >= 5.25 imports Hugging Face's ``kernels``; this repository once had a
top-level ``kernels/`` package). The 2-rank ``torchrun -m sdmprune prune`` from the root runs in
tests/test_distributed.py.
"""
import importlib.metadata
import os
import pkgutil
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(__file__))


def root_env():
    """The environment of a newcomer's shell: no PYTHONPATH, nothing else on sys.path but what
    ``python -m``/``-c`` puts there (the current folder, here the repository root)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_at_root(*args, timeout=180):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=root_env(), capture_output=True, text=True,
                          timeout=timeout)


def installed_top_level_names():
    """{top-level import name: [distributions]} of every installed distribution except this one."""
    names = {}
    for name, dists in importlib.metadata.packages_distributions().items():
        others = [d for d in dists if d.lower() != "sdmprune"]
        if others:
            names[name] = others
    return names


def test_repository_root_shadows_no_installed_distribution():
    """No regular package or module at the root carries an installed distribution's import name."""
    installed = installed_top_level_names()
    at_root = {m.name for m in pkgutil.iter_modules([ROOT])}
    clashes = {n: installed[n] for n in at_root if n in installed}
    assert not clashes, f"importable from the repository root under an installed package's name: {clashes}"
    assert "sdmprune" in at_root and "kernels" not in at_root


def test_import_kernels_at_the_root_is_never_ours():
    """``import kernels`` from the root gives Hugging Face's distribution when it is installed (transformers
    >= 5.25 needs it), and no module of this repository otherwise."""
    r = run_at_root("-c", "import kernels, os; print(os.path.realpath(kernels.__file__))")
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, r.stdout + r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.path.realpath(dist.locate_file("kernels/__init__.py")), r.stdout


def test_python_m_sdmprune_at_the_root():
    from sdmprune import __version__

    r = run_at_root("-m", "sdmprune", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sdmprune {__version__}", r.stdout + r.stderr


def test_a_model_loads_through_transformers_at_the_root(tmp_path):
    """A prune from the root: transformers loads the model (and imports its hub-kernel integration)."""
    import torch

    from conftest import tiny_model

    tiny_model(seed=0, layers=2).save_pretrained(tmp_path / "model")
    torch.save(torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0)), tmp_path / "ids.pt")
    r = run_at_root("-m", "sdmprune", "prune", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                    "--width", "96", "--method", "taylor", "--calib", str(tmp_path / "ids.pt"), "--samples", "2",
                    "--seq-len", "16", "--no-progress", "--verbose")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rotary replaces transformers.models.llama" in r.stderr, r.stderr  # --verbose names the fused ops
    assert os.path.isfile(tmp_path / "out" / "config.json")


def _declared(requirement_name):
    """The version specifier pyproject.toml declares for a dependency (core or extra)."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    found = re.findall(rf'"{re.escape(requirement_name)}([<>=!~][^";]*)', text)
    assert found, f"pyproject.toml declares no version range for {requirement_name}"
    return found[0]


@pytest.mark.parametrize("dist", ["torch", "transformers", "peft", "gguf", "lm-eval", "accelerate", "torch-pruning",
                                  "matplotlib"])
def test_installed_versions_are_inside_the_declared_range(dist):
    """The run tests what the package declares: a resolver that left the range would be a packaging bug."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    try:
        installed = Version(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed (an optional extra)")
    spec = SpecifierSet(_declared(dist))
    assert Version(installed.base_version) in spec, f"{dist} {installed} is outside the declared {spec}"


def test_every_optional_import_is_in_the_extra_its_error_names():
    """The one-line error for a missing optional package names an extra (sdmprune.errors); that extra of
    pyproject.toml must install the package, or the advice would not help."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    from packaging.requirements import Requirement

    from sdmprune.errors import OPTIONAL_DEPENDENCIES

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        extras = tomllib.load(fh)["project"]["optional-dependencies"]
    for module, (dist, extra) in OPTIONAL_DEPENDENCIES.items():
        if extra is None:
            continue
        assert extra in extras, f"{module}: pyproject.toml has no extra {extra!r}"
        assert dist in {Requirement(r).name for r in extras[extra]}, f"extra {extra!r} does not install {dist}"
        assert extra in Requirement(extras["all"][0]).extras, f"the all extra leaves out {extra!r}"
