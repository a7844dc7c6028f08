"""Interleaved timing spends its calls on samples: one call per round for a slow candidate."""

from __future__ import annotations

import time

from dsctl.latency import time_interleaved


def _calls(rounds: int) -> tuple[int, int]:
    calls = {"a": 0, "b": 0}

    def slow(name: str):
        def fn() -> None:
            calls[name] += 1
            time.sleep(0.06)  # longer than a round's share (0.05 s): one call per block, one block per round
        return fn

    times = time_interleaved({"a": slow("a"), "b": slow("b")}, warmup=1, min_run_time_s=0.01, rounds=rounds)
    assert len(times["a"]) == rounds and all(0.05 < t < 1.0 for t in times["a"])
    return calls["a"], calls["b"]


def test_every_later_round_costs_one_call_per_slow_candidate() -> None:
    one, five = _calls(1), _calls(5)
    # rounds 2..5 add exactly one timed call each (``Timer.timeit`` would add two untimed ones before each)
    assert (five[0] - one[0], five[1] - one[1]) == (4, 4)
