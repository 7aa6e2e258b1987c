"""Where the package writes, and the one rule for what it may delete: only what it created.

Every output goes through this module: model folders (``prune``, ``finetune``), single files
(``eval --json``, ``--save-scores``, reports), and the run's work folder (resume state, teacher cache).

The ownership rule:

* An output folder is written into a hidden temporary folder beside it (``.NAME.tmp-XXXX``, marked with
  ``PARTIAL_MARKER``) and renamed into place when complete; the last file written is ``MANIFEST``,
  every file the package put there with its SHA-256, size and modification time. ``overwrite``
  replaces an existing folder only when it is such an earlier output, holds nothing else, and none of
  its files was changed since it was written: a folder with a file the manifest does not list, a file
  whose content no longer matches its digest, or no manifest, is refused.
* Never replaced, with or without ``overwrite``: the current folder or any folder above it, an input
  (the model, the data, ...) or any folder above an input, a file where a folder is expected.
* A single file is replaced only when it carries the package's mark (``WRITTEN_BY`` in a JSON
  object, or in the metadata of a safetensors or GGUF file); a JSON file also carries the digest of
  its content (``CONTENT_DIGEST``) and is refused once it was edited.
* A hidden temporary folder of an earlier run that was killed (its marker names a process that no
  longer runs on this host) is removed at the next run for the same output; one without the marker
  is never touched.
* Work folders: files the run creates there are removed when it succeeds; the folder itself only
  when the run created it and it is empty afterwards.

Every check runs before any work (``check_output_dir`` / ``check_output_file``), and the same functions
guard the final rename, so a path refused at the end was refused at the start.

Outputs get the user's umask (``0644`` files and ``0755`` folders under the usual ``022``), not the
``0600``/``0700`` of temporary files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from ..errors import InputError

__all__ = ["REPORT_NAME", "MANIFEST", "PARTIAL_MARKER", "WRITTEN_BY", "GGUF_MARK_KEY", "is_sdmprune_gguf", "check_output_dir", "check_output_file",
           "atomic_output_dir", "atomic_write_file", "write_json_atomic", "is_package_output", "WorkDir",
           "remove_stale_partials"]

REPORT_NAME = "sdmprune.json"  # the report inside every output folder
MANIFEST = ".sdmprune-files"  # JSON list of the files an output folder holds, written last
PARTIAL_MARKER = ".sdmprune-partial"  # inside a temporary folder: {"pid", "host"} of the writing process
WRITTEN_BY = "written_by"  # key (JSON) or metadata field (safetensors) marking a file of the package
GGUF_MARK_KEY = f"sdmprune.{WRITTEN_BY}"  # the same mark as a GGUF metadata key
CONTENT_DIGEST = "content_sha256"  # beside WRITTEN_BY in a JSON file: the SHA-256 of its other keys (json_digest)

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------ modes
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public_mode(path: Path, folder: bool) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would under the user's umask."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


# ------------------------------------------------------------------------------------ checks
def _absolute(path: PathLike, flag: str) -> Path:
    text = os.fspath(path)
    if not str(text).strip():
        raise InputError(f"{flag}: empty path (an unset variable?); name the output explicitly")
    return Path(os.path.abspath(os.path.expanduser(text)))


def _is_within(path: Path, folder: Path) -> bool:
    """True when ``path`` is ``folder`` or lies below it (both absolute, symlinks resolved)."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _check_place(out: Path, flag: str) -> None:
    """``out``'s nearest existing ancestor is a writable folder, not a file."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {str(out)!r} lies under a file ({str(parent)!r})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {str(out)!r}: cannot write in {str(parent)!r} (permission denied)")
    for p in [out] + list(out.parents):
        if p.exists() and not p.is_dir() and p != out:
            raise InputError(f"{flag} {str(out)!r} lies under a file ({str(p)!r})")


def _check_not_protected(out: Path, flag: str, inputs: Iterable[Optional[PathLike]]) -> None:
    if _is_within(Path.cwd(), out):
        raise InputError(f"{flag} {str(out)!r} is the current folder or a folder above it; "
                         "name a new folder for the output")
    for given in inputs:
        if given is None or not str(given).strip():
            continue
        p = Path(os.path.abspath(os.path.expanduser(os.fspath(given))))
        if p.exists() and _is_within(p, out):
            raise InputError(f"{flag} {str(out)!r} is an input of this run ({str(p)!r}) or a folder above it; "
                             "name a new folder for the output")


def _listing(folder: Path) -> set:
    """Every file and folder below ``folder``, as POSIX paths relative to it."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        for n in dirnames + filenames:
            out.add((rel / n).as_posix())
    return out


