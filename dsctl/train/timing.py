"""Where a training run's wall time goes: exclusive seconds per named phase.

The trainer skeleton times the loader (``data``), the optimizer steps (``step``), evaluation,
checkpoints and the final step (``finish``: BN recalibration, the final table, gate calibration); the
trainers time their own parts inside those: ``backward`` (every trainer), ``teacher`` (the supernet's EMA
teacher forward) and ``ema`` (its update). What remains of ``step`` is the forward passes, the losses and
the optimizer. A nested phase's time is not counted in the phase
around it, so the phases add up to the run's time, less what no phase covered (``other``).

On CUDA, kernels run asynchronously: their time lands in the phase that waits for them (the step's loss
values synchronise every micro-batch, so a step's kernels are counted within it, but the teacher's
forward is mostly counted in ``step`` and the forward in ``backward``).

Example:
    >>> clock = PhaseClock()
    >>> with clock.phase("step"):
    ...     with clock.phase("teacher"):
    ...         pass
    >>> sorted(clock.totals())
    ['step', 'teacher']
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["PhaseClock", "RunTime"]

# the order phases are shown in, and how a person would call them
LABELS = {"data": "data loading", "step": "forward + optimizer", "backward": "backward", "teacher": "teacher forward",
          "ema": "EMA update", "evaluate": "evaluation", "checkpoint": "checkpoints",
          "finish": "final step (BN recalibration, table, calibration)", "other": "other"}


class PhaseClock:
    """Exclusive wall seconds per phase; phases nest (the inner one pauses the outer one's count)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._open: list[str] = []
        self._since = 0.0

    def _charge(self, now: float) -> None:
        if self._open:
            name = self._open[-1]
            self._seconds[name] = self._seconds.get(name, 0.0) + now - self._since
        self._since = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._charge(time.perf_counter())
        self._open.append(name)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._open.pop()

    def totals(self) -> dict[str, float]:
        """Seconds per phase so far, the open phases' running time included."""
        now = time.perf_counter()
        out = dict(self._seconds)
        if self._open:
            out[self._open[-1]] = out.get(self._open[-1], 0.0) + now - self._since
        return out

    def breakdown(self, elapsed: float) -> dict[str, float]:
        """Seconds per phase (rounded to 0.1 s) with ``other``: ``elapsed`` less every phase's time."""
        totals = self.totals()
        totals["other"] = max(0.0, elapsed - sum(totals.values()))
        order = list(LABELS)
        return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: order.index(kv[0])
                                                   if kv[0] in order else len(order))}


@dataclass(frozen=True)
class RunTime:
    """A run's wall time (this process: a resumed run counts from the resume), its phases, images trained."""

    elapsed_s: float
    phases_s: dict[str, float]
    images: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def describe(self) -> str:
        """One line: wall time, images per second end to end, and each phase's share (those above 0.5%)."""
        t = self.elapsed_s
        rate = f", {self.images_per_s:.0f} images/s end to end" if self.images and t > 0 else ""
        parts = ", ".join(f"{LABELS.get(k, k)} {100 * v / t:.0f}%" for k, v in self.phases_s.items()
                          if t > 0 and v >= 0.005 * t)
        return f"{t / 60:.1f} min{rate}: {parts}"
