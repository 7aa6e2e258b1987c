"""Recovery fine-tuning (sdmprune.recovery.recover, sdmprune.recovery.sft_data) on tiny random LLaMA models, CPU.

Tolerances: float32 model vs a float64 materialized-logits reference: rtol 1e-4 / atol 1e-6 on the
loss and 2e-4 relative (max-abs over the tensor) on adapter gradients; exact (0) where the same
float32 ops run (teacher vs unpruned model, resume vs uninterrupted); 2e-5 for merged-then-sliced vs
masked student (the merge re-rounds W + B A in float32).
"""
import copy
import json
import math

import pytest
import torch

from conftest import tiny_model

from sdmprune import cli
from sdmprune.recovery import lora
from sdmprune.recovery import recover
from sdmprune.recovery import trainer
from sdmprune.models import find_gated_mlps, get_adapter
from sdmprune.recovery.recover import FinetuneConfig
from sdmprune.recovery.sft_data import IGNORE_INDEX, Record, build_rows, load_records

TEXT = ("the quick brown fox jumps over the lazy dog. a stitch in time saves nine.\n"
        "all that glitters is not gold; fortune favours the bold.\n") * 12


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _torch_loss_backend(request, monkeypatch):
    """Training-loop tests run the fused loss's PyTorch path (the Triton interpreter is far too slow
    for whole runs; the kernel has its own tests); the float64 check runs the default backend."""
    if "float64" not in request.node.name:
        monkeypatch.setattr(trainer, "LOSS_BACKEND", "torch")


