"""One command for the issue-11 performance figures, measured side by side in one run.

    python -m benchmarks                    # every section, every registered family, native sizes
    python -m benchmarks --quick            # tiny models, few repeats: a smoke run (< 2 min, 1 thread)
    python -m benchmarks --only p1,p2 --threads 2
    python -m benchmarks --device cuda      # synchronised timing, bfloat16
    python -m benchmarks --only recipes     # opt-in: the quick recipes end to end (~25 min on 2 cores)

Writes ``results/benchmarks/<device>-<threads>t[-quick][-<sections>].csv`` (one :class:`FigureRow` per
figure, with device, threads, dtype, allocator, torch version and commit; the sections are named when
not all of p1..p5 ran) and prints the table. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.allocator import ALLOCATORS, allocator_setting
from benchmarks.common import Env, FigureRow, Settings

__all__ = ["main", "build_settings", "run"]

SECTIONS = ("p1", "p2", "p3", "p4", "p5")
# opt-in sections: the quick recipes trained end to end (~25 min on 2 cores, needs Fashion-MNIST)
EXTRA_SECTIONS = ("recipes",)
QUICK_MODELS = ("tiny_ds_resnet", "tiny_ds_mobilenetv1")
# inputs in channels_last: convolutions, BN and pooling keep it, and on CPU (oneDNN) and CUDA alike it ran
# every network faster than NCHW (ResNet-50 k0 1.4x at batch 32, 1 thread); sliced and static get the same
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
CPU_REDUCED_SIZE = 128  # CPU runs batches 32 and 64 at this resolution (stated in every row's input_size)


def _families() -> tuple[str, ...]:
    from dsctl.registry import list_models

    return tuple(m for m in list_models() if not m.startswith("tiny_"))


def build_settings(args: argparse.Namespace) -> Settings:
    from dsctl.train.common import resolve_device

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = args.threads or torch.get_num_threads()
    fmt = MEMORY_FORMATS[args.memory_format]
    if args.quick:
        settings = Settings(device, dtype, threads, True, fmt, QUICK_MODELS, min_run_time_s=0.3, rounds=3, warmup=2,
                            batches=(1, 8), dynamic_batch=8, train_batch=8, tool_model="tiny_ds_resnet",
                            tool_repeats=1)
    else:
        reduced = {} if device.type == "cuda" or args.native_size else {32: CPU_REDUCED_SIZE, 64: CPU_REDUCED_SIZE}
        settings = Settings(device, dtype, threads, False, fmt, _families(), min_run_time_s=3.0, rounds=7, warmup=3,
                            large_batch_rounds=25, batch_input_size=reduced,
                            train_batch=64 if device.type == "cuda" else 16,
                            train_input_size=None if device.type == "cuda" else 128)
    if args.models:
        settings = replace(settings, models=tuple(args.models.split(",")))
    if args.min_run_time is not None:
        settings = replace(settings, min_run_time_s=args.min_run_time)
    if args.rounds is not None:
        settings = replace(settings, rounds=args.rounds)
    if args.large_batch_rounds is not None:
        settings = replace(settings, large_batch_rounds=args.large_batch_rounds)
    return settings


def run(settings: Settings, sections: set[str], allocator: str = "system") -> list[FigureRow]:
    """Every figure of ``sections``; ``allocator``: what freed memory does meanwhile (benchmarks.allocator)."""
    with allocator_setting(allocator) as in_effect:
        return _run(settings, sections, in_effect)


def _run(settings: Settings, sections: set[str], allocator: str) -> list[FigureRow]:
    from benchmarks.dynamic import bench_routing
    from benchmarks.inference import bench_slicing
    from benchmarks.tools import bench_tools
    from benchmarks.training import bench_training
    from dsctl.train.run import git_commit

    torch.set_num_threads(settings.threads)
    env = Env(str(settings.device), settings.threads, str(settings.dtype).removeprefix("torch."),
              str(settings.memory_format).removeprefix("torch."), allocator, torch.__version__, git_commit(),
              settings.quick)
    rows: list[FigureRow] = []
    for name in settings.models:
        if sections & {"p1", "p2"}:
            rows += bench_slicing(name, settings, env, sections)
        if "p3" in sections:
            rows += bench_routing(name, settings, env)
        if "p4" in sections:
            rows += bench_training(name, settings, env)
    if "p5" in sections:
        rows += bench_tools(settings, env)
    if "recipes" in sections:
        from benchmarks.recipes import bench_recipes

        rows += bench_recipes(settings, env)
    return rows


def _print(rows: list[FigureRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    r0 = rows[0]
    quick = ", QUICK: smoke run" if r0.quick else ""
    table = Table(title=f"issue 11 figures ({r0.device}, {r0.threads} threads, {r0.dtype}, {r0.memory_format}, "
                        f"allocator {r0.allocator}, "
                        f"torch {r0.torch_version}, {r0.commit}{quick})", title_justify="left")
    for col in ("figure", "model", "subnet", "batch", "px", "value", "target", "ok", "numerator / denominator"):
        table.add_column(col, justify="right" if col in ("batch", "px", "value") else "left")
    for r in rows:
        subnet = f"{r.subnet} ({r.note})" if r.section in ("p1", "p2") else r.subnet
        parts = f"{r.numerator_value:.4g} / {r.denominator_value:.4g} {r.parts_unit}"
        size = str(r.input_size) if r.input_size else "-"
        table.add_row(f"{r.section} {r.figure}", r.model, subnet, str(r.batch), size, f"{r.value:.3f}", r.target,
                      r.meets, parts)
    Console(width=150).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections ({', '.join(SECTIONS + EXTRA_SECTIONS)}; default: "
                             f"{','.join(SECTIONS)}; recipes: the quick recipes end to end, ~25 min)")
    parser.add_argument("--quick", action="store_true", help="tiny models, few repeats (a smoke run, not figures)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--models", help="comma-separated model names (default: every registered family)")
    parser.add_argument("--memory-format", choices=list(MEMORY_FORMATS), default="channels_last",
                        help="layout of the inputs, which every layer keeps (default: channels_last)")
    parser.add_argument("--allocator", choices=list(ALLOCATORS), default="retain",
                        help="retain: freed CPU memory stays in the heap for the next forward (what jemalloc, tcmalloc "
                             "or MALLOC_MMAP_MAX_=0 give); system: glibc's defaults, which unmap and re-fault "
                             "activations above 32 MB on every forward (default: retain; recorded in every row)")
    parser.add_argument("--native-size", action="store_true", help="CPU: batch 32 at the native size too")
    parser.add_argument("--min-run-time", type=float, help="seconds of timing per candidate and measurement")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per measurement")
    parser.add_argument("--large-batch-rounds", type=int,
                        help="P1/P2 at batch > 1: at least this many rounds (default 25; each is one call per "
                             "candidate, so this is the sample count behind each median)")
    parser.add_argument("--out", type=Path, help="CSV path (default: results/benchmarks/<device>-<threads>t.csv)")
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    allowed = SECTIONS + EXTRA_SECTIONS
    if not sections <= set(allowed):
        parser.error(f"--only {args.only!r}: unknown section(s) {sorted(sections - set(allowed))} "
                     f"(allowed: {', '.join(allowed)})")
    logging.basicConfig(level=logging.WARNING)
    settings = build_settings(args)
    rows = run(settings, sections, args.allocator)
    from benchmarks.tools import ROOT
    from dsctl.report import write_csv

    # a run of some sections only is named after them: it never overwrites the full run's file
    part = "" if sections == set(SECTIONS) else "-" + "-".join(s for s in allowed if s in sections)
    out = args.out or ROOT / "results" / "benchmarks" / (
        f"{settings.device.type}-{settings.threads}t{'-quick' if settings.quick else ''}{part}.csv")
    write_csv(out, rows)
    _print(rows)
    print(f"wrote {out}")
    return 0
