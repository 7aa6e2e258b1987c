"""Shared fixtures: tiny random LLaMA-family models (CPU, float32) and seeding."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(family: str = "llama", layers: int = 2, hidden: int = 64, width: int = 160,
                vocab: int = 300, heads: int = 4, kv_heads: int = 2, tie: bool = False, act: str = "silu"):
    """A tiny random config of a LLaMA-family model (tests use tiny random configs: a real model is too slow on a CPU)."""
    from transformers import AutoConfig

    kwargs = dict(
        hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=256, tie_word_embeddings=tie, hidden_act=act,
    )
    if family == "qwen2":
        kwargs["use_sliding_window"] = False
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **kw):
    """A tiny random model in eval mode (no dropout), deterministic from ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=dtype)
    return model.eval()


def make_byte_tokenizer():
    """A byte-level tokenizer built offline (256 byte tokens + <s> + </s>, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_byte_model(path, seed: int = 11):
    """A tiny LLaMA (its bos token the tokenizer's <s>) and the byte tokenizer, saved as a model folder
    at ``path`` as the CLI reads one; returns the model."""
    model = tiny_model("llama", seed=seed)
    model.config.bos_token_id = 256
    model.save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return model


def loss_and_embedding_grad(model, ids):
    """(causal-LM loss, gradient of the input embedding) of one forward+backward on ``ids``."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), model.get_input_embeddings().weight.grad.clone()


@pytest.fixture
def seed_all():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def compile_for_h100(fn, signature: dict, constexprs: dict, **options):
    """Compile the Triton kernel ``fn`` to sm_90 on this machine (no GPU needed; a GPU-only type error
    cannot hide behind the interpreter) and return it, with the options every launch passes
    (LAUNCH_OPTIONS) unless ``options`` overrides them. Skips without triton, under TRITON_INTERPRET=1
    (run: python -m pytest -k compiles) or when this triton install has no CUDA toolchain."""
    from sdmprune.kernels.utils import LAUNCH_OPTIONS, interpreter_enabled, triton_available

    if not triton_available() or interpreter_enabled():
        pytest.skip("needs triton without TRITON_INTERPRET (run: python -m pytest -k compiles)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=dict(signature, **{k: "constexpr" for k in constexprs}), constexprs=constexprs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={**LAUNCH_OPTIONS, **options})
    except Exception as e:  # noqa: BLE001 - a missing CUDA toolchain is not a kernel bug
        if "ptxas" in str(e) or "not found" in str(e).lower():
            pytest.skip(f"no CUDA toolchain in this triton install: {e}")
        raise
    assert "ptx" in compiled.asm
    return compiled


def _ptxas_path():
    """The ptxas Triton compiles with (its location moved between Triton versions), else one on PATH."""
    import shutil

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except Exception:  # noqa: BLE001 - older Triton
        pass
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001
        return shutil.which("ptxas")


def ptxas_usage(monkeypatch, fn, signature, constexprs, **options):
    """(registers, spill bytes stored + loaded) per thread of ``fn`` compiled for sm_90, from ptxas -v:
    the log Triton prints on a fresh compile (TRITON_DUMP_PTXAS_LOG), else (a cached kernel) ptxas -v
    run again on the kernel's PTX."""
    import contextlib
    import io
    import re
    import subprocess
    import tempfile

    monkeypatch.setenv("TRITON_DUMP_PTXAS_LOG", "1")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        compiled = compile_for_h100(fn, signature, constexprs, **options)
    log = buf.getvalue()
    if "Used" not in log:
        ptxas = _ptxas_path()
        if ptxas is None:
            pytest.skip("no ptxas to read the kernel's register use from")
        with tempfile.TemporaryDirectory() as tmp:
            src = f"{tmp}/k.ptx"
            with open(src, "w") as fh:
                fh.write(compiled.asm["ptx"])
            # the options Triton 3.9 compiles with: without --regAllocOptLevel=2 ptxas allocates
            # differently and a kernel that spills when Triton builds it can read as spill-free
            log = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src,
                                  "-o", f"{tmp}/k.o"], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class LargestTensor(TorchDispatchMode):
    """Inside ``with LargestTensor():`` every tensor an op makes is measured; ``LargestTensor.biggest`` is
    the largest in bytes (to show a kernel never materializes an N x V tensor)."""

    biggest = 0

    def __enter__(self):
        LargestTensor.biggest = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                LargestTensor.biggest = max(LargestTensor.biggest, t.numel() * t.element_size())
        return out


# The releases a run tested, printed with every summary that has a failure: a new upstream release that
# breaks a test is then named by the failure itself (CI resolves the newest releases anew each run).
TESTED_DISTRIBUTIONS = ("torch", "transformers", "triton", "peft", "accelerate", "gguf", "lm-eval", "torch-pruning",
                        "kernels")


def tested_versions() -> str:
    import importlib.metadata

    found = []
    for name in TESTED_DISTRIBUTIONS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def pytest_report_header(config):
    return f"releases: {tested_versions()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(f"failures above ran with: {tested_versions()}")
