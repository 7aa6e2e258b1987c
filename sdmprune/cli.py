"""The ``sdmprune`` command line: one subcommand per step of the pipeline (sdmprune.commands).

A user-facing error (SdmpruneError) prints one line and exits with code 2; nothing is half-written
because every output is written atomically (sdmprune.storage.paths).
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

from .commands import SUBCOMMANDS
from .errors import SdmpruneError


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sdmprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sdmprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod = import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except SdmpruneError as exc:
        print(f"sdmprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        work = getattr(args, "resume_hint", None)
        hint = " (rerun with --resume to continue where it stopped)" if work is not None and work.holds_run_files() else ""
        print(f"sdmprune {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
