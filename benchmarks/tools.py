"""P5: what the user-facing commands cost, run as the user runs them (a fresh ``python -m dsctl`` process).

Figure: the command's median wall time over the median start-up of ``python -m dsctl --help`` (the
interpreter, torch and dsctl imports), timed in the same interleaved rounds; both seconds are in the row.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Env, FigureRow, Settings, figure, median_s
from dsctl.latency import time_interleaved

__all__ = ["bench_tools", "child_env", "ROOT"]

ROOT = Path(__file__).resolve().parents[1]


def child_env(threads: int) -> dict[str, str]:
    """The environment of a fresh ``python -m dsctl`` process limited to ``threads``."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _command(args: list[str], threads: int) -> Callable[[], None]:
    env = child_env(threads)

    def run() -> None:
        subprocess.run([sys.executable, "-m", "dsctl", *args], cwd=ROOT, env=env, check=True, capture_output=True)

    return run


def bench_tools(settings: Settings, env: Env) -> list[FigureRow]:
    model = settings.tool_model
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "startup": ["--help"],
            f"flops {model} --all": ["flops", model, "--all"],
            f"export --model {model}": ["export", "--model", model, "--out", str(Path(tmp) / "subnet.pt2")],
        }
        fns = {name: _command(args, settings.threads) for name, args in commands.items()}
        times = time_interleaved(fns, warmup=0 if settings.quick else 1, min_run_time_s=0.0,
                                 rounds=settings.tool_repeats, threads=settings.threads)
    start = median_s(times["startup"])
    rows = []
    for name in list(commands)[1:]:
        t = median_s(times[name])
        rows.append(figure(env, "p5", "tool_cost", model, "-", 1, 0, t / start, numerator=(f"dsctl {name}", t),
                           denominator=("dsctl --help (start-up)", start), parts_unit="s",
                           samples=len(times[name]), note="fresh process each run; value = x start-up"))
    return rows
