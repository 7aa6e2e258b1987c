"""torchrun worker for tests/test_distributed.py (not collected: the name starts with "_").

usage: torchrun --nproc_per_node 2 tests/_dist_worker.py OUT.pt WORKDIR
WORKDIR holds model/ (a tiny LLaMA saved by the test) and tokens.pt ([N, L] ids). One launch runs
every 2-rank check (a torchrun start costs ~10 s here):

* op level: CE Taylor scores with plain data parallel and with FSDP2 (shard_model), unshard_model_;
* pipeline level: prune_model (sdmprune, torch engine, both stages) plain and with shard="fsdp";
  hfprune (one stage, activation scores) plain and with shard="fsdp"; sdmprune with refit="ls" plain
  and with shard="fsdp";
* CLI in this process (the process group is already up): a plain run, an interrupted run resumed
  with --resume, a --shard fsdp run, and --samples smaller than the world size (exit 2);
  save_pruned is wrapped to count which ranks write.

Rank 0 writes a dict of results to OUT.pt; the CLI outputs land in WORKDIR/cli-*.
"""
import os
import sys

import torch
import torch.distributed as tdist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_model  # noqa: E402

from sdmprune import pipeline  # noqa: E402
from sdmprune.scale import distributed
from sdmprune.scoring import taylor
from sdmprune.errors import InputError  # noqa: E402
from sdmprune.scoring.importance import TaylorImportance  # noqa: E402
from sdmprune.models import find_gated_mlps, get_adapter  # noqa: E402
from sdmprune.scale.sharding import is_sharded, shard_model, unshard_model_  # noqa: E402

N, L = 4, 12
PIPE = dict(width=100, stage1_keep=0.8, engine="torch", batch_size=2, progress=False, temperature=0.5)
PIPE_HFPRUNE = dict(PIPE, method="hfprune")


def calib():
    return torch.randint(0, 300, (N, L), generator=torch.Generator().manual_seed(7))


def cli_args(workdir, out, *extra):
    """The `sdmprune prune` arguments every CLI check shares (single-process reference included)."""
    return ["prune", os.path.join(workdir, "model"), "--out", out, "--width", "100", "--calib",
            os.path.join(workdir, "tokens.pt"), "--samples", str(N), "--seq-len", str(L), "--engine", "torch",
            "--stage1-keep", "0.8", "--temperature", "0.5", "--batch-size", "1", "--checkpoint-every", "1",
            "--no-progress", "--device", "cpu", *extra]


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


def pipeline_result(r):
    return {"keep": r.keep, "scores": r.scores, "stage1_keep": r.stage1_keep, "stage1_scores": r.stage1_scores,
            "world_size": r.stats["world_size"]}


def op_level(result, tokens, idx):
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


def pipeline_level(result, tokens, workdir):
    x = tokens[:2]
    result["pipe_dp"] = pipeline_result(pipeline.prune_model(tiny_model(seed=0, layers=2), tokens, **PIPE))
    model = tiny_model(seed=0, layers=2)
    r = pipeline.prune_model(model, tokens, shard="fsdp", **PIPE)
    result["pipe_fsdp"] = pipeline_result(r)
    # after the prune the model is plain again (no DTensor, no FSDP class), sliced, on the CPU
    result["pipe_fsdp_plain"] = (not is_sharded(model)) and all(
        type(p) is torch.nn.Parameter and p.device.type == "cpu" for p in model.parameters()) and all(
        m.width == 100 for m in find_gated_mlps(model))
    with torch.no_grad():
        result["pipe_fsdp_logits"] = model(input_ids=x).logits
    result["pipe_fsdp_sharded_bytes"] = r.stats.get("sharded_param_bytes_per_rank")
    for name, shard in (("pipe_hfprune_dp", None), ("pipe_hfprune_fsdp", "fsdp")):
        result[name] = pipeline_result(pipeline.prune_model(tiny_model(seed=0, layers=2), tokens, shard=shard,
                                                            **PIPE_HFPRUNE))
    # the refit: each rank's Grams of its windows, summed before the solve; plain and after --shard fsdp
    for name, shard in (("pipe_refit_dp", None), ("pipe_refit_fsdp", "fsdp")):
        model = tiny_model(seed=0, layers=2)
        r = pipeline.prune_model(model, tokens, shard=shard, refit="ls", **PIPE)
        result[name] = {"weights": model.state_dict(), "layers": r.stats["refit"]["layers"]}
    # more ranks than samples: one InputError before a checkpoint directory is made
    ck = os.path.join(workdir, f"too-few-ck-{distributed.rank()}")
    try:
        pipeline.prune_model(tiny_model(seed=0, layers=2), tokens[:1], checkpoint_dir=ck, shard="fsdp", **PIPE)
        result["pipe_too_few_error"] = None
    except InputError as exc:
        result["pipe_too_few_error"] = str(exc) if not os.path.exists(ck) else "wrote " + ck


class Stop(Exception):
    pass


def cli_level(result, workdir):
    from sdmprune.storage import save
    from sdmprune.cli import main

    writes = []
    real_save = save.save_pruned

    def counting_save(*a, **kw):
        writes.append(distributed.rank())
        return real_save(*a, **kw)

    save.save_pruned = counting_save
    try:
        out = os.path.join(workdir, "cli-plain")
        result["cli_plain_rc"] = main(cli_args(workdir, out, "--save-scores", os.path.join(workdir, "cli-plain.st")))
        tdist.barrier()

        def stop(stage, done):
            if (stage, done) == (2, 1):
                raise Stop

        out = os.path.join(workdir, "cli-resumed")
        taylor._after_batch_hook = stop
        try:
            main(cli_args(workdir, out))
            result["cli_interrupted"] = False
        except Stop:
            result["cli_interrupted"] = True
        finally:
            taylor._after_batch_hook = None
        tdist.barrier()
        result["cli_work_after_interrupt"] = sorted(os.listdir(out + ".sdmprune-work"))
        result["cli_out_after_interrupt"] = os.path.exists(out)
        tdist.barrier()
        result["cli_resume_rc"] = main(cli_args(workdir, out, "--resume"))
        tdist.barrier()
        result["cli_fsdp_rc"] = main(cli_args(workdir, os.path.join(workdir, "cli-fsdp"), "--shard", "fsdp"))
        tdist.barrier()
        few = os.path.join(workdir, "cli-too-few")
        result["cli_too_few_rc"] = main(cli_args(workdir, few, "--samples", "1"))
        tdist.barrier()
        result["cli_too_few_wrote"] = os.path.exists(few) or os.path.exists(few + ".sdmprune-work")
    finally:
        save.save_pruned = real_save
    gathered = [None] * distributed.world_size()
    tdist.all_gather_object(gathered, writes)
    result["cli_writes_by_rank"] = gathered


def main():
    out_path, workdir = sys.argv[1], sys.argv[2]
    tdist.init_process_group("gloo")
    torch.set_num_threads(1)
    tokens = calib()
    idx = distributed.shard_indices(N)
    result = {"world_size": distributed.world_size()}
    op_level(result, tokens, idx)
    pipeline_level(result, tokens, workdir)
    cli_level(result, workdir)
    gathered = [None] * distributed.world_size()
    tdist.all_gather_object(gathered, idx)
    result["indices"] = gathered
    if distributed.is_main_process():
        torch.save(result, out_path)
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