def char_tokenizer(chat_template=None):
    """A character-level fast tokenizer (ids < 100) that fits the tiny models' vocab of 300."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama", seed=3).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(TEXT)
    return p


def fast_cfg(**kw):
    base = dict(seq_len=64, batch_size=2, grad_accum=2, max_steps=4, lr=1e-3, progress=False, save_every=0)
    base.update(kw)
    return FinetuneConfig(**base)


# ----------------------------------------------------------------------------------- data


def test_packed_record_equals_record_alone():
    """A record packed after others gives the same hidden states as alone (no cross attention),
    targets are shifted inside each record, padding has no target and no KL."""
    torch.manual_seed(0)
    model = tiny_model("llama", seed=1)
    recs = [Record(torch.randint(4, 300, (n,)).tolist(), torch.randint(4, 300, (n,)).tolist()) for n in (7, 11, 5)]
    rows = build_rows(recs, 30, pad_id=3, packing=True)
    assert len(rows) == 1 and rows.position_ids[0].tolist()[:23] == list(range(7)) + list(range(11)) + list(range(5))
    body = get_adapter(model).body(model)
    with torch.no_grad():
        packed = body(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).last_hidden_state
        start = 0
        for r in recs:
            alone = body(input_ids=torch.tensor([r.input_ids]), use_cache=False).last_hidden_state
            torch.testing.assert_close(packed[0, start:start + len(r.input_ids)], alone[0], rtol=1e-5, atol=1e-5)
            tg = rows.targets[0, start:start + len(r.input_ids)].tolist()
            assert tg == r.labels[1:] + [IGNORE_INDEX]
            start += len(r.input_ids)
    assert rows.targets[0, start:].eq(IGNORE_INDEX).all() and not rows.kl_mask[0, start:].any()
    assert rows.kl_mask[0, :start].all()
    # without packing: one record per row
    assert len(build_rows(recs, 30, pad_id=3, packing=False)) == 3


@pytest.mark.parametrize("template", [None, CHAT])
def test_instruction_loss_on_response_only(tmp_path, template):
    tok = char_tokenizer(template)
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "add", "input": "2+2", "output": "four"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                      {"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"}]},
    ]))
    records, desc = load_records(p, tok, 64)
    assert desc["records"] == 2
    got = [tok.decode([t for t in r.labels if t != IGNORE_INDEX]) for r in records]
    if template:  # every assistant turn, with the template's end-of-turn token
        assert got[0] == "four</s>\n</s>" or got[0].startswith("four</s>")
        assert got[1].startswith("yo</s>") and "sure</s>" in got[1] and "hi" not in got[1]
    else:
        assert got[0] == "four</s>"
        assert got[1] == "sure</s>"  # Alpaca rendering: the last response only
    full = tok.decode(records[0].input_ids)
    assert "add" in full and "2+2" in full


# ----------------------------------------------------------------------------------- loss/grad


def _reference_step(ad, model64, rows, idx, alpha, T, teacher64):
    """float64 materialized logits: (1-a) CE(mean over step) + a KL(mean over real tokens)."""
    ids, pos = rows.input_ids[idx], rows.position_ids[idx]
    tgt, klm = rows.targets[idx].reshape(-1), rows.kl_mask[idx].reshape(-1)
    h = ad.body(model64)(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    w = ad.lm_head(model64).weight
    z = (h @ w.T).reshape(-1, w.shape[0])
    ce = torch.nn.functional.cross_entropy(z, tgt, ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        zt = teacher64(ids, pos).reshape(-1, z.shape[-1])
    pt = torch.softmax(zt / T, -1)
    kl_rows = (pt * (torch.log(pt) - torch.log_softmax(z, -1))).sum(-1)
    kl = kl_rows[klm].sum() / klm.sum()
    return (1 - alpha) * ce + alpha * kl


def test_distill_loss_and_adapter_grads_match_float64_reference(tmp_path):
    """One step (2 micro-batches, instruction-style labels, padding) of the distilled LoRA loss:
    loss and every adapter gradient equal a float64 materialized-logits reference."""
    torch.manual_seed(0)
    recs = []
    for n in (9, 14, 6, 20, 12):
        ids = torch.randint(4, 300, (n,)).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2:]
        recs.append(Record(ids, labels))
    rows = build_rows(recs, 24, pad_id=3, packing=True)
    cfg = FinetuneConfig(lora_dropout=0.0, alpha=0.6, temperature=0.7, batch_size=1, grad_accum=len(rows),
                         seq_len=24, progress=False)
    model = tiny_model("llama", seed=5)
    adapter = get_adapter(model)
    torch.manual_seed(1)
    peft_model = lora.apply_lora(model, cfg)
    with torch.no_grad():  # lora_B is zero at init: make the student differ from the teacher
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    loop = trainer.Trainer(model, adapter, rows, cfg, 1, teacher_fn=trainer.self_teacher(model, peft_model, adapter))
    idx = torch.arange(len(rows))
    model.train()
    loss, ce, kl = loop.accumulate(idx)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())

    # float64 copy of the LoRA-injected model; its teacher pass disables the copied LoRA layers.
    m64 = copy.deepcopy(model).double()
    lora_layers = [mod for mod in m64.modules() if hasattr(mod, "lora_A") and hasattr(mod, "enable_adapters")]
    assert lora_layers

    def teacher64(ids, pos):
        for mod in lora_layers:
            mod.enable_adapters(False)
        try:
            h = adapter.body(m64)(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        finally:
            for mod in lora_layers:
                mod.enable_adapters(True)
        return h @ adapter.lm_head(m64).weight.T

    m64.train()
    ref = _reference_step(adapter, m64, rows, idx, cfg.alpha, cfg.temperature, teacher64)
    ref.backward()
    assert math.isclose(loss, float(ref), rel_tol=1e-4, abs_tol=1e-6), (loss, float(ref))
    assert kl > 1e-4  # the KL term is really exercised
    named64 = dict(m64.named_parameters())
    for n, g in grads.items():
        g64 = named64[n].grad
        err = (g.double() - g64).abs().max() / g64.abs().max()
        assert err < 2e-4, (n, float(err))


# ----------------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_lowers_loss_and_writes_loadable_output(tmp_path, model_dir, text_file, method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    lr = 2e-2 if method == "lora" else 3e-3
    rep = recover.finetune(str(model_dir), str(text_file), out,
                           fast_cfg(method=method, max_steps=10, lr=lr, merge=(method == "lora"),
                                    dtype="fp32"))  # the same check on CPU and GPU
    losses = [h["loss"] for h in rep["training"]["losses"]]
    # a random model starts at ~ln(300) = 5.7 nats; the repeated text is quickly learnable
    drop = 0.25 if method == "lora" else 0.5  # nats, mean of the last two steps vs the first two
    assert len(losses) == 10 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - drop, losses
    meta = json.loads((out / "sdmprune.json").read_text())
    assert meta["recipe"]["method"] == method and meta["training"]["steps"] == 10
    assert meta["data"]["data"]["kind"].startswith("plain text") and meta["timings"]["train_seconds"] > 0
    assert not recover.checkpoint_dir(out).exists()
    probe = torch.randint(4, 100, (1, 16))
    if method == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_dir)
        peft_model = PeftModel.from_pretrained(base, out).eval()
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        with torch.no_grad():
            torch.testing.assert_close(peft_model(probe).logits, merged(probe).logits, rtol=1e-4, atol=1e-4)
            plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
            assert (plain(probe).logits - merged(probe).logits).abs().max() > 1e-3  # it did change
    else:
        full = AutoModelForCausalLM.from_pretrained(out).eval()
        assert full.config.intermediate_size == 160


def test_distilled_finetune_with_teacher_runs(tmp_path, model_dir, text_file):
    """--distill --teacher on a sliced dir: the teacher (wider) is loaded separately."""
    from sdmprune.slicing import prune_model_
    from transformers import AutoModelForCausalLM

    sliced = tmp_path / "sliced"
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    prune_model_(m, {i: torch.arange(0, 160, 2) for i in range(2)})
    m.save_pretrained(sliced)
    (sliced / "sdmprune.json").write_text("{}")
    out = tmp_path / "out"
    rep = recover.finetune(str(sliced), str(text_file), out,
                           fast_cfg(distill=True, teacher=str(model_dir), max_steps=3), tokenizer=char_tokenizer())
    assert rep["teacher_kind"] == "separate model"
    assert all(h["kl"] > 0 for h in rep["training"]["losses"])


def test_resume_equals_uninterrupted(tmp_path, model_dir, text_file):
    from safetensors.torch import load_file

    cfg = dict(max_steps=5, lora_dropout=0.1, save_every=2)
    a = tmp_path / "a"
    recover.finetune(str(model_dir), str(text_file), a, fast_cfg(**cfg))
    b = tmp_path / "b"
    with pytest.raises(recover.Interrupted):
        recover.finetune(str(model_dir), str(text_file), b, fast_cfg(stop_after=3, **cfg))
    assert not b.exists() and (recover.checkpoint_dir(b) / trainer.CHECKPOINT_FILE).is_file()
    rep = recover.finetune(str(model_dir), str(text_file), b, fast_cfg(resume=True, **cfg))
    assert rep["resumed_from_step"] == 3
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = json.loads((a / "sdmprune.json").read_text())["training"]["losses"]
    lb = json.loads((b / "sdmprune.json").read_text())["training"]["losses"]
    assert [h["loss"] for h in la] == [h["loss"] for h in lb]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_offloaded_activations_train_the_same(tmp_path, model_dir, text_file, method, device, monkeypatch):
    """--offload-activations (with checkpointing) changes where the layer inputs wait, not the numbers:
    the same losses and weights as the checkpointed run without it, every input out and back once,
    the last one of each forward prefetched before backward. LoRA distils from itself (adapters off: the
    teacher's no-grad forward runs through the same hooked body before the student's); full fine-tuning
    from a separate teacher model. The device and dtype are pinned (the defaults pick CUDA and bf16 on a
    GPU host); on CUDA the tiny model's layer inputs (32 KiB) are under the 1 MiB offload threshold, so
    the test lowers it through the module's own knob to offload them through pinned memory too."""
    import contextlib

    from safetensors.torch import load_file
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sdmprune.scale import activation_offload

    attention = contextlib.nullcontext
    if device == "cuda":
        monkeypatch.setattr(activation_offload, "DEFAULT_MIN_BYTES", 0)
        # float32 SDPA on CUDA picks the memory-efficient kernel, whose backward may add in any order:
        # the math backend keeps the two runs comparable bit for bit
        attention = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731 - a fresh context per run
    cfg = dict(method=method, distill=True, max_steps=3, gradient_checkpointing=True, lr=1e-2, dtype="fp32",
               device=device, teacher=None if method == "lora" else str(model_dir))
    reps, weights = [], []
    for offload in (False, True):
        out = tmp_path / f"out{int(offload)}"
        with attention():
            reps.append(recover.finetune(str(model_dir), str(text_file), out,
                                         fast_cfg(offload_activations=offload, **cfg)))
        name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
        weights.append(load_file(out / name))
    assert [h["loss"] for h in reps[0]["training"]["losses"]] == [h["loss"] for h in reps[1]["training"]["losses"]]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    st = reps[1]["training"]["activation_offload"]
    micro_batches = 3 * 2  # max_steps x grad_accum
    assert st["offloaded"] == st["fetched"] == 2 * micro_batches  # two decoder layers per forward
    assert st["prefetched"] == st["fetched"] and st["fetched_on_demand"] == 0
    assert "activation_offload" not in reps[0]["training"]


