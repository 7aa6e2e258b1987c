"""One distilled LoRA recovery step on a Llama-3.2-1B-shaped model (GPU only): this package's
one-copy fused path vs the usual way, tokens/s and peak memory measured in the same run.

Shape: hidden 2048, MLP width 8192 pruned to 5613 (20 %), 16 layers, 32/8 heads, vocabulary 128256,
tied embeddings, random bf16 weights; rows of ``--seq-len`` (2048) tokens packed from records of
random lengths; LoRA r 8 / alpha 16 on q/k/v/o/gate/up/down; alpha 0.5, T 1; AdamW.

* ``one-copy fused``: sdmprune.recovery.recover's trainer exactly as ``recover_masked_`` runs it: the
  original weights with the pruned channels masked + LoRA as the student, the same weights with
  masks off and adapters disabled as the teacher (hidden states only), the fused LM-head loss.
* ``one-copy fused, checkpointed + offloaded inputs``: the same trainer with gradient checkpointing
  and ``--offload-activations`` (the layer inputs wait in pinned host memory), whatever
  ``--checkpointing`` says: what the recovery memory comes down to, and what the copies cost.
* ``separate teacher + logits``: the usual way: a sliced student (+ LoRA) and a separate unpruned
  teacher copy, full student and teacher logits, CE and KL in PyTorch (float32 softmax).

    python benchmarks/bench_recovery.py --out benchmarks/results     # writes recovery.json
Prints a skip line and writes nothing without CUDA.
"""
import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def llama_1b_config(layers=16):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=8192,
                       rope_theta=500000.0, hidden_act="silu")


def build(config, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def make_rows(seq_len, n_rows, vocab, seed=0):
    from sdmprune.recovery.sft_data import Record, build_rows

    g = torch.Generator().manual_seed(seed)
    recs = []
    while sum(len(r.input_ids) for r in recs) < n_rows * seq_len * 0.97:
        n = int(torch.randint(200, 1200, (1,), generator=g))
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        recs.append(Record(ids, ids))
    return build_rows(recs, seq_len, pad_id=0, packing=True)


def measure(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps, torch.cuda.max_memory_allocated(device)


def run_ours(config, keep, rows, args, device, offload_activations=False):
    from sdmprune.recovery import recover
    from sdmprune.scale.activation_offload import maybe_offload_checkpoint_inputs
    from sdmprune.recovery.lora import apply_lora
    from sdmprune.models import ChannelMasks, get_adapter
    from sdmprune.recovery.trainer import Trainer, self_teacher

    model = build(config, device)
    cfg = recover.FinetuneConfig(batch_size=1, grad_accum=len(rows), seq_len=args.seq_len, alpha=0.5,
                                 temperature=1.0, progress=False, lr=1e-4, lora_dropout=0.05)
    adapter = get_adapter(model)
    masks = ChannelMasks(model, keep)
    peft_model = apply_lora(model, cfg)
    masks.install()
    if args.checkpointing or offload_activations:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(model, adapter, rows, cfg, 10 ** 6,
                      teacher_fn=self_teacher(model, peft_model, adapter, masks))
    trainer.rows_for_step = lambda step: torch.arange(len(rows))  # every row, every step
    with maybe_offload_checkpoint_inputs(model, offload_activations):
        sec, peak = measure(trainer.train_step, args.steps, args.warmup, device)
    del trainer, peft_model, model, masks
    return sec, peak


def run_usual(config, keep, rows, args, device):
    from peft import LoraConfig, get_peft_model

    from sdmprune.models import find_gated_mlps

    teacher = build(config, device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # the usual student: a sliced copy
        for m in find_gated_mlps(student):
            k = keep[m.index].to(device)
            for lin, dim in ((m.gate, 0), (m.up, 0), (m.down, 1)):
                lin.weight = torch.nn.Parameter(lin.weight.index_select(dim, k).contiguous(), requires_grad=False)
            m.gate.out_features = m.up.out_features = m.down.in_features = k.numel()
    student.config.intermediate_size = keep[0].numel()
    student = get_peft_model(student, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]))
    if args.checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    alpha, T = 0.5, 1.0

    def step():
        student.train()
        opt.zero_grad(set_to_none=True)
        n_ce = (rows.targets != -100).sum().item()
        n_kl = rows.kl_mask.sum().item()
        for r in range(len(rows)):
            ids = rows.input_ids[r:r + 1].to(device)
            pos = rows.position_ids[r:r + 1].to(device)
            tgt = rows.targets[r].to(device)
            klm = rows.kl_mask[r].to(device)
            with torch.no_grad():
                zt = teacher(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
            zs = student(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
            ce = F.cross_entropy(zs, tgt, ignore_index=-100, reduction="sum") / n_ce
            logq = F.log_softmax(zs, -1)
            pt = F.softmax(zt / T, -1)
            kl = (pt * (torch.log(pt.clamp_min(1e-30)) - logq)).sum(-1)[klm].sum() / n_kl
            ((1 - alpha) * ce + alpha * kl).backward()
        opt.step()

    sec, peak = measure(step, args.steps, args.warmup, device)
    del student, teacher, opt
    return sec, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=2, help="packed rows per optimizer step (1-row micro-batches)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=5613, help="kept MLP width (20 %% of Llama-3.2-1B)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both paths")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_recovery: skipped (needs a CUDA GPU)")
        return 0
    import peft
    import transformers

    device = torch.device("cuda")
    config = llama_1b_config(args.layers)
    g = torch.Generator().manual_seed(0)
    keep = {i: torch.randperm(config.intermediate_size, generator=g)[:args.width].sort().values
            for i in range(config.num_hidden_layers)}
    rows = make_rows(args.seq_len, args.rows, config.vocab_size)
    tokens = int(rows.kl_mask.sum())
    results = []
    runs = (("one-copy fused (sdmprune)", run_ours), ("separate teacher + logits (usual)", run_usual),
            ("one-copy fused, checkpointed + offloaded inputs (sdmprune)",
             lambda *a: run_ours(*a, offload_activations=True)))
    for name, fn in runs:
        gc.collect()
        torch.cuda.empty_cache()
        try:
            sec, peak = fn(config, keep, rows, args, device)
            results.append({"method": name, "step_seconds": round(sec, 4), "tokens_per_s": round(tokens / sec, 1),
                            "peak_memory_gib": round(peak / 2 ** 30, 3)})
        except torch.cuda.OutOfMemoryError as exc:
            results.append({"method": name, "error": f"out of memory: {str(exc).splitlines()[0]}"})
        print(results[-1], flush=True)
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    out = {
        "benchmark": "recovery step (distilled LoRA, Llama-3.2-1B shape)",
        "device": torch.cuda.get_device_name(device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "triton": tv, "cuda": torch.version.cuda},
        "shape": {"hidden": 2048, "width": 8192, "kept_width": args.width, "layers": args.layers, "vocab": 128256,
                  "tied": True, "dtype": "bf16", "seq_len": args.seq_len, "rows_per_step": args.rows,
                  "tokens_per_step": tokens, "gradient_checkpointing": args.checkpointing},
        "results": results,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "recovery.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
