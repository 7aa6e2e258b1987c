"""The subcommands of ``sdmprune``: one module each, a thin layer over library functions.

Each module defines ``add_arguments(parser)`` and ``run(args) -> int``; ``sdmprune.cli`` builds the
parser from ``SUBCOMMANDS`` and turns a user-facing error (SdmpruneError) into one line, exit code 2.
"""

# name -> (module, one-line help)
SUBCOMMANDS = {
    "prune": ("sdmprune.commands.prune", "prune the MLPs of a model (SDMPrune or another registered method)"),
    "eval": ("sdmprune.commands.eval", "perplexity (and lm-eval tasks) of a model"),
    "finetune": ("sdmprune.commands.finetune", "recover a pruned model (LoRA or full, plain or distilled)"),
    "plan": ("sdmprune.commands.plan", "predict peak memory per GPU and the largest batch that fits"),
}
