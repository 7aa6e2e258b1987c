"""Small helpers shared by the kernels: when to run Triton, and dtype bookkeeping."""
import os

import torch

try:  # Triton is optional at import time: the PyTorch references cover every op.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    _HAVE_TRITON = False


# Options every launch of these kernels passes. Triton 3.10 turns the implicit mul+add -> FMA fusion off
# by default (3.9 warns that it will); the kernels were measured and tolerance-tested with it on, so they
# ask for it rather than inherit each release's default. The interpreter ignores it.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def triton_available() -> bool:
    """True when the triton package imports."""
    return _HAVE_TRITON


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1 (Triton kernels then run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op given these tensors should run its Triton kernel.

    Yes on CUDA tensors when Triton is installed, and on CPU tensors under TRITON_INTERPRET=1;
    otherwise the op uses its PyTorch reference.
    """
    if not _HAVE_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreter_enabled() and all(t.device.type == "cpu" for t in tensors)
