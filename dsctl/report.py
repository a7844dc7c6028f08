"""CSV rows and comparison reports."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

__all__ = ["write_csv"]


def write_csv(path: str | Path, rows: Sequence[Any]) -> None:
    """Write dataclass instances or dicts as CSV; the first row's keys make the header."""
    dict_rows = [asdict(r) if is_dataclass(r) else dict(r) for r in rows]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict_rows[0]) if dict_rows else [])
        writer.writeheader()
        writer.writerows(dict_rows)
