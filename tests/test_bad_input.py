"""Every bad input is one line and exit code 2 before any work: no traceback, no file written anywhere.

Table-driven over the command line (prune, eval, finetune, plan) on tiny local files. The whole folder
tree the commands can see (the fixture files, the output's folder, the current folder) is compared
byte for byte before and after each case, and the model is never loaded where the input alone decides
(sdmprune.loading.load_model fails the case if it is called).
"""
import importlib.util
import json
import os
import sys

import pytest
import torch

from conftest import save_byte_model, tiny_model
from sdmprune.cli import main

# one score function of a plugin that fails: the error names the method and shows this frame
CRASHING_PLUGIN = """import sdmprune


def crashing_scores(model, tokens, config):
    scale = 1.0 / tokens.shape[0]  # the user's bug: no calibration tokens for this method
    return [layer.mlp.down_proj.weight.norm(dim=0) * scale for layer in model.model.layers]


sdmprune.register_method("crash", crashing_scores, needs_calibration=False)
"""

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 12
BINARY = bytes(range(256)) * 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("bad")
    save_byte_model(r / "tiny")
    # the same model with its weights file damaged
    (r / "corrupt").mkdir()
    for f in (r / "tiny").iterdir():
        (r / "corrupt" / f.name).write_bytes(f.read_bytes())
    (r / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + BINARY)
    # a folder whose config asks for its own code (that code must never run without --trust-remote-code)
    (r / "remote").mkdir()
    cfg = json.loads((r / "tiny" / "config.json").read_text())
    cfg.update({"model_type": "sdmprune_remote_probe", "auto_map": {
        "AutoConfig": "probe.ProbeConfig", "AutoModelForCausalLM": "probe.ProbeModel"}})
    (r / "remote" / "config.json").write_text(json.dumps(cfg))
    (r / "remote" / "probe.py").write_text(f"open({str(r / 'REMOTE_CODE_RAN')!r}, 'w').write('ran')\n")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(
        r / "gpt2")
    (r / "calib.txt").write_text(TEXT)
    (r / "short.txt").write_text("far too short")
    (r / "binary.txt").write_bytes(BINARY)
    (r / "binary.bin").write_bytes(BINARY)
    (r / "binary.jsonl").write_bytes(BINARY)
    (r / "binary.parquet").write_bytes(BINARY)
    (r / "malformed.jsonl").write_text(json.dumps({"text": TEXT}) + "\n{not json\n")
    (r / "malformed.json").write_text('[{"text": "abc"}, ')
    (r / "no_text.jsonl").write_text("\n".join(json.dumps({"id": f"doc-{i}", "body": TEXT}) for i in range(3)))
    (r / "a_file").write_text("user data")
    # the same model without a tokenizer
    tiny_model("llama", seed=3).save_pretrained(r / "notok")
    torch.save(torch.randint(0, 300, (4, 32)), r / "ids.pt")
    torch.save(torch.randint(300, 400, (4, 32)), r / "ids_past_vocab.pt")
    torch.save(torch.rand(4, 32), r / "ids_float.pt")
    (r / "broken.yaml").write_text("task: broken\n  dataset_path: [unclosed\n")
    (r / "crash_plugin.py").write_text(CRASHING_PLUGIN)
    (r / "import_error_plugin.py").write_text("import sdmprune\n\nLIMIT = 1 / 0\n")
    (r / "no_response.jsonl").write_text(json.dumps({"instruction": "say hi", "output": ""}) + "\n")
    # an earlier output and an eval --json result, each edited by the user since sdmprune wrote it
    from sdmprune.storage.paths import write_json_atomic
    from sdmprune.storage.save import save_pruned

    save_pruned(tiny_model("llama"), None, r / "earlier", {"method": "magnitude"})
    with open(r / "earlier" / "README.md", "a") as fh:
        fh.write("My notes on this model.\n")
    write_json_atomic(r / "edited.json", {"model": "tiny", "perplexity": {"perplexity": 12.0}},
                      written_by="sdmprune eval")
    edited = json.loads((r / "edited.json").read_text())
    (r / "edited.json").write_text(json.dumps({**edited, "my_note": "keep"}, indent=2))
    # checkpoints of interrupted runs, made with the package's own fingerprints of these settings
    from sdmprune.pipeline import PruneConfig, prune_settings, prune_state
    from sdmprune.recovery.recover import FinetuneConfig, checkpoint_dir
    from sdmprune.recovery.trainer import CHECKPOINT_FILE, finetune_settings
    from sdmprune.storage.paths import WorkDir
    from sdmprune.storage.run_state import RunState

    settings = prune_settings(PruneConfig(width=96, engine="torch"), "torch", torch.float32, "cpu", {0: 160, 1: 160})
    prune_state(WorkDir(r / "work", given=True), {**settings, "weights": "w", "calibration": "c"}).save({"stage": 1})
    settings = finetune_settings(FinetuneConfig(max_steps=3, seq_len=16), torch.float32, "cpu")
    RunState(WorkDir(checkpoint_dir(r / "ft"), given=False), CHECKPOINT_FILE, {**settings, "weights": "w"}).save({})
    return r


