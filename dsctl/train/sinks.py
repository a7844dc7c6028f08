"""Live metrics: an optional TensorBoard sink beside metrics.csv (which stays the source of truth).

``dsctl train-supernet|train-gate|baseline|quickstart --tensorboard`` writes TensorBoard event files to
``<run>/tensorboard/`` (a baseline's phases to ``dense/tensorboard`` and ``finetune/tensorboard``): every
optimizer step the training values the progress bar shows (losses, smoothed, and the learning rate) under
``train/``, every evaluation each evaluated sub-network's, gate's or network's top-1, top-5 and loss under
``val_top1/<name>`` and so on. Watch with ``tensorboard --logdir runs/``. A resumed run drops the events
after its resume point first (``purge_step``), so a curve never holds two versions of a step. The flag is
not part of the recipe: turning it on or off does not change what a run is made from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsctl.errors import DsctlError

__all__ = ["TensorBoardSink", "tensorboard_available"]


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardSink:
    """Scalars of one run to ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``)."""

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None, every: int = 1) -> None:
        if not tensorboard_available():
            raise DsctlError("--tensorboard needs the tensorboard package: pip install 'dsctl[tensorboard]' "
                             "(or pip install tensorboard)")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.every = max(1, every)

    def step(self, global_step: int, metrics: dict[str, float]) -> None:
        if global_step % self.every:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, global_step)

    def epoch(self, global_step: int, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            name = str(row.get("subnet", row.get("model", "model")))
            for key in ("top1", "top5", "loss", "avg_macs"):
                if isinstance(row.get(key), int | float):
                    self.writer.add_scalar(f"val_{key}/{name}", row[key], global_step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
