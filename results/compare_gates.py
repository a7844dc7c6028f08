"""comparison.csv: gates of two search spaces compared at equal MACs targets, from a report that `dsctl report`
wrote over both (nothing here is measured: every number is read from its report.csv and correctness.pt).

    python results/compare_gates.py REPORT_DIR BASE OTHER

Gate runs are named ``BASE-gate-<target>`` and ``OTHER-gate-<target>-<anything>`` (results/kernel-slicing:
width / kernel; results/vit-mlp: coupled / mlp). For every target, each OTHER gate against the BASE gate:
MACs, latencies at batch 1 and N (timed in the report's one interleaved run), top-1, and the paired accuracy
difference with its 95% interval over the test images (dsctl.stats.paired_diff) and its verdict ("met" when
the OTHER gate is better beyond noise, "missed" when worse, "within noise" otherwise).
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import torch

from dsctl.stats import paired_diff, verdict


def main(report_dir: Path, base_prefix: str, other_prefix: str) -> None:
    with open(report_dir / "report.csv") as f:
        rows = list(csv.DictReader(f))
    correct = torch.load(report_dir / "correctness.pt", weights_only=True)["correct"]

    def correctness(row: dict[str, str]) -> torch.Tensor:
        prefix = f"{row['run']}|{row['method']}|{row['variant']}|"
        (key,) = [k for k in correct if k.startswith(prefix)]
        return correct[key]

    gates = {Path(r["run"]).name: r for r in rows if r["method"] == "dynamic"}
    out = []
    for name, base in sorted(gates.items()):
        m = re.fullmatch(rf"{re.escape(base_prefix)}-gate-([\d.]+)", name)
        if not m:
            continue
        for other, row in sorted(gates.items()):
            if not other.startswith(f"{other_prefix}-gate-{m.group(1)}-"):
                continue
            d = paired_diff(correctness(row), correctness(base))
            out.append({
                "target_macs_m": m.group(1), "gate": other, "window": row["variant"].split()[0],
                "base_gate": name, "base_window": base["variant"].split()[0],
                "macs_m": f"{float(row['macs']) / 1e6:.3f}", "base_macs_m": f"{float(base['macs']) / 1e6:.3f}",
                "top1": row["top1"], "base_top1": base["top1"],
                "diff_points": f"{d.diff:+.2f}", "ci95_low": f"{d.low:+.2f}", "ci95_high": f"{d.high:+.2f}",
                "only_gate_right": d.only_a, "only_base_right": d.only_b, "images": d.n,
                "verdict": verdict(d, 0.0),
                "latency_ms_b1": row["latency_ms_b1"], "base_latency_ms_b1": base["latency_ms_b1"],
                "latency_ms_bN": row["latency_ms_bN"], "base_latency_ms_bN": base["latency_ms_bN"],
                "batch_n": row["batch_n"],
            })
    if not out:
        raise SystemExit(f"no {base_prefix}-gate-* / {other_prefix}-gate-* pairs in {report_dir / 'report.csv'}")
    path = report_dir / "comparison.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    print(f"wrote {path}")
    for r in out:
        print(f"{r['gate']:>20} vs {r['base_gate']}: {r['diff_points']} [{r['ci95_low']}, {r['ci95_high']}] "
              f"{r['verdict']}; MACs {r['macs_m']} vs {r['base_macs_m']}; b1 {r['latency_ms_b1']} vs "
              f"{r['base_latency_ms_b1']} ms; b{r['batch_n']} {r['latency_ms_bN']} vs {r['base_latency_ms_bN']} ms")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__.split("\n\n")[1])
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