# name -> (argv, fragment of the one error line)
CASES = {
    "corrupt weights": (["prune", "{r}/corrupt", "--out", "{out}", "--width", "96", "--method", "magnitude"],
                        "cannot load the weights"),
    "device mps": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--device", "mps"], "--device 'mps'"),
    "device meta": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--device", "meta"], "--device 'meta'"),
    "device nonsense": (["eval", "{r}/tiny", "--ppl", "{r}/calib.txt", "--device", "gpu9"], "--device 'gpu9'"),
    "malformed jsonl": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--calib", "{r}/malformed.jsonl"],
                        "line 2"),
    "malformed json": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--calib", "{r}/malformed.json"],
                       "not valid JSON"),
    "binary jsonl": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--calib", "{r}/binary.jsonl"],
                     "does not look like text"),
    "binary parquet": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--calib", "{r}/binary.parquet"],
                       "not a readable parquet file"),
    "binary txt": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--calib", "{r}/binary.txt"],
                   "does not look like text"),
    "binary bin": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--calib", "{r}/binary.bin"],
                   "does not look like text"),
    "jsonl without text field": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--calib",
                                  "{r}/no_text.jsonl"], "no 'text' field"),
    "jsonl other text field missing": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--calib",
                                        "{r}/no_text.jsonl", "--text-field", "content"], "no 'content' field"),
    "out under a file": (["prune", "{r}/tiny", "--out", "{r}/a_file/out", "--width", "96"], "under a file"),
    "out is a file": (["prune", "{r}/tiny", "--out", "{r}/a_file", "--width", "96", "--overwrite"], "is a file"),
    "scores is a folder": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--save-scores", "{r}"],
                           "is a folder"),
    "eval windows zero": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--eval-ppl", "{r}/calib.txt",
                           "--eval-windows", "0"], "--eval-windows must be at least 1"),
    "seq len past positions": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--seq-len", "257"],
                               "max_position_embeddings"),
    "prune eval seq len past positions": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--eval-ppl",
                                     "{r}/calib.txt", "--eval-seq-len", "300"], "max_position_embeddings"),
    "width equal to current": (["prune", "{r}/tiny", "--out", "{out}", "--width", "160", "--seq-len", "16"],
                               "removes nothing"),
    "temperature inf": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--temperature", "inf"],
                        "--temperature"),
    "alpha nan": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--alpha", "nan"], "--alpha"),
    "stage1 keep internal name": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--stage1-keep", "2"],
                                  "--stage1-keep"),
    "loss chunk zero": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--loss-chunk", "0"],
                        "--loss-chunk"),
    "samples zero": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--samples", "0"], "--samples"),
    "batch size zero": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--batch-size", "0"],
                        "--batch-size"),
    "plain file as model": (["prune", "{r}/calib.txt", "--out", "{out}", "--width", "96"], "is a file"),
    "remote code": (["prune", "{r}/remote", "--out", "{out}", "--width", "96"], "--trust-remote-code"),
    "eval binary text": (["eval", "{r}/tiny", "--ppl", "{r}/binary.txt", "--seq-len", "16"],
                         "does not look like text"),
    "eval max windows zero": (["eval", "{r}/tiny", "--ppl", "{r}/calib.txt", "--max-windows", "0"],
                              "--max-windows must be at least 1"),
    "eval max windows negative": (["eval", "{r}/tiny", "--ppl", "{r}/calib.txt", "--max-windows", "-1"],
                                  "--max-windows must be at least 1"),
    "eval batch size zero": (["eval", "{r}/tiny", "--ppl", "{r}/calib.txt", "--batch-size", "0"],
                             "--batch-size"),
    "eval seq len past positions": (["eval", "{r}/tiny", "--ppl", "{r}/calib.txt", "--seq-len", "4096"],
                                    "max_position_embeddings"),
    "eval json under a file": (["eval", "{r}/tiny", "--ppl", "{r}/calib.txt", "--json", "{r}/a_file/x.json"],
                               "under a file"),
    "eval corrupt weights": (["eval", "{r}/corrupt", "--ppl", "{r}/calib.txt", "--seq-len", "16"],
                             "cannot load the weights"),
    "finetune binary jsonl": (["finetune", "{r}/tiny", "--data", "{r}/binary.jsonl", "--out", "{out}",
                               "--max-steps", "1"], "does not look like text"),
    "finetune malformed jsonl": (["finetune", "{r}/tiny", "--data", "{r}/malformed.jsonl", "--out", "{out}",
                                  "--max-steps", "1"], "line 2"),
    "finetune device meta": (["finetune", "{r}/tiny", "--data", "{r}/calib.txt", "--out", "{out}",
                              "--max-steps", "1", "--device", "meta"], "--device 'meta'"),
    "plan non-gated model": (["plan", "{r}/gpt2"], "gated MLP"),
    "plan loss chunk zero": (["plan", "llama-3.1-8b", "--loss-chunk", "0"], "--loss-chunk"),
    "plan max memory zero": (["plan", "llama-3.1-8b", "--max-memory", "0"], "--max-memory"),
    "plan seq len zero": (["plan", "llama-3.1-8b", "--seq-len", "0"], "--seq-len"),

    "max memory too small": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--max-memory", "1MiB"],
                             "even batch 1 is predicted to need"),
    "max memory with batch size": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--max-memory",
                                    "8GiB", "--batch-size", "2"], "exclude each other"),
    "max memory for magnitude": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--max-memory", "8GiB",
                                  "--method", "magnitude"], "has none"),
    "max memory unreadable": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--max-memory", "lots"],
                              "cannot read memory size"),
    "offload activations without checkpointing": (
        ["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--offload-activations",
         "--no-gradient-checkpointing"], "needs gradient checkpointing"),
    "missing model": (["prune", "{r}/nope", "--out", "{out}", "--ratio", "0.2"], "does not exist"),
    "no gated mlp": (["prune", "{r}/gpt2", "--out", "{out}", "--ratio", "0.2"], "gated MLP"),
    "ratio too big": (["prune", "{r}/tiny", "--out", "{out}", "--ratio", "0.6"], "outside"),
    "ratio > 1": (["prune", "{r}/tiny", "--out", "{out}", "--ratio", "1.5"], "outside"),
    "ratio zero": (["prune", "{r}/tiny", "--out", "{out}", "--ratio", "0"], "outside"),
    "width zero": (["prune", "{r}/tiny", "--out", "{out}", "--width", "0"], "width"),
    "width too big": (["prune", "{r}/tiny", "--out", "{out}", "--width", "161"], "outside"),
    "short text": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--calib", "{r}/short.txt",
                    "--samples", "2", "--seq-len", "64"], "shorter than one window"),
    "missing calib": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--calib",
                       "{r}/missing.jsonl"], "does not exist"),
    "unknown dataset offline": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--calib",
                                 "no-such-dataset"], "unknown calibration source"),
    "hub id offline": (["prune", "no-such-org/no-such-model", "--out", "{out}", "--ratio", "0.2"],
                       "not a local directory"),
    "c4 offline": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--calib", "c4"], "no network"),
    "shard without torchrun": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--shard", "fsdp"],
                               "needs an initialized process group"),
    "offload to meta": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--offload", "cpu",
                         "--device", "meta"], "is not supported"),
    "offload baseline": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--offload", "cpu",
                          "--method", "magnitude"], "applies to the methods sdmprune/taylor"),
    "recover without data (magnitude)": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--method",
                                          "magnitude", "--recover-steps", "2"], "needs --recover-data"),
    "recover data missing": (["prune", "{r}/tiny", "--out", "{out}", "--width", "100", "--recover-steps", "2",
                              "--recover-data", "{r}/nope.jsonl"], "no such file"),
}

