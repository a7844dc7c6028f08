"""P5: what the user-facing commands cost, run as the user runs them (a fresh ``python -m dsctl`` process).

Figure: the command's median wall time over the median start-up of ``python -m dsctl --help`` (the
interpreter, torch and dsctl imports), timed in the same interleaved rounds; both seconds are in the row.
Commands: ``flops MODEL --all``, ``export --model MODEL`` and, where the committed report's runs are on this
machine, ``dsctl report`` over them: the command its ``REPORT.md`` says produced it, writing elsewhere.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Env, FigureRow, Settings, figure, median_s
from dsctl.latency import time_interleaved

__all__ = ["bench_tools", "child_env", "report_command", "ROOT", "COMMITTED_REPORT"]

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_REPORT = ROOT / "results" / "fashion-mnist" / "REPORT.md"
_PRODUCED_BY = re.compile(r"Produced by `dsctl (report [^`]*)`")


def report_command(report_md: Path, out: Path, root: Path = ROOT) -> tuple[list[str] | None, str]:
    """(dsctl arguments, why): the ``dsctl report`` command ``report_md`` says produced it, with ``--out``
    replaced by ``out``; None and the reason when the file does not say or its run folders are not here
    (``runs/`` is not in git: the report's README says how to make them)."""
    m = _PRODUCED_BY.search(report_md.read_text()) if report_md.is_file() else None
    if m is None:
        return None, f"{report_md}: no 'Produced by `dsctl report ...`' line"
    args = shlex.split(m.group(1))
    if "--out" not in args:
        return None, f"{report_md}: its dsctl report command has no --out"
    args[args.index("--out") + 1] = str(out)
    runs = [a for a in args[1 : args.index("--out")] if not a.startswith("-")]
    missing = [r for r in runs if not (root / r).is_dir()]
    if missing:
        more = " ..." if len(missing) > 1 else ""
        return None, f"the runs of {report_md.name} are not on this machine ({missing[0]}{more})"
    return args, ""


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
        report, why = report_command(COMMITTED_REPORT, Path(tmp) / "report")
        if report is not None and not settings.quick:
            commands["report (results/fashion-mnist)"] = report
        elif not settings.quick:
            print(f"benchmarks p5: dsctl report not timed: {why}", file=sys.stderr)
        fns = {name: _command(args, settings.threads) for name, args in commands.items()}
        times = time_interleaved(fns, warmup=0 if settings.quick else 1, min_run_time_s=0.0,
                                 rounds=settings.tool_repeats, threads=settings.threads)
    start = median_s(times["startup"])
    rows = []
    for name in list(commands)[1:]:
        t = median_s(times[name])
        subject = "results/fashion-mnist" if name.startswith("report") else model
        rows.append(figure(env, "p5", "tool_cost", subject, "-", 1, 0, t / start, numerator=(f"dsctl {name}", t),
                           denominator=("dsctl --help (start-up)", start), parts_unit="s",
                           samples=len(times[name]), note="fresh process each run; value = x start-up"))
    return rows
