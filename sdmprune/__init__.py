"""sdmprune: SDMPrune (self-distillation MLP pruning) for LLaMA-family models.

The pipeline reads top-down, one room per step: ``data`` (calibration text) -> ``loading`` and
``models`` (the model and its family adapter) -> ``scoring/`` (the method registry and its engines)
-> ``widths`` (ratio -> width) -> ``pipeline`` (``prune_model``, ``score_channels``) -> ``slicing``
-> ``storage/`` (save, GGUF, the ownership rule, resume state) -> ``evaluate`` -> ``recovery/``, with
``commands/`` (the CLI) on top; ``scale/`` holds the options for models larger than one GPU and
``memory`` predicts their peak. Triton kernels live in ``sdmprune.kernels``; the compiled gather ops
in ``sdmprune.ops``. ``integrations/`` drives other pruners with sdmprune's choices
(``integrations.torch_pruning``, the extra ``sdmprune[torch-pruning]``); ``lm_loss`` puts the fused
LM-head loss into another pruning loop.

Public names are imported lazily so that ``import sdmprune`` stays cheap.
"""
from importlib import import_module

import torch  # noqa: F401  (loads libtorch/libc10 before the extension sdmprune._C can be imported)

__version__ = "0.1.0"

_LAZY = {
    # importance engine (drop-in)
    "TaylorImportance": "sdmprune.scoring.importance",
    "NaiveTaylorImportance": "sdmprune.scoring.importance",
    # the model's own LM-head loss through the fused kernels (drop-in for model(ids, labels=ids).loss)
    "lm_loss": "sdmprune.scoring.objectives",
    "head_states": "sdmprune.scoring.objectives",
    # methods
    "register_method": "sdmprune.scoring.registry",
    "available_methods": "sdmprune.scoring.registry",
    # pipeline
    "PruneConfig": "sdmprune.pipeline",
    "PruneResult": "sdmprune.pipeline",
    "prune_model": "sdmprune.pipeline",
    "score_channels": "sdmprune.pipeline",
    # compensation after selection (PruneConfig.refit)
    "refit_down_proj_": "sdmprune.compensation",
    # model adapters
    "find_gated_mlps": "sdmprune.models",
    "GatedMLP": "sdmprune.models",
    "UnsupportedModelError": "sdmprune.models",
    # planning
    "width_for_ratio": "sdmprune.widths",
    "plan_width": "sdmprune.widths",
    # data and loading
    "calibration_windows": "sdmprune.data",
    "load_model": "sdmprune.loading",
    # slicing and saving
    "prune_mlp_": "sdmprune.slicing",
    "prune_model_": "sdmprune.slicing",
    "save_pruned": "sdmprune.storage.save",
    "load_pruned": "sdmprune.storage.save",
    # evaluation
    "evaluate_perplexity": "sdmprune.evaluate",
    # recovery
    "FinetuneConfig": "sdmprune.recovery.recover",
    "finetune": "sdmprune.recovery.recover",
    "recover_masked_": "sdmprune.recovery.recover",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdmprune' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
