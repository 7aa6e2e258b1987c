"""Every bad input is one line and exit code 2 before any work: no traceback, no file written anywhere.

Table-driven over the command line (prune, eval, finetune, plan) on tiny local files. The whole folder
tree the commands can see (the fixture files, the output's folder, the current folder) is compared
byte for byte before and after each case.
"""
import importlib.util
import json
import os

import pytest

from conftest import save_byte_model
from sdmprune.cli import main

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
    "eval tasks without lm-eval": (["eval", "{r}/tiny", "--tasks", "arc_easy"], "pip install sdmprune[eval]"),
}


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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    if case == "eval tasks without lm-eval" and importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed")
    argv, fragment = CASES[case]
    argv = [a.format(r=root, out=tmp_path / "out") for a in argv]
    if argv[0] in ("prune", "finetune", "eval"):
        argv.append("--no-progress")
    if argv[0] == "prune" and "--seq-len" not in argv:
        argv += ["--seq-len", "16"]  # within the tiny model's 256 positions, so the case's own error shows
    before = snapshot(root, tmp_path)
    code = main(argv)
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert code == 2, cap.err
    assert "Traceback" not in cap.err and len(lines) == 1, cap.err
    assert lines[0].startswith(f"sdmprune {argv[0]}: error:") and fragment in lines[0], lines[0]
    assert snapshot(root, tmp_path) == before
    assert not (root / "REMOTE_CODE_RAN").exists()
