"""Options and checks the subcommands share, so each is written once."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
import os
import sys
from typing import Optional

from ..errors import InputError, user_code_error

DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]


def model_argument(p: argparse.ArgumentParser, what: str = "the model") -> None:
    p.add_argument("model", help=f"{what}: a Hugging Face id, a local folder, a .gguf file, or the alias smollm2-135m")


def device_options(p: argparse.ArgumentParser, dtype_default: Optional[str] = "auto") -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    p.add_argument("--dtype", default=dtype_default, choices=DTYPE_CHOICES,
                   help="model dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code a model folder ships (auto_map in its config); off: such a model is "
                        "refused unless transformers knows its type")


def progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars on stderr (the package's, and those of the libraries it runs: weight "
                        "loading, GGUF de-quantizing, shard writing, lm-eval)")


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Inside, with ``enabled`` False, no progress bar is drawn: ours take ``progress=False``, but
    transformers, its GGUF reader, huggingface_hub, datasets and lm-eval each draw their own, some
    with no switch (transformers' GGUF de-quantizing, lm-eval's request loops), so every tqdm bar
    created inside is made disabled. Restored on exit."""
    if enabled:
        yield
        return
    from tqdm import std

    original = std.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = quiet_init
    try:
        yield
    finally:
        std.tqdm.__init__ = original


def verbose_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="also say which fused layer ops (RMSNorm, rotary) the gradient passes used, and why not")


def say_layer_ops(report: Optional[dict], verbose: bool, where: str) -> None:
    """The fused layer ops a pass used (models.LayerOps.report): with --verbose always, otherwise only
    when a probe left some of the model's own code in place (the run is then slower or larger)."""
    from ..models import describe_layer_ops, layer_ops_incomplete

    if report is not None and (verbose or layer_ops_incomplete(report)):
        print(f"sdmprune: {where}: {describe_layer_ops(report)}", file=sys.stderr, flush=True)


def at_least(value, least, flag: str) -> None:
    """InputError naming ``flag`` unless ``value`` (when given) is a number >= ``least``."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{flag} {value} is not a finite number")
    if value < least:
        raise InputError(f"{flag} must be at least {least} (got {value})")


def warn_remote_code(args) -> None:
    if getattr(args, "trust_remote_code", False):
        print("sdmprune: --trust-remote-code: Python code shipped with the model will run", file=sys.stderr)


def import_plugins(specs) -> None:
    """Import each ``--plugin`` (a module name on the path, or a .py file): a plugin registers its methods
    with ``sdmprune.register_method`` when imported."""
    for spec in specs or ():
        if spec.endswith(".py") or os.sep in spec:
            path = os.path.abspath(os.path.expanduser(spec))
            if not os.path.isfile(path):
                raise InputError(f"--plugin {spec!r}: no such file")
            name = "sdmprune_plugin_" + os.path.splitext(os.path.basename(path))[0]
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            try:
                loader.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001 - a user's module failing is one line
                raise user_code_error(f"--plugin {spec!r}: importing it", exc, path) from None
            sys.modules[name] = module
            continue
        if importlib.util.find_spec(spec) is None:
            raise InputError(f"--plugin {spec!r}: no module of that name on the Python path")
        try:
            importlib.import_module(spec)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise user_code_error(f"--plugin {spec!r}: importing it", exc,
                                  importlib.util.find_spec(spec).origin) from None
