"""Data parallel and FSDP2 sharding on CPU/gloo: a 2-rank torchrun run gives the same float32 scores
(rtol 1e-5: only the summation order over samples differs) and the same kept channels as one
process on the same samples -- at the op level, through prune_model (both stages), and through the
CLI (`torchrun -m sdmprune prune`, --shard fsdp, --resume); only rank 0 writes; bad input is one
InputError with nothing written. Two torchrun launches in all (~10 s each), run side by side."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from sdmprune import pipeline
from sdmprune.errors import InputError

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _dist_worker as worker  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tiny_model(seed=0, layers=2).save_pretrained(root / "model")
    torch.save(worker.calib(), root / "tokens.pt")
    return root


@pytest.fixture(scope="module")
def launches(workdir):
    """Both torchrun launches at once: the worker (op, pipeline and in-process CLI checks) and the real
    `torchrun -m sdmprune prune` entry point, started from the repository root as a user would (every rank
    then has the root first on sys.path: nothing there may shadow an installed package)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    root_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    out = workdir / "result.pt"
    procs = {
        "worker": subprocess.Popen(TORCHRUN + [os.path.join(HERE, "_dist_worker.py"), str(out), str(workdir)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
        "cli": subprocess.Popen(TORCHRUN + ["-m", "sdmprune"] + worker.cli_args(
            str(workdir), str(workdir / "torchrun-cli"), "--save-scores", str(workdir / "torchrun-cli.st")),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=root_env, cwd=os.path.dirname(HERE)),
    }
    done = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"{name}:\n{stdout[-3000:]}\n{stderr[-5000:]}"
        done[name] = (stdout, stderr)
    return torch.load(out, weights_only=False), done


@pytest.fixture(scope="module")
def single_process_scores():
    tokens = worker.calib()
    return worker.ce_taylor(tiny_model(seed=0, layers=2), tokens, range(worker.N))


@pytest.fixture(scope="module")
def single_process_prune():
    model = tiny_model(seed=0, layers=2)
    r = pipeline.prune_model(model, worker.calib(), **worker.PIPE)
    with torch.no_grad():
        logits = model(input_ids=worker.calib()[:2]).logits
    return r, logits


@pytest.fixture(scope="module")
def single_process_hfprune():
    return pipeline.prune_model(tiny_model(seed=0, layers=2), worker.calib(), **worker.PIPE_HFPRUNE)


@pytest.fixture(scope="module")
def single_process_refit():
    model = tiny_model(seed=0, layers=2)
    r = pipeline.prune_model(model, worker.calib(), refit="ls", **worker.PIPE)
    return {"weights": model.state_dict(), "layers": r.stats["refit"]["layers"]}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["pipe_refit_dp", "pipe_refit_fsdp"])
def test_two_ranks_refit_like_one_process(launches, single_process_refit, mode):
    """The refit's Grams are summed over the ranks before the solve: the same strengths chosen and the
    same refit weights (float64 Grams; only the order of the sums differs)."""
    got, want = launches[0][mode], single_process_refit
    assert all(v["strength"] != "inf" for v in want["layers"].values())  # a refit, not the kept weights
    assert {k: v["strength"] for k, v in got["layers"].items()} == {k: v["strength"] for k, v in want["layers"].items()}
    for k, v in want["weights"].items():
        torch.testing.assert_close(got["weights"][k], v, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def single_process_cli(workdir):
    from sdmprune.cli import main

    out = str(workdir / "single-cli")
    assert main(worker.cli_args(str(workdir), out, "--save-scores", out + ".st")) == 0
    return out


def kept(scores, k):
    return {layer: set(torch.topk(v, k).indices.tolist()) for layer, v in scores.items()}


def assert_scores_close(got, ref):
    assert sorted(got) == sorted(ref)
    for layer in ref:
        finite = torch.isfinite(ref[layer])
        assert ref[layer].dtype == torch.float32 and torch.count_nonzero(ref[layer][finite]) > 0
        assert torch.equal(finite, torch.isfinite(got[layer]))
        torch.testing.assert_close(got[layer][finite], ref[layer][finite], rtol=1e-5, atol=0)


def load_cli_output(out):
    from safetensors.torch import load_file

    report = json.load(open(os.path.join(out, "sdmprune.json")))
    weights = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            weights.update(load_file(os.path.join(out, f)))
    return report, weights


def assert_same_cli_output(out, ref_out, scores=False):
    report, weights = load_cli_output(out)
    ref_report, ref_weights = load_cli_output(ref_out)
    assert report["kept_indices"] == ref_report["kept_indices"]
    assert report["stage1_kept_indices"] == ref_report["stage1_kept_indices"]
    assert report["width"] == 100 and report["params_after"] == ref_report["params_after"]
    assert sorted(weights) == sorted(ref_weights)
    for k in ref_weights:  # the same channels sliced out of the same weights: bit-equal
        assert torch.equal(weights[k], ref_weights[k]), k
    assert not os.path.exists(out + ".sdmprune-work")  # the resume state is cleaned up
    if scores:
        from safetensors.torch import load_file

        got, ref = load_file(out + ".st"), load_file(ref_out + ".st")
        assert_scores_close({k: v for k, v in got.items() if "scores" in k},
                            {k: v for k, v in ref.items() if "scores" in k})
    return report


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["dp", "fsdp"])
def test_two_ranks_match_one_process(launches, single_process_scores, mode):
    got = launches[0][mode]
    assert launches[0]["world_size"] == 2
    assert_scores_close(got, single_process_scores)
    for k in (40, 80, 120):
        assert kept(got, k) == kept(single_process_scores, k)


@pytest.mark.distributed
def test_shards_disjoint_and_weights_sharded(launches):
    r = launches[0]
    assert sorted(i for shard in r["indices"] for i in shard) == list(range(worker.N))
    assert r["fsdp_layer_weight_is_sharded"]  # each rank held a shard of every layer
    assert r["unshard_equal"]  # unshard_model_ restores the full, unchanged weights
    assert r["too_many_ranks_error"]  # more ranks than samples: InputError


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["pipe_dp", "pipe_fsdp"])
def test_prune_model_two_ranks_match_one_process(launches, single_process_prune, mode):
    got, (ref, _) = launches[0][mode], single_process_prune
    assert got["world_size"] == 2
    assert_scores_close(got["stage1_scores"], ref.stage1_scores)
    assert_scores_close(got["scores"], ref.scores)  # stage 2: -inf outside the stage-1 channels
    for layer in ref.keep:
        assert torch.equal(got["stage1_keep"][layer], ref.stage1_keep[layer])
        assert torch.equal(got["keep"][layer], ref.keep[layer])


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["pipe_hfprune_dp", "pipe_hfprune_fsdp"])
def test_hfprune_two_ranks_match_one_process(launches, single_process_hfprune, mode):
    """hfprune's activation scores, summed over two ranks' disjoint samples (plain and FSDP2), equal one
    process's; the same channels are kept."""
    got, ref = launches[0][mode], single_process_hfprune
    assert got["world_size"] == 2 and got["stage1_keep"] is None
    assert_scores_close(got["scores"], ref.scores)
    for layer in ref.keep:
        assert torch.equal(got["keep"][layer], ref.keep[layer])


