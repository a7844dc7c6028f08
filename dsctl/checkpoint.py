"""Low-level checkpoint files: atomic writes, and loads that never unpickle code.

A checkpoint is a plain dict of tensors and JSON-like values stamped with ``format_version``; loading
always uses ``torch.load(..., weights_only=True)``. Which keys a run kind stores, and what they mean, is
:mod:`dsctl.artifacts`' business (``read_artifact``, ``Artifact.save``); this module only moves dicts.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from dsctl.errors import CheckpointError

__all__ = ["FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "atomic_write_bytes",
           "find_checkpoint"]

FORMAT_VERSION = 2  # 2: typed artifacts (dsctl.artifacts); format 1 still loads


def _umask() -> int:
    """The process umask, read from /proc where possible (``os.umask`` can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        _fsync(tmp)  # the data is on disk before the rename makes it the file ...
        os.replace(tmp, path)
        _fsync(path.parent)  # ... and the rename is on disk before we report success
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus ``format_version``) to a temporary file, then rename it over ``path``."""
    payload = {"format_version": FORMAT_VERSION, **payload}
    _atomic(Path(path), lambda tmp: torch.save(payload, tmp))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the best (else last) checkpoint of a run folder."""
    p = Path(path)
    if p.is_dir():
        for name in ("final.pt", "best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: no checkpoint (final.pt, best.pt or last.pt) in this folder")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file or folder")
    return p


def _load_weights_only(p: Path, map_location: str | torch.device, what: str) -> Any:
    """``torch.load(weights_only=True)`` with one clear line for every way a file can be wrong.

    Never repeats torch's advice to retry with ``weights_only=False``: files can come from strangers, and
    unpickling them can run code.
    """
    try:
        if p.stat().st_size == 0:
            raise CheckpointError(f"{p}: empty file (0 bytes), not a {what}")
    except OSError as err:
        raise CheckpointError(f"{p}: cannot read ({err.strerror})") from None
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        text = str(err)
        if "Unsupported global" in text or "GLOBAL" in text:
            reason = ("it holds Python objects other than tensors and plain containers, which dsctl does not "
                      "unpickle (that could run code)")
        elif isinstance(err, OSError | EOFError | RuntimeError | IndexError | ValueError | KeyError | pickle.UnpicklingError):
            reason = "not a PyTorch file, or a truncated/corrupt one"
        else:
            reason = f"unreadable ({type(err).__name__})"
        raise CheckpointError(f"{p}: not a readable {what}: {reason}") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a dsctl checkpoint's dict with ``weights_only=True`` (plus ``path``: the file read); CheckpointError
    on anything else. Use :func:`dsctl.artifacts.read_artifact` for a typed, validated run artifact."""
    p = find_checkpoint(path)
    ckpt = _load_weights_only(p, map_location, "checkpoint")
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "model_name" not in ckpt:
        raise CheckpointError(f"{p}: not a dsctl checkpoint (no format_version/model_name)")
    version = ckpt["format_version"]
    if not isinstance(version, int):
        raise CheckpointError(f"{p}: not a dsctl checkpoint (format_version {version!r})")
    if version > FORMAT_VERSION:
        writer = f" (written by dsctl {ckpt['dsctl_version']})" if ckpt.get("dsctl_version") else ""
        raise CheckpointError(f"{p}: checkpoint format {version!r}{writer} is newer than this dsctl reads "
                              f"(format {FORMAT_VERSION}); upgrade dsctl")
    ckpt["path"] = str(p)
    return ckpt
