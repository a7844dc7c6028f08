"""Training curves of finished or running runs, drawn from their metrics.csv (``dsctl plot``; ``dsctl
report`` draws the curves of the runs it reads too): each evaluated model's validation top-1 per epoch, and
the training loss the progress bar showed at each epoch's end."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from dsctl.errors import DsctlError

__all__ = ["metrics_files", "plot_training_curves"]


def metrics_files(run_dir: str | Path) -> list[Path]:
    """The run's metrics.csv, and its phases' (a pruning baseline's dense/ and finetune/)."""
    root = Path(run_dir)
    return [p for p in (root / "metrics.csv", *sorted(root.glob("*/metrics.csv"))) if p.is_file()]


def plot_training_curves(run_dirs: Sequence[str | Path], out: str | Path, title: str = "") -> Path:
    """One PNG: validation top-1 per epoch of every evaluated model of every run (left), and the training
    losses at each epoch's end (right).

    Raises:
        DsctlError: none of the runs has a metrics.csv.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = [(Path(r), f) for r in run_dirs for f in metrics_files(r)]
    if not files:
        raise DsctlError(f"no metrics.csv in {', '.join(map(str, run_dirs))} (not dsctl training runs?)")
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, path in files:
        frame = pd.read_csv(path)
        if frame.empty or "epoch" not in frame:
            continue
        phase = "" if path.parent == run else f"/{path.parent.name}"
        name_col = next((c for c in ("subnet", "model") if c in frame), None)
        groups = frame.groupby(name_col) if name_col else [("", frame)]
        for name, g in groups:
            if "top1" in g:
                acc.plot(g.epoch + 1, g.top1, marker="o", ms=3, label=f"{run.name}{phase} {name}".strip())
        first = frame.drop_duplicates("epoch")
        for col in (c for c in frame.columns if c.startswith("train_loss")):
            loss.plot(first.epoch + 1, first[col], marker="o", ms=3, label=f"{run.name}{phase} {col[6:]}")
    acc.set(xlabel="epoch", ylabel="validation top-1 (%)", title="accuracy")
    loss.set(xlabel="epoch", ylabel="training loss (smoothed, epoch end)", title="loss")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title or "training curves")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
