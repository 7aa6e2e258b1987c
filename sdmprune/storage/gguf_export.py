"""GGUF in, GGUF out: write the pruned model as a GGUF file, in the input's quantization where possible.

``write_pruned_gguf(src, keep, out)`` reads a GGUF (memory-mapped; nothing is dequantized that is not
sliced) and writes a copy in which every MLP keeps only the channels ``keep[layer]``:

* metadata: every key/value field of the input is copied with its own type (the tokenizer lives
  there), ``{arch}.feed_forward_length`` is set to the pruned width, and ``sdmprune.written_by`` marks
  the file as the package's output (the ownership rule of ``sdmprune.storage.paths``);
* ``blk.{i}.ffn_gate.weight`` / ``ffn_up.weight``: GGUF stores a matrix as rows of ``ne0`` contiguous
  elements, quantized row by row. These two have one row per channel (numpy shape ``[I, d]``, the
  same as Hugging Face's ``gate_proj.weight``), so the kept rows are copied byte for byte in their own
  type, quantized or not: no new quantization error;
* ``blk.{i}.ffn_down.weight`` (numpy shape ``[d, I]``): the channel is the position inside a row, so a
  quantized row cannot be cut without decoding it. It is dequantized, the kept columns are sliced and
  it is requantized to its own type when the ``gguf`` package can quantize that type and the pruned
  width is a multiple of the type's block size (a quantized row holds whole blocks: 32 elements for
  Q4_0/Q4_1/Q8_0, 256 for the K-quants); otherwise it is written as F16 and the returned description
  says which tensors and why. Float types (F32, F16, BF16) are sliced exactly;
* gate/up biases, if present, are sliced like ffn_down (the channel is their only axis); every other
  tensor (attention, embeddings, norms, the output head, ffn_down's bias) is copied byte for byte.

Requantizing ffn_down adds a second quantization error on top of the input's (the kept channels of a
row fall into new blocks with new scales); F16 adds only F16 rounding of the dequantized values.
``down_type`` chooses the type ffn_down is written in instead of its own (e.g. "F16", or "Q8_0", whose
second rounding is about 16x finer than Q4_1's). ``down_weights`` (after ``--refit``, which changes the
kept down_proj columns): ffn_down is encoded from these pruned weights instead of the input's sliced
ones, by the same path (its own type, or ``down_type``, or the F16 fallback). Widths must be uniform: transformers reads one
``intermediate_size``.

The file is written beside ``out`` and renamed into place (``sdmprune.storage.paths.atomic_write_file``) after
``check_output_file(out, overwrite, flag="--gguf")``: an existing file is replaced only when it is an
earlier output of the package and ``overwrite`` is set.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np

from .. import __version__
from ..errors import InputError, require_extra
from .paths import GGUF_MARK_KEY, atomic_write_file, check_output_file

__all__ = ["write_pruned_gguf", "MARK_KEY"]

PathLike = Union[str, os.PathLike]

MARK_KEY = GGUF_MARK_KEY  # GGUF metadata key that marks a file written by this package (the ownership rule's)
FALLBACK_TYPE_NAME = "F16"
_MLP = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)$")


def _gguf():
    require_extra("gguf", "writing a GGUF file (--gguf)")
    import gguf

    return gguf


def _field_value(field, gguf):
    """(value, type, sub_type) of a reader field, in the form GGUFWriter.add_key_value takes."""
    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 2:
        raise InputError(f"GGUF field {field.name!r} is a nested array, which this writer does not copy")
    return field.contents(), vtype, sub


def _channel_axis(kind: str, part: str) -> Optional[int]:
    """The numpy axis of a GGUF MLP tensor that indexes channels (None: no channel axis)."""
    if part == "bias":
        return 0 if kind in ("gate", "up") else None  # down_proj's bias is per output feature
    return 0 if kind in ("gate", "up") else 1


def _logical(tensor, gguf) -> np.ndarray:
    """The tensor dequantized to float32, numpy shape = reversed GGUF shape (= the HF weight shape)."""
    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise InputError(f"{tensor.name}: gguf {_version(gguf)} cannot dequantize {tensor.tensor_type.name}, "
                         "so its pruned channels cannot be sliced") from None


def _version(gguf) -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001
        return getattr(gguf, "__version__", "?")


def _float_types(gguf):
    Q = gguf.GGMLQuantizationType
    return (Q.F32, Q.F16, Q.BF16)


def _slice_tensor(tensor, axis: int, idx: np.ndarray, gguf, target=None, values=None):
    """(array for GGUFWriter.add_tensor, raw_dtype, written type name, method, fallback reason or None,
    whether the array holds the file's own bytes). ``target``: the type to re-encode a tensor whose
    channels lie inside its rows (default: its own type); ``values``: the pruned float values to encode
    instead of the tensor's own sliced ones (refit weights)."""
    qtype = tensor.tensor_type
    data = tensor.data
    if axis != data.ndim - 1 and data.ndim >= 2:
        # whole rows: the rows of a quantized tensor are independent, copy the kept ones as they are
        return (np.ascontiguousarray(np.take(data, idx, axis=axis)), qtype, qtype.name,
                "kept rows copied byte for byte", None, True)
    source = "dequantized, channels sliced" if values is None else "refit weights"
    if values is None:
        values = np.take(_logical(tensor, gguf), idx, axis=axis)
    values = np.ascontiguousarray(values, dtype=np.float32)
    target = qtype if target is None else target
    floats = _float_types(gguf)
    if target in floats:
        how = ("channels sliced (exact)" if target == qtype and source.startswith("dequantized") else
               f"{source}, written as {target.name}")
        return gguf.quants.quantize(values, target), target, target.name, how, None, False
    block = gguf.GGML_QUANT_SIZES[target][0]
    if values.shape[-1] % block:
        reason = (f"pruned width {values.shape[-1]} is not a multiple of the {target.name} block size {block} "
                  "(a quantized row holds whole blocks)")
    else:
        try:
            packed = gguf.quants.quantize(values, target)
            how = (f"{source}, requantized" if target == qtype else f"{source}, quantized to {target.name}")
            return packed, target, target.name, how, None, False
        except NotImplementedError:
            reason = f"gguf {_version(gguf)} cannot quantize {target.name} (it only dequantizes it)"
    return (values.astype(np.float16), gguf.GGMLQuantizationType.F16, FALLBACK_TYPE_NAME,
            f"{source}, written as {FALLBACK_TYPE_NAME}", reason, False)


def _pruned_values(down_weights, layer: int, tensor, width: int):
    """The given pruned ffn_down values of ``layer`` as float32 [d, width] (None: slice the input's)."""
    if down_weights is None or layer not in down_weights:
        return None
    w = down_weights[layer]
    w = w.detach().float().cpu().numpy() if hasattr(w, "detach") else np.asarray(w, dtype=np.float32)
    expected = (int(tensor.shape[1]), width)  # GGUF lists ne0 (the channel axis) first: shape (I, d)
    if tuple(w.shape) != expected:
        raise InputError(f"{tensor.name}: the given pruned weights have shape {tuple(w.shape)}, expected {expected}")
    return w


def _type_named(name: Optional[str], gguf):
    if name is None:
        return None
    try:
        return gguf.GGMLQuantizationType[str(name).upper()]
    except KeyError:
        raise InputError(f"--gguf-down-type {name!r} is not a GGUF tensor type (e.g. F16, F32, Q8_0, Q4_1)") from None


def check_down_type(name: Optional[str]) -> None:
    """InputError unless ``name`` (``--gguf-down-type``) is a GGUF tensor type: checked before any work,
    as ``write_pruned_gguf`` reads it."""
    _type_named(name, _gguf())


def _plan(reader, keep: Mapping[int, object], gguf):
    """Check the input and ``keep`` before anything is written; returns (architecture, the
    feed_forward_length key, {tensor name: (channel axis, kept channels)}, width before, width after)."""
    from ..slicing import normalize_keep

    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise InputError("the GGUF has no general.architecture field")
    arch = arch_field.contents()
    ffn_key = f"{arch}.feed_forward_length"
    if ffn_key not in reader.fields:
        raise InputError(f"the GGUF has no {ffn_key} field: not a model with a gated MLP that sdmprune knows")
    if reader.fields[ffn_key].types[0] == gguf.GGUFValueType.ARRAY:
        raise InputError(f"{ffn_key} is a per-layer array (non-uniform widths): not supported")
    tensors = {t.name: t for t in reader.tensors}
    layers: Dict[int, Dict[str, object]] = {}
    for name, t in tensors.items():
        m = _MLP.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[f"{m.group(2)}.{m.group(3)}"] = t
    if not layers:
        raise InputError("the GGUF has no blk.N.ffn_gate/ffn_up/ffn_down tensors (a fused or expert MLP is not "
                         "supported)")
    width = None
    for i, parts in sorted(layers.items()):
        missing = [p for p in ("gate.weight", "up.weight", "down.weight") if p not in parts]
        if missing:
            raise InputError(f"layer {i} has no blk.{i}.ffn_{missing[0]} tensor in the GGUF")
        shapes = {p: tuple(int(x) for x in reversed(parts[p].shape)) for p in ("gate.weight", "up.weight",
                                                                               "down.weight")}
        w = shapes["gate.weight"][0]
        if shapes["up.weight"][0] != w or shapes["down.weight"][1] != w:
            raise InputError(f"layer {i}: MLP shapes disagree in the GGUF ({shapes})")
        if width is None:
            width = w
        elif w != width:
            raise InputError(f"MLP widths differ between layers in the GGUF ({width} vs {w} at layer {i})")
    if int(reader.fields[ffn_key].contents()) != width:
        raise InputError(f"{ffn_key} = {reader.fields[ffn_key].contents()} but the MLP tensors are {width} wide")
    unknown = sorted(set(int(i) for i in keep) - set(layers))
    if unknown:
        raise InputError(f"keep names layers {unknown} that are not in the GGUF ({len(layers)} MLP layers)")
    idx = {int(i): normalize_keep(v, width, f"layer {int(i)}").numpy() for i, v in keep.items()}
    new_widths = {i: (len(idx[i]) if i in idx else width) for i in layers}
    if len(set(new_widths.values())) != 1:
        raise InputError(f"non-uniform MLP widths {sorted(set(new_widths.values()))}: a GGUF for transformers "
                         "holds one feed_forward_length for all layers")
    new_width = next(iter(new_widths.values()))
    if new_width == width:
        raise InputError(f"keep removes no channel (width stays {width}); nothing to prune")
    slices = {}
    for i, parts in layers.items():
        if i not in idx:  # every channel kept: the layer's tensors are copied as they are
            continue
        for p, t in parts.items():
            axis = _channel_axis(*p.split("."))
            if axis is not None:
                slices[t.name] = (axis, idx[i])
    return arch, ffn_key, slices, width, new_width


def write_pruned_gguf(src_gguf_path: PathLike, keep: Mapping[int, object], out_path: PathLike, *,
                      overwrite: bool = False, down_type: Optional[str] = None,
                      down_weights: Optional[Mapping[int, object]] = None) -> dict:
    """Write the GGUF ``src_gguf_path`` with every MLP sliced to ``keep[layer]`` (sorted kept channel
    indices in the original numbering; a layer absent from ``keep`` keeps all) to ``out_path``.

    ``down_type``: the type ffn_down (the one MLP tensor that must be decoded and re-encoded) is written
    in, e.g. "F16" (no new error, larger file) or "Q8_0"; default: its own type (the same block-size
    and can-quantize fallbacks to F16 apply to any quantized type asked for). ``down_weights``: {layer:
    pruned down_proj weight [d, width]} (a torch tensor or array) to write as ffn_down instead of the
    input's sliced tensor, e.g. after a refit of the kept columns.

    Returns a description for the report: the path, the tensor types written (counts), each MLP
    tensor group with its source and written type and how it was sliced, and the fallbacks to F16 with
    the reason. InputError (one line) for an unreadable input, bad ``keep``, non-uniform widths, or an
    output the ownership rule refuses; nothing is written then.
    """
    gguf = _gguf()
    target = _type_named(down_type, gguf)
    src = Path(os.path.abspath(os.path.expanduser(os.fspath(src_gguf_path))))
    if not src.is_file():
        raise InputError(f"GGUF input {str(src_gguf_path)!r} is not a file")
    out = check_output_file(out_path, overwrite, flag="--gguf", inputs=[src])
    try:
        reader = gguf.GGUFReader(str(src))
    except Exception as exc:  # noqa: BLE001 - ValueError, struct.error...: one user-facing line
        raise InputError(f"cannot read the GGUF {str(src)!r}: {type(exc).__name__}: {exc}") from None
    arch, ffn_key, slices, width, new_width = _plan(reader, keep, gguf)

    groups: Dict[tuple, list] = {}
    written_types: Counter = Counter()
    with atomic_write_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch, endianess=reader.endianess)
        try:
            for field in reader.fields.values():
                # GGUF.* are the reader's view of the header; the writer writes the architecture itself
                if field.name.startswith("GGUF.") or field.name == "general.architecture":
                    continue
                value, vtype, sub = _field_value(field, gguf)
                if field.name == ffn_key:
                    value = new_width
                if field.name == "general.alignment":  # tensor data must be padded to the input's alignment
                    writer.data_alignment = int(value)
                writer.add_key_value(field.name, value, vtype, sub_type=sub)
            writer.add_key_value(MARK_KEY, f"sdmprune {__version__}", gguf.GGUFValueType.STRING)
            for t in reader.tensors:
                if t.name in slices:
                    axis, idx = slices[t.name]
                    m = _MLP.match(t.name)
                    down = t.name.endswith(".ffn_down.weight")
                    values = _pruned_values(down_weights, int(m.group(1)), t, len(idx)) if down else None
                    data, raw, wname, how, why, from_file = _slice_tensor(t, axis, idx, gguf, target if down else None,
                                                                          values)
                    key = (f"ffn_{m.group(2)}.{m.group(3)}", t.tensor_type.name, wname, how, why)
                    groups.setdefault(key, []).append(int(m.group(1)))
                else:
                    # untouched: the input's bytes in the input's type (a memory-mapped view; nothing decoded)
                    data, raw, wname, from_file = t.data, t.tensor_type, t.tensor_type.name, True
                # the file's own bytes are in the file's byte order; decoded-and-encoded ones are native
                writer.add_tensor(t.name, data, raw_dtype=raw, tensor_endianess=reader.endianess if from_file else None)
                written_types[wname] += 1
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        # someone may have created the output meanwhile: the same check as before the work
        check_output_file(out, overwrite, flag="--gguf", inputs=[src])

    mlp = [{"tensor": k[0], "layers": sorted(v), "source_type": k[1], "written_type": k[2], "method": k[3],
            "fallback_reason": k[4]} for k, v in sorted(groups.items(), key=lambda kv: (kv[0][0], min(kv[1])))]
    return {
        "path": str(out),
        "source": str(src),
        "architecture": arch,
        "feed_forward_length": {"before": width, "after": new_width},
        "down_type_requested": target.name if target is not None else None,
        "tensor_types": dict(sorted(written_types.items())),
        "mlp_tensors": mlp,
        "fallbacks": [{k: g[k] for k in ("tensor", "layers", "source_type", "written_type", "fallback_reason")}
                      for g in mlp if g["fallback_reason"]],
        "bytes": out.stat().st_size,
        "source_bytes": src.stat().st_size,
        "gguf_version": _version(gguf),
    }
