"""A rich progress bar implementing dsctl.train.progress.Progress."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dsctl.cli._common import console
from dsctl.train.progress import Progress


class RichProgress(Progress):
    def __init__(self) -> None:
        self.bar = RichBar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TextColumn("eta"),
                           TimeRemainingColumn(), console=console, transient=False)
        self.task = None
        self.bar.start()

    def start(self, description: str, total: int, completed: int = 0) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(description, total=total, completed=completed, metrics="")

    def advance(self, n: int = 1, **metrics: float) -> None:
        text = "  ".join(f"{k} {v:.3g}" if k != "img_s" else f"{v:.0f} img/s" for k, v in metrics.items())
        self.bar.update(self.task, advance=n, metrics=text)

    def finish(self, summary: str = "") -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None
        if summary:
            self.bar.console.print(summary, highlight=False)

    def close(self) -> None:
        self.bar.stop()
