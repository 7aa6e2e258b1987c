"""One run state for every resumable command (``prune``, ``finetune``): fingerprint, checkpoint, RNG.

A checkpoint is kept in a work folder (``sdmprune.storage.paths.WorkDir``) and written atomically. It carries
the run's fingerprint: every setting that decides the result, the model's identity (a digest of its
weights), its dtype and device kind, and a digest of the data. ``RunState.load`` refuses a checkpoint
whose fingerprint differs, with one line naming what differs, so a resumed run never mixes two
settings (for instance cached bf16 teacher states read back as float32). The part of a fingerprint
that the arguments decide is compared before any weight is loaded (``RunState.check_settings``); the
weights and data digests when the run has them (``load``). The RNG states (torch CPU,
CUDA when it is in use, Python's ``random``) are captured with every checkpoint and restored on load.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Dict, Optional

import torch

from ..errors import InputError
from .paths import WorkDir, atomic_write_file

__all__ = ["RunState", "rng_state", "set_rng_state", "tensor_digest", "weights_digest"]

# elements read from every parameter for the weights digest (evenly spaced over the flattened tensor)
WEIGHT_SAMPLES = 257


def rng_state() -> dict:
    """The RNG states a run draws from: torch CPU, Python ``random``, and CUDA once CUDA is in use (a CPU
    run never starts CUDA for this)."""
    out = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Optional[dict]) -> None:
    """Restore what ``rng_state`` captured (missing parts are left as they are)."""
    if not state:
        return
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tensor_digest(t: Optional[torch.Tensor]) -> Optional[str]:
    """SHA-256 of a tensor's shape, dtype and bytes (calibration tokens: exact identity)."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def weights_digest(model: torch.nn.Module) -> str:
    """A digest of the model's identity: every parameter's name, shape, dtype and ``WEIGHT_SAMPLES``
    evenly spaced values. Reading a few hundred values per tensor keeps it cheap for an 8B model on any
    device, and any other checkpoint, fine-tune or dtype changes it."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name} {tuple(p.shape)} {p.dtype}".encode())
        if p.device.type == "meta" or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        k = min(WEIGHT_SAMPLES, flat.numel())
        # integer spacing: float positions (linspace) round past the end beyond 2**24 elements
        idx = torch.arange(k, dtype=torch.int64) * (flat.numel() - 1) // max(k - 1, 1)
        h.update(flat[idx.to(flat.device)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _show(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:12] + "..."


class RunState:
    """The checkpoint of one run in ``work`` (file ``name``), tied to ``fingerprint``.

    ``fingerprint``: an ordered dict of what decides the result; keys are named in the refusal
    message, so use the command's own words (``dtype``, ``weights``, ``calibration``, ``--alpha``...)."""

    def __init__(self, work: WorkDir, name: str, fingerprint: Dict[str, Any]):
        self.work = work
        self.path = work.file(name)
        self.fingerprint = dict(fingerprint)

    def file(self, name: str):
        """Another file of this run in the same work folder (removed with it)."""
        return self.work.file(name)

    def exists(self) -> bool:
        return self.path.is_file()

    def _read(self, mmap: bool = False) -> dict:
        """The saved state (``mmap``: its tensors mapped, not read: cheap for a large checkpoint when only
        the fingerprint is wanted); InputError when it cannot be read or has no fingerprint."""
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is one line
            raise InputError(f"--resume: the checkpoint {str(self.path)!r} cannot be read ({type(exc).__name__}); "
                             "drop --resume to start over") from None
        if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), dict):
            raise InputError(f"--resume: {str(self.path)!r} was written by another version of sdmprune; "
                             "drop --resume to start over")
        return state

    def _compare(self, saved: dict, now: dict, only_now: bool) -> None:
        """InputError naming every key whose value differs (``only_now``: the keys of ``now`` only, a part
        of the fingerprint; else also keys only the checkpoint has)."""
        keys = list(now) + ([] if only_now else [k for k in saved if k not in now])
        diffs = []
        for key in keys:
            was, is_ = saved.get(key), now.get(key)
            if was != is_:
                if key in ("weights", "calibration", "data"):
                    diffs.append(f"other {key}")
                else:
                    diffs.append(f"{key} {_show(was)} (now {_show(is_)})")
        if diffs:
            raise InputError(f"--resume: the checkpoint in {str(self.work.path)!r} was made with "
                             f"{', '.join(diffs)}; rerun with the same settings, or drop --resume to start over")

    def check_settings(self) -> bool:
        """Before anything is loaded: compare the checkpoint with this state's fingerprint, which then
        holds only the part the arguments decide (InputError naming what differs). False when there
        is no checkpoint (the run starts from the beginning), True when there is one to resume."""
        if not self.path.is_file():
            return False
        self._compare(self._read(mmap=True)["fingerprint"], self.fingerprint, only_now=True)
        return True

    def load(self) -> Optional[dict]:
        """The saved state, or None when there is none. InputError when it belongs to another run."""
        if not self.path.is_file():
            return None
        state = self._read()
        self._compare(state["fingerprint"], self.fingerprint, only_now=False)
        set_rng_state(state.get("rng"))
        return state

    def save(self, state: dict) -> None:
        """Write ``state`` with the fingerprint and the current RNG states, atomically."""
        state = dict(state, fingerprint=self.fingerprint, rng=rng_state())
        with atomic_write_file(self.path) as tmp:
            torch.save(state, tmp)

    def discard(self) -> None:
        """Forget an earlier checkpoint (a fresh start): a later --resume must never pair it with files
        this run rewrites."""
        self.path.unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Remove the run's files (the work folder's rule: a user's folder and files are kept)."""
        self.work.cleanup()
