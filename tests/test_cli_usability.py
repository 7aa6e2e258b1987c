"""The command line as a user meets it: --version, help for every option, the interrupt hint, progress."""
import argparse

import pytest

from conftest import make_byte_tokenizer, tiny_model
from sdmprune.cli import build_parser, main


def test_version(capsys):
    import sdmprune

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and sdmprune.__version__ in capsys.readouterr().out


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["prune", "eval", "finetune", "plan"])
def test_every_option_has_help_and_shows_its_default(command):
    p = subparsers()[command]
    shows_defaults = issubclass(p.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    missing, no_default = [], []
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if not a.help or a.help == argparse.SUPPRESS:
            missing.append(a.dest)
        elif not shows_defaults and a.option_strings and a.default not in (None, False, argparse.SUPPRESS):
            if "%(default)" not in a.help and "default" not in a.help:
                no_default.append(a.dest)
    assert not missing, f"{command}: options without help: {missing}"
    assert not no_default, f"{command}: options that do not show their default: {no_default}"


def test_interrupt_hint_only_where_there_is_something_to_resume(tmp_path, capsys, monkeypatch):
    import sdmprune.commands.eval as eval_command

    model = tiny_model(seed=1)
    model.save_pretrained(tmp_path / "m")
    make_byte_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("abc " * 200)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_command, "run_eval", interrupted)
    code = main(["eval", str(tmp_path / "m"), "--ppl", str(tmp_path / "t.txt"), "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "--resume" not in err


def test_eval_shows_progress(tmp_path, capsys):
    model = tiny_model(seed=1)
    model.save_pretrained(tmp_path / "m")
    make_byte_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("abc def " * 200)
    code = main(["eval", str(tmp_path / "m"), "--ppl", str(tmp_path / "t.txt"), "--seq-len", "16",
                 "--max-windows", "3"])
    cap = capsys.readouterr()
    assert code == 0 and "perplexity" in cap.err and "3/3" in cap.err, cap.err
