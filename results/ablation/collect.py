"""results/ablation/ablation.csv from the runs results/ablation/run.sh made (nothing measured here: every
number is read from a dsctl command's output).

    python results/ablation/collect.py RUNS OUT_DIR

One row per gate: what was changed from dsctl's default gate, its window, accuracy, average MACs (gate
included) against the target, latency at batch 1 and 32 (the report's run), and its accuracy minus the
default gate's with the paired 95% interval over the 10,000 test images (the report's correctness.pt,
dsctl.stats.paired_diff).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

VARIANTS = {"default": "dsctl's default: cheapest-correct targets, class weighting, window of 3, calibrated",
            "authors-sgs": "the authors' SGS targets (smallest if right, else widest)",
            "argmax": "argmax decision (no calibration to the budget)",
            "window-4": "window of 4 sub-networks (the authors') instead of 3",
            "no-class-weighting": "no class weighting of the gate's targets"}


def main(runs: Path, out: Path) -> None:
    from dsctl.stats import paired_diff

    report = {Path(r["run"]).name: r for r in csv.DictReader(open(runs / "report" / "report.csv")) if r["method"] == "dynamic"}
    correct = torch.load(runs / "report" / "correctness.pt", weights_only=True)["correct"]
    by_run = {Path(k.split("|")[0]).name: v for k, v in correct.items() if "|dynamic|" in k}
    base = by_run["default"]
    rows = []
    for name, change in VARIANTS.items():
        final = json.loads((runs / name / "summary.json").read_text())["final"]
        r = report[name]
        d = paired_diff(by_run[name], base)
        lo, hi = final["window"]
        verdict = "-" if name == "default" else ("better" if d.low > 0 else "worse" if d.high < 0 else "within noise")
        rows.append({"variant": name, "change": change, "window": f"k{lo}..k{hi}", "top1": final["top1"],
                     "avg_macs_m": round(final["avg_macs"] / 1e6, 3),
                     "macs_vs_target_pct": round(100 * (final["avg_macs"] / (final["target_macs_m"] * 1e6) - 1), 2),
                     "ms_b1": r["latency_ms_b1"], "ms_b32": r["latency_ms_bN"],
                     "vs_default_points": round(d.diff, 2), "ci95_low": round(d.low, 2), "ci95_high": round(d.high, 2),
                     "only_variant": d.only_a, "only_default": d.only_b, "verdict": verdict})
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'ablation.csv'}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
