"""Run folders: resolved recipe, metrics CSV, checkpoints, JSON summary; interruption handling.

Layout of a run folder::

    recipe.yaml     the resolved recipe (after overrides)
    provenance.json what made the folder: recipe, data identity, dsctl version, commit (dsctl.provenance)
    .lock           held (flock) while a process writes the folder
    metrics.csv     one row per epoch and evaluated sub-network
    last.pt         latest state, written atomically (resume point, also mid-epoch on interruption)
    best.pt         best epoch so far
    final.pt        the finished model (BN recalibrated); what export/eval/report read
    subnets.csv     final per-sub-network table
    summary.json    what ran, where, how long, final numbers
"""

from __future__ import annotations

import csv
import json
import platform
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dsctl.checkpoint import atomic_write_bytes
from dsctl.errors import DsctlError

__all__ = ["RunDir", "StopFlag", "TrainingInterrupted", "catch_signals", "git_commit", "environment"]


class TrainingInterrupted(DsctlError):
    """Raised after an interrupted run saved its resume point."""


class StopFlag:
    """Set by SIGINT/SIGTERM (or a test); trainers check it between optimizer steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


@contextmanager
def catch_signals(flag: StopFlag) -> Iterator[None]:
    """While active, the first SIGINT/SIGTERM sets ``flag``; a second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        if flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def git_commit() -> str:
    """Commit of the dsctl source tree ('+dirty' if modified), or 'unknown'."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "device": str(device), "threads": torch.get_num_threads(), "commit": git_commit()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


class RunDir:
    """Paths and writers of one run folder; only the main rank writes (``main=False`` makes writes no-ops)."""

    def __init__(self, path: str | Path, main: bool = True) -> None:
        self.path = Path(path)
        self.main = main
        if main:
            self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def final(self) -> Path:
        return self.path / "final.pt"

    def write_json(self, name: str, obj: Any) -> None:
        if self.main:
            atomic_write_bytes(self.path / name, (json.dumps(obj, indent=2, default=str) + "\n").encode())

    def write_csv(self, name: str, rows: list[dict[str, Any]]) -> None:
        if not self.main or not rows:
            return
        from io import StringIO

        buf = StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path / name, buf.getvalue().encode())

    def read_csv(self, name: str) -> list[dict[str, str]]:
        p = self.path / name
        if not p.is_file():
            return []
        with p.open(newline="") as f:
            return list(csv.DictReader(f))

    def append_metrics(self, rows: list[dict[str, Any]], *, keep_before_epoch: int | None = None) -> None:
        """Append epoch rows to metrics.csv (dropping rows at or after ``keep_before_epoch`` first, on resume)."""
        if not self.main:
            return
        old = self.read_csv("metrics.csv")
        if keep_before_epoch is not None:
            old = [r for r in old if int(r["epoch"]) < keep_before_epoch]
        self.write_csv("metrics.csv", [*old, *rows])
