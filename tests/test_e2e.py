"""The real commands in a row on a tiny model and generated images, checking the files they write."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsctl.cli import app

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "recipes/smoke/synthetic_tiny_ds_resnet.yaml")
runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result.output


@pytest.mark.slow
def test_commands_in_a_row(tmp_path) -> None:
    sup, gate, uni = tmp_path / "sup", tmp_path / "gate", tmp_path / "uni"
    _ok(["train-supernet", SMOKE, "--out", str(sup), "--device", "cpu", "--quiet", "--set", "optim.epochs=1"])
    assert {"final.pt", "subnets.csv", "metrics.csv", "recipe.yaml", "summary.json"} <= {p.name for p in sup.iterdir()}
    _ok(["calibrate-bn", str(sup / "final.pt"), "--batches", "2", "--device", "cpu", "--quiet"])
    _ok(["train-gate", SMOKE, "--supernet", str(sup), "--window", "0:3", "--target-macs", "1.0", "--out", str(gate),
         "--device", "cpu", "--quiet", "--set", "optim.epochs=1"])
    summary = json.loads((gate / "summary.json").read_text())
    assert summary["final"]["window"] == [0, 3] and summary["final"]["target_macs_m"] == 1.0
    _ok(["export", str(sup), "--width", "0.5", "--out", str(tmp_path / "half.pt2")])
    assert json.loads((tmp_path / "half.pt2.json").read_text())["source"].endswith("final.pt")
    _ok(["export", str(gate), "--dynamic", "--out", str(tmp_path / "dyn")])  # a folder of torch.export programs
    assert json.loads((tmp_path / "dyn" / "dynamic.json").read_text())["max_abs_diff"] < 1e-4
    _ok(["bench", str(tmp_path / "dyn"), "--batch", "2", "--min-run-time", "0.05"])
    _ok(["flops", str(sup), "--all", "--csv", str(tmp_path / "flops.csv")])
    assert list(csv.DictReader((tmp_path / "flops.csv").open()))[0]["input_size"] == "16"
    out = _ok(["eval", str(gate), "--json"])
    assert json.loads(out)["width"] == "dynamic"
    _ok(["bench", str(tmp_path / "half.pt2"), "--batch", "1,2", "--min-run-time", "0.05", "--csv", str(tmp_path / "b.csv")])
    _ok(["bench", str(gate), "--dynamic", "--batch", "2", "--min-run-time", "0.05"])
    _ok(["baseline", SMOKE, "--method", "uniform", "--width", "0.5", "--out", str(uni), "--device", "cpu", "--quiet",
         "--set", "optim.epochs=1"])
    _ok(["report", str(sup), str(gate), str(uni), "--out", str(tmp_path / "rep"), "--batch", "2", "--min-run-time", "0.05"])
    rows = list(csv.DictReader((tmp_path / "rep" / "report.csv").open()))
    assert {r["method"] for r in rows} == {"supernet", "dynamic", "uniform"}
    assert (tmp_path / "rep" / "accuracy_vs_latency.png").stat().st_size > 10_000


@pytest.mark.slow
def test_quickstart_pipeline_on_generated_data(tmp_path) -> None:
    recipe = str(ROOT / "recipes/smoke/pipeline_synthetic.yaml")
    _ok(["quickstart", recipe, "--out", str(tmp_path / "qs"), "--device", "cpu", "--quiet"])
    rows = list(csv.DictReader((tmp_path / "qs" / "report" / "report.csv").open()))
    assert [r["method"] for r in rows].count("dynamic") == 2
    assert {"uniform", "l1", "slimming"} <= {r["method"] for r in rows}
    # a second call finds every stage finished and only re-reports
    _ok(["quickstart", recipe, "--out", str(tmp_path / "qs"), "--device", "cpu", "--quiet"])


@pytest.mark.slow
def test_quickstart_pipeline_on_a_kernel_space(tmp_path) -> None:
    """DS-CNN++ end to end: the kernel family trains, routes, exports and reports, with a baseline named by
    width and kernel (0.5@3, whose '@' the pipeline's stage keys must not split on)."""
    recipe = str(ROOT / "recipes/smoke/pipeline_synthetic.yaml")
    _ok(["quickstart", recipe, "--out", str(tmp_path / "qs"), "--device", "cpu", "--quiet", "--set",
         "model.name=tiny_ds_mobilenetv1pp", "--set", "pipeline.baseline_methods=[uniform]", "--set",
         "pipeline.baseline_width=0.5@3"])
    rows = list(csv.DictReader((tmp_path / "qs" / "report" / "report.csv").open()))
    assert [r["method"] for r in rows].count("supernet") == 19 and [r["method"] for r in rows].count("dynamic") == 2
    assert {"uniform"} <= {r["method"] for r in rows}
    _ok(["export", str(tmp_path / "qs" / "supernet"), "--width", "0.625@5", "--out", str(tmp_path / "k.pt2")])
    assert json.loads((tmp_path / "k.pt2.json").read_text())["spec"]["kernels"][-1] == 5
    _ok(["export", str(tmp_path / "qs" / "gate-0.45"), "--dynamic", "--out", str(tmp_path / "dyn")])
    routes = json.loads((tmp_path / "dyn" / "dynamic.json").read_text())["routes"]
    assert all("@" in r["name"] and r["spec"]["kernels"] for r in routes.values())


@pytest.mark.slow
def test_latency_budget_from_analyze_to_the_dynamic_export(tmp_path) -> None:
    """analyze times the sub-networks; train-gate --target-latency calibrates on that table (window chosen by
    time, decision in ms); the gate, its summary and its dynamic export carry the budget."""
    sup, gate = tmp_path / "sup", tmp_path / "gate"
    _ok(["train-supernet", SMOKE, "--out", str(sup), "--device", "cpu", "--quiet", "--set", "optim.epochs=1"])
    out = _ok(["analyze", str(sup), "--device", "cpu", "--quiet", "--latency-batch", "4", "--min-run-time", "0.05"])
    assert "costs" in out and "k0's time" in out
    rows = list(csv.DictReader((sup / "analysis" / "latency.csv").open()))
    ms4 = [float(r["subnet_ms"]) for r in rows if r["batch"] == "4"]  # sub-networks k0, k1, ... in order
    # what routing can spend runs from k0's time to the costliest (a narrower one may time below k0: on
    # this tiny model the span is within the timing noise), so the target is halfway between those two
    target = (ms4[0] + max(ms4)) / 2
    _ok(["train-gate", SMOKE, "--supernet", str(sup), "--target-latency", f"{target:.4f}", "--latency-batch", "4",
         "--latency-table", str(sup / "analysis" / "latency.csv"), "--out", str(gate), "--device", "cpu", "--quiet",
         "--set", "optim.epochs=1"])
    final = json.loads((gate / "summary.json").read_text())["final"]
    budget, cal = final["latency_budget"], final["decision_calibration"]
    assert budget["target_ms"] == pytest.approx(target, abs=1e-4) and budget["batch"] == 4 and final["target_macs_m"] is None
    assert cal["unit"] == "ms" and cal["target"] == pytest.approx(target / 4, abs=1e-4)
    lo, hi = final["window"]
    assert budget["route_ms"][lo] * 4 <= target <= budget["route_ms"][hi] * 4  # the window brackets it in time
    _ok(["export", str(gate), "--dynamic", "--out", str(tmp_path / "dyn")])
    assert json.loads((tmp_path / "dyn" / "dynamic.json").read_text())["latency_budget"]["target_ms"] == budget["target_ms"]
    r = runner.invoke(app, ["train-gate", SMOKE, "--supernet", str(sup), "--target-latency", "1e6", "--latency-batch",
                            "4", "--latency-table", str(sup / "analysis" / "latency.csv"), "--out", str(tmp_path / "g2")])
    assert r.exit_code == 1 and "outside what routing can spend" in r.output, r.output
