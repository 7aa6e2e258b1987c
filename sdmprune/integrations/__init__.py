"""Connections to the pruning codebases people already run. Each module imports its tool only when it
is itself imported (``sdmprune.integrations.torch_pruning`` needs the extra ``sdmprune[torch-pruning]``)."""