@pytest.mark.distributed
def test_prune_model_fsdp_returns_a_plain_pruned_model(launches, single_process_prune):
    r = launches[0]
    assert r["pipe_fsdp_plain"]
    torch.testing.assert_close(r["pipe_fsdp_logits"], single_process_prune[1], rtol=1e-5, atol=1e-6)
    full = sum(p.numel() * 4 for p in tiny_model(seed=0, layers=2).parameters())
    assert r["pipe_fsdp_sharded_bytes"] < full  # each rank held less than the whole model
    err = r["pipe_too_few_error"]
    assert err is not None and "2 ranks but only 1 calibration samples" in err


@pytest.mark.distributed
def test_cli_two_ranks(launches, single_process_cli, workdir):
    r, procs = launches

    def out_dir(name):
        return str(workdir / name)

    # `torchrun -m sdmprune prune`: the CLI joins the process group itself
    stdout, stderr = procs["cli"]
    assert len([line for line in stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 prints the result
    report = assert_same_cli_output(out_dir("torchrun-cli"), single_process_cli, scores=True)
    assert report["stats"]["world_size"] == 2
    # in-process CLI under the worker's process group: plain, resumed, --shard fsdp
    assert r["cli_plain_rc"] == 0 and r["cli_resume_rc"] == 0 and r["cli_fsdp_rc"] == 0
    assert_same_cli_output(out_dir("cli-plain"), single_process_cli, scores=True)
    assert r["cli_interrupted"] and not r["cli_out_after_interrupt"]
    assert r["cli_work_after_interrupt"] == ["sdmprune-state-rank0.pt", "sdmprune-state-rank1.pt",
                                             "sdmprune-teacher-rank0.bin", "sdmprune-teacher-rank1.bin"]
    resumed = assert_same_cli_output(out_dir("cli-resumed"), single_process_cli)
    assert resumed["stats"]["resumed_from"] == {"stage": 2, "batch": 1}
    fsdp = assert_same_cli_output(out_dir("cli-fsdp"), single_process_cli)
    assert fsdp["config"]["shard"] == "fsdp"
    # only rank 0 saved (plain, resumed, fsdp); world size > samples: exit 2, nothing written
    assert r["cli_writes_by_rank"] == [[0, 0, 0], []]
    assert r["cli_too_few_rc"] == 2 and not r["cli_too_few_wrote"]


def test_shard_without_process_group_is_input_error(tmp_path):
    from sdmprune.scale.sharding import shard_model

    model = tiny_model(seed=0, layers=2)
    w = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(InputError, match="process group"):
        shard_model(model)
    assert model.model.layers[0].mlp.up_proj.weight is w and w.requires_grad
    # through prune_model: the same error before any work, nothing written, the model untouched
    ck = tmp_path / "ck"
    with pytest.raises(InputError, match="torchrun"):
        pipeline.prune_model(model, worker.calib(), checkpoint_dir=str(ck), shard="fsdp", **worker.PIPE)
    assert not ck.exists() and model.model.layers[0].mlp.up_proj.weight is w and w.shape == (160, 64)


@pytest.mark.parametrize("bad", [dict(shard="ddp"), dict(shard="fsdp", offload="cpu"),
                                 dict(shard="fsdp", engine="reference"), dict(shard="fsdp", method="magnitude"),
                                 dict(shard="fsdp", recover_steps=2)])
def test_bad_shard_config(bad):
    with pytest.raises(InputError):
        pipeline.PruneConfig(**{**worker.PIPE, **bad}).validate()