# name -> (argv, fragment of the one error line, options): "loads": the model may load (the case is decided
# by the weights or by the user's code); "hide": modules made unimportable (a fresh install without the
# extra); "needs": modules the case needs installed; "no_interpreter": without TRITON_INTERPRET
CASES.update({
    # tracebacks before
    "eval ids past the vocabulary": (["eval", "{r}/tiny", "--ppl", "{r}/ids_past_vocab.pt", "--seq-len", "16"],
                                     "token ids must be in [0, 300)", {}),
    "prune ids past the vocabulary": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--calib",
                                       "{r}/ids_past_vocab.pt", "--samples", "2"], "token ids must be in [0, 300)", {}),
    "plugin score function raises": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--plugin",
                                      "{r}/crash_plugin.py", "--method", "crash"],
                                     "method 'crash' (crashing_scores in {r}/crash_plugin.py) raised AttributeError: "
                                     "'NoneType' object has no attribute 'shape' (at {r}/crash_plugin.py:5 in "
                                     "crashing_scores: scale = 1.0 / tokens.shape[0]", {"loads": True}),
    "plugin import raises": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--plugin",
                              "{r}/import_error_plugin.py", "--method", "x"],
                             "raised ZeroDivisionError: division by zero (at", {}),
    "eval broken task yaml": (["eval", "{r}/tiny", "--tasks", "{r}/broken.yaml"],
                              "is not a readable lm-eval task: ScannerError", {"needs": ("lm_eval",)}),
    "eval paper tasks offline": (["eval", "{r}/tiny", "--tasks", "paper", "--limit", "1"],
                                 "boolq needs aps/super_glue boolq", {"needs": ("lm_eval",)}),
    # refused only after the model loaded (or the whole prune) before
    "gguf down type unknown": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--gguf", "{out}.gguf",
                                "--gguf-down-type", "Q99_X"], "--gguf-down-type 'Q99_X' is not a GGUF tensor type",
                               {"needs": ("gguf",)}),
    "recover lr nan": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--recover-steps", "1",
                        "--recover-lr", "nan"], "--recover-lr nan is not a finite number", {"needs": ("peft",)}),
    "recover seq len past positions": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--recover-steps",
                                        "1", "--recover-seq-len", "9999"], "--recover-seq-len 9999 is past",
                                       {"needs": ("peft",)}),
    "recover data without responses": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--recover-steps",
                                        "1", "--recover-data", "{r}/no_response.jsonl"], "has no response",
                                       {"needs": ("peft",)}),
    "resume with another seed": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--work-dir", "{r}/work",
                                  "--resume", "--seed", "3"], "--seed 0 (now 3)", {}),
    "resume with another dtype": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--work-dir", "{r}/work",
                                   "--resume", "--dtype", "bf16"], "dtype float32 (now bfloat16)", {}),
    "resume with another alpha": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--work-dir", "{r}/work",
                                   "--resume", "--alpha", "0.3"], "--alpha 0.4 (now 0.3)", {}),
    "finetune resume with another lr": (["finetune", "{r}/tiny", "--data", "{r}/calib.txt", "--out", "{r}/ft",
                                         "--max-steps", "3", "--seq-len", "16", "--resume", "--lr", "2e-4"],
                                        "--lr 0.0001 (now 0.0002)", {"needs": ("peft",)}),
    "finetune resume with other max steps": (["finetune", "{r}/tiny", "--data", "{r}/calib.txt", "--out", "{r}/ft",
                                              "--max-steps", "4", "--seq-len", "16", "--resume", "--seed", "1"],
                                             "--max-steps 3 (now 4)", {"needs": ("peft",)}),
    "engine fused on the cpu": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--engine", "fused",
                                 "--device", "cpu"], "--engine fused needs Triton and a CUDA GPU",
                                {"no_interpreter": True}),
    "eval float token file": (["eval", "{r}/tiny", "--ppl", "{r}/ids_float.pt"], "expected an integer tensor", {}),
    "eval text without a tokenizer": (["eval", "{r}/notok", "--ppl", "{r}/calib.txt", "--seq-len", "16"],
                                      "--ppl '{r}/calib.txt' is text, but the model '{r}/notok' has no tokenizer", {}),
    "eval tasks without a tokenizer": (["eval", "{r}/notok", "--tasks", "arc_easy"], "--tasks runs on text, but",
                                       {"needs": ("lm_eval",)}),
    "prune eval text without a tokenizer": (["prune", "{r}/notok", "--out", "{out}", "--width", "96", "--eval-ppl",
                                             "{r}/calib.txt"], "--eval-ppl '{r}/calib.txt' is text, but", {}),
    "prune calib text without a tokenizer": (["prune", "{r}/notok", "--out", "{out}", "--width", "96", "--calib",
                                              "{r}/calib.txt"], "--calib '{r}/calib.txt' is text, but", {}),
    "prune recover text without a tokenizer": (["prune", "{r}/notok", "--out", "{out}", "--width", "96",
                                                "--recover-steps", "1", "--recover-data", "{r}/calib.txt"],
                                               "--recover-data '{r}/calib.txt' is text, but", {"needs": ("peft",)}),
    "finetune text without a tokenizer": (["finetune", "{r}/notok", "--data", "{r}/calib.txt", "--out", "{out}",
                                           "--max-steps", "1"], "no tokenizer files", {"needs": ("peft",)}),
    "finetune self on a pruned model": (["finetune", "{r}/earlier", "--data", "self", "--out", "{out}",
                                         "--max-steps", "1"], "--data self samples from the unpruned model",
                                        {"needs": ("peft",)}),
    "finetune unknown target module": (["finetune", "{r}/tiny", "--data", "{r}/calib.txt", "--out", "{out}",
                                        "--max-steps", "1", "--targets", "q_proj,qkv_proj"],
                                       "no module named qkv_proj", {"needs": ("peft",)}),
    "eval text shorter than a window": (["eval", "{r}/tiny", "--ppl", "{r}/short.txt", "--seq-len", "64"],
                                        "shorter than one window", {}),
    "prune eval text shorter than a window": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96",
                                               "--eval-ppl", "{r}/short.txt"], "shorter than one window", {}),
    # accepted silently before
    "stage1 keep below the width": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--stage1-keep",
                                     "0.1"], "give at least 0.6", {}),
    "plan seq len past positions": (["plan", "{r}/tiny", "--seq-len", "300"], "past the model's 256 positions", {}),
    "plan seq len huge": (["plan", "llama-3.2-1b", "--seq-len", "10000000"], "past the model's 131072 positions", {}),
    "overwrite an edited output": (["prune", "{r}/tiny", "--out", "{r}/earlier", "--width", "96", "--overwrite"],
                                   "'README.md' changed after sdmprune wrote it", {}),
    "overwrite an edited eval json": (["eval", "{r}/tiny", "--ppl", "{r}/calib.txt", "--seq-len", "16", "--json",
                                       "{r}/edited.json", "--overwrite"], "changed since", {}),
    "scores path is the output folder": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--save-scores",
                                          "{out}"], "is the --out folder", {}),
    # a fresh install without the extra an option needs
    "recover steps without peft": (["prune", "{r}/tiny", "--out", "{out}", "--ratio", "0.2", "--recover-steps", "1"],
                                   "needs the optional package 'peft'", {"hide": ("peft",)}),
    "finetune lora without peft": (["finetune", "{r}/tiny", "--data", "{r}/calib.txt", "--out", "{out}",
                                    "--max-steps", "1"], "needs the optional package 'peft'", {"hide": ("peft",)}),
    "gguf without gguf": (["prune", "{r}/tiny", "--out", "{out}", "--width", "96", "--gguf", "{out}.gguf"],
                          "needs the optional package 'gguf'", {"hide": ("gguf",)}),
    "eval tasks without lm-eval": (["eval", "{r}/tiny", "--tasks", "arc_easy"], "pip install 'sdmprune[eval]'",
                                   {"hide": ("lm_eval",)}),
    # usage errors: one line too
    "usage: a required option missing": (["prune", "{r}/tiny", "--ratio", "0.2"],
                                         "the following arguments are required: --out", {}),
    "usage: not a number": (["eval", "{r}/tiny", "--ppl", "{r}/calib.txt", "--seq-len", "many"],
                            "argument --seq-len: invalid int value: 'many'", {}),
    "usage: unknown option": (["plan", "llama-3.2-1b", "--nodes", "2"], "unrecognized arguments", {}),
})


