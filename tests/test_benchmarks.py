"""The benchmark runner writes one row per figure with finite ratios and full provenance (no timed asserts)."""

from __future__ import annotations

import csv
import math
import os
import platform
import sys
import time
from dataclasses import fields

import pytest
import torch

from benchmarks import tools
from benchmarks.common import FigureRow
from benchmarks.run import main


@pytest.mark.slow  # every section on a real model: about 10 s
def test_quick_run_writes_every_section(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_command(args: list[str], threads: int):  # a fresh dsctl process per call costs seconds: fake it
        return lambda: time.sleep(0.002 if args == ["--help"] else 0.004)

    monkeypatch.setattr(tools, "_command", fake_command)
    out = tmp_path / "quick.csv"
    assert main(["--quick", "--models", "tiny_ds_resnet", "--threads", "1", "--min-run-time", "0.05", "--rounds", "2",
                 "--out", str(out)]) == 0
    with out.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [f.name for f in fields(FigureRow)]
    assert {(r["section"], r["figure"]) for r in rows} == {
        ("p1", "slicing_overhead"), ("p2", "realised_speedup_sliced"), ("p2", "realised_speedup_static"),
        ("p3", "dynamic_vs_static_equal_macs"), ("p3", "dynamic_vs_masked"),
        ("p3", "supernet_grouped_vs_exported"), ("p3", "torchscript_vs_exported"),
        ("p3", "dynamic_vs_interpolated_static"), ("p4", "sandwich_step_time"), ("p4", "sandwich_peak_memory"),
        ("p5", "tool_cost")}
    # the interpolated reference lies between the window's two static networks
    interp = next(r for r in rows if r["figure"] == "dynamic_vs_interpolated_static")
    assert " at 0." in interp["numerator"] and interp["note"].startswith("window k")
    assert sum(r["section"] == "p1" for r in rows) == 6  # smallest, middle, largest at two batch sizes
    for r in rows:
        assert math.isfinite(float(r["value"])) and float(r["value"]) > 0, r
        assert r["device"] == "cpu" and r["threads"] == "1" and r["quick"] == "True" and r["torch_version"], r
        assert r["commit"], r


def test_only_rejects_unknown_sections() -> None:
    with pytest.raises(SystemExit):
        main(["--only", "p1,p9"])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"), reason="glibc's mallopt")
def test_retain_keeps_freed_memory_for_reuse_and_restores_the_defaults() -> None:
    """Under ``retain`` a freed 256 MB buffer stays resident (the next forward reuses it, no page faults);
    under glibc's defaults, and again after the block, it goes back to the OS on free."""
    from benchmarks.allocator import allocator_setting

    def given_back_on_free(mb: int = 256) -> float:
        buf = torch.ones(mb * 2**18)  # touched
        held = _rss_mb()
        del buf
        return held - _rss_mb()

    with allocator_setting("system") as used:
        assert used == "system" and given_back_on_free() > 192
    with allocator_setting("retain") as used:
        assert used == "retain" and os.environ["MALLOC_MMAP_MAX_"] == "0"  # P5's child processes too
        assert given_back_on_free() < 64
    assert os.environ.get("MALLOC_MMAP_MAX_") != "0"
    # glibc's defaults are back (larger than the retained 256 MB, which the heap would hand out again)
    assert given_back_on_free(512) > 448
    with pytest.raises(ValueError, match="allowed: retain, system"):
        with allocator_setting("jemalloc"):
            pass
