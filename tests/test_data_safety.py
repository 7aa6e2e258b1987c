"""Nothing a user owns is ever deleted or replaced: the output rule, the work directory, resume.

Every test puts real user files next to and inside the paths a command is given and checks that they
survive byte for byte.
"""
import json
import os
import stat

import pytest
import torch

from conftest import save_byte_model, tiny_model
from sdmprune.cli import main

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety") / "tiny"
    save_byte_model(d)
    (d.parent / "calib.txt").write_text(TEXT)
    return d


def snapshot(root):
    """{relative path: bytes (files) or None (folders)} of everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), root)] = None
        for n in filenames:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def user_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.csv").write_text("run,ppl\n1,12.5\n")
    (folder / "notes").mkdir(exist_ok=True)
    (folder / "notes" / "todo.md").write_text("- keep me\n")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap


def one_error_line(cap, command="prune"):
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sdmprune {command}: error:") and "Traceback" not in cap.err, \
        cap.err
    return lines[0]


PRUNE = ["--width", 96, "--method", "random", "--no-progress"]


@pytest.mark.parametrize("out", [".", "", "./", "sub/.."])
def test_overwrite_never_empties_the_current_folder(model_dir, tmp_path, capsys, monkeypatch, out):
    work = tmp_path / "cwd"
    user_files(work)
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    code, cap = run(["prune", model_dir, "--out", out, "--overwrite"] + PRUNE, capsys)
    assert code == 2
    line = one_error_line(cap)
    assert "current folder" in line or "empty" in line
    assert snapshot(tmp_path) == before


def test_overwrite_never_replaces_the_input_model_or_its_parents(model_dir, tmp_path, capsys):
    before = snapshot(model_dir.parent)
    for out in (model_dir, model_dir.parent, model_dir / ".."):
        code, cap = run(["prune", model_dir, "--out", out, "--overwrite"] + PRUNE, capsys)
        assert code == 2
        assert "input" in one_error_line(cap)
    assert snapshot(model_dir.parent) == before


def test_overwrite_replaces_only_an_earlier_output(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    # a folder holding the user's files is never replaced, --overwrite or not
    user_files(out)
    before = snapshot(tmp_path)
    code, cap = run(["prune", model_dir, "--out", out, "--overwrite"] + PRUNE, capsys)
    assert code == 2 and "not written by sdmprune" in one_error_line(cap)
    assert snapshot(tmp_path) == before
    # an earlier output of this package is replaced with --overwrite
    out2 = tmp_path / "pruned2"
    assert run(["prune", model_dir, "--out", out2] + PRUNE, capsys)[0] == 0
    code, cap = run(["prune", model_dir, "--out", out2] + PRUNE, capsys)
    assert code == 2 and "--overwrite" in one_error_line(cap)
    code, cap = run(["prune", model_dir, "--out", out2, "--overwrite", "--width", 80, "--method", "random",
                     "--no-progress"], capsys)
    assert code == 0, cap.err
    assert json.loads((out2 / "sdmprune.json").read_text())["width"] == 80
    # ... but not once the user has put a file of their own into it
    (out2 / "eval.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, cap = run(["prune", model_dir, "--out", out2, "--overwrite"] + PRUNE, capsys)
    assert code == 2 and "eval.txt" in one_error_line(cap)
    assert snapshot(tmp_path) == before


def test_output_path_errors_come_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    """An existing file, a path under a file, a scores path that is a folder: refused before the model loads."""
    import sdmprune.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    a_file = tmp_path / "a_file"
    a_file.write_text("user data")
    before = snapshot(tmp_path)
    for extra, message in [(["--out", a_file], "is a file"), (["--out", a_file, "--overwrite"], "is a file"),
                           (["--out", a_file / "sub"], "under a file"),
                           (["--out", tmp_path / "o", "--save-scores", tmp_path], "is a folder"),
                           (["--out", tmp_path / "o", "--save-scores", a_file / "s.safetensors"], "under a file"),
                           (["--out", tmp_path / "o", "--work-dir", a_file], "is a file")]:
        code, cap = run(["prune", model_dir] + extra + PRUNE[:2] + ["--method", "taylor", "--no-progress"], capsys)
        assert code == 2 and message in one_error_line(cap), (extra, cap.err)
    assert snapshot(tmp_path) == before


def test_a_users_work_dir_is_kept(model_dir, tmp_path, capsys):
    work = tmp_path / "work"
    user_files(work)
    before = snapshot(work)
    code, cap = run(["prune", model_dir, "--out", tmp_path / "o", "--width", 96, "--method", "sdmprune",
                     "--engine", "torch", "--calib", model_dir.parent / "calib.txt", "--samples", 2,
                     "--seq-len", 16, "--work-dir", work, "--no-progress"], capsys)
    assert code == 0, cap.err
    assert snapshot(work) == before  # the run's own state files are gone, the user's are untouched
    # the default work dir (next to the output) is the run's own and is removed
    code, cap = run(["prune", model_dir, "--out", tmp_path / "o2", "--width", 96, "--method", "taylor",
                     "--engine", "torch", "--calib", model_dir.parent / "calib.txt", "--samples", 2,
                     "--seq-len", 16, "--no-progress"], capsys)
    assert code == 0, cap.err
    assert not (tmp_path / "o2.sdmprune-work").exists()


def test_a_stale_temporary_output_is_removed_at_the_next_run(model_dir, tmp_path, capsys):
    """A run killed while saving leaves a hidden temporary folder; the next run for that output removes it
    (and only folders this package made: a look-alike without its marker stays)."""
    from sdmprune.storage.paths import PARTIAL_MARKER

    stale = tmp_path / ".o.tmp-dead1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    (stale / PARTIAL_MARKER).write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename}))
    lookalike = tmp_path / ".o.tmp-users"
    user_files(lookalike)
    before = snapshot(lookalike)
    code, cap = run(["prune", model_dir, "--out", tmp_path / "o"] + PRUNE, capsys)
    assert code == 0, cap.err
    assert not stale.exists() and snapshot(lookalike) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.tmp-users", "o"]


def test_outputs_follow_the_umask(model_dir, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, cap = run(["prune", model_dir, "--out", tmp_path / "o", "--save-scores", tmp_path / "s.safetensors",
                         "--width", 96, "--method", "taylor", "--engine", "torch", "--samples", 2, "--seq-len", 8,
                         "--no-progress"], capsys)
    finally:
        os.umask(old)
    assert code == 0, cap.err
    assert stat.S_IMODE(os.stat(tmp_path / "o").st_mode) == 0o755
    for p in list((tmp_path / "o").iterdir()) + [tmp_path / "s.safetensors"]:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644, p


def test_resume_with_another_dtype_is_refused(tmp_path):
    """The checkpoint names the dtype (and device kind, engine, weights, calibration) it was made with; a
    resume that changes one is refused naming it, and the teacher cache is never re-created empty."""
    from sdmprune.errors import InputError
    from sdmprune.pipeline import PruneConfig, prune_model

    tokens = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(width=96, engine="torch", batch_size=2, stage1_keep=0.9, checkpoint_every=1, progress=False)
    work = tmp_path / "work"
    prune_model(tiny_model(seed=2), tokens, cfg, checkpoint_dir=str(work))
    teacher = [p for p in work.iterdir() if "teacher" in p.name]
    assert teacher
    sizes = {p: p.stat().st_size for p in teacher}
    with pytest.raises(InputError, match="dtype.*float32.*bfloat16"):
        prune_model(tiny_model(seed=2, dtype=torch.bfloat16), tokens, cfg, checkpoint_dir=str(work), resume=True)
    with pytest.raises(InputError, match="weights"):
        prune_model(tiny_model(seed=3), tokens, cfg, checkpoint_dir=str(work), resume=True)
    with pytest.raises(InputError, match="calibration"):
        prune_model(tiny_model(seed=2), tokens.flip(0), cfg, checkpoint_dir=str(work), resume=True)
    with pytest.raises(InputError, match="alpha"):
        prune_model(tiny_model(seed=2), tokens, cfg, checkpoint_dir=str(work), resume=True, alpha=0.3)
    assert {p: p.stat().st_size for p in teacher} == sizes
    # a teacher cache cut short is refused, not refilled with zeros
    with open(teacher[0], "r+b") as fh:
        fh.truncate(sizes[teacher[0]] // 2)
    with pytest.raises(InputError, match="teacher"):
        prune_model(tiny_model(seed=2), tokens, cfg, checkpoint_dir=str(work), resume=True)


def test_finetune_output_follows_the_same_rule(model_dir, tmp_path, capsys, monkeypatch):
    data = model_dir.parent / "calib.txt"
    before = snapshot(model_dir.parent)
    code, cap = run(["finetune", model_dir, "--data", data, "--out", model_dir, "--overwrite", "--max-steps", 1,
                     "--seq-len", 16, "--no-progress"], capsys)
    assert code == 2 and "input" in one_error_line(cap, "finetune")
    work = tmp_path / "cwd"
    user_files(work)
    monkeypatch.chdir(work)
    code, cap = run(["finetune", model_dir, "--data", data, "--out", ".", "--overwrite", "--max-steps", 1,
                     "--seq-len", 16, "--no-progress"], capsys)
    assert code == 2 and "current folder" in one_error_line(cap, "finetune")
    assert snapshot(model_dir.parent) == before and (work / "results.csv").exists()


def test_eval_json_is_checked_before_the_evaluation(model_dir, tmp_path, capsys, monkeypatch):
    import sdmprune.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "numbers"}')
    for target, message in [(tmp_path, "is a folder"), (mine, "not written by sdmprune"),
                            (mine / "x.json", "under a file")]:
        code, cap = run(["eval", model_dir, "--ppl", model_dir.parent / "calib.txt", "--seq-len", 16,
                         "--json", target, "--overwrite"], capsys)
        assert code == 2 and message in one_error_line(cap, "eval"), cap.err
    assert mine.read_text() == '{"my": "numbers"}'


def test_self_text_evaluation_is_the_same_in_prune_eval_and_finetune(model_dir, tmp_path, capsys):
    """Held-out 'self' text is one function of the run's seed, so perplexities of the three commands compare."""
    from sdmprune.data import eval_token_stream
    from sdmprune.evaluate import perplexity_on_source
    from sdmprune.loading import load_model
    from sdmprune.recovery.recover import FinetuneConfig, _eval

    model, tok = load_model(str(model_dir))
    from sdmprune.models import get_adapter

    _, t_prune, _ = perplexity_on_source(model, tok, "self", 8, 2, seed=5)
    t_eval, _ = eval_token_stream("self", tok, model=model, max_tokens=16, seq_len=8, seed=5)
    _, t_finetune = _eval(model, get_adapter(model), tok, FinetuneConfig(eval_ppl="self", eval_windows=2,
                                                                         eval_seq_len=8, seed=5))
    assert torch.equal(t_prune, t_eval) and torch.equal(t_eval, t_finetune)
    # and through the commands: prune's "before" equals eval of the unpruned model with the same seed
    code, cap = run(["prune", model_dir, "--out", tmp_path / "o", "--width", 96, "--method", "magnitude",
                     "--eval-ppl", "self", "--eval-seq-len", 8, "--eval-windows", 2, "--seed", 5, "--no-progress"],
                    capsys)
    assert code == 0, cap.err
    before = json.loads((tmp_path / "o" / "sdmprune.json").read_text())["eval"]["before"]["perplexity"]
    code, cap = run(["eval", model_dir, "--ppl", "self", "--seq-len", 8, "--max-windows", 2, "--seed", 5,
                     "--json", tmp_path / "ev.json"], capsys)
    assert code == 0, cap.err
    assert json.loads((tmp_path / "ev.json").read_text())["perplexity"]["perplexity"] == pytest.approx(before,
                                                                                                      rel=1e-6)


