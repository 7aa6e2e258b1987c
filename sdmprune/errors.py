"""The one exception family the CLI turns into a single clear error line (exit code 2), the one
check that an optional dependency a requested option needs is installed, and the one line for an
exception raised by a user's own code (a plugin, a registered method)."""
import importlib.util
import os
import sys
import traceback
from typing import Optional


class SdmpruneError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported model."""


class InputError(SdmpruneError, ValueError):
    """Bad input: a ratio out of range, a path that does not exist, a dataset too short."""


# import name -> (distribution, the sdmprune extra that installs it); pyproject.toml's extras list the same
OPTIONAL_DEPENDENCIES = {
    "peft": ("peft", "lora"),
    "lm_eval": ("lm-eval", "eval"),
    "gguf": ("gguf", "gguf"),
    "accelerate": ("accelerate", "gguf"),
    "torch_pruning": ("torch-pruning", "torch-pruning"),
    "pyarrow": ("pyarrow", None),
    "matplotlib": ("matplotlib", "plot"),
}


def importable(module: str) -> bool:
    """Whether ``import module`` can succeed, without importing it (a module set to None in
    sys.modules, as tests do to hide one, counts as missing)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_extra(module: str, why: str) -> None:
    """InputError naming the extra to install unless ``module`` is importable; ``why`` says what
    needs it, as the user asked for it (e.g. "--recover-steps")."""
    if importable(module):
        return
    dist, extra = OPTIONAL_DEPENDENCIES[module]
    how = f"pip install 'sdmprune[{extra}]'" if extra else f"pip install {dist}"
    raise InputError(f"{why} needs the optional package {dist!r}, which is not installed: {how}")


def one_line(text) -> str:
    """``text`` with its line breaks and runs of spaces folded into single spaces: a whole message on one line."""
    return " ".join(str(text).split())


def user_code_error(what: str, exc: BaseException, user_file: Optional[str] = None) -> InputError:
    """One line for ``exc`` raised by a user's code: ``what`` failed (e.g. "method 'm' of plugin p.py"), the
    exception, and the innermost frame in ``user_file`` (else the innermost frame), so the user sees
    their own line of code rather than a traceback through the package."""
    frames = traceback.extract_tb(exc.__traceback__)
    if user_file is not None:
        mine = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(user_file)]
        frames = mine or frames
    where = ""
    if frames:
        f = frames[-1]
        where = f" (at {f.filename}:{f.lineno} in {f.name}" + (f": {one_line(f.line)}" if f.line else "") + ")"
    message = one_line(exc)
    return InputError(f"{what} raised {type(exc).__name__}" + (f": {message}" if message else "") + where)
