"""The ``sdmprune`` command line: one subcommand per step of the pipeline.

Each subcommand lives beside the code it runs: the module named in SUBCOMMANDS defines
``add_arguments(parser)`` and ``run(args) -> int``. A user-facing error (SdmpruneError) prints one
line and exits with code 2; nothing is half-written because every output is written atomically.
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

from .errors import SdmpruneError

# name -> (module, help)
SUBCOMMANDS = {
    "prune": ("sdmprune.pipeline", "prune the MLPs of a model (SDMPrune or a baseline method)"),
    "eval": ("sdmprune.evaluate", "perplexity (and lm-eval tasks) of a model"),
    "finetune": ("sdmprune.recover", "recover a pruned model (LoRA or full, plain or distilled)"),
    "plan": ("sdmprune.memory", "predict peak memory per GPU and the largest batch that fits"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdmprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = import_module(module)
        except ModuleNotFoundError as exc:  # a subcommand whose module is not built yet
            if exc.name != module:
                raise
            p.set_defaults(_run=None, _missing=module)
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._run is None:
        print(f"sdmprune: error: subcommand {args.command!r} is not available ({args._missing} missing)", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except SdmpruneError as exc:
        print(f"sdmprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdmprune {args.command}: interrupted (rerun with --resume to continue where it stopped)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
