"""Latency measurement with ``torch.utils.benchmark``, side by side.

``measure_latency`` times several candidates in interleaved rounds (A B C A B C ...), so that a noisy,
shared machine slows them alike; each round is one ``Timer.blocked_autorange`` block per candidate.
Medians and p90 are over the blocks' mean per-iteration times. ``Timer`` synchronises CUDA.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LatencyReport", "measure_latency", "torch_threads"]


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


@torch.no_grad()
def measure_latency(candidates: dict[str, Callable[[Tensor], Tensor]], x: Tensor, *, warmup: int = 10,
                    min_run_time_s: float = 1.0, rounds: int = 5, threads: int | None = None) -> list[LatencyReport]:
    """Time ``fn(x)`` for every candidate, interleaved over ``rounds``; total time ~ ``min_run_time_s`` each.

    Example:
        >>> reports = measure_latency({"static": static_net, "sliced": bind(model, spec)}, torch.randn(1, 3, 224, 224))
        >>> reports[0].latency_ms_p50
    """
    from torch.utils.benchmark import Timer

    times: dict[str, list[float]] = {name: [] for name in candidates}
    per_round = max(min_run_time_s / rounds, 0.05)
    with torch_threads(threads) as threads:  # warm-up at the thread count it is timed at
        for fn in candidates.values():
            for _ in range(warmup):
                fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        for _ in range(rounds):
            for name, fn in candidates.items():
                timer = Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=threads)
                m = timer.blocked_autorange(min_run_time=per_round)
                times[name].extend(m.times)
    batch = x.shape[0]
    out = []
    for name, t in times.items():
        p50 = statistics.median(t)
        out.append(LatencyReport(name, batch, p50 * 1e3, _percentile(t, 0.9) * 1e3, batch / p50, len(t)))
    return out
