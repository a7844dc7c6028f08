"""The benchmark runner writes one row per figure with finite ratios and full provenance (no timed asserts)."""

from __future__ import annotations

import argparse
import csv
import math
import platform
import subprocess
import sys
import time
from dataclasses import fields

import pytest

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
        ("p1", "slicing_overhead"), ("p1", "timing_noise"), ("p2", "realised_speedup_sliced"),
        ("p2", "realised_speedup_static"),
        ("p3", "dynamic_vs_static_equal_macs"), ("p3", "dynamic_vs_masked"),
        ("p3", "supernet_grouped_vs_exported"), ("p3", "torchscript_vs_exported"),
        ("p3", "dynamic_vs_interpolated_static"), ("p3", "routed_vs_parts"), ("p4", "sandwich_step_time"),
        ("p4", "sandwich_peak_memory"),
        ("p5", "tool_cost")}
    # the interpolated reference lies between the window's two static networks
    interp = next(r for r in rows if r["figure"] == "dynamic_vs_interpolated_static")
    assert " at 0." in interp["numerator"] and interp["note"].startswith("window k")
    # smallest, middle, largest at two batch sizes
    assert sum(r["figure"] == "slicing_overhead" for r in rows) == 6
    # the A/A control: the static largest network under two names, one row per batch size
    noise = [r for r in rows if r["figure"] == "timing_noise"]
    assert len(noise) == 2 and all(r["numerator"] == "static largest again" for r in noise)
    for r in rows:
        assert math.isfinite(float(r["value"])) and float(r["value"]) > 0, r
        assert r["device"] == "cpu" and r["threads"] == "1" and r["quick"] == "True" and r["torch_version"], r
        assert r["commit"], r


def test_only_rejects_unknown_sections() -> None:
    with pytest.raises(SystemExit):
        main(["--only", "p1,p9"])


_ALLOCATOR_PROBE = """
import os, torch
from benchmarks.allocator import allocator_setting

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def given_back_on_free(mb=256):
    buf = torch.ones(mb * 2**18)  # touched
    held = rss_mb()
    del buf
    return held - rss_mb()

with allocator_setting("system") as used:
    print(used, given_back_on_free())
with allocator_setting("retain") as used:
    print(used, given_back_on_free(), os.environ["MALLOC_MMAP_MAX_"])
# glibc's defaults are back (larger than the retained 256 MB, which the heap would hand out again)
print("after", given_back_on_free(512), os.environ.get("MALLOC_MMAP_MAX_"))
"""


@pytest.mark.skipif(not (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"), reason="glibc's mallopt")
def test_retain_keeps_freed_memory_for_reuse_and_restores_the_defaults() -> None:
    """Under ``retain`` a freed 256 MB buffer stays resident (the next forward reuses it, no page faults);
    under glibc's defaults, and again after the block, it goes back to the OS on free. In a fresh process:
    what earlier tests left in this one's heap would serve the allocations."""
    out = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], cwd=tools.ROOT, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    system, retain, after = (line.split() for line in out[:3])
    assert system[0] == "system" and float(system[1]) > 192
    assert retain[0] == "retain" and float(retain[1]) < 64 and retain[2] == "0"  # P5's child processes too
    assert float(after[1]) > 448 and after[2] == "None"
    from benchmarks.allocator import allocator_setting

    with pytest.raises(ValueError, match="allowed: retain, system"), allocator_setting("jemalloc"):
        pass


def _one_thread():
    """The quick runner's settings at one thread, and an Env for its rows."""
    from benchmarks.common import Env
    from benchmarks.run import build_settings

    args = argparse.Namespace(device="cpu", threads=1, memory_format="channels_last", quick=True, native_size=False,
                              models=None, min_run_time=None, rounds=None, large_batch_rounds=None)
    return build_settings(args), Env("cpu", 1, "float32", "channels_last", "system", "x", "c", True)


def test_stated_minutes() -> None:
    from benchmarks.recipes import stated_minutes

    assert stated_minutes("sized for 2 CPU cores (~14 minutes: measured)") == 14
    assert stated_minutes("~2.5 min per run") == 2.5 and stated_minutes("no duration") is None


@pytest.mark.slow  # one smoke training in a fresh process: about 15 s
def test_recipe_section_times_a_real_run_and_its_phases(tmp_path) -> None:
    from benchmarks.recipes import bench_recipes

    recipe = tmp_path / "smoke.yaml"
    text = (tools.ROOT / "recipes/smoke/synthetic_tiny_ds_resnet.yaml").read_text()
    recipe.write_text(text.replace("description: Seconds-long smoke run", "description: ~1 min smoke run"))
    rows = bench_recipes(*_one_thread(), [recipe])
    by = {r.figure: r for r in rows}
    stated = by["recipe_time_vs_stated"]
    assert stated.denominator_value == 60 and stated.value == pytest.approx(stated.numerator_value / 60, abs=1e-3)
    shares = [r for r in rows if r.figure.startswith("recipe_share_")]
    phases = {"step", "backward", "data", "teacher", "ema", "evaluate", "checkpoint", "finish"}
    assert {f"recipe_share_{p}" for p in phases} <= set(by)
    assert sum(r.value for r in shares) == pytest.approx(1.0, abs=0.05)
    assert "images/s end to end" in stated.note


@pytest.mark.slow  # a fresh dsctl process: about 5 s
def test_recipe_section_reports_a_failed_run_in_one_line(tmp_path) -> None:
    from benchmarks.recipes import bench_recipes

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("description: ~1 min\nmodel:\n  name: tiny_ds_resnet\ndata:\n  source: folder\n"
                      f"  root: {tmp_path / 'no_such_folder'}\n")
    with pytest.raises(SystemExit, match=r"bad.yaml failed \(exit [1-9]\): .*no_such_folder"):
        bench_recipes(*_one_thread(), [recipe])


def test_reference_twin_computes_what_the_exported_full_network_computes() -> None:
    """P1's ``static_vs_reference`` times the library model with the same shapes and weights as the exported
    full network: both give the same logits, so the ratio compares implementations, not models."""
    import torch

    from benchmarks.inference import reference_model
    from dsctl.export import export_subnet
    from dsctl.registry import build_model

    model = build_model("ds_deit_tiny").eval()
    label, ref = reference_model("ds_deit_tiny", model)
    assert label == "timm deit_tiny_patch16_224"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(export_subnet(model, model.space.full)(x), ref(x), atol=1e-4, rtol=1e-4)
    assert reference_model("tiny_ds_resnet", build_model("tiny_ds_resnet")) is None


def test_report_command_is_the_one_the_report_says_produced_it(tmp_path) -> None:
    from benchmarks.tools import COMMITTED_REPORT, report_command

    md = tmp_path / "REPORT.md"
    md.write_text("# Report\n\nProduced by `dsctl report runs/a runs/b --out results/x --batch 32 --title 'a b'` at "
                  "commit `abc`.\n")
    args, why = report_command(md, tmp_path / "out", root=tmp_path)
    assert args is None and "runs/a" in why  # the run folders are not here
    (tmp_path / "runs/a").mkdir(parents=True)
    (tmp_path / "runs/b").mkdir()
    args, why = report_command(md, tmp_path / "out", root=tmp_path)
    assert args == ["report", "runs/a", "runs/b", "--out", str(tmp_path / "out"), "--batch", "32", "--title", "a b"]
    md.write_text("no provenance line")
    assert report_command(md, tmp_path)[0] is None
    # the committed report says how it was produced, in that form
    assert "Produced by `dsctl report " in COMMITTED_REPORT.read_text()
