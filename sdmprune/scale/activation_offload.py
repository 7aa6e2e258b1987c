"""Checkpointed layer inputs in pinned host memory (``--offload-activations``).

With per-layer gradient checkpointing a gradient pass keeps one tensor per decoder layer from
forward to backward: the layer's input, ``[B, L, d]`` (4 MiB per 1024-token sample at d = 2048 in
bf16, 64 MiB per sample over Llama-3.2-1B's 16 layers). At large batches these dominate the
activations. ``offload_checkpoint_inputs(model)`` moves them to pinned host memory while the other
layers run and brings each back just before its recompute:

* forward, layer i: torch.utils.checkpoint saves the layer's positional tensor inputs as saved
  tensors before it enters its own region (both the non-reentrant ``save_inputs`` and the reentrant
  ``save_for_backward``), so a ``saved_tensors_hooks`` pair around the checkpoint call sees exactly
  them and nothing inside the layer. The pack hook copies each large CUDA input to a pinned host
  buffer on a side stream and lets the device copy go (``record_stream`` keeps the allocator from
  reusing it before the copy has read it).
* backward, layer i: the checkpoint unpacks its inputs to recompute the layer. The unpack hook
  waits for the copy back (started as a prefetch when layer i+1 was unpacked) and starts the copy
  back of layer i-1's input, so at most two layer inputs are on the device at once, and the copies
  overlap the recompute and backward of the layer before. The last layer's input, which backward
  needs first, is sent back as soon as the decoder body's forward returns (a forward hook), so its
  copy overlaps the loss and its backward instead of stalling the first recompute.

Host buffers are reused: pinning memory is slow (cudaHostAlloc, and torch's pinned-memory cache
rounds every block up to a power of two), so the offload keeps a pool of exact-size host buffers
(``HostBufferPool``). A layer input's buffer goes back to the pool when its saved handle dies, i.e.
when the graph that held it is freed after backward, so the next forward writes the same buffers.
The copies into and out of a buffer all run on the one copy stream of its device, so a reused
buffer is never written before the copy back of its previous contents has read it. The pool keeps
at most as many idle bytes as were ever in use at once (least recently returned dropped first) and
frees everything when the context exits.

Tensors under ``min_bytes`` (and non-CUDA tensors, except in the CPU test mode below) stay where
they are. The hooks wrap each layer's ``_gradient_checkpointing_func`` (what transformers calls in
every ``GradientCheckpointingLayer``), so they need checkpointing already on, and they are removed
on exit. On the CPU the "host" copy is a separate CPU tensor (from the same pool, not pinned) and
there are no streams: the packing, prefetch order, buffer reuse and release are the same, which is
what the CPU tests check.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import InputError
from ..models import get_adapter

# Tensors smaller than this stay on the device (rotary tables, masks, small test models' inputs on CUDA).
DEFAULT_MIN_BYTES = 1 << 20


class HostBufferPool:
    """Host buffers (flat uint8, pinned when ``pin``) reused by size.

    ``take(nbytes, device)`` hands out an idle buffer of exactly ``nbytes`` that was last used for
    ``device`` (its copies ran on that device's copy stream, which orders the reuse), else a new one,
    and says which (``(buffer, reused)``).
    ``give`` returns it. Idle bytes are kept at or under the most bytes ever in use at once (one
    forward's layer inputs in a training loop), dropping the least recently returned first, so
    batches of changing shapes cannot grow the pool without bound. ``close`` drops every idle
    buffer, and buffers given back afterwards are dropped too. Thread-safe: buffers come back from
    the autograd engine's threads, when a graph's saved tensors are freed."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._idle: "OrderedDict[Tuple[int, str], List[torch.Tensor]]" = OrderedDict()  # LRU order of keys
        self._lock = threading.Lock()
        self._closed = False
        self.in_use_bytes = 0
        self.idle_bytes = 0
        self.peak_in_use_bytes = 0
        self.allocated = 0  # buffers created
        self.reused = 0  # takes served from idle buffers

    def take(self, nbytes: int, device: torch.device) -> Tuple[torch.Tensor, bool]:
        key = (int(nbytes), str(device))
        with self._lock:
            bufs = self._idle.get(key)
            buf = bufs.pop() if bufs else None
            if bufs is not None and not bufs:
                del self._idle[key]
            if buf is not None:
                self.idle_bytes -= nbytes
                self.reused += 1
            else:
                self.allocated += 1
            self.in_use_bytes += nbytes
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
        if buf is not None:
            return buf, True
        # allocated outside the lock: pinning can take milliseconds per MiB
        return torch.empty(int(nbytes), dtype=torch.uint8, device="cpu", pin_memory=self.pin), False

    def give(self, buf: torch.Tensor, device: torch.device) -> None:
        nbytes = buf.numel()
        key = (int(nbytes), str(device))
        with self._lock:
            self.in_use_bytes -= nbytes
            if self._closed:
                return
            self._idle.setdefault(key, []).append(buf)
            self._idle.move_to_end(key)
            self.idle_bytes += nbytes
            while self.idle_bytes > self.peak_in_use_bytes and self._idle:
                old_key, old = next(iter(self._idle.items()))
                old.pop(0)
                self.idle_bytes -= old_key[0]
                if not old:
                    del self._idle[old_key]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._idle.clear()
            self.idle_bytes = 0


def _as_view(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``buf`` (flat uint8 of the same byte size) seen as a contiguous tensor of ``like``'s dtype and shape."""
    return buf.view(like.dtype).view(like.shape)


class _Offloaded:
    """One packed layer input: the host copy, and the device copy while it is fetched back. The host
    buffer goes back to its pool when the handle dies (the graph holding it was freed), not at unpack:
    a graph kept for a second backward unpacks its inputs again."""

    __slots__ = ("host", "buffer", "pool", "device", "device_tensor", "ready", "prev", "__weakref__")

    def __init__(self, host: torch.Tensor, buffer: torch.Tensor, pool: Optional[HostBufferPool],
                 device: torch.device, prev: Optional["weakref.ref"]):
        self.host = host
        self.buffer = buffer  # the pool's flat buffer under ``host``
        self.pool = pool
        self.device = device
        self.device_tensor: Optional[torch.Tensor] = None  # set by a fetch, handed over by unpack
        self.ready = None  # CUDA event: the copy back has finished
        # the input packed just before this one (layer i-1 of the same forward): prefetched when this one
        # is unpacked, since backward visits the layers in reverse
        self.prev = prev

    def __del__(self):
        pool = self.pool
        if pool is not None:
            self.pool = None
            try:
                pool.give(self.buffer, self.device)
            except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to reuse it
                pass


class CheckpointInputOffload:
    """Pack/unpack hooks that keep checkpointed layer inputs in (pinned) host memory.

    Use ``offload_checkpoint_inputs(model)`` on a model; the object itself only needs ``hooks()``
    around a checkpoint call. ``stats``: tensors offloaded, bytes offloaded, fetches, fetches that
    were prefetched, fetches that had to wait for a copy started on demand (one per backward pass:
    the last layer's input), host buffers allocated and reused (``HostBufferPool``). ``close()``
    frees the pool (``offload_checkpoint_inputs`` calls it on exit).
    """

    def __init__(self, min_bytes: int = DEFAULT_MIN_BYTES, prefetch: bool = True, cpu_copies: bool = False):
        self.min_bytes = int(min_bytes)
        self.prefetch_enabled = prefetch
        self.cpu_copies = cpu_copies  # CPU tensors are "offloaded" too (test mode: a separate CPU copy)
        self.stats = {"offloaded": 0, "bytes_offloaded": 0, "fetched": 0, "prefetched": 0, "fetched_on_demand": 0,
                      "host_buffers_allocated": 0, "host_buffers_reused": 0}
        self._streams: Dict[torch.device, "torch.cuda.Stream"] = {}
        self._last: Optional[weakref.ref] = None  # weak: a finished pass's inputs are freed with its graph
        # one pool per kind of host memory: pinned for CUDA inputs, plain for the CPU test mode
        self.pools: Dict[bool, HostBufferPool] = {}

    def _pool(self, pin: bool) -> HostBufferPool:
        if pin not in self.pools:
            self.pools[pin] = HostBufferPool(pin=pin)
        return self.pools[pin]

    def close(self) -> None:
        """Free the idle host buffers (and those still held by live graphs once those are freed); the
        pinned ones go back to the OS, not only to torch's pinned-memory cache."""
        for stream in self._streams.values():
            stream.synchronize()  # no copy may still be reading or writing a buffer being freed
        pinned = False
        for pin, pool in self.pools.items():
            pool.close()
            pinned |= pin and pool.allocated > 0
        if pinned:
            empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
            if empty is None:
                empty = getattr(torch._C, "_host_emptyCache", None)
            if empty is not None:
                empty()

    # ---------------------------------------------------------------- streams
    def _copy_stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    # ---------------------------------------------------------------- hooks
    def _wants(self, t: torch.Tensor) -> bool:
        if t.layout != torch.strided or t.numel() * t.element_size() < self.min_bytes:
            return False
        return t.is_cuda or (self.cpu_copies and t.device.type == "cpu")

    def pack(self, t: torch.Tensor):
        if not self._wants(t):
            return t
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        pool = self._pool(pin=t.is_cuda)
        buf, reused = pool.take(nbytes, t.device)
        self.stats["host_buffers_reused" if reused else "host_buffers_allocated"] += 1
        host = _as_view(buf, t)
        if t.is_cuda:
            stream = self._copy_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written on the compute stream
            with torch.cuda.stream(stream):
                # a reused buffer: the copy back of its previous contents ran earlier on this same stream
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # the device block is not reused until the copy has read it
        else:
            host.copy_(t)
        handle = _Offloaded(host, buf, pool, t.device, self._last)
        self._last = weakref.ref(handle)
        self.stats["offloaded"] += 1
        self.stats["bytes_offloaded"] += t.numel() * t.element_size()
        return handle

    def _fetch(self, h: _Offloaded) -> None:
        """Start the copy of ``h`` back to its device (asynchronous on CUDA)."""
        if h.device.type == "cuda":
            stream = self._copy_stream(h.device)
            with torch.cuda.stream(stream):
                # allocated on the copy stream: the allocator orders its reuse after the copy stream's work
                h.device_tensor = h.host.to(h.device, non_blocking=True)
                h.ready = torch.cuda.Event()
                h.ready.record(stream)
        else:
            h.device_tensor = h.host.clone()  # the recompute must not alias a buffer the pool hands out again

    def unpack(self, h):
        if not isinstance(h, _Offloaded):
            return h
        self.stats["fetched"] += 1
        if h.device_tensor is None:
            self.stats["fetched_on_demand"] += 1
            self._fetch(h)
        else:
            self.stats["prefetched"] += 1
        out, h.device_tensor = h.device_tensor, None
        if h.device.type == "cuda":
            compute = torch.cuda.current_stream(h.device)
            compute.wait_event(h.ready)
            out.record_stream(compute)  # read on the compute stream: not reused before it is done
        prev = h.prev() if (self.prefetch_enabled and h.prev is not None) else None
        if prev is not None and prev.device_tensor is None:
            self._fetch(prev)  # the layer backward visits next: its copy overlaps this layer's backward
        return out

    def begin_pass(self) -> None:
        """A new forward starts: its first layer has no layer before it to prefetch."""
        self._last = None

    def prefetch_last(self) -> None:
        """The forward has ended: start the copy back of its last packed input, which backward needs
        first, so that it overlaps the loss and the loss backward."""
        last = self._last() if (self.prefetch_enabled and self._last is not None) else None
        if last is not None and last.device_tensor is None:
            self._fetch(last)

    def hooks(self):
        """The ``saved_tensors_hooks`` context to put around one checkpoint call."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _checkpointed_layers(model: nn.Module, adapter) -> List[nn.Module]:
    layers = [m for m in adapter.decoder_layers(model)
              if getattr(m, "gradient_checkpointing", False) and callable(getattr(m, "_gradient_checkpointing_func", None))]
    if not layers:
        raise InputError("activation offload moves checkpointed layer inputs: turn gradient checkpointing on "
                         "(it found no decoder layer with transformers' per-layer checkpointing enabled)")
    return layers


@contextmanager
def offload_checkpoint_inputs(model: nn.Module, min_bytes: Optional[int] = None, prefetch: bool = True,
                              cpu_copies: Optional[bool] = None):
    """While active, the checkpointed decoder layers of ``model`` keep their inputs in pinned host memory
    between forward and backward (see the module docstring). Needs gradient checkpointing on (e.g.
    ``models.set_activation_checkpointing``). ``cpu_copies`` (default: when the model is on the CPU)
    offloads CPU tensors to separate CPU copies, which only tests use. ``min_bytes``: smaller tensors
    stay (default DEFAULT_MIN_BYTES, 0 with ``cpu_copies``). Yields the CheckpointInputOffload (its
    ``stats``); its host buffer pool is freed on exit. Scores and gradients are unchanged: the copies
    are exact. Hooks on the decoder body (``begin_pass`` before its forward, ``prefetch_last`` after)
    chain each forward's inputs on their own and send the last one back while the loss runs."""
    adapter = get_adapter(model)
    layers = _checkpointed_layers(model, adapter)
    if cpu_copies is None:
        cpu_copies = next(model.parameters()).device.type == "cpu"
    if min_bytes is None:
        min_bytes = 0 if cpu_copies else DEFAULT_MIN_BYTES
    offload = CheckpointInputOffload(min_bytes=min_bytes, prefetch=prefetch, cpu_copies=cpu_copies)
    originals = []
    for layer in layers:
        inner = layer._gradient_checkpointing_func

        def offloaded_checkpoint(function, *args, _inner=inner, **kwargs):
            with offload.hooks():
                return _inner(function, *args, **kwargs)

        offloaded_checkpoint.__wrapped__ = inner
        originals.append((layer, inner, offloaded_checkpoint))
        layer._gradient_checkpointing_func = offloaded_checkpoint
    body = adapter.body(model)
    body_hooks = [body.register_forward_pre_hook(lambda module, args: offload.begin_pass()),
                  body.register_forward_hook(lambda module, args, out: offload.prefetch_last())]
    try:
        yield offload
    finally:
        offload.close()
        for hook in body_hooks:
            hook.remove()
        for layer, inner, wrapper in originals:
            # leave it alone if checkpointing was re-configured meanwhile (a new function was set)
            if getattr(layer, "_gradient_checkpointing_func", None) is wrapper:
                layer._gradient_checkpointing_func = inner


def maybe_offload_checkpoint_inputs(model: nn.Module, enabled: bool):
    """``offload_checkpoint_inputs(model)`` when ``enabled``, else a context that yields None (the
    ``--offload-activations`` switch of the pipeline, recovery and benchmarks)."""
    return offload_checkpoint_inputs(model) if enabled else nullcontext()
