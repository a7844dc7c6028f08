"""Tables of results/conversion/ from the runs results/conversion/run.sh made (nothing here is measured:
every number is read from what a dsctl command wrote).

    python results/conversion/collect.py RUNS OUT_DIR      # conversion.csv, finetune.csv, targets.csv
    python results/conversion/collect.py RUNS --best-criterion   # prints the criterion run.sh fine-tunes

* conversion.csv: each sub-network's top-1 right after conversion (BN recalibrated), by criterion, beside
  the first-k of the weights as trained (``dsctl convert``'s conversion.csv);
* finetune.csv: each sub-network's top-1 after the sandwich fine-tune from the best conversion and from
  the unordered weights, and of the supernets trained from scratch, with the training images each saw
  (summary.json);
* targets.csv: issue 23's two targets per width, each a paired difference with its 95% interval over the
  test images (dsctl analyze's correctness.pt; dsctl.stats) and its verdict.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

CRITERIA = ("l1", "l2", "bn_scale", "taylor")


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def indexed_mean(rows: list[dict[str, str]], column: str) -> float:
    vals = [float(r[column]) for r in rows if r["subnet"].startswith("k")]
    return sum(vals) / len(vals)


def best_criterion(runs: Path) -> str:
    """The criterion whose converted sub-networks are most accurate on average (before any fine-tune)."""
    done = {c: _csv(runs / f"convert-{c}" / "conversion.csv") for c in CRITERIA if (runs / f"convert-{c}" / "conversion.csv").is_file()}
    return max(done, key=lambda c: indexed_mean(done[c], "top1_ordered"))


def correctness(run: Path) -> torch.Tensor:
    return torch.load(run / "analysis" / "correctness.pt", weights_only=True)["correct"]


def main(runs: Path, out: Path) -> None:
    from dsctl.stats import paired_diff, verdict

    best = best_criterion(runs)
    conv = {c: _csv(runs / f"convert-{c}" / "conversion.csv") for c in CRITERIA}
    first = conv[CRITERIA[0]]
    table = []
    for i, row in enumerate(first):
        table.append({"subnet": row["subnet"], "width": row["width"], "macs": row["macs"],
                      "first_k_as_trained": row["top1_unordered"],
                      **{c: conv[c][i]["top1_ordered"] for c in CRITERIA}})
    _write(out / "conversion.csv", table)

    runs_ft = {"finetune": f"fine-tuned from convert-{best}", "finetune-unordered": "fine-tuned from the first-k weights",
               "scratch-2ep": "from scratch, same images", "scratch-6ep": "from scratch, 3x the images"}
    subnets = {name: _csv(runs / name / "subnets.csv") for name in runs_ft}
    images = {name: json.loads((runs / name / "summary.json").read_text())["images_trained"] for name in runs_ft}
    ft = []
    for i, row in enumerate(subnets["finetune"]):
        ft.append({"subnet": row["subnet"], "width": row["width"], "macs": row["macs"],
                   **{name: subnets[name][i]["top1"] for name in runs_ft}})
    ft.append({"subnet": "images trained", "width": "", "macs": "", **{n: images[n] for n in runs_ft}})
    _write(out / "finetune.csv", ft)

    targets = []
    ordered, unordered = correctness(runs / f"convert-{best}"), correctness(runs / "convert-none")
    tuned, scratch = correctness(runs / "finetune"), correctness(runs / "scratch-6ep")
    def row(target: str, k: int, a: str, b: str, r, threshold: float, verdict_: str) -> dict:
        return {"target": target, "subnet": f"k{k}", "a": a, "b": b, "diff_points": round(r.diff, 2),
                "ci95_low": round(r.low, 2), "ci95_high": round(r.high, 2), "only_a": r.only_a, "only_b": r.only_b,
                "n": r.n, "threshold": threshold, "verdict": verdict_}

    last = ordered.shape[1] - 1  # the full network: the ordering must leave it as it was
    for k in range(ordered.shape[1]):
        r = paired_diff(ordered[:, k], unordered[:, k])
        if k == last:
            targets.append(row("ordering leaves the full network's predictions unchanged", k, f"convert-{best}",
                               "convert-none", r, 0.0, "met" if r.only_a == r.only_b == 0 else "missed"))
        else:
            targets.append(row("ordered conversion beats the first-k weights (before fine-tuning)", k,
                               f"convert-{best}", "convert-none", r, 0.0, "met" if r.low > 0 else verdict(r, 0.0)))
    same = correctness(runs / "scratch-2ep")
    for k in range(tuned.shape[1]):
        r = paired_diff(tuned[:, k], scratch[:, k])
        targets.append(row("fine-tuned within 0.5 points of from-scratch (3x the images)", k, "finetune",
                           "scratch-6ep", r, -0.5, verdict(r, -0.5)))
    for k in range(tuned.shape[1]):
        r = paired_diff(tuned[:, k], same[:, k])
        targets.append(row("fine-tuned beats from-scratch on the same training images", k, "finetune",
                           "scratch-2ep", r, 0.0, "met" if r.low > 0 else verdict(r, 0.0)))
    _write(out / "targets.csv", targets)
    ratio = images["finetune"] / images["scratch-6ep"]
    print(f"best criterion {best}; fine-tune images / from-scratch images = {ratio:.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[2] == "--best-criterion":
        print(best_criterion(Path(sys.argv[1])))
    elif len(sys.argv) == 3:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
