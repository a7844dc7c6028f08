"""PhaseClock: exclusive time per phase (a nested phase pauses the one around it), open phases counted."""

from __future__ import annotations

import time

import pytest

from dsctl.train.timing import PhaseClock, RunTime


def test_nested_phases_are_exclusive_and_add_up() -> None:
    clock = PhaseClock()
    t0 = time.perf_counter()
    with clock.phase("step"):
        time.sleep(0.03)
        with clock.phase("teacher"):
            time.sleep(0.05)
        time.sleep(0.02)
    with clock.phase("step"):
        with clock.phase("finish"):
            time.sleep(0.01)
            mid = clock.totals()
    elapsed = time.perf_counter() - t0
    totals = clock.totals()
    assert totals["teacher"] == pytest.approx(0.05, abs=0.02)
    assert totals["step"] == pytest.approx(0.05, abs=0.02)  # the teacher's time is not the step's
    assert mid["finish"] == pytest.approx(0.01, abs=0.01)  # an open phase counts up to now
    assert sum(totals.values()) == pytest.approx(elapsed, abs=0.01)
    shown = clock.breakdown(elapsed + 1.0)
    assert list(shown) == ["step", "teacher", "finish", "other"] and shown["other"] == pytest.approx(1.0, abs=0.1)


def test_run_time_line() -> None:
    line = RunTime(120.0, {"data": 6.0, "step": 108.0, "other": 6.0}, 12000).describe()
    assert line == "2.0 min, 100 images/s end to end: data loading 5%, forward + optimizer 90%, other 5%"
