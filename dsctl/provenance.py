"""What a run folder was made from, fixed when the folder is created; and the lock of a folder being written.

``provenance.json`` holds the resolved recipe, the identity of the data (source, the files read, their
sizes and a content hash, the sample counts), the dsctl version and the commit. ``--resume`` and re-runs
compare what they would use now with it and refuse a difference with one line naming it; an explicit
``allow_changed`` continues and appends the accepted differences to the file's ``changes`` list, so the
folder never claims a history it did not have.

``run_lock`` holds an exclusive ``flock`` on ``<run>/.lock`` while a process writes the folder. The kernel
drops the lock when the process dies (even by SIGKILL), so a stale lock never blocks a resume.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsctl.config import DataConfig
from dsctl.errors import DsctlError

__all__ = ["Provenance", "ProvenanceError", "RunLockedError", "check_provenance", "data_identity", "record_provenance",
           "release_lock", "run_lock"]

FILE = "provenance.json"
_CHUNK = 1 << 20


class ProvenanceError(DsctlError):
    """A run folder was made from other inputs than the ones given now."""


class RunLockedError(DsctlError):
    """Another live process is writing the run folder."""


def _dsctl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsctl")
    except PackageNotFoundError:  # a source checkout on sys.path, not installed
        return "unknown"


def _hash_files(paths: list[Path]) -> str:
    """Content hash of the files, in order (cached per process by path, size and modification time)."""
    return _hash_cached(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths))


@functools.lru_cache(maxsize=16)
def _hash_cached(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        h.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()[:16]


def _folder_index(root: Path) -> tuple[list[Path], str]:
    """Image folders are too big to hash: hash their index (relative path and size of every file)."""
    files = sorted(p for split in ("train", "val") for p in (root / split).rglob("*") if p.is_file())
    listing = "\n".join(f"{p.relative_to(root)}\t{p.stat().st_size}" for p in files)
    return files, hashlib.sha256(listing.encode()).hexdigest()[:16]


def data_identity(cfg: DataConfig, train_size: int, val_size: int) -> dict[str, Any]:
    """Source, resolved folder, files with sizes, a content hash (index hash for image folders), sample counts."""
    ident: dict[str, Any] = {"source": cfg.source, "train_size": train_size, "val_size": val_size}
    if cfg.source == "synthetic":
        params = {k: v for k, v in cfg.model_dump().items() if k.startswith("synthetic_")}
        ident["hash"] = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        return ident
    if cfg.source == "folder":
        root = Path(cfg.root or ".").resolve()
        files, digest = _folder_index(root)
        ident.update(folder=str(root), files=len(files), bytes=sum(p.stat().st_size for p in files), hash=digest)
        return ident
    if cfg.source in ("fashion_mnist", "mnist"):
        from dsctl.data.idx import IDX_FILES, _file_in, find_idx_dir

        folder = find_idx_dir(cfg.source, cfg.root, download=False)
        files = [f for pair in IDX_FILES.values() for n in pair if (f := _file_in(folder, n)) is not None]
    else:
        from dsctl.data.cifar import find_cifar_dir

        folder = find_cifar_dir(cfg.source, cfg.root)
        files = sorted(p for p in folder.iterdir() if p.is_file())
    ident.update(folder=str(folder), files={p.name: p.stat().st_size for p in files}, hash=_hash_files(files))
    return ident


@dataclass
class Provenance:
    recipe: dict[str, Any]
    data: dict[str, Any]
    dsctl_version: str = field(default_factory=_dsctl_version)
    commit: str = ""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    changes: list[dict[str, Any]] = field(default_factory=list)

    def differences(self, now: Provenance) -> list[str]:
        """What ``now`` changes: 'recipe optim.lr 0.1 -> 0.2', 'data hash a -> b', 'commit x -> y'."""
        out = [f"recipe {k} {a!r} -> {b!r}" for k, (a, b) in _diff(self.recipe, now.recipe).items()]
        out += [f"data {k} {a!r} -> {b!r}" for k, (a, b) in _diff(self.data, now.data).items()]
        out += [f"{k} {getattr(self, k)!r} -> {getattr(now, k)!r}" for k in ("dsctl_version", "commit")
                if getattr(self, k) != getattr(now, k)]
        return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    fa, fb = _flatten(a), _flatten(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def _read(run: Path) -> Provenance | None:
    p = run / FILE
    if not p.is_file():
        return None
    try:
        return Provenance(**json.loads(p.read_text()))
    except (ValueError, TypeError) as err:
        raise ProvenanceError(f"{p}: unreadable ({err}); the run's record is damaged") from None


def _write(run: Path, prov: Provenance) -> None:
    from dsctl.checkpoint import atomic_write_bytes

    atomic_write_bytes(run / FILE, (json.dumps(asdict(prov), indent=2, default=str) + "\n").encode())


def check_provenance(run: Path, now: Provenance, *, allow_changed: bool = False, what: str = "--resume") -> None:
    """Refuse (ProvenanceError, one line) if ``run`` was made from other inputs than ``now``.

    A folder without a record (made by an older dsctl) passes. With ``allow_changed`` the differences are
    appended to the record's ``changes`` instead.
    """
    saved = _read(run)
    if saved is None:
        return
    diffs = saved.differences(now)
    if not diffs:
        return
    if not allow_changed:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ProvenanceError(f"{what} {run}: made from other inputs ({shown}); use the same inputs, another "
                              "--out, or --allow-changed to continue anyway (recorded in the run)")
    saved.changes.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "accepted": diffs})
    _write(run, saved)


def record_provenance(run: Path, now: Provenance) -> None:
    """Write the record of a new run folder (an existing record is kept: it says how the folder began)."""
    if _read(run) is None:
        _write(run, now)


_HELD: dict[Path, int] = {}


def run_lock(run: Path) -> None:
    """Lock ``run`` for this process until it exits (re-locking in the same process is a no-op).

    Raises:
        RunLockedError: another live process holds it (its pid, host and start time are named).
    """
    import fcntl

    key = run.resolve()
    if key in _HELD:
        return
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunLockedError(f"{run} is being written by {holder}; wait for it to finish or use another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
    _HELD[key] = fd


def release_lock(run: Path) -> None:
    """Drop this process's lock on ``run`` (no-op if it holds none)."""
    fd = _HELD.pop(run.resolve(), None)
    if fd is not None:
        os.close(fd)
