"""Every Triton launch passes the options its kernels were measured and tolerance-tested with
(``LAUNCH_OPTIONS``) instead of inheriting each Triton release's defaults: Triton 3.10 turns the
implicit mul+add -> FMA fusion off by default, which would change both the speed and the rounding of
the GPU path with no line of ours changed."""
import ast
import os
import re

import pytest
from conftest import compile_for_h100

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "sdmprune_kernels")


def kernel_launches():
    """(file:line, passes **LAUNCH_OPTIONS) for every ``kernel[grid](...)`` call in the kernels' folder."""
    for name in sorted(os.listdir(KERNELS)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(KERNELS, name)) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                passes = any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == "LAUNCH_OPTIONS"
                             for k in node.keywords)
                yield f"{name}:{node.lineno}", passes


def test_every_kernel_launch_passes_the_launch_options():
    launches = list(kernel_launches())
    kernel_files = {where.split(":")[0] for where, _ in launches}
    # every op file that holds a Triton kernel launches it somewhere
    assert {"rms_norm.py", "rotary.py", "gated_mlp.py", "taylor_importance.py", "activation_taylor.py",
            "fused_linear_distill_loss.py", "fused_linear_entropy_loss.py"} <= kernel_files, kernel_files
    missing = [where for where, passes in launches if not passes]
    assert not missing, f"kernel launches without **LAUNCH_OPTIONS: {missing}"


def test_launch_options_ask_for_fma_fusion():
    from sdmprune.kernels.utils import LAUNCH_OPTIONS

    assert LAUNCH_OPTIONS == {"enable_fp_fusion": True}


@pytest.mark.parametrize("release_default", ["0", "1"])
def test_launch_options_keep_fma_fusion_whatever_the_release_default_compiles(release_default, monkeypatch):
    """The RMSNorm backward compiled for sm_90 with the launch options has fused multiply-adds whether the
    release's default fusion is on or off (TRITON_DEFAULT_FP_FUSION, what Triton 3.10 turns to off), and
    none when fusion is turned off explicitly: the option is real and it decides."""
    import sdmprune.kernels.rms_norm as rmod

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", release_default)
    sig = dict(dy_ptr="*fp32", x_ptr="*fp32", w_ptr="*fp32", rstd_ptr="*fp32", dx_ptr="*fp32", D="i32",
               dy_stride="i32", x_stride="i32", dx_stride="i32")
    consts = dict(GEMMA=False, BLOCK_D=1024)
    fma = re.compile(r"\bfma\.rn\.f32\b")
    fused = compile_for_h100(rmod._rms_norm_bwd_kernel, sig, consts, num_warps=4)
    assert fma.search(fused.asm["ptx"])
    unfused = compile_for_h100(rmod._rms_norm_bwd_kernel, sig, consts, num_warps=4, enable_fp_fusion=False)
    assert not fma.search(unfused.asm["ptx"])