def file_digest(path: PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_entries(folder: Path) -> dict:
    """What MANIFEST records of ``folder``: every file with its digest, size and modification time (the
    time lets a later check skip re-reading an unchanged file), every sub-folder as None."""
    out = {}
    for rel in sorted(_listing(folder)):
        p = folder / rel
        if p.is_dir():
            out[rel] = None
        else:
            st = p.stat()
            out[rel] = {"sha256": file_digest(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def _manifest(folder: Path) -> Optional[dict]:
    """{path: entry} of ``folder``'s MANIFEST (an entry without a digest for a folder, or for the bare list
    an earlier version wrote), or None when there is none."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, list):
        return {str(rel): None for rel in data}
    return data if isinstance(data, dict) else None


def _changed_files(folder: Path, listed: dict) -> list:
    """The files of ``folder`` whose content differs from the digest MANIFEST holds (a file with its
    recorded size and modification time is taken as unchanged without reading it)."""
    changed = []
    for rel, entry in sorted(listed.items()):
        if not isinstance(entry, dict) or "sha256" not in entry:
            continue
        p = folder / rel
        try:
            st = p.stat()
        except FileNotFoundError:
            continue  # removed since: nothing of the user's is lost by replacing the folder
        if not p.is_file() or st.st_size != entry.get("bytes"):
            changed.append(rel)
        elif st.st_mtime_ns != entry.get("mtime_ns") and file_digest(p) != entry["sha256"]:
            changed.append(rel)
    return changed


def is_package_output(folder: PathLike) -> bool:
    """True when ``folder`` is an output of this package holding nothing else (see the module docstring)."""
    folder = Path(folder)
    listed = _manifest(folder)
    return listed is not None and _listing(folder) <= set(listed) | {MANIFEST}


def check_output_dir(out: PathLike, overwrite: bool = False, *, flag: str = "--out",
                     inputs: Sequence[Optional[PathLike]] = ()) -> Path:
    """The absolute output folder ``out`` after every check of the ownership rule (InputError otherwise).

    ``inputs``: paths this run reads (model, data, teacher, work folder); the output may be none of them
    and no folder above one. Run it before any work; ``atomic_output_dir`` runs it again at the end."""
    path = _absolute(out, flag)
    _check_not_protected(path, flag, inputs)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {str(path)!r} is a file, not a folder")
    _check_place(path, flag)
    if path.is_dir() and any(path.iterdir()):
        if not is_package_output(path):
            extra = sorted(_listing(path) - set(_manifest(path) or ()) - {MANIFEST})
            what = f"it holds {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "") \
                if _manifest(path) is not None else "it is not an earlier sdmprune output"
            raise InputError(f"{flag} {str(path)!r} exists and is not written by sdmprune ({what}); "
                             "it is never replaced: choose another folder")
        changed = _changed_files(path, _manifest(path))
        if changed:
            raise InputError(f"{flag} {str(path)!r} is an earlier sdmprune output, but {changed[0]!r}"
                             + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
                             + " changed after sdmprune wrote it; it is never replaced: keep your changes elsewhere "
                             "and remove the folder yourself, or choose another folder")
        if not overwrite:
            raise InputError(f"{flag} {str(path)!r} holds an earlier output (use --overwrite to replace it)")
    return path


def is_sdmprune_gguf(path: PathLike) -> bool:
    """True when ``path`` is a readable GGUF file carrying the package's mark (``GGUF_MARK_KEY``)."""
    try:
        import gguf  # the optional sdmprune[gguf]: without it no GGUF of the package's was written here

        return GGUF_MARK_KEY in gguf.GGUFReader(os.fspath(path)).fields
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def _package_mark(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            if fh.read(4) == b"GGUF":
                return is_sdmprune_gguf(path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                return WRITTEN_BY in (fh.metadata() or {})
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return isinstance(data, dict) and WRITTEN_BY in data
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def json_digest(obj: dict) -> str:
    """SHA-256 of a JSON object without its CONTENT_DIGEST key, in canonical form (sorted keys, no
    spaces), so re-indenting a file does not count as changing it."""
    rest = {k: v for k, v in obj.items() if k != CONTENT_DIGEST}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _edited_json(path: Path) -> bool:
    """True when ``path`` is a JSON object carrying CONTENT_DIGEST that no longer matches its content."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except Exception:  # noqa: BLE001 - not JSON (a safetensors or GGUF file): its mark is checked elsewhere
        return False
    return isinstance(data, dict) and CONTENT_DIGEST in data and data[CONTENT_DIGEST] != json_digest(data)


def check_output_file(out: PathLike, overwrite: bool = False, *, flag: str,
                      inputs: Sequence[Optional[PathLike]] = ()) -> Path:
    """The absolute output file ``out`` after the ownership rule's checks for files (InputError otherwise)."""
    path = _absolute(out, flag)
    if path.is_dir():
        raise InputError(f"{flag} {str(path)!r} is a folder; give a file path")
    for given in inputs:
        if given is not None and str(given).strip() and os.path.exists(os.path.expanduser(os.fspath(given))):
            if Path(os.path.abspath(os.path.expanduser(os.fspath(given)))).resolve() == path.resolve():
                raise InputError(f"{flag} {str(path)!r} is an input of this run")
    _check_place(path, flag)
    if path.exists():
        if not _package_mark(path):
            raise InputError(f"{flag} {str(path)!r} exists and is not written by sdmprune; it is never replaced")
        if _edited_json(path):
            raise InputError(f"{flag} {str(path)!r} was written by sdmprune but changed since; it is never "
                             "replaced: keep your changes elsewhere and remove it yourself, or choose another path")
        if not overwrite:
            raise InputError(f"{flag} {str(path)!r} exists (use --overwrite to replace it)")
    return path


# ------------------------------------------------------------------------------------ stale partials
def _alive(marker: dict) -> bool:
    if marker.get("host") != socket.gethostname():
        return True  # another machine's: cannot tell, leave it
    try:
        os.kill(int(marker["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, KeyError, ValueError, TypeError):
        return True
    return True


def remove_stale_partials(out: PathLike) -> list:
    """Remove this package's temporary folders beside ``out`` whose writer is gone; returns their paths.

    A left-over ``.NAME.old-*`` (the previous output moved aside) is put back when ``out`` is missing."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            try:
                marker = json.loads((p / PARTIAL_MARKER).read_text())
            except (OSError, ValueError):
                continue  # not ours
            if _alive(marker):
                continue
            if kind == "old" and not out.exists() and (p / "d").is_dir():
                os.rename(p / "d", out)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    return removed


def _mark_partial(folder: Path) -> None:
    (folder / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


# ------------------------------------------------------------------------------------ atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(out_dir: PathLike, overwrite: bool = False, *, flag: str = "--out",
                      inputs: Sequence[Optional[PathLike]] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out_dir``; on success it becomes ``out_dir``.

    The ownership rule is checked before anything is written and again before the rename. On an
    exception in the body the temporary folder is removed and ``out_dir`` is left as it was. On success
    the manifest is written, an earlier output (if any) is moved aside, the temporary folder renamed
    into place (same filesystem: atomic), then the earlier output removed."""
    out = check_output_dir(out_dir, overwrite, flag=flag, inputs=inputs)
    remove_stale_partials(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    _mark_partial(tmp)
    try:
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        for rel in _listing(tmp):
            _public_mode(tmp / rel, (tmp / rel).is_dir())
        (tmp / MANIFEST).write_text(json.dumps(_manifest_entries(tmp), indent=1) + "\n", encoding="utf-8")
        _public_mode(tmp / MANIFEST, False)
        _public_mode(tmp, True)
        check_output_dir(out, overwrite, flag=flag, inputs=inputs)  # someone may have filled it meanwhile
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            _mark_partial(old)
            os.rename(out, old / "d")
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old / "d", out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_write_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the body returns it replaces ``path`` (fsync, rename).

    No ownership check here: callers check the user-facing path first (``check_output_file``); this is
    also how the package rewrites its own state files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _public_mode(Path(tmp), False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _jsonable(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if hasattr(obj, "tolist") and getattr(obj, "ndim", 0) > 0:  # numpy arrays
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def json_text(obj: Any) -> str:
    """``obj`` as strict JSON: tensors/numpy values become lists or numbers, paths and dtypes strings,
    NaN/inf the strings "NaN"/"Infinity"/"-Infinity"."""

    def fix(o):
        if isinstance(o, float) and not math.isfinite(o):
            return "NaN" if math.isnan(o) else ("Infinity" if o > 0 else "-Infinity")
        if isinstance(o, dict):
            return {str(k): fix(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [fix(v) for v in o]
        return o

    return json.dumps(fix(json.loads(json.dumps(obj, default=_jsonable))), indent=2, allow_nan=False) + "\n"


def write_json_atomic(path: PathLike, obj: Any, written_by: Optional[str] = None) -> None:
    """Write ``obj`` as strict JSON (``json_text``) to ``path`` atomically. ``written_by`` (e.g.
    "sdmprune eval") adds the package's mark to a JSON object, so a later run may replace the file, and
    the digest of its content, so that a file edited since is not replaced."""
    if written_by is not None and isinstance(obj, dict):
        obj = json.loads(json_text({WRITTEN_BY: written_by, **obj}))
        obj[CONTENT_DIGEST] = json_digest(obj)
    text = json_text(obj)
    with atomic_write_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------ work folders
class WorkDir:
    """A folder for a run's own files (resume state, teacher cache) that may also hold the user's.

    ``file(name)`` is a path the run owns; ``cleanup()`` removes exactly those files (and their
    temporaries), then the folder when it is empty and the run chose it (``given=False``: a default
    location beside the output) or created it. A folder the user named is otherwise kept."""

    def __init__(self, path: PathLike, *, given: bool, flag: str = "--work-dir"):
        self.path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{flag} {str(self.path)!r} is a file, not a folder")
        _check_place(self.path, flag)
        self.removable = not given or not self.path.exists()
        self.names: set = set()

    def file(self, name: str) -> Path:
        """The path of a file of the run (the folder is made when the file is first written)."""
        self.names.add(name)
        return self.path / name

    def cleanup(self) -> None:
        for name in self.names:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
            for stale in self.path.glob(f".{name}.tmp-*"):
                with contextlib.suppress(OSError):
                    stale.unlink()
        if self.removable and self.path.is_dir() and not any(self.path.iterdir()):
            with contextlib.suppress(OSError):  # another rank may have removed it first
                self.path.rmdir()

    def holds_run_files(self) -> bool:
        """True when a file of this run is in the folder (something to resume)."""
        return any((self.path / name).exists() for name in self.names)
