"""Layer streaming (``--offload cpu``): decoder layers live in pinned host memory and are copied to
the GPU ahead of use, in forward and again (in reverse) in backward, double-buffered.

Why not accelerate's offload hooks: they act around forward only, so in backward the weights are on
``meta`` (checked on transformers 5 / accelerate). A gradient pass needs the weights again for the layer's backward, and
the importance op reads ``mlp.gate_proj.weight`` etc. at backward time.

Mechanism (one ``LayerStreamer`` per model):

* Each layer's parameters are packed into one flat host buffer per dtype (pinned when the device is
  CUDA). Two device buffers ("slots") of the largest layer's size hold the layers in use.
* forward pre-hook of layer i: make i resident (wait for its prefetch, or copy it now), then prefetch
  i+1 into the other slot on a side CUDA stream.
* forward post-hook of layer i: release i (its parameters point at a NaN placeholder of the right
  shape and zero strides: any use while released gives NaN, never silent stale data; never ``meta``).
  When the output requires grad, a tensor hook on the output makes i resident again when the
  gradient reaches the layer, i.e. before its backward (and before the checkpoint recompute), and
  prefetches i-1; a hook on the layer's input releases i once the gradient has passed through it.
  The last layer stays resident between forward and backward.
* Slots are reused only after an event recorded at release, so a copy never overwrites weights a
  queued kernel still reads.

Works with and without gradient checkpointing (transformers checkpoints ``forward`` inside the module
hooks, so the recompute runs with the weights made resident by the output hook). On CPU the "device"
slots are CPU tensors: the swapping is the same, which is what the CPU tests check.
"""
from __future__ import annotations

import contextlib

import time
from collections import defaultdict
from functools import partial
from typing import Dict, List, Optional

import torch
from torch import nn

from ..errors import InputError
from ..models import get_adapter

OFFLOAD_TARGETS = ("cpu",)


def check_offload(offload: Optional[str], device) -> None:
    """Raise InputError unless ``offload`` is None or "cpu" and the device can stream (cuda, or cpu
    for testing)."""
    if offload is None:
        return
    if offload not in OFFLOAD_TARGETS:
        raise InputError(f"--offload {offload!r} is not supported (supported: cpu)")
    dev = torch.device(device)
    if dev.type not in ("cuda", "cpu"):
        raise InputError(f"--offload cpu streams layers to a CUDA GPU; device {dev.type!r} is not supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--offload cpu with device cuda, but no CUDA GPU is available")