def snapshot(*roots):
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames:
                out[os.path.join(dirpath, n)] = None
            for n in filenames:
                p = os.path.join(dirpath, n)
                with open(p, "rb") as fh:
                    out[p] = fh.read()
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(root, tmp_path, capsys, monkeypatch, case):
    import datasets
    from huggingface_hub import constants

    import sdmprune.loading
    from sdmprune.scoring import registry

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # empty caches: no dataset a task needs is found there, whatever this machine holds
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "no-hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "no-datasets-cache"))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # a plugin's method stays in this case
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv, fragment, *rest = CASES[case]
    options = rest[0] if rest else {}
    for module in options.get("needs", ()):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    for module in options.get("hide", ()):
        monkeypatch.setitem(sys.modules, module, None)
    if options.get("no_interpreter"):
        if torch.cuda.is_available():
            pytest.skip("the case is a machine without a GPU")
        from sdmprune.kernels import utils as kernel_utils

        # as without TRITON_INTERPRET (the variable stays: a kernel module imported without it would not interpret)
        monkeypatch.setattr(kernel_utils, "interpreter_enabled", lambda: False)
    if not options.get("loads"):
        def load_model(*args, **kwargs):
            raise AssertionError(f"{case}: the model was loaded, although the input alone decides")

        monkeypatch.setattr(sdmprune.loading, "load_model", load_model)
    fill = {"r": root, "out": tmp_path / "out"}
    argv = [a.format(**fill) for a in argv]
    fragment = fragment.format(**fill)
    if argv[0] in ("prune", "finetune", "eval"):
        argv.append("--no-progress")
    if argv[0] == "prune" and "--seq-len" not in argv:
        argv += ["--seq-len", "16"]  # within the tiny model's 256 positions, so the case's own error shows
    before = snapshot(root, tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # a usage error (argparse)
        code = exc.code
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    if options.get("loads"):  # what the run said before the error (the plan, the load) stays
        lines = [line for line in lines if line.startswith(f"sdmprune {argv[0]}:")]
    assert code == 2, cap.err
    assert "Traceback" not in cap.err and len(lines) == 1, cap.err
    assert lines[0].startswith(f"sdmprune {argv[0]}: error:") and fragment in lines[0], lines[0]
    assert snapshot(root, tmp_path) == before
    assert not (root / "REMOTE_CODE_RAN").exists()


def test_a_run_with_its_files_inside_the_output(root, tmp_path, capsys):
    """--resume without a checkpoint says the run starts fresh; --no-progress leaves no bar on stderr (the
    libraries' included); --save-scores inside OUT is listed, with its digest, in OUT's manifest, so
    --overwrite replaces the whole output, until one of its files is edited."""
    from sdmprune.storage.paths import MANIFEST, file_digest

    out = tmp_path / "out"
    argv = ["prune", str(root / "tiny"), "--out", str(out), "--width", "96", "--seq-len", "16", "--samples", "2",
            "--resume", "--no-progress", "--save-scores", str(out / "scores.safetensors")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"--resume: no checkpoint in {str(out) + '.sdmprune-work'!r}; starting from the beginning" in err
    assert "it/s" not in err and "Loading weights" not in err and "Writing model shards" not in err, err
    listed = json.loads((out / MANIFEST).read_text())
    assert listed["scores.safetensors"]["sha256"] == file_digest(out / "scores.safetensors")
    assert listed["model.safetensors"]["sha256"] == file_digest(out / "model.safetensors")
    assert main(argv + ["--overwrite"]) == 0
    capsys.readouterr()
    (out / "sdmprune.json").write_text((out / "sdmprune.json").read_text().replace('"width": 96', '"width": 95'))
    assert main(argv + ["--overwrite"]) == 2
    assert "'sdmprune.json' changed after sdmprune wrote it" in capsys.readouterr().err
    assert (out / "scores.safetensors").exists()


def test_an_unchanged_output_may_be_replaced_however_its_files_were_touched(tmp_path):
    """The digests decide, not the times: a file touched or re-indented (JSON) without a change of content is
    replaced; one changed to another content of the same size is not."""
    from sdmprune.errors import InputError
    from sdmprune.storage.paths import atomic_output_dir, check_output_dir, check_output_file, write_json_atomic

    with atomic_output_dir(tmp_path / "out") as folder:
        (folder / "a.txt").write_text("abc")
    os.utime(tmp_path / "out" / "a.txt", ns=(1, 1))
    check_output_dir(tmp_path / "out", overwrite=True)
    (tmp_path / "out" / "a.txt").write_text("abd")
    with pytest.raises(InputError, match="'a.txt' changed after sdmprune wrote it"):
        check_output_dir(tmp_path / "out", overwrite=True)
    write_json_atomic(tmp_path / "r.json", {"x": [1, 2]}, written_by="sdmprune eval")
    (tmp_path / "r.json").write_text(json.dumps(json.loads((tmp_path / "r.json").read_text()), indent=8))
    check_output_file(tmp_path / "r.json", overwrite=True, flag="--json")
    edited = json.loads((tmp_path / "r.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps({**edited, "x": [1, 3]}))
    with pytest.raises(InputError, match="changed since"):
        check_output_file(tmp_path / "r.json", overwrite=True, flag="--json")


def test_no_progress_silences_the_bars_of_the_libraries(capsys):
    """Inside --no-progress no tqdm bar is drawn, also where a library draws one without a switch of its
    own (transformers' GGUF de-quantizing uses plain tqdm); afterwards bars are back."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from sdmprune.commands.common import progress_bars

    with progress_bars(False):
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
    assert capsys.readouterr().err == ""
    for _ in tqdm(range(3), desc="after"):
        pass
    assert "after" in capsys.readouterr().err


def test_help_shows_defaults_but_not_for_flags(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "as prune --no-gradient-checkpointing (default: True)" not in text
    assert "--no-gradient-checkpointing as prune --no-gradient-checkpointing" in text
    assert "tokens per calibration window (default: 1024)" in text


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
def test_finetune_on_self_text_needs_no_tokenizer(root, tmp_path, capsys, monkeypatch):
    """--data self samples from the model (its config's BOS): a model without a tokenizer fine-tunes."""
    from sdmprune.recovery import trainer

    monkeypatch.setattr(trainer, "LOSS_BACKEND", "torch")  # the kernels' own tests run the interpreter
    out = tmp_path / "ft"
    assert main(["finetune", str(root / "notok"), "--data", "self", "--out", str(out), "--max-steps", "1",
                 "--self-samples", "2", "--seq-len", "16", "--no-progress"]) == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").exists() and not (out / "tokenizer.json").exists()


def test_a_gguf_inside_the_output_is_one_of_its_files(tmp_path, capsys):
    """--gguf OUT/NAME.gguf is written into the output before it is renamed into place: listed in OUT's
    manifest with its digest, and described in OUT's report."""
    pytest.importorskip("gguf")
    from test_gguf_export import Q, write_tiny_gguf

    from sdmprune.storage.paths import MANIFEST, file_digest

    src = write_tiny_gguf(tmp_path / "src.gguf", Q.F32)
    out = tmp_path / "hf"
    code = main(["prune", str(src), "--out", str(out), "--width", "64", "--method", "magnitude", "--gguf",
                 str(out / "pruned.gguf"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    listed = json.loads((out / MANIFEST).read_text())
    assert listed["pruned.gguf"]["sha256"] == file_digest(out / "pruned.gguf")
    assert json.loads((out / "sdmprune.json").read_text())["gguf"]["path"] == str(out / "pruned.gguf")
