"""Torch-Pruning with sdmprune's scores on a real model: the channels its pruner removes against
``prune_model``'s, per layer (intersection over union), and the perplexity of both pruned models.

    python benchmarks/torch_pruning_parity.py                      # SmolLM2-135M, fp32, CPU (~10 min, 2 cores)
    python benchmarks/torch_pruning_parity.py --samples 2 --seq-len 32 --eval-windows 2 --out /tmp/t.json

One calibration set (random windows of the WikiText-2 validation text). Three pruned copies of the model:

- ``prune_model``: sdmprune's own pipeline (SDMPrune, two stages), sliced by sdmprune;
- ``torch-pruning + ChannelImportance``: ``score_channels`` (the same selection, the model left whole),
  then ``mlp_pruner(model, ChannelImportance(model, result), width=...)`` and ``pruner.step()``;
- ``torch-pruning + its own Taylor, LLM-Pruner loop``: ``mlp_pruner`` with torch-pruning's
  ``GroupTaylorImportance`` after a loop of ``loss.backward()`` over the same calibration batches, run
  twice: with the model's own loss (``model(x, labels=x).loss``) and with ``sdmprune.lm_loss`` (the
  loss and every gradient compared; the kept channels of both compared), then its kept channels
  against SDMPrune's: a different score, so a different choice. On the first batch both float32 losses
  and their gradients are also measured against the same loss in float64.

The kept channels of a torch-pruned model are read back from its weights (each kept row of gate_proj
matched to the original row it equals). Perplexity: the first ``--eval-windows`` windows of
``--eval-seq-len`` tokens of the WikiText-2 raw test split, unpruned and per pruned model.

Writes benchmarks/results/torch_pruning_parity.json (device, versions, settings, per-layer IoU,
perplexities, timings). Target: per-layer IoU 1.0 and equal perplexity for ChannelImportance.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from kept_channels import kept_iou  # noqa: E402  (benchmarks/ is not a package)
from quality import device_name, rel_path  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=os.path.join(DATA, "wikitext-2", "valid.txt"))
    p.add_argument("--eval", default=os.path.join(DATA, "wikitext-2-raw", "wiki.test.raw"))
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=4, help="calibration samples per backward")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); on a shared CPU 1 avoids threads waiting on each other")
    p.add_argument("--out", default=os.path.join(HERE, "results", "torch_pruning_parity.json"))
    return p.parse_args(argv)


def kept_from_weights(pruned, original) -> dict:
    """{layer: sorted kept channels} of a model another tool sliced: each row of its gate_proj is matched
    to the row of the original with the same bytes, and the match is checked exactly on gate, up and
    down."""
    out = {}
    for i, (a, b) in enumerate(zip(pruned.model.layers, original.model.layers)):
        wa, wb = a.mlp.gate_proj.weight.detach(), b.mlp.gate_proj.weight.detach()
        where = {row.numpy().tobytes(): c for c, row in enumerate(wb)}
        kept = torch.tensor([where[row.numpy().tobytes()] for row in wa])
        assert torch.equal(wa, wb[kept]) and torch.equal(a.mlp.up_proj.weight, b.mlp.up_proj.weight[kept])
        assert torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight[:, kept])
        out[i] = kept.sort().values
    return out


def iou_summary(got: dict, ref: dict) -> dict:
    iou = kept_iou(got, ref)
    vals = list(iou.values())
    return {"iou_min": min(vals), "iou_mean": sum(vals) / len(vals), "iou_max": max(vals),
            "iou_per_layer": {k: round(v, 6) for k, v in iou.items()}}


def taylor_loop(model, calib, batch_size: int, width: int, loss_of):
    """The LLM-Pruner loop with torch-pruning's Taylor: build the pruner, backward over the calibration
    batches, step. Returns (losses, {name: grad}, seconds)."""
    import torch_pruning as tp

    from sdmprune.integrations.torch_pruning import mlp_pruner

    t0 = time.perf_counter()
    pruner = mlp_pruner(model, tp.importance.GroupTaylorImportance(), width=width)
    model.zero_grad(set_to_none=True)
    losses = []
    for batch in calib.split(batch_size):
        loss = loss_of(model, batch)
        loss.backward()
        losses.append(float(loss.detach()))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    pruner.step()
    model.zero_grad(set_to_none=True)
    return losses, grads, time.perf_counter() - t0


def float64_check(model, batch) -> dict:
    """On one batch: the loss and every gradient of the model's own float32 loss and of lm_loss, each
    against the same loss computed in float64 (a float64 copy of the model, cross-entropy on its float64
    logits): which of the two float32 losses sits closer to the exact value."""
    import torch.nn.functional as F

    from sdmprune import lm_loss

    def run(m, loss_of):
        for p in m.parameters():
            p.requires_grad_(True)
        m.zero_grad(set_to_none=True)
        loss = loss_of(m)
        loss.backward()
        return float(loss.detach()), {n: p.grad.detach().double() for n, p in m.named_parameters()}

    V = model.config.vocab_size
    exact, g64 = run(copy.deepcopy(model).double(), lambda m: F.cross_entropy(
        m(input_ids=batch, use_cache=False).logits[:, :-1].reshape(-1, V), batch[:, 1:].reshape(-1)))
    out = {"tokens": batch.numel(), "loss_float64": exact}
    for name, loss_of in (("model_loss", lambda m: m(input_ids=batch, labels=batch, use_cache=False).loss),
                          ("lm_loss", lambda m: lm_loss(m, batch))):
        loss, g = run(copy.deepcopy(model), loss_of)
        out[name] = {"loss_abs_err": abs(loss - exact),
                     "grad_max_rel_err": max(float((g[n] - g64[n]).abs().max() / g64[n].abs().max()) for n in g64)}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from importlib.metadata import version

    from sdmprune import PruneConfig, lm_loss, prune_model, score_channels
    from sdmprune.data import calibration_windows, eval_token_stream
    from sdmprune.evaluate import evaluate_perplexity
    from sdmprune.integrations.torch_pruning import ChannelImportance, mlp_pruner
    from sdmprune.loading import load_model
    from sdmprune.storage.paths import write_json_atomic
    from sdmprune.storage.save import package_versions
    from sdmprune.widths import plan_width

    t_all = time.perf_counter()
    model, tok = load_model(args.model, dtype="fp32", device="cpu", need_tokenizer=True)
    model.eval()
    calib, desc = calibration_windows(args.calib, tok, args.samples, args.seq_len, seed=args.seed)
    desc["source"] = rel_path(desc["source"])
    stream, _ = eval_token_stream(args.eval, tok)
    plan = plan_width(model, args.ratio)
    cfg = PruneConfig(width=plan.width, method="sdmprune", batch_size=args.batch_size, seed=args.seed, progress=False)
    versions = package_versions()
    versions["torch_pruning"] = version("torch-pruning")
    res = {"benchmark": "torch_pruning_parity", "device": device_name(torch.device("cpu")), "versions": versions,
           "torch_threads": torch.get_num_threads(),
           "settings": {"model": args.model, "dtype": "fp32", "calibration": desc, "ratio": args.ratio,
                        "width": plan.width, "original_width": plan.original_width, "layers": len(model.model.layers),
                        "method": "sdmprune", "alpha": cfg.alpha, "temperature": cfg.temperature,
                        "stage1_keep": cfg.stage1_keep, "batch_size": args.batch_size,
                        "evaluation": {"source": rel_path(args.eval), "windows": args.eval_windows,
                                       "seq_len": args.eval_seq_len, "which": "the first windows"}},
           "target": "torch-pruning with ChannelImportance: per-layer IoU 1.0 against prune_model, equal perplexity"}

    def ppl(m) -> float:
        return float(evaluate_perplexity(m, stream, seq_len=args.eval_seq_len, max_windows=args.eval_windows))

    def write():
        res["wall_s"] = time.perf_counter() - t_all
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json_atomic(args.out, res)

    res["perplexity_unpruned"] = ppl(model)
    print(f"unpruned perplexity {res['perplexity_unpruned']:.2f}", file=sys.stderr)

    ours = copy.deepcopy(model)
    t0 = time.perf_counter()
    selected = prune_model(ours, calib, cfg)
    row_ours = {"seconds": time.perf_counter() - t0, "width": ours.config.intermediate_size, "perplexity": ppl(ours)}
    res["prune_model"] = row_ours
    write()
    print(f"prune_model: perplexity {row_ours['perplexity']:.2f}", file=sys.stderr)

    theirs = copy.deepcopy(model)
    t0 = time.perf_counter()
    result = score_channels(theirs, calib, cfg)
    t_score = time.perf_counter() - t0
    t0 = time.perf_counter()
    pruner = mlp_pruner(theirs, ChannelImportance(theirs, result), width=result.width)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    pruner.step()
    t_step = time.perf_counter() - t0
    x = calib[:2]
    with torch.no_grad():
        logits_diff = float((theirs(input_ids=x).logits - ours(input_ids=x).logits).abs().max())
    row = {"score_channels_s": t_score, "build_pruner_s": t_build, "step_s": t_step,
           "width": theirs.config.intermediate_size,
           "score_channels_keep_equals_prune_model": all(torch.equal(result.keep[k], selected.keep[k])
                                                         for k in selected.keep),
           "logits_max_abs_diff_vs_prune_model": logits_diff, "perplexity": ppl(theirs),
           **iou_summary(kept_from_weights(theirs, model), selected.keep)}
    row["perplexity_equal"] = row["perplexity"] == row_ours["perplexity"]
    res["torch_pruning_channel_importance"] = row
    write()
    print(f"torch-pruning + ChannelImportance: IoU min {row['iou_min']:.4f}, perplexity {row['perplexity']:.2f}, "
          f"build {t_build:.1f} s", file=sys.stderr)
    del theirs, pruner

    # the LLM-Pruner loop with torch-pruning's own Taylor: the model's loss, then lm_loss in its place
    hf = copy.deepcopy(model)
    for p in hf.parameters():
        p.requires_grad_(True)
    losses_hf, grads_hf, t_hf = taylor_loop(hf, calib, args.batch_size, plan.width,
                                            lambda m, b: m(input_ids=b, labels=b, use_cache=False).loss)
    fused = copy.deepcopy(model)
    for p in fused.parameters():
        p.requires_grad_(True)
    losses_f, grads_f, t_f = taylor_loop(fused, calib, args.batch_size, plan.width, lambda m, b: lm_loss(m, b))
    grad_err = max(float((grads_f[n] - g).abs().max() / g.abs().max()) for n, g in grads_hf.items())
    kept_hf, kept_f = kept_from_weights(hf, model), kept_from_weights(fused, model)
    res["torch_pruning_taylor_llm_pruner_loop"] = {
        "seconds_model_loss": t_hf, "seconds_lm_loss": t_f,
        "loss_model": losses_hf, "loss_lm_loss": losses_f,
        "loss_max_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses_f, losses_hf)),
        "grad_max_rel_diff": grad_err, "grads_compared": len(grads_hf),
        "kept_lm_loss_vs_model_loss": iou_summary(kept_f, kept_hf),
        "perplexity": ppl(fused),
        "kept_vs_sdmprune": iou_summary(kept_f, selected.keep),
    }
    row = res["torch_pruning_taylor_llm_pruner_loop"]
    row["float64_reference_first_batch"] = float64_check(model, calib[:args.batch_size])
    print(f"LLM-Pruner loop: loss rel diff {row['loss_max_rel_diff']:.1e}, grad rel diff {grad_err:.1e}, "
          f"IoU vs SDMPrune min {row['kept_vs_sdmprune']['iou_min']:.3f}", file=sys.stderr)
    write()
    print(json.dumps({k: res[k] for k in ("perplexity_unpruned", "prune_model")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
