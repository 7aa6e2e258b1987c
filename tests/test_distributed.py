"""Data parallel and FSDP2 sharding on CPU/gloo: a 2-rank torchrun run gives the same float32 scores
(rtol 1e-5: only the summation order over samples differs) and the same kept channels as one
process on the same samples; bad input is one InputError."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from sdmprune.errors import InputError

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _dist_worker as worker  # noqa: E402


@pytest.fixture(scope="module")
def two_rank_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "scores.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "_dist_worker.py"), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single_process_scores():
    tokens = worker.calib()
    return worker.ce_taylor(tiny_model(seed=0, layers=2), tokens, range(worker.N))


def kept(scores, k):
    return {layer: set(torch.topk(v, k).indices.tolist()) for layer, v in scores.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["dp", "fsdp"])
def test_two_ranks_match_one_process(two_rank_result, single_process_scores, mode):
    got = two_rank_result[mode]
    assert two_rank_result["world_size"] == 2
    assert sorted(got) == sorted(single_process_scores)
    for layer, ref in single_process_scores.items():
        assert ref.dtype == torch.float32 and torch.count_nonzero(ref) > 0
        torch.testing.assert_close(got[layer], ref, rtol=1e-5, atol=0)
    for k in (40, 80, 120):
        assert kept(got, k) == kept(single_process_scores, k)


@pytest.mark.distributed
def test_shards_disjoint_and_weights_sharded(two_rank_result):
    r = two_rank_result
    assert sorted(i for shard in r["indices"] for i in shard) == list(range(worker.N))
    assert r["fsdp_layer_weight_is_sharded"]  # each rank held a shard of every layer
    assert r["unshard_equal"]  # unshard_model_ restores the full, unchanged weights
    assert r["too_many_ranks_error"]  # more ranks than samples: InputError


def test_shard_without_process_group_is_input_error():
    from sdmprune.sharding import shard_model

    model = tiny_model(seed=0, layers=2)
    w = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(InputError, match="process group"):
        shard_model(model)
    assert model.model.layers[0].mlp.up_proj.weight is w and w.requires_grad
