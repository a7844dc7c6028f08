"""comparison.csv of results/kernel-slicing/ from the report run.sh wrote (nothing here is measured: every
number is read from report.csv and correctness.pt, which `dsctl report` wrote).

    python results/kernel-slicing/collect.py REPORT_DIR

For every MACs target, each gate over width and kernel size against the gate over width alone: MACs,
latencies at batch 1 and N (timed in the report's one interleaved run), top-1, and the paired accuracy
difference with its 95% interval over the test images (dsctl.stats.paired_diff) and its verdict ("met" when
the kernel gate is better beyond noise, "missed" when worse, "within noise" otherwise).
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import torch

from dsctl.stats import paired_diff, verdict


def main(report_dir: Path) -> None:
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
        m = re.fullmatch(r"width-gate-([\d.]+)", name)
        if not m:
            continue
        for other, row in sorted(gates.items()):
            if not other.startswith(f"kernel-gate-{m.group(1)}-"):
                continue
            d = paired_diff(correctness(row), correctness(base))
            out.append({
                "target_macs_m": m.group(1), "kernel_gate": other, "window": row["variant"].split()[0],
                "width_gate_window": base["variant"].split()[0],
                "macs_m_kernel": f"{float(row['macs']) / 1e6:.3f}", "macs_m_width": f"{float(base['macs']) / 1e6:.3f}",
                "top1_kernel": row["top1"], "top1_width": base["top1"],
                "diff_points": f"{d.diff:+.2f}", "ci95_low": f"{d.low:+.2f}", "ci95_high": f"{d.high:+.2f}",
                "only_kernel_right": d.only_a, "only_width_right": d.only_b, "images": d.n,
                "verdict": verdict(d, 0.0),
                "latency_ms_b1_kernel": row["latency_ms_b1"], "latency_ms_b1_width": base["latency_ms_b1"],
                "latency_ms_bN_kernel": row["latency_ms_bN"], "latency_ms_bN_width": base["latency_ms_bN"],
                "batch_n": row["batch_n"],
            })
    if not out:
        raise SystemExit(f"no width-gate-* / kernel-gate-* pairs in {report_dir / 'report.csv'}")
    path = report_dir / "comparison.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    print(f"wrote {path}")
    for r in out:
        print(f"{r['kernel_gate']:>20} vs width gate at {r['target_macs_m']} M: {r['diff_points']} "
              f"[{r['ci95_low']}, {r['ci95_high']}] {r['verdict']}; MACs {r['macs_m_kernel']} vs {r['macs_m_width']}; "
              f"b1 {r['latency_ms_b1_kernel']} vs {r['latency_ms_b1_width']} ms")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    main(Path(sys.argv[1]))
