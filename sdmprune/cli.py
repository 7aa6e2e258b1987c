"""The ``sdmprune`` command line: one subcommand per step of the pipeline (sdmprune.commands).

A user-facing error (SdmpruneError) prints one line and exits with code 2; nothing is half-written
because every output is written atomically (sdmprune.storage.paths).
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

from .commands import SUBCOMMANDS
from .commands.common import progress_bars
from .errors import SdmpruneError


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, like every other error (``--help`` still prints the whole usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except for on/off flags: "--no-progress ... (default: False)" says nothing
    and "--no-gradient-checkpointing ... (default: True)" reads backwards."""

    def _get_help_string(self, action):
        if action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="sdmprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sdmprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_HelpFormatter)
        mod = import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand, as its other usage errors are
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with progress_bars(not getattr(args, "no_progress", False)):
            return int(args._run(args) or 0)
    except SdmpruneError as exc:
        print(f"sdmprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (``sdmprune plan ... | head``): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
        return 141
    except KeyboardInterrupt:
        work = getattr(args, "resume_hint", None)
        hint = " (rerun with --resume to continue where it stopped)" if work is not None and work.holds_run_files() else ""
        print(f"sdmprune {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
