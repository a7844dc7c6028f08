"""Tabulate the bootstrapping comparison: every run's subnets.csv (written by `dsctl train-supernet`) and the
width-multiplier baselines' final top-1 (written by `dsctl baseline`), side by side.

Usage: python results/bootstrap/collect.py RUNS_DIR OUT_CSV   (prints a Markdown table too)
Nothing here computes accuracy: it copies the numbers the dsctl commands wrote.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

MODES = ("none", "id", "ib", "eib", "ib-mix")


def main(runs: Path, out: Path) -> None:
    alone = {}
    for run in sorted(r for r in runs.glob("uniform-w*") if (r / "summary.json").is_file()):
        summary = json.loads((run / "summary.json").read_text())
        alone[run.name.removeprefix("uniform-w")] = float(summary["top1"])
    rows = []
    for mode in MODES:
        path = runs / mode / "subnets.csv"
        if not path.is_file():
            continue
        subnets = list(csv.DictReader(path.open()))
        row = {"mode": mode}
        for r in subnets:
            row[r["subnet"]] = float(r["top1"])
        for w, top1 in alone.items():
            match = next((r for r in subnets if r["width"] != "largest" and abs(float(r["width"]) - float(w)) < 1e-6), None)
            if match is not None:
                row[f"gap_w{w}"] = round(float(match["top1"]) - top1, 2)
        rows.append(row)
    rows.append({"mode": "alone", **{f"w{w}": t for w, t in alone.items()}})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
