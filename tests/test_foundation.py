"""The package imports, the extension is built, and a Triton kernel runs (interpreter on CPU)."""
import os

import pytest
import torch

import sdmprune
import sdmprune.kernels


def test_package_imports():
    assert sdmprune.__version__
    import sdmprune._C as C

    assert isinstance(C.compiled_with_cuda(), bool)
    # A CPU-only torch cannot have built the CUDA part.
    if torch.version.cuda is None:
        assert C.compiled_with_cuda() is False


def test_kernels_package_maps_to_the_sdmprune_kernels_dir():
    path = os.path.dirname(sdmprune.kernels.__file__)
    assert os.path.basename(path) == "sdmprune_kernels", path  # the folder's own name is the package's


def test_model_adapter_finds_gated_mlps():
    from conftest import tiny_model
    from sdmprune.models import count_parameters, find_gated_mlps

    model = tiny_model("llama", layers=3, hidden=64, width=160)
    mlps = find_gated_mlps(model)
    assert [m.index for m in mlps] == [0, 1, 2]
    assert all(m.width == 160 and m.hidden_size == 64 and m.activation == "silu" for m in mlps)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family,expected", [("llama", True), ("qwen2", True), ("gemma", True), ("gemma2", False)])
def test_adapter_knows_when_the_mlp_output_only_feeds_the_residual(family, expected):
    """Only then may a checkpoint recompute skip the MLP: Gemma 2 normalizes the MLP output first."""
    from conftest import tiny_model
    from sdmprune.models import get_adapter

    model = tiny_model(family, layers=1)
    assert get_adapter(model).mlp_output_feeds_residual_only(model) is expected


def test_model_without_gated_mlp_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel
    from sdmprune.models import UnsupportedModelError, find_gated_mlps

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(UnsupportedModelError, match="gated MLP"):
        find_gated_mlps(model)


@pytest.mark.skipif(not sdmprune.kernels.triton_available(), reason="triton not installed")
def test_triton_kernel_runs():
    """A minimal Triton kernel (x * 2 + 1) runs under the interpreter on CPU, or on the GPU."""
    import triton
    import triton.language as tl

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no GPU and TRITON_INTERPRET is not set")

    @triton.jit
    def axpb(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) * 2.0 + 1.0, mask=m)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(77, device=dev)
    y = torch.full_like(x, float("nan"))
    axpb[(triton.cdiv(77, 32),)](x, y, 77, BLOCK=32)
    torch.testing.assert_close(y, x * 2 + 1)
