"""The library functions behind the commands, called without the CLI: what a TARGET names, the defaults a
run's recipe gives, which benchmark a target gets, the progress helper, and the CLI passing options through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dsctl
from dsctl.artifacts import GateArtifact, RouteCosts, StaticArtifact, StaticMeta, SupernetArtifact
from dsctl.cli import app
from dsctl.config import MeasureConfig, load_recipe, recipe_to_dict
from dsctl.errors import CheckpointError, DsctlError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes/smoke/synthetic_tiny_ds_resnet.yaml"  # input_size 16; tiny_ds_resnet's default is 28
runner = CliRunner()


def _recipe(*overrides: str) -> dict:
    return recipe_to_dict(load_recipe(SMOKE, ["data.synthetic_val_size=32", *overrides]))


def _supernet(tmp_path: Path, *overrides: str) -> Path:
    model = dsctl.build_model("tiny_ds_resnet")
    SupernetArtifact.from_model(model, recipe=_recipe(*overrides)).save(tmp_path / "final.pt")
    return tmp_path / "final.pt"


def _gate(tmp_path: Path, *overrides: str) -> Path:
    model = dsctl.build_model("tiny_ds_resnet")
    GateArtifact.from_model(model, window=(1, 3), costs=RouteCosts(tuple(1000 * (k + 1) for k in range(7)), 50),
                            recipe=_recipe(*overrides)).save(tmp_path / "gate.pt")
    return tmp_path / "gate.pt"


# -- targets ---------------------------------------------------------------------------------------------------
def test_a_checkpoint_target_measures_at_the_runs_input_size_without_changing_the_model(tmp_path) -> None:
    from dsctl.targets import load_model_target

    t = load_model_target(_supernet(tmp_path))
    assert t.input_size == 16 and t.model.default_input_size == 28 and t.source == str(tmp_path / "final.pt")
    assert t.artifact is not None and t.artifact.input_size == 16
    named = load_model_target("tiny_ds_resnet", num_classes=3)
    assert named.source == "random init" and named.input_size == 28 and named.model.num_classes == 3
    with pytest.raises(DsctlError, match="--init-from applies to a model name"):
        load_model_target(tmp_path / "final.pt", init_from=tmp_path / "x.pth")
    with pytest.raises(DsctlError, match="neither a registered model"):
        load_model_target("resnet9000")


def test_count_target_counts_every_subnet_at_the_runs_input_size(tmp_path) -> None:
    from dsctl.flops import count_subnet, count_target

    reports = count_target(str(_supernet(tmp_path)))
    model = dsctl.build_model("tiny_ds_resnet")
    assert [r.subnet for r in reports] == [model.space.label(s) for s in model.space.all_specs()]
    assert {r.input_size for r in reports} == {16}
    assert reports[2].macs == count_subnet(model, model.space.subnets[2], 16).macs
    assert reports[0].to_row()["macs_m"] == round(reports[0].macs / 1e6, 3)


# -- export ----------------------------------------------------------------------------------------------------
def test_export_target_takes_width_and_format_from_the_runs_recipe(tmp_path, monkeypatch) -> None:
    from dsctl.export import export_target

    ckpt = _supernet(tmp_path, "export.width='0.5'", "export.format=torchscript")
    monkeypatch.chdir(tmp_path)
    r = export_target(str(ckpt))
    assert (r.subnet, r.width, r.format, r.input_size) == ("k2", 0.5, "torchscript", 16)
    assert r.path == "tiny_ds_resnet_k2.ts.pt" and Path(r.sidecar).is_file()
    r = export_target(str(ckpt), width="largest", fmt="pt2", out=tmp_path / "full.pt2")  # given values win
    assert (r.subnet, r.format) == ("k6", "pt2")
    with pytest.raises(DsctlError, match="unknown --format 'zip'"):
        export_target("tiny_ds_resnet", fmt="zip")


def test_export_target_with_a_model_name_as_target_uses_plain_defaults(tmp_path) -> None:
    from dsctl.export import export_target

    r = export_target("tiny_ds_resnet", width="0.25", out=tmp_path / "m.pt2")
    assert (r.subnet, r.format, r.input_size, r.source) == ("k0", "pt2", 28, "random init")


def test_export_gate_run_checks_the_kind_and_uses_the_runs_costs(tmp_path) -> None:
    from dsctl.export import export_gate_run

    with pytest.raises(CheckpointError, match="gate checkpoint"):
        export_gate_run(_supernet(tmp_path))
    r = export_gate_run(_gate(tmp_path), out=tmp_path / "dyn.ts.pt")
    assert r.window == (1, 3) and r.route_macs == [2000, 3000, 4000] and r.gate_macs == 50
    assert r.input_size == 16 and json.loads(Path(r.sidecar).read_text())["kind"] == "dynamic"


# -- bench -----------------------------------------------------------------------------------------------------
def test_bench_specs_default_all_and_given() -> None:
    from dsctl.bench import bench_specs

    space = dsctl.build_model("ds_mobilenetv1").space
    assert bench_specs(space) == [space.smallest(), space.resolve(0.5), space.full]
    assert bench_specs(space, ["all"]) == list(space.all_specs())
    assert bench_specs(space, ["0.35", "largest"]) == [space.smallest(), space.full]
    resnet = dsctl.build_model("tiny_ds_resnet").space  # full network is k6: listed once
    assert bench_specs(resnet) == [resnet.smallest(), resnet.resolve(0.5), resnet.full]


def test_bench_settings_fill_unset_values_from_the_recipe() -> None:
    from dsctl.bench import bench_settings

    measure = MeasureConfig(batch_sizes=(1, 8), warmup=3, min_run_time_s=0.2, threads=2)
    s = bench_settings(measure)
    assert (s.batches, s.threads, s.warmup, s.min_run_time_s, s.input_size) == ((1, 8), 2, 3, 0.2, None)
    s = bench_settings(measure, batches=[4], threads=1, min_run_time_s=0.5, input_size=20, device="cpu")
    assert (s.batches, s.threads, s.min_run_time_s, s.input_size) == ((4,), 1, 0.5, 20)


@pytest.fixture
def bench_calls(monkeypatch) -> list[tuple]:
    """Replaces the timing functions of dsctl.bench with recorders: which one a target gets, with what."""
    from dsctl import bench

    calls: list[tuple] = []
    monkeypatch.setattr(bench, "bench_widths", lambda model, specs, s: calls.append(("widths", model, specs, s)) or [])
    monkeypatch.setattr(bench, "bench_exported", lambda path, s: calls.append(("exported", path, s)) or [])
    monkeypatch.setattr(bench, "bench_gate_run", lambda gate, s: calls.append(("gate", gate, s)) or [])
    monkeypatch.setattr(bench, "bench_static_run", lambda art, s: calls.append(("static", art, s)) or [])
    return calls


def test_bench_target_picks_the_benchmark_and_the_runs_defaults(tmp_path, bench_calls) -> None:
    from dsctl.bench import bench_target

    sup = _supernet(tmp_path, "measure.batch_sizes=[2]", "measure.min_run_time_s=0.1")
    bench_target(sup, widths=["0.5"])
    kind, model, specs, s = bench_calls.pop()
    assert kind == "widths" and specs == [model.space.resolve(0.5)]
    assert (s.batches, s.min_run_time_s, s.input_size) == ((2,), 0.1, 16)  # the run's recipe and input size
    bench_target("tiny_ds_resnet", batches=[1])
    kind, model, specs, s = bench_calls.pop()
    assert kind == "widths" and s.batches == (1,) and s.input_size == 28 and len(specs) == 3
    bench_target(_gate(tmp_path), dynamic=True)
    kind, gate, s = bench_calls.pop()
    assert kind == "gate" and isinstance(gate, GateArtifact) and gate.window == (1, 3)
    with pytest.raises(CheckpointError, match="--dynamic"):
        bench_target(sup, dynamic=True)
    model = dsctl.build_model("tiny_ds_resnet")
    spec = model.space.resolve(0.5)
    StaticArtifact(model_name=model.model_name, model_kwargs=model.model_kwargs,
                   state_dict=model.to_static(spec).state_dict(), recipe=_recipe(),
                   meta=StaticMeta(method="uniform", base_spec=spec, variant="w0.5", width=0.5)).save(tmp_path / "s.pt")
    bench_target(tmp_path / "s.pt")
    assert bench_calls.pop()[0] == "static"
    (tmp_path / "m.pt2").write_bytes(b"x")
    (tmp_path / "m.pt2.json").write_text("{}")
    bench_target(tmp_path / "m.pt2")
    assert bench_calls.pop()[:2] == ("exported", tmp_path / "m.pt2") and not bench_calls


# -- the CLI passes options to one library function ------------------------------------------------------------
def test_bench_command_passes_its_options_to_bench_target(monkeypatch) -> None:
    from dsctl import bench

    seen = {}
    monkeypatch.setattr(bench, "bench_target", lambda target, **kw: seen.update(target=target, **kw) or [])
    runner.invoke(app, ["bench", "tiny_ds_resnet", "-w", "0.25", "--width", "0.5,largest", "--batch", "1,4",
                        "--threads", "1", "--device", "cpu"])
    assert seen == {"target": "tiny_ds_resnet", "widths": ["0.25", "0.5", "largest"], "dynamic": False,
                    "batches": (1, 4), "device": "cpu", "threads": 1, "min_run_time_s": None, "input_size": None,
                    "compiled": False}
    r = runner.invoke(app, ["bench", "tiny_ds_resnet", "--widths", "0.25,largest"])  # the old spelling, one release
    assert seen["widths"] == ["0.25", "largest"] and seen["device"] == "auto"
    assert "--widths is deprecated" in r.output and "use --width" in r.output
    runner.invoke(app, ["bench", "tiny_ds_resnet", "--compile"])
    assert seen["compiled"] is True


def test_export_command_passes_its_options_to_export_target(monkeypatch, tmp_path) -> None:
    from dsctl import export

    seen = {}

    def fake(target, **kw):
        seen.update(target=target, **kw)
        raise DsctlError("stop here")

    monkeypatch.setattr(export, "export_target", fake)
    result = runner.invoke(app, ["export", "--model", "tiny_ds_resnet", "--width", "0.5", "--format", "onnx"])
    assert result.exit_code == 1 and "stop here" in result.output
    assert seen == {"target": "tiny_ds_resnet", "width": "0.5", "out": None, "fmt": "onnx", "input_size": None,
                    "init_from": None}


def test_progress_display_turns_an_interrupted_run_into_exit_130_and_closes() -> None:
    import typer

    from dsctl.cli import _common
    from dsctl.train.run import TrainingInterrupted

    with pytest.raises(typer.Exit) as info, _common.progress_display(quiet=True) as progress:
        closed = []
        progress.close = lambda: closed.append(True)  # type: ignore[method-assign]
        raise TrainingInterrupted("interrupted: resume with --resume runs/x")
    assert info.value.exit_code == 130 and closed == [True]


def test_describe_models_lists_every_registered_model() -> None:
    from dsctl.registry import describe_models

    rows = {r["model"]: r for r in describe_models()}
    assert list(rows) == dsctl.list_models()
    assert rows["tiny_ds_resnet"]["input_size"] == 28 and rows["tiny_ds_resnet"]["subnets"] == 7


def test_report_runs_names_the_machine_the_rows_were_timed_on(monkeypatch, tmp_path) -> None:
    from dsctl import report

    row = report.ReportRow("supernet", "tiny_ds_resnet", "k0", "0.25", 1, 1, 50.0, 90.0, device="cpu", threads=3)
    seen = {}
    monkeypatch.setattr(report, "build_entries", lambda runs, **kw: [report._Entry(row, None)])
    monkeypatch.setattr(report, "per_image_correctness", lambda entries, runs, out, **kw: {})
    monkeypatch.setattr(report, "write_report", lambda rows, out, **kw: seen.update(kw) or [Path(out) / "report.csv"])
    rows, paths = report.report_runs([tmp_path], tmp_path / "rep", command="dsctl report x")
    assert rows == [row] and paths == [tmp_path / "rep" / "report.csv"]
    assert seen["command"] == "dsctl report x" and "(cpu, 3 threads), torch " + torch.__version__ in seen["machine"]