def test_a_fresh_start_forgets_an_earlier_checkpoint(tmp_path, monkeypatch):
    """Run A stops in stage 2; run B starts afresh (no --resume) over the same work folder and stops in
    stage 1 before its first checkpoint. A --resume now must not pair A's stage-2 state with the teacher
    cache B has begun to rewrite: A's checkpoint is gone with B's start, and the resume starts over."""
    from sdmprune.scoring import taylor
    from sdmprune.pipeline import PruneConfig, prune_model

    tokens = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(width=96, engine="torch", batch_size=1, stage1_keep=0.9, checkpoint_every=1, progress=False)
    work = str(tmp_path / "work")

    def stop_at(stage_no, batch_no):
        def hook(stage, done):
            if (stage, done) == (stage_no, batch_no):
                raise KeyboardInterrupt
        return hook

    monkeypatch.setattr(taylor, "_after_batch_hook", stop_at(2, 1))
    with pytest.raises(KeyboardInterrupt):
        prune_model(tiny_model(seed=2), tokens, cfg, checkpoint_dir=work)
    monkeypatch.setattr(taylor, "_after_batch_hook", stop_at(1, 1))
    with pytest.raises(KeyboardInterrupt):  # checkpoint_every 2: stops before its first checkpoint
        prune_model(tiny_model(seed=2), tokens, cfg, checkpoint_dir=work, checkpoint_every=2)
    monkeypatch.setattr(taylor, "_after_batch_hook", None)
    resumed = prune_model(tiny_model(seed=2), tokens, cfg, checkpoint_dir=work, resume=True)
    clean = prune_model(tiny_model(seed=2), tokens, cfg)
    assert "resumed_from" not in resumed.stats
    for k in clean.keep:
        assert torch.equal(clean.keep[k], resumed.keep[k])


def test_weights_digest_reads_large_tensors_and_tells_weights_apart():
    """The resume fingerprint's weights digest: any parameter size (past float32's exact integers), one
    changed sampled value or another dtype changes it, the same weights give the same digest."""
    from sdmprune.storage.run_state import WEIGHT_SAMPLES, weights_digest

    big = torch.nn.Linear(2 ** 12 + 1, 2 ** 12 + 3, bias=False).to(torch.float16)  # 16.8 M elements > 2**24
    a = weights_digest(big)
    assert a == weights_digest(big)
    with torch.no_grad():
        big.weight.view(-1)[-1] += 1  # the last element is always sampled
    assert weights_digest(big) != a
    small = torch.nn.Linear(3, 2)
    assert weights_digest(small) != weights_digest(small.to(torch.bfloat16)) and WEIGHT_SAMPLES > 6
