"""The one exception family the CLI turns into a single clear error line (exit code 2), and the one
check that an optional dependency a requested option needs is installed."""
import importlib.util
import sys


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
