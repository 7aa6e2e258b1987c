"""torchrun worker for tests/test_distributed.py (not collected: the name starts with "_").

usage: torchrun --nproc_per_node N tests/_dist_worker.py OUT.pt [pipeline]
Rank 0 writes {"dp": scores, "fsdp": scores, "too_many_ranks_error": bool, ...} to OUT.pt.
"""
import os
import sys

import torch
import torch.distributed as tdist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_model  # noqa: E402

from sdmprune import distributed  # noqa: E402
from sdmprune.errors import InputError  # noqa: E402
from sdmprune.importance import TaylorImportance  # noqa: E402
from sdmprune.models import get_adapter  # noqa: E402
from sdmprune.sharding import is_sharded, shard_model, unshard_model_  # noqa: E402

N, L = 4, 12


def calib():
    return torch.randint(0, 300, (N, L), generator=torch.Generator().manual_seed(7))


def ce_taylor(model, tokens, indices):
    """CE Taylor scores over the samples ``indices`` (one per backward), summed over ranks."""
    adapter = get_adapter(model)
    body, weight = adapter.body(model), adapter.lm_head(model).weight
    model.train()
    with TaylorImportance(model, backend="torch") as imp:
        for i in indices:
            x = tokens[i:i + 1]
            h = body(input_ids=x, use_cache=False).last_hidden_state
            logits = (h @ weight.t()).float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            loss.backward()
        return distributed.all_reduce_scores_({k: v.detach().clone() for k, v in imp.scores().items()})


def main():
    out_path = sys.argv[1]
    tdist.init_process_group("gloo")
    tokens = calib()
    idx = distributed.shard_indices(N)
    result = {"world_size": distributed.world_size(), "indices": {}}
    result["dp"] = ce_taylor(tiny_model(seed=0, layers=2), tokens, idx)

    model = tiny_model(seed=0, layers=2)
    shard_model(model)
    w = model.model.layers[0].mlp.up_proj.weight
    result["fsdp_layer_weight_is_sharded"] = hasattr(w, "to_local") and w.to_local().shape[0] < w.shape[0]
    result["fsdp"] = ce_taylor(model, tokens, idx)
    unshard_model_(model)
    ref = tiny_model(seed=0, layers=2).state_dict()
    result["unshard_equal"] = (not is_sharded(model)) and all(
        torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    try:
        distributed.shard_indices(distributed.world_size() - 1)
        result["too_many_ranks_error"] = False
    except InputError:
        result["too_many_ranks_error"] = True
    gathered = [None] * distributed.world_size()
    tdist.all_gather_object(gathered, idx)
    result["indices"] = gathered
    if distributed.is_main_process():
        torch.save(result, out_path)
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
