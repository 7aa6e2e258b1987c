"""Memory planning: predict the peak GPU memory of a prune from the model config alone.

``sdmprune plan MODEL`` reads only a config (a Hugging Face directory or id, a ``.gguf`` file's
metadata, or a built-in shape name such as ``llama-3.1-8b``) and prints, per GPU, what a prune
holds at its peak -- weights, cached teacher states, activations, scratch -- and the largest
batch (samples per backward pass, per rank) that fits a stated budget.

The model (``predict_peak_memory``) follows what the engines keep alive, per rank, with
``T = batch_size * seq_len`` tokens per pass, model dtype of ``b`` bytes, ``P`` parameters,
``d`` hidden, ``I`` MLP width, ``n`` decoder layers, ``V`` vocabulary:

* weights: ``P*b`` (one copy; the stage-2 student is the same weights with a channel mask).
  ``shard="fsdp"``: ``ceil(P_layers/g)*b`` of sharded layers + two gathered layers (the one
  running and the prefetched next) + the non-layer parameters. ``offload="cpu"``: the non-layer
  parameters + two layer buffers (double buffering); the layers live in pinned host memory.
  The reference engine of the weight-Taylor methods (sdmprune, taylor) holds the bf16 MLP weight
  gradients and an ``I x d`` element-score matrix per layer, and for sdmprune's stage 2 a second
  (teacher) copy; hfprune's reference loop holds one frozen copy.
* teacher cache (sdmprune only): stage 2 reads the cached final hidden states of the batch,
  ``T*d*b`` on the GPU (the whole cache, ``N*L*d*b``, lives in host memory).
* activations: with per-layer gradient checkpointing, each layer's input ``T*d*b`` is kept (with
  ``offload_activations`` they wait in pinned host memory and two are on the GPU at once), plus
  one layer recomputed and back-propagated at a time (attention projections; the RMSNorms keep their
  input and a float32 1/rms per row; the MLP saves only its input and back-propagates in chunks of
  whole samples holding five ``chunk x I`` temporaries, six for hfprune, whose activation score
  still reads dL/dH; chunk = 256 MiB worth, at least one sample). Without checkpointing every
  layer's saved tensors are kept (the MLP's gate/up outputs among them). hfprune's reference loop
  also keeps every layer's down_proj input and its gradient, ``2*T*I*b`` per layer.
* scratch: the loss and the importance op. The fused LM-head loss holds float32 per-token
  statistics and one token x vocabulary tile (with a teacher column for sdmprune's stage 2); the
  unfused loss (reference engine) holds the logits and their float32 copies, softmaxes and
  gradient, ``T*V`` each. The fused importance op holds a float32 score vector per layer; the torch
  backend of the weight score forms one float32 ``I x d`` product per sample, that of the activation
  score float32 products of a fixed number of elements.

These are estimates of the dominant terms, not allocator-exact numbers: ``bench_pipeline.py``
prints the measured peak beside the prediction.

The refit stage (``--refit ls``, sdmprune.compensation) runs after the scoring passes, whose tensors are
gone by then; ``predict_refit_memory`` gives its own peak, with ``k`` the kept width:

* weights: the resident model (``P*b``), or under ``--offload``/``--shard`` the one layer being refit;
* Grams: two ``I x I`` matrices (fit and held-out windows), float32 on a GPU (float64 on a CPU),
  doubled while the ranks sum them;
* activations: one batch through one decoder layer, without gradients (its norms, attention and MLP
  outputs and the float32 copy of the down_proj input the Grams are fed);
* solve, float64, the largest of three moments: forming ``W G[:, S]`` and ``G_SS`` (both Grams alive,
  ``W``, ``G[:, S]``), forming the held-out parts (the held-out Gram, ``W``, ``H[:, S]``, a column chunk
  of ``W H``), and solving the candidates (``G_SS``, ``H_SS``, the shifted system and its Cholesky
  factor: four ``k x k``, and about nine ``d x k``);
* host: the hidden states of this rank's calibration windows, ``N*L*d*b``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional

from .errors import InputError, require_extra

GiB = 1024 ** 3
MiB = 1024 ** 2

# Bytes per CUDA allocator context + cuBLAS workspaces + fragmentation headroom, per GPU.
RUNTIME_OVERHEAD = 512 * MiB

ENGINES = ("fused", "torch", "reference")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a LLaMA-family decoder that memory depends on."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    name: str = ""
    # parameters counted on the model itself (a meta-device build of its config: biases, extra norms and
    # all); None for shapes known only by their dimensions, which use the LLaMA formula below
    counted_parameters: Optional[int] = None
    counted_layer_parameters: Optional[int] = None
    # positions the model has (a --seq-len past them is refused, as prune refuses it); None: not known
    max_position_embeddings: Optional[int] = None

    @property
    def layer_parameters(self) -> int:
        if self.counted_layer_parameters is not None:
            return self.counted_layer_parameters
        d, hd = self.hidden_size, self.head_dim
        attn = d * self.num_attention_heads * hd * 2 + d * self.num_key_value_heads * hd * 2
        mlp = 3 * d * self.intermediate_size
        return attn + mlp + 2 * d  # + input and post-attention RMSNorm weights

    @property
    def other_parameters(self) -> int:
        """Embedding, final norm and (untied) LM head."""
        if self.counted_parameters is not None:
            return self.counted_parameters - self.num_hidden_layers * self.layer_parameters
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def parameters(self) -> int:
        if self.counted_parameters is not None:
            return self.counted_parameters
        return self.num_hidden_layers * self.layer_parameters + self.other_parameters


def _shape(name, d, i, n, v, h, kv, tied, head_dim=None, positions=None):
    return ModelShape(d, i, n, v, h, kv, head_dim or d // h, tied, name, max_position_embeddings=positions)


# Built-in shapes for users without the model files (dims from the published configs).
BUILTIN_SHAPES: Dict[str, ModelShape] = {
    s.name: s
    for s in (
        _shape("smollm2-135m", 576, 1536, 30, 49152, 9, 3, True, positions=8192),
        _shape("llama-3.2-1b", 2048, 8192, 16, 128256, 32, 8, True, 64, 131072),
        _shape("llama-3.2-3b", 3072, 8192, 28, 128256, 24, 8, True, 128, 131072),
        _shape("llama-3.1-8b", 4096, 14336, 32, 128256, 32, 8, False, 128, 131072),
        _shape("llama-3.1-70b", 8192, 28672, 80, 128256, 64, 8, False, 128, 131072),
        _shape("qwen2.5-7b", 3584, 18944, 28, 152064, 28, 4, False, 128, 131072),
        _shape("mistral-7b", 4096, 14336, 32, 32768, 32, 8, False, 128, 32768),
    )
}

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of ``dtype`` (a torch.dtype or a name such as "bf16")."""
    if hasattr(dtype, "itemsize"):
        return int(dtype.itemsize)
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPE_BYTES:
        raise InputError(f"unknown dtype {dtype!r} (use one of bf16, fp16, fp32)")
    return _DTYPE_BYTES[key]


