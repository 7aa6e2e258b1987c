"""``sdmprune finetune``: recovery fine-tuning of a (pruned) model (sdmprune.recovery.recover.finetune)."""
from __future__ import annotations

import argparse

from ..errors import InputError, require_extra
from ..recovery.recover import FinetuneConfig
from .common import device_options, model_argument, progress_option, say_layer_ops, verbose_option, warn_remote_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    model_argument(p, "the (pruned) model to fine-tune")
    p.add_argument("--data", required=True, help="jsonl/json/parquet instruction records, a text file, or 'self'")
    p.add_argument("--out", required=True,
                   help="output folder, written atomically (a PEFT adapter folder, or a model folder with --full)")
    p.add_argument("--lora", action="store_true", help="LoRA adapters (the default)")
    p.add_argument("--full", action="store_true", help="full fine-tuning of every parameter")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="LoRA scaling numerator")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA dropout")
    p.add_argument("--targets", default=d.targets, help="LoRA modules: all | mlp | attn | a comma list (q_proj,v_proj,...)")
    p.add_argument("--distill", action="store_true", help="add KL(teacher || student) to the loss")
    p.add_argument("--teacher", default=None, help="the unpruned model to distill from (needed for a pruned model)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="weight of the KL term")
    p.add_argument("--temperature", type=float, default=d.temperature, help="on the teacher logits")
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the data")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine decay, no warm-up)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: off)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 16 // batch size)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="packed sequence length (default min(4096, max positions))")
    p.add_argument("--no-packing", action="store_true", help="one record per sequence (padded)")
    p.add_argument("--eval-ppl", default=None, help="perplexity on this source before and after")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="perplexity windows")
    p.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len, help="perplexity window in tokens")
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every K steps (0: only when "
                   "interrupted)")
    p.add_argument("--merge", action="store_true", help="also write OUT/merged (adapters merged, a plain model)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--offload-activations", action="store_true",
                   help="with --gradient-checkpointing: keep the checkpointed layer inputs in pinned host memory "
                        "between forward and backward (longer sequences or larger batches in the same memory)")
    p.add_argument("--self-samples", type=int, default=d.self_samples, help="--data self: sequences to sample")
    device_options(p)
    p.add_argument("--seed", type=int, default=d.seed, help="data order, LoRA init and 'self' text")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT when it is an earlier sdmprune output (never a folder holding anything else)")
    progress_option(p)
    verbose_option(p)


def config_from_args(args) -> FinetuneConfig:
    if args.lora and args.full:
        raise InputError("--lora and --full exclude each other")
    if not args.full:
        require_extra("peft", "finetune --lora (the default; --full needs no peft)")
    return FinetuneConfig(
        method="full" if args.full else "lora", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, targets=args.targets, distill=args.distill, teacher=args.teacher,
        alpha=args.alpha, temperature=args.temperature, epochs=args.epochs, max_steps=args.max_steps,
        lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        packing=not args.no_packing, eval_ppl=args.eval_ppl, eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len, resume=args.resume, merge=args.merge, device=args.device,
        dtype=args.dtype, seed=args.seed, overwrite=args.overwrite, save_every=args.save_every,
        gradient_checkpointing=args.gradient_checkpointing, offload_activations=args.offload_activations,
        self_samples=args.self_samples, progress=not args.no_progress, trust_remote_code=args.trust_remote_code)


def run(args) -> int:
    from ..storage.paths import WorkDir
    from ..recovery.recover import checkpoint_dir, finetune
    from ..recovery.trainer import CHECKPOINT_FILE

    cfg = config_from_args(args)
    warn_remote_code(args)
    if args.out.strip():  # cli: "rerun with --resume" only once the checkpoint is there
        args.resume_hint = WorkDir(checkpoint_dir(args.out), given=False)
        args.resume_hint.file(CHECKPOINT_FILE)
    report = finetune(args.model, args.data, args.out, cfg)
    tr = report["training"]
    say_layer_ops(tr.get("layer_ops"), args.verbose, "training steps")
    line = (f"finetune: {tr['steps']} steps, {tr['tokens']} tokens, loss {tr['first_loss']:.4f} -> "
            f"{tr['last_loss']:.4f}, {tr['seconds']:.1f} s -> {args.out}")
    if report.get("eval_ppl"):
        e = report["eval_ppl"]
        line += f"; ppl {e.get('before', {}).get('perplexity', '?')} -> {e.get('after', {}).get('perplexity', '?')}"
    print(line)
    return 0
