"""Latency measurement with ``torch.utils.benchmark``, side by side.

``measure_latency`` times several candidates in interleaved rounds (A B C, C B A, ...), so that a
noisy, shared machine slows them alike; the first round sizes each candidate's blocks of calls
(``Timer.blocked_autorange``), every round times such blocks.
Medians and p90 are over the blocks' mean per-iteration times. Timing synchronises CUDA (as ``Timer`` does).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

__all__ = ["LatencyReport", "measure_latency", "time_interleaved", "torch_threads"]


@dataclass(frozen=True)
class LatencyReport:
    """Per-batch latency (milliseconds) and throughput of one candidate at one batch size."""

    name: str
    batch: int
    latency_ms_p50: float
    latency_ms_p90: float
    throughput: float  # images / second at the median
    samples: int


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` intra-op threads (None: unchanged); the caller's setting is restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 10, min_run_time_s: float = 1.0,
                     rounds: int = 5, threads: int | None = None) -> dict[str, list[float]]:
    """Seconds per call of every ``fn()``, timed in interleaved rounds, every other one reversed
    (A B C, C B A, A B C, ...) so that no candidate always runs right after the same other one (what ran
    before leaves caches and the allocator in a state that helps or hurts the next).

    Each round times every candidate for ``min_run_time_s / rounds`` (at least 0.05 s, at least one block)
    in blocks of calls; the lists hold every block's mean per-call time. The first round sizes the blocks
    (``Timer.blocked_autorange``, which also calls once more to warm up); later rounds reuse that size, so
    a slow candidate (a training step, a command) costs one call per round, timed with ``perf_counter``
    between accelerator synchronisations, as ``Timer`` times. Grad mode is the caller's (time
    a training step by passing a function that runs backward). Timing synchronises the accelerator.
    """
    Timer = _timer()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # as Timer does
    times: dict[str, list[float]] = {name: [] for name in fns}
    block: dict[str, int] = {}  # calls per block, from the first round
    per_round = max(min_run_time_s / rounds, 0.05)
    with torch_threads(threads) as threads:  # warm-up at the thread count it is timed at; restored after
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        timers = {name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads) for name, fn in fns.items()}
        names = list(timers)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                timer = timers[name]
                if name not in block:
                    m = timer.blocked_autorange(min_run_time=per_round)
                    block[name] = m.number_per_run
                    times[name].extend(m.times)
                    continue
                spent = 0.0
                while spent < per_round:
                    per_call = _time_block(fns[name], block[name], sync)
                    times[name].append(per_call)
                    spent += per_call * block[name]
    return times


def _time_block(fn: Callable[[], object], number: int, sync: Callable[[], None]) -> float:
    """Mean seconds per call of ``number`` calls. Not ``Timer.timeit``, which first runs
    ``max(number // 100, 2)`` untimed calls: for a one-call block (a batch-32 forward, a training step)
    three calls per sample instead of one."""
    sync()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return (time.perf_counter() - start) / number


@torch.no_grad()
def measure_latency(candidates: dict[str, Callable[[Tensor], Tensor]], x: Tensor, *, warmup: int = 10,
                    min_run_time_s: float = 1.0, rounds: int = 5, threads: int | None = None) -> list[LatencyReport]:
    """Time ``fn(x)`` for every candidate, interleaved over ``rounds``; total time ~ ``min_run_time_s`` each.

    Example:
        >>> reports = measure_latency({"static": static_net, "sliced": bind(model, spec)}, torch.randn(1, 3, 224, 224))
        >>> reports[0].latency_ms_p50
    """
    times = time_interleaved({name: partial(fn, x) for name, fn in candidates.items()}, warmup=warmup,
                             min_run_time_s=min_run_time_s, rounds=rounds, threads=threads)
    batch = x.shape[0]
    out = []
    for name, t in times.items():
        p50 = statistics.median(t)
        out.append(LatencyReport(name, batch, p50 * 1e3, _percentile(t, 0.9) * 1e3, batch / p50, len(t)))
    return out


def _timer():
    """``torch.utils.benchmark.Timer``; its import drags in torch.utils.cpp_extension, which logs a
    "No CUDA runtime is found, using CUDA_HOME" warning on CPU-only machines: not dsctl's output to give."""
    import logging

    ext = logging.getLogger("torch.utils.cpp_extension")
    level = ext.level
    ext.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        ext.setLevel(level)
    return Timer

