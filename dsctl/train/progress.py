"""Progress reporting for long work, without tying the library to a terminal.

Trainers call a :class:`Progress`; the default logs a line per epoch, the CLI passes a rich progress bar.
"""

from __future__ import annotations

import logging
import time

__all__ = ["Progress", "LogProgress"]

logger = logging.getLogger("dsctl")


class Progress:
    """Interface (and no-op implementation) of trainer progress callbacks."""

    def start(self, description: str, total: int, completed: int = 0) -> None:
        """A new phase of ``total`` steps begins (``completed`` already done, when resuming)."""

    def advance(self, n: int = 1, **metrics: float) -> None:
        """``n`` steps done; ``metrics`` are running values to display (losses, images/s)."""

    def finish(self, summary: str = "") -> None:
        """The current phase ended; ``summary`` is one line worth keeping on screen."""

    def close(self) -> None:
        """No more phases."""


class LogProgress(Progress):
    """Logs phase summaries, and a line every ``every_s`` seconds inside long phases."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s, self.desc, self.total, self.done, self.t_last = every_s, "", 0, 0, time.monotonic()
        self.metrics: dict[str, float] = {}

    def start(self, description: str, total: int, completed: int = 0) -> None:
        self.desc, self.total, self.done, self.t_last = description, total, completed, time.monotonic()
        self.metrics = {}

    def advance(self, n: int = 1, **metrics: float) -> None:
        self.done += n
        self.metrics.update(metrics)
        if time.monotonic() - self.t_last >= self.every_s:
            self.t_last = time.monotonic()
            vals = " ".join(f"{k}={v:.4g}" for k, v in self.metrics.items())
            logger.info("%s %d/%d %s", self.desc, self.done, self.total, vals)

    def finish(self, summary: str = "") -> None:
        if summary:
            logger.info("%s", summary)
