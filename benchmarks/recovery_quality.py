"""Recovery quality on CPU: SmolLM2-135M pruned 20 % with SDMPrune, then LoRA-recovered, plain CE vs
self-distillation, same steps, data and seed. WikiText-2 test perplexity before and after.

    python benchmarks/recovery_quality.py                    # the fixed small budget (~15 min, 2 cores)
    python benchmarks/recovery_quality.py --steps 2 --windows 2 --calib 2   # smoke run

Pruning: sdmprune.pipeline.prune_model (ratio 0.2, paper alpha 0.4 / T 0.2 for the importance,
calibration windows from ../shared/data/wikitext-2/valid.txt). Recovery: sdmprune.recover.finetune
on the pruned model object, LoRA r 8 / alpha 16 on all linear modules, text of the same valid.txt,
``--seq-len`` tokens per row; distilled = alpha/T below with the unpruned model as teacher.
Evaluation: sdmprune.evaluate.evaluate_perplexity on the first ``--windows`` windows of 512 tokens
of ../shared/data/wikitext-2-raw/wiki.test.raw. The GGUF weights carry Q4_1 quantization error:
compare the rows with each other, not with published scores. Writes
benchmarks/results/recovery_quality.json and .md (measured numbers only).
"""
import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows for pruning")
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--train", default=str(DATA / "wikitext-2" / "valid.txt"))
    ap.add_argument("--eval", default=str(DATA / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows of --eval-len tokens")
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16, help="recovery optimizer steps")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (grad-accum of 1-sequence micro-batches)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from sdmprune.data import calibration_windows, eval_token_stream
    from sdmprune.evaluate import evaluate_perplexity
    from sdmprune.loading import load_model
    from sdmprune.models import count_parameters, mlp_widths
    from sdmprune.pipeline import PruneConfig, prune_model
    from sdmprune.recover import FinetuneConfig, finetune

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype="fp32", device="cpu", need_tokenizer=True)
    t_load = time.perf_counter() - t0
    eval_tokens, _ = eval_token_stream(args.eval, tok, max_tokens=args.windows * args.eval_len)

    def ppl(m):
        return float(evaluate_perplexity(m, eval_tokens, seq_len=args.eval_len, max_windows=args.windows))

    rows = []
    t0 = time.perf_counter()
    base_ppl = ppl(model)
    rows.append({"model": "unpruned", "ppl": base_ppl, "params": count_parameters(model), "seconds": time.perf_counter() - t0})

    teacher = copy.deepcopy(model).eval()
    calib, _ = calibration_windows(args.train, tok, args.calib, args.calib_len, seed=0)
    t0 = time.perf_counter()
    res = prune_model(model, calib, PruneConfig(ratio=args.ratio, method="sdmprune", progress=False))
    t_prune = time.perf_counter() - t0
    pruned = model
    rows.append({"model": f"SDMPrune {args.ratio:.0%}, no recovery", "ppl": ppl(pruned),
                 "params": count_parameters(pruned), "width": sorted(set(mlp_widths(pruned).values())),
                 "seconds": t_prune})

    for name, distill in (("plain-CE LoRA", False), ("distilled LoRA", True)):
        student = copy.deepcopy(pruned)
        cfg = FinetuneConfig(method="lora", distill=distill, alpha=args.alpha, temperature=args.temperature,
                             max_steps=args.steps, batch_size=1, grad_accum=args.batch, seq_len=args.seq_len,
                             lr=args.lr, merge=True, seed=0, progress=True, save_every=0, device="cpu", dtype="fp32")
        with tempfile.TemporaryDirectory() as tmp:
            rep = finetune(student, args.train, Path(tmp) / "out", cfg, tokenizer=tok,
                           teacher=teacher if distill else None)
        # merge=True merged the adapters into ``student`` in place: a plain model again
        tr = rep["training"]
        rows.append({"model": f"SDMPrune {args.ratio:.0%} + {name}", "ppl": ppl(student),
                     "params": count_parameters(student), "steps": tr["steps"], "tokens": tr["tokens"],
                     "first_loss": tr["first_loss"], "last_loss": tr["last_loss"], "seconds": tr["seconds"]})
        del student

    result = {
        "benchmark": "recovery_quality", "device": f"CPU ({platform.processor() or platform.machine()}, "
                                                   f"{torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "model": args.model, "ratio": args.ratio, "calibration": f"{args.calib} x {args.calib_len} tokens of {args.train}",
        "recovery": {"data": args.train, "steps": args.steps, "sequences_per_step": args.batch, "seq_len": args.seq_len,
                     "lr": args.lr, "lora": "r 8, alpha 16, dropout 0.05, q/k/v/o/gate/up/down",
                     "distill_alpha": args.alpha, "distill_temperature": args.temperature},
        "evaluation": f"{args.windows} windows x {args.eval_len} tokens of {args.eval}",
        "load_seconds": t_load, "rows": rows,
    }
    # paths relative to the repository root, so results read the same on every machine
    rel = lambda path: os.path.relpath(path, ROOT)  # noqa: E731
    result["calibration"] = f"{args.calib} x {args.calib_len} tokens of {rel(args.train)}"
    result["recovery"]["data"] = rel(args.train)
    result["evaluation"] = f"{args.windows} windows x {args.eval_len} tokens of {rel(args.eval)}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery_quality.json").write_text(json.dumps(result, indent=2))
    md = ["# Recovery quality (CPU, measured)", "", f"- model: {args.model}, {result['calibration']}",
          f"- recovery: {result['recovery']}", f"- evaluation: {result['evaluation']}", f"- device: {result['device']}",
          "", "| model | WikiText-2 ppl | params | steps | seconds |", "|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['ppl']:.3f} | {r['params']:,} | {r.get('steps', '')} | {r['seconds']:.1f} |" for r in rows]
    (out / "recovery_quality.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