class LayerStreamer:
    """Keeps the decoder layers of ``model`` in host memory and streams them through two device slots.

    Construct it on a model whose parameters are anywhere (CPU typically); the non-layer parameters
    and all buffers move to ``device``. ``remove()`` (or leaving the ``with`` block) detaches the hooks
    and leaves every layer parameter pointing at its host copy (CPU).
    """

    def __init__(self, model: nn.Module, device="cuda", prefetch: bool = True):
        check_offload("cpu", device)
        self.model = model
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.is_cuda = self.device.type == "cuda"
        self.prefetch_enabled = prefetch
        self.layers: List[nn.Module] = list(get_adapter(model).decoder_layers(model))
        self.n = len(self.layers)
        self.stats = {"loads": 0, "releases": 0, "bytes_copied": 0, "sync_loads": 0}
        self.load_counts = [0] * self.n
        self._hooks = []

        layer_param_ids = {id(p) for layer in self.layers for p in layer.parameters()}
        self._moved = []  # (param or (module, buffer name), original device): put back by remove()
        with torch.no_grad():
            for p in model.parameters():  # embedding, final norm, LM head: resident on the device
                if id(p) not in layer_param_ids and p.device != self.device:
                    self._moved.append((p, p.device))
                    p.data = p.data.to(self.device)
            for mod in model.modules():  # buffers (rotary inv_freq, ...) are small: resident
                for name, b in list(mod._buffers.items()):
                    if b is not None and b.device != self.device:
                        self._moved.append(((mod, name), b.device))
                        mod._buffers[name] = b.to(self.device)

        # host copies: one flat buffer per (layer, dtype); parameters become views of it
        self._entries: List[List[tuple]] = []  # per layer: (param, dtype, offset, shape)
        self._host: List[Dict[torch.dtype, torch.Tensor]] = []
        sizes: Dict[torch.dtype, int] = defaultdict(int)
        pin = self.is_cuda
        self._placeholders: List[List[torch.Tensor]] = []
        for layer in self.layers:
            per_dtype = defaultdict(int)
            entries = []
            seen = set()
            for p in layer.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                entries.append((p, p.dtype, per_dtype[p.dtype], tuple(p.shape)))
                per_dtype[p.dtype] += p.numel()
            host = {dt: torch.empty(n, dtype=dt, pin_memory=pin) for dt, n in per_dtype.items()}
            with torch.no_grad():
                for p, dt, off, shape in entries:
                    n = p.numel()
                    host[dt][off:off + n].copy_(p.data.reshape(-1))
            for dt, n in per_dtype.items():
                sizes[dt] = max(sizes[dt], n)
            self._entries.append(entries)
            self._host.append(host)
            self._placeholders.append([self._placeholder(p.dtype, shape) for p, _, _, shape in entries])
            # drop the original storage now: host memory holds one copy of the layers plus one layer
            self._set_released(len(self._entries) - 1)
        self._slots = [{dt: torch.empty(n, dtype=dt, device=self.device) for dt, n in sizes.items()} for _ in range(2)]
        self._free_slots = [0, 1]
        self._slot_free_event: List[Optional[object]] = [None, None]
        self._resident: Dict[int, int] = {}  # layer -> slot
        self._pending: Dict[int, tuple] = {}  # layer -> (slot, event or None)
        self._side_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(partial(self._pre_forward, i), with_kwargs=True))
            self._hooks.append(layer.register_forward_hook(partial(self._post_forward, i)))

    # ---------------------------------------------------------------- residency
    def _placeholder(self, dtype, shape):
        # right shape, one NaN element, zero strides: shape queries work, any use gives NaN
        return torch.full((1,), float("nan"), dtype=dtype, device=self.device).expand(shape)

    def _set_released(self, i: int) -> None:
        for (p, _, _, _), ph in zip(self._entries[i], self._placeholders[i]):
            p.data = ph

    def is_resident(self, i: int) -> bool:
        return i in self._resident

    def layer_bytes(self, i: int) -> int:
        return sum(t.numel() * t.element_size() for t in self._host[i].values())

    def _start_copy(self, i: int) -> bool:
        if not self._free_slots:
            return False
        slot = self._free_slots.pop(0)
        bufs = self._slots[slot]
        if self.is_cuda:
            stream = self._side_stream
            ev_free = self._slot_free_event[slot]
            if ev_free is not None:
                stream.wait_event(ev_free)  # the slot's previous layer is no longer read
            with torch.cuda.stream(stream):
                for dt, host in self._host[i].items():
                    bufs[dt][: host.numel()].copy_(host, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
        else:
            for dt, host in self._host[i].items():
                bufs[dt][: host.numel()].copy_(host)
            ev = None
        self._pending[i] = (slot, ev)
        self.stats["loads"] += 1
        self.load_counts[i] += 1
        self.stats["bytes_copied"] += self.layer_bytes(i)
        return True

    def prefetch(self, i: int) -> None:
        """Start copying layer i into a free slot (no-op if resident, pending, out of range or no slot)."""
        if not self.prefetch_enabled or not (0 <= i < self.n):
            return
        if i in self._resident or i in self._pending:
            return
        self._start_copy(i)

    def ensure(self, i: int) -> None:
        """Make layer i's parameters point at its device slot, its copy complete for the current stream."""
        if i in self._resident:
            return
        if i not in self._pending:
            if not self._start_copy(i):
                raise RuntimeError(
                    f"layer streaming: no free device slot for layer {i} (resident: {sorted(self._resident)}); "
                    "a forward ran twice before its backward?"
                )
            self.stats["sync_loads"] += 1
        slot, ev = self._pending.pop(i)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        bufs = self._slots[slot]
        for p, dt, off, shape in self._entries[i]:
            n = 1
            for s in shape:
                n *= s
            p.data = bufs[dt][off:off + n].view(shape)
        self._resident[i] = slot

    def release(self, i: int) -> None:
        """Point layer i's parameters back at the placeholder and free its slot once queued work is done."""
        slot = self._resident.pop(i, None)
        if slot is None:
            return
        self._set_released(i)
        if self.is_cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._slot_free_event[slot] = ev
        self._free_slots.append(slot)
        self.stats["releases"] += 1

    def release_all(self) -> None:
        for i in list(self._resident):
            self.release(i)
        for i, (slot, ev) in list(self._pending.items()):  # drop prefetched layers nobody used
            if ev is not None:
                ev.synchronize()
            del self._pending[i]
            self._free_slots.append(slot)

    # ---------------------------------------------------------------- hooks
    @staticmethod
    def _in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    def _pre_forward(self, i, module, args, kwargs):
        backward = self._in_backward()
        self.ensure(i)
        if not backward:
            self.prefetch(i + 1)
            hidden = args[0] if args else kwargs.get("hidden_states")
            if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(partial(self._after_layer_backward, i))
        return None

    def _post_forward(self, i, module, args, output):
        if self._in_backward():
            return None  # a recompute inside backward: the input-gradient hook releases the layer
        out = output[0] if isinstance(output, (tuple, list)) else output
        needs_backward = torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad
        if needs_backward:
            out.register_hook(partial(self._before_layer_backward, i))
            if i == self.n - 1:
                return None  # the backward starts with this layer: keep it
        self.release(i)
        return None

    def _before_layer_backward(self, i, grad):
        # the gradient w.r.t. layer i's output is complete: layer i+1's backward is done
        self.release(i + 1)
        self.ensure(i)
        self.prefetch(i - 1)
        return None

    def _after_layer_backward(self, i, grad):
        self.release(i)
        return None

    # ---------------------------------------------------------------- lifetime
    def copy_pass(self) -> float:
        """Copy every layer in and release it, forward then reverse; seconds (the copy-only cost of
        one forward+backward)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for order in (range(self.n), range(self.n - 1, -1, -1)):
            order = list(order)
            for k, i in enumerate(order):
                self.ensure(i)
                if k + 1 < len(order):
                    self.prefetch(order[k + 1])
                self.release(i)
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def remove(self) -> None:
        """Detach the hooks; every layer parameter then points at its host copy (CPU) and the other
        parameters and buffers go back where they were."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        self.release_all()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for i, entries in enumerate(self._entries):
            for p, dt, off, shape in entries:
                n = 1
                for s in shape:
                    n *= s
                p.data = self._host[i][dt][off:off + n].view(shape)
        with torch.no_grad():
            for obj, dev in self._moved:
                if isinstance(obj, tuple):
                    mod, name = obj
                    mod._buffers[name] = mod._buffers[name].to(dev)
                else:
                    obj.data = obj.data.to(dev)
        self._moved = []
        self._slots = []

    def __enter__(self) -> "LayerStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def stream_layers(model: nn.Module, device="cuda", prefetch: bool = True) -> LayerStreamer:
    """Start streaming ``model``'s decoder layers from host memory to ``device``; returns the streamer."""
    return LayerStreamer(model, device, prefetch=prefetch)


@contextlib.contextmanager
def maybe_stream_layers(model: nn.Module, device, enabled: bool):
    """Forward-only work (perplexity, sampling 'self' text) on a model kept in host memory (``--shard``,
    ``--offload``): stream its layers through the GPU while the block runs instead of running on the
    CPU. A no-op when not ``enabled`` or when ``device`` is not a GPU."""
    if not enabled or torch.device(device).type != "cuda":
        yield
        return
    streamer = stream_layers(model, device)
    try:
        yield
    finally:
        streamer.remove()