def shape_of(config: Any) -> ModelShape:
    """A ModelShape from a ModelShape, a transformers config or a dict of config fields. A transformers
    config's parameters are counted on a meta-device build of it (models.count_parameters, the count
    the width plan uses), so biases and extra norms are included."""
    if isinstance(config, ModelShape):
        return config
    get = config.get if isinstance(config, dict) else (lambda k, default=None: getattr(config, k, default))
    text = get("text_config", None)  # multimodal wrappers keep the decoder config inside
    if text is not None and get("hidden_size", None) is None:
        return shape_of(text)
    try:
        d = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        shape = ModelShape(
            hidden_size=d,
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            vocab_size=int(get("vocab_size")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads", None) or heads),
            head_dim=int(get("head_dim", None) or d // heads),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            name=str(get("name_or_path", "") or get("_name_or_path", "") or ""),
            max_position_embeddings=int(get("max_position_embeddings", None) or 0) or None,
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"config lacks the fields of a LLaMA-family decoder ({exc})") from None
    if not isinstance(config, dict) and hasattr(config, "to_dict"):
        shape = replace(shape, **_counted(config))
    return shape


def _counted(config) -> dict:
    """{counted_parameters, counted_layer_parameters} of a transformers config (meta device, no memory)."""
    from .models import count_parameters, get_adapter, meta_model_from_config

    try:
        model = meta_model_from_config(config)
        layer = get_adapter(model).decoder_layers(model)[0]
    except Exception:  # noqa: BLE001 - a config transformers cannot build keeps the formula
        return {}
    return {"counted_parameters": count_parameters(model), "counted_layer_parameters": count_parameters(layer)}


def predict_peak_memory(config: Any, seq_len: int, batch_size: int, dtype: Any = "bf16", gpus: int = 1,
                        shard: Optional[str] = None, offload: Optional[str] = None, engine: str = "fused",
                        gradient_checkpointing: bool = True,
                        loss_token_chunk: Optional[int] = None,
                        offload_activations: bool = False, method: str = "sdmprune") -> Dict[str, int]:
    """Predicted peak memory of one GPU (one rank) during a prune, in bytes.

    ``batch_size`` is samples per backward pass on one rank; ``engine`` is "fused" (Triton kernels),
    "torch" (the same design with the PyTorch backends) or "reference" (two model copies, weight
    gradients, full logits). Returns {"weights", "teacher_cache", "activations", "loss_scratch",
    "importance_scratch", "overhead", "total"} on the GPU plus "host_weights" and
    "host_teacher_cache_per_sample" (host memory, not in "total"). ``loss_token_chunk`` is
    PruneConfig.loss_token_chunk (None: the loss's own 768 MiB chunk plan). ``offload_activations``:
    PruneConfig.offload_activations (needs checkpointing); its host copies are "host_activations".
    ``method``: the gradient method, "sdmprune" (two stages, the second against cached teacher states),
    "taylor" (CE, one stage) or "hfprune" (entropy, activation Taylor, one stage).
    """
    from .scoring.taylor import ACTIVATION_SCORED, DISTILLING, OBJECTIVES

    s = shape_of(config)
    if seq_len < 1 or batch_size < 1 or gpus < 1:
        raise InputError("seq_len, batch_size and gpus must be >= 1")
    if shard not in (None, "fsdp"):
        raise InputError(f"unknown shard mode {shard!r} (supported: fsdp)")
    if offload not in (None, "cpu"):
        raise InputError(f"unknown offload target {offload!r} (supported: cpu)")
    if method not in OBJECTIVES:
        raise InputError(f"the memory model covers the gradient methods ({', '.join(OBJECTIVES)}), not {method!r}")
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r} (supported: {', '.join(ENGINES)})")
    if shard and offload:
        raise InputError("--shard fsdp and --offload cpu are exclusive")
    if offload_activations and (not gradient_checkpointing or engine == "reference"):
        raise InputError("offload_activations moves checkpointed layer inputs: it needs gradient checkpointing "
                         "and the fused or torch engine")
    b = dtype_bytes(dtype)
    d, I, n, V = s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.vocab_size
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    T = seq_len * batch_size
    layer_bytes = s.layer_parameters * b

    host_weights = 0
    if offload == "cpu":
        weights = s.other_parameters * b + 2 * layer_bytes
        host_weights = n * layer_bytes
    elif shard == "fsdp":
        # layers sharded 1/g; the root's embedding/head kept whole (the loss reads the head weight)
        weights = math.ceil(n * s.layer_parameters / gpus) * b + 2 * layer_bytes + s.other_parameters * b
    else:
        weights = s.parameters * b
    distils = method in DISTILLING  # cached teacher states; the reference loop's teacher copy
    activation_score = method in ACTIVATION_SCORED  # weights frozen: no weight gradients, H and dL/dH kept
    if engine == "reference" and not activation_score:
        # bf16 weight gradients of every MLP matrix + an I x d element-score matrix per layer (+ the teacher copy)
        weights = (2 if distils else 1) * weights + n * 3 * I * d * b + n * I * d * b

    # stage 2 reads the batch's cached teacher hidden states
    teacher_cache = T * d * b if distils and engine != "reference" else 0

    # one decoder layer's live tensors while it is recomputed and back-propagated
    attn = T * (3 * d + 2 * q + 3 * kv) * b + T * s.num_attention_heads * 4  # norm out, q/k/v (+rope), attn out, o; lse
    if engine == "reference":
        norms = 2 * T * d * 4  # transformers' RMSNorm keeps a float32 copy of its input, two per layer
        # autograd's MLP: gate/up outputs, act*up, their gradients (dG, dU reuse), dY, dX
        mlp_saved, mlp_backward = T * 4 * I * b, 2 * T * d * b
    else:
        from sdmprune.kernels.gated_mlp import BACKWARD_CHUNK_BYTES

        # kernels.rms_norm keeps its input and a float32 1/rms per row: the post-attention norm's input
        # (the residual sum) is new, the input norm's is the layer input (the checkpoint's, or without
        # checkpointing the residual stream, then kept as well)
        norms = (1 if gradient_checkpointing else 2) * T * d * b + 2 * T * 4
        # kernels.gated_mlp: with checkpointing the MLP saves only x and its backward recomputes gate/up
        # in chunks of whole samples (5 [C, I] temporaries); without, it saves gate/up (2 [T, I]) and
        # backward holds 3 [C, I] temporaries. dY and dX are [T, d].
        per_token = ((5 if gradient_checkpointing else 3) + activation_score) * I * b
        C = min(T, max(seq_len, BACKWARD_CHUNK_BYTES // per_token // seq_len * seq_len))
        mlp_saved = 0 if gradient_checkpointing else T * 2 * I * b
        mlp_backward = C * per_token + 2 * T * d * b
    one_layer = attn + norms + mlp_saved + mlp_backward
    if gradient_checkpointing:
        # layer inputs (offloaded: the one in use and the one prefetched, or in forward the one being
        # copied out and the next) + one layer + residual grads
        resident_inputs = min(n, 2) if offload_activations else n
        activations = resident_inputs * T * d * b + one_layer + 2 * T * d * b
    else:
        saved = T * (3 * d + 2 * q + 3 * kv) * b + mlp_saved + (norms // 2 if engine == "reference" else norms)
        activations = n * saved + one_layer
    activations += 2 * T * d * b  # final hidden states and their gradient
    if engine == "reference" and activation_score:
        activations += n * 2 * T * I * b  # every down_proj input and its retained gradient

    if engine == "reference":
        # logits (dtype) + their float32 copy, log-softmax and gradient (sdmprune: the teacher's
        # float32 softmax; hfprune: the probabilities)
        loss_scratch = T * V * (b + 4 * (3 if method == "taylor" else 4))
    else:
        # the launcher's own chunk plan (GPU defaults of the backend the engine uses), the gradient of the
        # student hidden states it holds from forward to backward, and a few float32 per-row statistics
        import torch

        from sdmprune.kernels.fused_linear_distill_loss import plan_chunks

        tdtype = {2: torch.bfloat16, 4: torch.float32}.get(b, torch.float32)
        chunks = plan_chunks(T, V, d, tdtype, "cuda", has_teacher=distils,
                             backend="triton" if engine == "fused" else "torch", token_chunk=loss_token_chunk)
        loss_scratch = chunks.scratch_bytes + T * d * b + T * 4 * 8

    scores = n * I * 4
    if engine == "reference":
        importance_scratch = scores if activation_score else 0  # the weight scores: counted with the weights
    elif engine == "fused":
        importance_scratch = scores
    elif activation_score:
        from sdmprune.kernels.activation_taylor import TORCH_CHUNK_ELEMS

        # float32 copies of H and dL/dH of one token chunk and their product
        importance_scratch = scores + 3 * min(T * I, TORCH_CHUNK_ELEMS) * 4
    else:
        importance_scratch = scores + 2 * I * d * 4  # one float32 per-sample I x d product + abs temp

    out = {
        "weights": int(weights),
        "teacher_cache": int(teacher_cache),
        "activations": int(activations),
        "loss_scratch": int(loss_scratch),
        "importance_scratch": int(importance_scratch),
        "overhead": RUNTIME_OVERHEAD,
    }
    out["total"] = sum(out.values())
    out["host_weights"] = int(host_weights)
    out["host_activations"] = int(n * T * d * b) if offload_activations else 0
    out["host_teacher_cache_per_sample"] = seq_len * d * b if distils else 0
    return out


def predict_refit_memory(config: Any, seq_len: int, batch_size: int, width: Optional[int] = None,
                         dtype: Any = "bf16", gpus: int = 1, shard: Optional[str] = None,
                         offload: Optional[str] = None, gram_bytes: int = 4, samples: int = 1) -> Dict[str, int]:
    """Predicted peak memory of the refit stage on one GPU (one rank), in bytes: {"weights", "grams",
    "activations", "solve", "overhead", "total"} plus "host_stream" (host memory, not in "total").
    ``width``: the kept MLP width k (default: I, an upper bound); ``batch_size``: windows per layer
    forward; ``gram_bytes``: 4 (float32 Grams, GPU) or 8 (float64, CPU); ``samples``: calibration
    windows of this rank (for the host term). See the module docstring for the terms."""
    from .compensation import QUADRATIC_CHUNK

    s = shape_of(config)
    b = dtype_bytes(dtype)
    d, I = s.hidden_size, s.intermediate_size
    k = I if width is None else int(width)
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    T = seq_len * batch_size
    weights = s.layer_parameters * b if (shard or offload) else s.parameters * b
    grams = 2 * I * I * gram_bytes
    reducing = grams if gpus > 1 else 0  # the ranks' sum gathers both into one flat buffer
    # layer input and output, norm outputs with a float32 intermediate, q/k/v (+rope), attention and o
    # outputs; gate, up, act, act*up and the masked copy; the down_proj input for the Grams
    activations = T * ((6 * d + 2 * q + 4 * kv) * b + 2 * d * 4 + 5 * I * b + I * gram_bytes)
    f64 = 8
    gather = I * k * (gram_bytes + f64 if gram_bytes != f64 else f64)  # G[:, S] gathered, then float64
    chunk = min(QUADRATIC_CHUNK, I)
    forming = 2 * I * I * gram_bytes + d * I * f64 + gather + (k * k + 2 * d * k) * f64
    # a float64 copy of a column chunk of H (none when H is float64 already) and two [d, chunk] products
    chunk_copy = I * chunk * f64 if gram_bytes != f64 else 0
    held_out = (I * I * gram_bytes + (2 * d * k + k * k) * f64 + d * I * f64 + gather + (d * k + k * k) * f64
                + chunk_copy + 2 * d * chunk * f64)
    candidates = (4 * k * k + 9 * d * k) * f64
    solve = max(forming, held_out, candidates)
    out = {"weights": int(weights), "grams": int(grams + reducing), "activations": int(activations),
           "solve": int(solve), "overhead": RUNTIME_OVERHEAD}
    out["total"] = out["weights"] + max(out["grams"] + out["activations"], out["solve"]) + out["overhead"]
    out["host_stream"] = int(samples * seq_len * d * b)
    return out


def largest_batch(config: Any, seq_len: int, budget_bytes: int, max_batch: int = 4096, **kw) -> int:
    """The largest batch_size whose predicted total fits ``budget_bytes`` (0 when even 1 does not)."""
    config = shape_of(config)  # once, not once per probe
    if predict_peak_memory(config, seq_len, 1, **kw)["total"] > budget_bytes:
        return 0
    lo, hi = 1, max_batch
    while lo < hi:  # the prediction grows monotonically with the batch
        mid = (lo + hi + 1) // 2
        if predict_peak_memory(config, seq_len, mid, **kw)["total"] <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": MiB, "mb": 10 ** 6, "mib": MiB,
          "g": GiB, "gb": 10 ** 9, "gib": GiB, "t": 1024 ** 4, "tb": 10 ** 12, "tib": 1024 ** 4}


def parse_size(text: str) -> int:
    """Bytes from a size such as "16GiB", "16G", "500MB", "1.5GiB" (plain numbers are bytes)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"cannot read memory size {text!r} (examples: 16GiB, 40GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def shape_from_gguf(path: str) -> ModelShape:
    """Read a decoder's dims from GGUF metadata (the tensors are not read)."""
    require_extra("gguf", "reading a .gguf file")
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")

    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        return f.parts[f.data[0]].tolist()[0] if f.data else default

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    d = field(f"{arch}.embedding_length")
    heads = field(f"{arch}.attention.head_count")
    vocab = field(f"{arch}.vocab_size")
    if vocab is None:
        tok = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tok.data) if tok is not None else None
    names = {t.name for t in reader.tensors}
    if None in (d, heads, vocab) or field(f"{arch}.block_count") is None:
        raise InputError(f"{path}: GGUF metadata lacks the decoder dimensions")
    return ModelShape(
        hidden_size=int(d),
        intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(field(f"{arch}.block_count")),
        vocab_size=int(vocab),
        num_attention_heads=int(heads),
        num_key_value_heads=int(field(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(field(f"{arch}.attention.key_length", int(d) // int(heads))),
        tie_word_embeddings="output.weight" not in names,
        name=os.path.basename(path),
        max_position_embeddings=field(f"{arch}.context_length"),
    )


def resolve_shape(model: str, trust_remote_code: bool = False) -> ModelShape:
    """The shape of MODEL: a built-in shape name, a .gguf file, the smollm2-135m alias, or a
    transformers config (a directory or a hub id, checked like every model: sdmprune.loading).
    Never reads weights."""
    from .loading import alias_path, resolve_model

    gguf_path = model if model.endswith(".gguf") else alias_path(model)
    if gguf_path is not None:
        if not os.path.exists(gguf_path):
            raise InputError(f"{gguf_path}: no such file")
        return replace(shape_from_gguf(gguf_path), name=model)
    if model.lower() in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[model.lower()]
    try:
        src = resolve_model(model, trust_remote_code=trust_remote_code)
    except InputError as exc:
        raise InputError(f"{exc} (or name a built-in shape: {', '.join(BUILTIN_SHAPES)})") from None
    return replace(shape_of(src.config), name=model)


def format_plan(shape: ModelShape, pred: Dict[str, int], batch_size: int, fit: Optional[int],
                budget: Optional[int], args_desc: str) -> str:
    gib = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
    lines = [
        f"model {shape.name or '?'}: {shape.parameters / 1e9:.3f} B parameters, d={shape.hidden_size}, "
        f"I={shape.intermediate_size}, layers={shape.num_hidden_layers}, V={shape.vocab_size}",
        f"setting: {args_desc}",
        f"predicted peak per GPU at batch {batch_size}:",
        f"  weights             {gib(pred['weights'])}",
        f"  teacher states      {gib(pred['teacher_cache'])}",
        f"  activations         {gib(pred['activations'])}",
        f"  loss scratch        {gib(pred['loss_scratch'])}",
        f"  importance scratch  {gib(pred['importance_scratch'])}",
        f"  runtime overhead    {gib(pred['overhead'])}",
        f"  total               {gib(pred['total'])}",
    ]
    if pred["host_weights"]:
        lines.append(f"host (pinned) layer weights: {gib(pred['host_weights'])}")
    if pred.get("host_activations"):
        lines.append(f"host (pinned) layer inputs: {gib(pred['host_activations'])}")
    if pred["host_teacher_cache_per_sample"]:
        lines.append(f"host teacher cache: {pred['host_teacher_cache_per_sample'] / MiB:.2f} MiB per sample per rank")
    if budget is not None:
        if fit:
            lines.append(f"largest batch within {budget / GiB:.2f} GiB: {fit}")
        else:
            lines.append(f"does not fit {budget / GiB:.2f} GiB even at batch 1 "
                         "(try --offload cpu, --shard fsdp with more GPUs, or a shorter --seq-len)")
    return "\n".join(lines)


def memory_settings(cfg, engine: str, dtype="bf16", gpus: Optional[int] = None) -> dict:
    """The keyword arguments of ``predict_peak_memory`` / ``largest_batch`` that describe a run of the
    PruneConfig ``cfg`` on ``gpus`` ranks (default: this process group's) with ``engine`` resolved
    ("fused", "torch" or "reference")."""
    from .scale import distributed as dist

    return dict(dtype=dtype, gpus=dist.world_size() if gpus is None else gpus, shard=cfg.shard,
                offload=cfg.offload, engine=engine, gradient_checkpointing=cfg.gradient_checkpointing,
                loss_token_chunk=cfg.loss_token_chunk, offload_activations=cfg.offload_activations,
                method=cfg.method)


def batch_size_for_memory(model_config, cfg, engine: str, seq_len: int, budget: str, samples: int,
                          dtype: str = "bf16", width: Optional[int] = None) -> tuple:
    """(batch size, note): the largest batch per GPU predicted to fit ``budget`` (e.g. "18GiB") with the
    PruneConfig ``cfg``'s settings, at most this rank's share of ``samples``; ``note`` holds the budget
    and the prediction for the report. InputError when even batch 1 is predicted not to fit, or when the
    refit stage (``cfg.refit``, kept ``width``) is predicted not to fit at that batch. ``engine``:
    "fused", "torch" or "reference" (one sample per backward)."""
    from .scale import distributed as dist

    limit = parse_size(budget)
    if limit <= 0:
        raise InputError(f"--max-memory {budget}: the budget must be positive")
    shape = shape_of(model_config)
    kw = memory_settings(cfg, engine, dtype)
    most = 1 if engine == "reference" else max(1, -(-samples // dist.world_size()))
    batch = largest_batch(shape, seq_len, limit, max_batch=most, **kw)
    if batch == 0:
        need = predict_peak_memory(shape, seq_len, 1, **kw)["total"]
        hints = [h for h, applies in (("--offload-activations", cfg.gradient_checkpointing and not cfg.offload_activations),
                                      ("--offload cpu", not cfg.offload), ("--shard fsdp over more GPUs", True),
                                      ("a shorter --seq-len", True)) if applies]
        raise InputError(f"--max-memory {budget}: even batch 1 is predicted to need {need / GiB:.2f} GiB per GPU "
                         f"(try {', '.join(hints)})")
    predicted = predict_peak_memory(shape, seq_len, batch, **kw)["total"]
    note = {"max_memory": budget, "budget_bytes": limit, "batch_size": batch, "predicted_peak_bytes": predicted}
    if getattr(cfg, "refit", "none") != "none":
        refit = predict_refit_memory(shape, seq_len, batch, width=width, dtype=dtype, gpus=kw["gpus"],
                                     shard=cfg.shard, offload=cfg.offload,
                                     samples=-(-samples // dist.world_size()))
        if refit["total"] > limit:
            raise InputError(f"--max-memory {budget}: the refit stage (--refit ls) is predicted to need "
                             f"{refit['total'] / GiB:.2f} GiB per GPU, {refit['solve'] / GiB:.2f} GiB of it its "
                             "float64 solve" + ("" if cfg.offload or cfg.shard else "; try --offload cpu"))
        note["refit_predicted_peak_bytes"] = refit["total"]
    return batch, note