# ----------------------------------------------------------------------------------- one copy


def test_recover_masked_one_copy(monkeypatch):
    """Student = masked original + LoRA, teacher = unmasked original without adapters, one set of
    base storages; merged-then-sliced equals the masked student with adapters."""
    torch.manual_seed(0)
    model = tiny_model("llama", seed=7, layers=2, width=96)
    original = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    keep = {m.index: torch.randperm(96, generator=g)[:56].sort().values for m in find_gated_mlps(model)}
    tokens = torch.randint(4, 300, (8, 32), generator=g)
    before = lora.base_storage_pointers(model)

    seen = {"teacher_calls": 0}
    real_teacher = recover.self_teacher

    def spy_teacher(model_, peft_model, adapter, masks=None):
        fn = real_teacher(model_, peft_model, adapter, masks)

        def wrapped(ids, pos):
            h, w = fn(ids, pos)
            with torch.no_grad():
                ref = get_adapter(original).body(original)(input_ids=ids, position_ids=pos, use_cache=False)
            # same weights; inside a training step the norms and rotary run sdmprune's ops
            # (models.fused_layer_ops), so equal up to float32 rounding
            torch.testing.assert_close(h, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
            assert w is None  # shared LM head
            now = lora.base_storage_pointers(model_)
            assert {k: now[k] for k in before} == before  # LoRA wrapping copied no base weight
            norms = [m for m in model_.modules() if type(m).__name__.endswith("RMSNorm")]
            assert norms and all("forward" in m.__dict__ for m in norms)  # swapped during the step
            seen["teacher_calls"] += 1
            return h, w
        return wrapped

    probe = torch.randint(4, 300, (2, 20), generator=g)

    def record_student(m):
        with torch.no_grad():
            seen["student"] = m(input_ids=probe, use_cache=False).logits.clone()
    monkeypatch.setattr(recover, "self_teacher", spy_teacher)
    monkeypatch.setattr(recover, "_before_merge_hook", record_student)
    cfg = FinetuneConfig(lr=5e-3, batch_size=2, grad_accum=2, alpha=0.5, temperature=1.0, progress=False)
    stats = recover.recover_masked_(model, keep, None, tokens, 3, cfg)
    assert stats["steps"] == 3 and seen["teacher_calls"] == 3 * 2 and stats["base_storage_unchanged"]
    assert lora.base_storage_pointers(model) == before
    assert not any("forward" in m.__dict__ for m in model.modules())  # the norms' own forwards are back
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert all(not h for m in find_gated_mlps(model) for h in [m.down._forward_pre_hooks])
    assert not hasattr(model, "peft_config")
    # the merged weights changed (LoRA trained), and slicing them gives the masked student
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters()))
    from sdmprune.slicing import prune_model_

    prune_model_(model, keep)
    assert all(m.width == 56 for m in find_gated_mlps(model))
    with torch.no_grad():
        out = model(input_ids=probe, use_cache=False).logits
    torch.testing.assert_close(out, seen["student"], rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def sliced_dir(tmp_path_factory, model_dir):
    d = tmp_path_factory.mktemp("sliced") / "m"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    (d / "sdmprune.json").write_text(json.dumps({"kind": "prune"}))
    return d


@pytest.mark.parametrize("case", ["missing", "empty", "no_response", "seq_len", "distill_sliced", "lora_full",
                                  "offload_no_ckpt"])
def test_bad_input_one_line_nothing_written(tmp_path, capsys, model_dir, sliced_dir, text_file, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"instruction": "z"}) + "\n")
    out = tmp_path / "out"
    model, extra = str(model_dir), []
    data = str(text_file)
    if case == "missing":
        data = str(tmp_path / "nope.jsonl")
    elif case == "empty":
        data = str(empty)
    elif case == "no_response":
        data = str(bad)
    elif case == "seq_len":
        extra = ["--seq-len", "257"]
    elif case == "distill_sliced":
        model, extra = str(sliced_dir), ["--distill"]
    elif case == "lora_full":
        extra = ["--lora", "--full"]
    elif case == "offload_no_ckpt":
        extra = ["--offload-activations"]
    rc = cli.main(["finetune", model, "--data", data, "--out", str(out), "--max-steps", "1", "--no-progress",
                   "--seq-len", "64"] + extra if case != "seq_len" else
                  ["finetune", model, "--data", data, "--out", str(out), "--max-steps", "1", "--no-progress"] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("sdmprune finetune: error:"), err
    assert not out.exists() and not recover.checkpoint_dir(out).exists()
    assert {"missing": "no such file", "empty": "empty", "no_response": "no response", "seq_len": "positions",
            "distill_sliced": "--teacher", "lora_full": "--lora and --full",
            "offload_no_ckpt": "needs --gradient-checkpointing"}[case] in err[0]


def test_lora_setup_raises_no_deprecation_the_user_cannot_act_on():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model: every
    recovery printed that FutureWarning. Other warnings still reach the user."""
    import warnings

    model = tiny_model("llama", seed=5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lora.apply_lora(model, FinetuneConfig(lora_dropout=0.0))
        warnings.warn("still shown", FutureWarning)
    messages = [str(w.message) for w in seen]
    assert not [m for m in messages if "is_gradient_checkpointing" in m], messages
    assert "still shown" in messages
