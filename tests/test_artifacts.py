"""Run artifacts: round trips of each kind, format-1 files, and the one-line refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dsctl
from dsctl.artifacts import (
    Artifact, GateArtifact, GateReport, ModelArtifact, RouteCosts, StaticArtifact, StaticMeta, StaticReport,
    SubnetRow, SupernetArtifact, TrainingState, read_artifact, route_costs,
)
from dsctl.checkpoint import FORMAT_VERSION
from dsctl.cli import app
from dsctl.config import load_recipe, recipe_to_dict
from dsctl.data import DataInfo
from dsctl.errors import CheckpointError
from dsctl.routing import Calibration

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes/smoke/synthetic_tiny_ds_resnet.yaml"
INFO = DataInfo(10, 1, (0.5,), (0.25,), "synthetic", 128, 64)


def _recipe(model: str = "tiny_ds_resnet") -> dict:
    return recipe_to_dict(load_recipe(SMOKE, [f"model.name={model}", "data.synthetic_val_size=32"]))


def _rows(model: dsctl.Supernet) -> tuple[SubnetRow, ...]:
    space = model.space
    specs = space.all_specs()
    return tuple(SubnetRow(spec=s, index=space.index(s) if s in space.subnets else None,
                           width=space.ratio(s) if s in space.subnets else None, macs=1000 * (i + 1), params=10 * i,
                           top1=50.0 + i, top5=90.0, loss=1.5) for i, s in enumerate(specs))


def _training() -> TrainingState:
    return TrainingState(optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
                         scheduler={"t": 3}, rng={"python": (3, (1, 2, 3), None)}, epoch=1, batch=5, global_step=13,
                         best_score=42.5)


def _gate_report() -> GateReport:
    cal = Calibration(offsets=(0.0, -0.5), price=0.5, target=1.5e6, achieved=1.49e6, samples=100, met=True)
    return GateReport(window=(0, 1), top1=80.0, top5=99.0, loss=0.5, avg_macs=1_500_123, gate_macs=321,
                      histogram=(60, 40, 0, 0, 0, 0, 0), gate_sgs_acc=70.0, complexity="target", target_macs_m=1.5,
                      complexity_weight=1.0, sgs_target="cheapest", decision="calibrated", calibration=cal)


def _same(a: Artifact, b: Artifact) -> None:
    """Equal fields, tensors compared by value; ``path`` and the version fields are the file's."""
    tensors = ("state_dict", "ema_state_dict")
    strip = {f.name: None for f in dataclasses.fields(a) if f.name in (*tensors, "path")}
    assert dataclasses.replace(a, **strip) == dataclasses.replace(b, **strip)
    for name in (n for n in tensors if n in strip):
        sa, sb = getattr(a, name), getattr(b, name)
        assert (sa is None) == (sb is None)
        for k in sa or {}:
            assert torch.equal(sa[k], sb[k]), k


# -- round trips ----------------------------------------------------------------------------------------------
def test_supernet_round_trip_and_ema_weights_build_the_model(tmp_path) -> None:
    model = dsctl.build_model("tiny_ds_mobilenetv1")
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    art = SupernetArtifact.from_model(model, recipe=_recipe("tiny_ds_mobilenetv1"), data_info=INFO,
                                      completed=False, training=_training(), ema_state_dict=ema, calibrated=True,
                                      calib_batches=2, subnets=_rows(model), gate_macs=77)
    art.save(tmp_path / "last.pt")
    back = read_artifact(tmp_path, SupernetArtifact)  # a run folder: its last.pt
    _same(art, back)
    assert back.path == str(tmp_path / "last.pt") and back.format_version == FORMAT_VERSION
    assert back.dsctl_version == dsctl.__version__ and back.input_size == 16
    assert back.subnets[-1].index is None and back.subnets[-1].spec == model.space.full  # full outside k
    assert back.costs == RouteCosts(tuple(1000 * (i + 1) for i in range(model.space.num_subnets)), 77)
    rebuilt = back.build_model()
    assert rebuilt.default_input_size == model.default_input_size != back.input_size  # the model is not changed
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_gate_round_trip(tmp_path) -> None:
    model = dsctl.build_model("tiny_ds_resnet")
    art = GateArtifact.from_model(model, window=(0, 1), costs=RouteCosts(tuple(range(7)), 321), supernet="sup/final.pt",
                                  recipe=_recipe(), data_info=INFO, final=_gate_report())
    art.save(tmp_path / "final.pt")
    back = read_artifact(tmp_path / "final.pt", GateArtifact)
    _same(art, back)
    assert back.training is None and back.completed
    summary = back.final.to_dict()
    assert list(summary) == ["window", "top1", "top5", "loss", "avg_macs", "gate_macs", "histogram", "gate_sgs_acc",
                             "complexity", "target_macs_m", "complexity_weight", "sgs_target", "decision",
                             "decision_calibration", "latency_budget"]
    assert summary["window"] == [0, 1] and summary["decision_calibration"]["error"] == pytest.approx(-1 / 150)


def test_static_round_trip_rebuilds_the_network(tmp_path) -> None:
    model = dsctl.build_model("tiny_ds_resnet")
    spec = model.space.resolve(0.5)
    net = model.to_static(spec).eval()
    meta = StaticMeta(method="uniform", base_spec=spec, variant="w0.5", width=0.5)
    art = StaticArtifact(model_name=model.model_name, model_kwargs=model.model_kwargs, state_dict=net.state_dict(),
                         meta=meta, recipe=_recipe(), data_info=INFO, final=StaticReport(top1=1.0, top5=2.0, loss=3.0))
    art.save(tmp_path / "final.pt")
    back = read_artifact(tmp_path / "final.pt", StaticArtifact)
    _same(art, back)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back.build_network()(x), net(x))
    assert back.final.to_dict() == {"top1": 1.0, "top5": 2.0, "loss": 3.0}


def test_route_costs_are_read_back_not_recounted_at_the_same_input_size() -> None:
    model = dsctl.build_model("tiny_ds_resnet")
    art = SupernetArtifact.from_model(model, recipe=_recipe(), subnets=_rows(model), gate_macs=5)
    assert route_costs(art, model, 16) == art.costs  # made-up MACs: read, not counted
    measured = route_costs(art, model, 20)
    assert measured == RouteCosts.measure(model, 20) and measured != art.costs


# -- format 1 (as dsctl 0.1.0 wrote it) -----------------------------------------------------------------------
def _v1_common(model: dsctl.Supernet, kind: str) -> dict:
    return {"format_version": 1, "kind": kind, "model_name": model.model_name, "model_kwargs": model.model_kwargs,
            "space": model.space.to_dict(), "state_dict": model.state_dict(), "recipe": _recipe(model.model_name),
            "data_info": dataclasses.asdict(INFO)}


def _v1_training(tag: float) -> dict:
    return {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"t": 1}, "rng": {"python": (3, (1,), None)},
            "position": {"epoch": 2, "batch": 0, "global_step": 8}, "best_score": tag}


def test_format_1_supernet_final_and_last_load(tmp_path) -> None:
    model = dsctl.build_model("tiny_ds_mobilenetv1")
    space = model.space
    rows = [{"subnet": space.label(s), "width": space.ratio(s) if s in space.subnets else "largest", "macs": 100 + k,
             "params": 5, "top1": 50.0, "top5": 90.0, "loss": 1.0}
            for k, s in enumerate([*space.subnets, space.full])]
    torch.save({**_v1_common(model, "supernet"), "calibrated": True, "calib_batches": 2, "subnets": rows},
               tmp_path / "final.pt")
    torch.save({**_v1_common(model, "supernet"), **_v1_training(12.5), "completed": False, "calibrated": False,
                "ema_state_dict": model.state_dict()}, tmp_path / "last.pt")
    final = read_artifact(tmp_path / "final.pt", SupernetArtifact)
    assert final.format_version == 1 and final.dsctl_version is None and final.completed and final.calibrated
    assert [r.label for r in final.subnets] == [f"k{k}" for k in range(space.num_subnets)] + ["largest"]
    assert [r.spec for r in final.subnets] == [*space.subnets, space.full]
    assert final.subnets[1].width == space.ratio(space.subnets[1]) and final.subnets[-1].width is None
    assert [r.to_row() for r in final.subnets] == rows  # subnets.csv rows as format 1 wrote them
    assert final.costs is None  # format 1 did not store the gate's MACs
    last = read_artifact(tmp_path / "last.pt", SupernetArtifact)
    t = last.require_training()
    assert (t.epoch, t.batch, t.global_step, t.best_score) == (2, 0, 8, 12.5) and not last.completed
    assert last.ema_state_dict is not None and last.build_model().model_name == model.model_name


def test_format_1_gate_and_static_load(tmp_path) -> None:
    model = dsctl.build_model("tiny_ds_resnet")
    final = _gate_report().to_dict()
    torch.save({**_v1_common(model, "gate"), "window": [0, 1], "route_macs": list(range(7)), "gate_macs": 321,
                "input_size": 16, "supernet": "sup/final.pt", "calibrated": True, "decision": "calibrated",
                "decision_calibration": final["decision_calibration"], "completed": True, "final": final},
               tmp_path / "gate.pt")
    gate = read_artifact(tmp_path / "gate.pt", GateArtifact)
    assert gate.window == (0, 1) and gate.costs == RouteCosts(tuple(range(7)), 321) and gate.input_size == 16
    assert gate.final == _gate_report() and gate.supernet == "sup/final.pt"

    spec = model.space.resolve(0.5)
    net = model.to_static(spec)
    meta = {"model_name": model.model_name, "model_kwargs": model.model_kwargs, "method": "uniform",
            "base_spec": list(spec.widths), "width": "0.5", "variant": "w0.5"}
    torch.save({"format_version": 1, "kind": "static", "model_name": model.model_name,
                "model_kwargs": model.model_kwargs, "meta": meta, "state_dict": net.state_dict(),
                "recipe": _recipe(), "data_info": dataclasses.asdict(INFO), "completed": True,
                "final": {"top1": 1.0, "top5": 2.0, "loss": 3.0, "elapsed_s": 0.5}}, tmp_path / "static.pt")
    static = read_artifact(tmp_path / "static.pt", StaticArtifact)
    assert static.meta == StaticMeta(method="uniform", base_spec=spec, variant="w0.5", width=0.5)
    assert static.meta.width_label == "0.5" and static.final == StaticReport(top1=1.0, top5=2.0, loss=3.0, elapsed_s=0.5)
    assert static.data_info == INFO
    static.build_network()


def test_format_1_without_kind_reads_as_a_supernet(tmp_path) -> None:
    model = dsctl.build_model("tiny_ds_resnet")
    raw = _v1_common(model, "supernet")
    del raw["kind"]
    torch.save(raw, tmp_path / "old.pt")
    assert isinstance(read_artifact(tmp_path / "old.pt"), SupernetArtifact)


# -- refusals: one line naming the file ------------------------------------------------------------------------
@pytest.fixture
def supernet_file(tmp_path) -> Path:
    SupernetArtifact.from_model(dsctl.build_model("tiny_ds_resnet"), recipe=_recipe()).save(tmp_path / "final.pt")
    return tmp_path / "final.pt"


def test_wrong_kind_is_one_line_naming_file_kind_and_expected(supernet_file: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        read_artifact(supernet_file, GateArtifact, why="--dynamic")
    assert str(err.value) == (f"{supernet_file}: --dynamic needs a gate checkpoint (from train-gate), "
                              "not a supernet checkpoint (from train-supernet)")
    with pytest.raises(CheckpointError, match="expected a static baseline checkpoint"):
        read_artifact(supernet_file, StaticArtifact)
    assert isinstance(read_artifact(supernet_file, ModelArtifact), SupernetArtifact)
    result = CliRunner().invoke(app, ["eval", str(supernet_file), "--dynamic"])
    out = result.output.strip()
    assert result.exit_code == 1 and out.startswith("error:") and "Traceback" not in out
    assert "needs a gate checkpoint" in out and len(out.splitlines()) <= 2, out


def test_newer_format_is_refused_with_the_writer_version(tmp_path) -> None:
    torch.save({"format_version": FORMAT_VERSION + 1, "dsctl_version": "9.9.9", "kind": "supernet",
                "model_name": "tiny_ds_resnet", "state_dict": {}}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match=r"new\.pt: checkpoint format 3 \(written by dsctl 9\.9\.9\) is newer "
                                              r"than this dsctl reads \(format 2\); upgrade dsctl"):
        read_artifact(tmp_path / "new.pt")


def test_malformed_and_unknown_kinds_are_one_line(tmp_path) -> None:
    model = dsctl.build_model("tiny_ds_resnet")
    torch.save({**_v1_common(model, "gate"), "format_version": 2}, tmp_path / "nowindow.pt")
    with pytest.raises(CheckpointError, match=r"nowindow\.pt: malformed gate checkpoint \(KeyError: 'window'\)"):
        read_artifact(tmp_path / "nowindow.pt")
    torch.save({**_v1_common(model, "oracle"), "format_version": 2}, tmp_path / "oracle.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint kind 'oracle' .allowed: supernet, gate, static"):
        read_artifact(tmp_path / "oracle.pt")


def test_code_carrying_pickle_is_refused_without_running_it(tmp_path, capsys) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format_version": FORMAT_VERSION, "kind": "supernet", "model_name": "tiny_ds_resnet",
                "state_dict": {}, "recipe": {"x": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="does not unpickle"):
        read_artifact(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out


def test_training_state_is_required_to_resume(supernet_file: Path) -> None:
    art = read_artifact(supernet_file, SupernetArtifact)
    assert art.training is None
    with pytest.raises(CheckpointError, match="no training state"):
        art.require_training()


def test_evaluate_checkpoint_returns_a_report_with_the_json_keys(supernet_file: Path) -> None:
    from dsctl.evaluation import evaluate_checkpoint

    r = evaluate_checkpoint(supernet_file, width="0.5", device="cpu")
    assert (r.subnet, r.width, r.samples) == ("k2", 0.5, 32)
    assert list(r.to_dict()) == ["model", "data", "checkpoint", "subnet", "width", "top1", "top5", "loss", "samples",
                                 "macs", "params"]


def test_data_that_does_not_fit_the_model_is_one_line_in_every_command_that_reads_data(tmp_path) -> None:
    """Channels and class counts of the data against the run's model: eval, calibrate-bn, analyze,
    train-gate and bench each refuse before the first batch, naming the file and both numbers."""
    from typer.testing import CliRunner

    from dsctl.cli import app

    model = dsctl.build_model("tiny_ds_resnet", num_classes=10, in_chans=1)
    SupernetArtifact.from_model(model, recipe=_recipe()).save(tmp_path / "final.pt")
    sup = str(tmp_path / "final.pt")
    three = ["--set", "data.synthetic_channels=3"]
    runner = CliRunner()
    for args, text in ((["eval", sup, *three], "3-channel images where the model reads 1"),
                       (["eval", sup, "--set", "data.synthetic_classes=12"], "12 classes where the model has 10"),
                       (["calibrate-bn", sup, *three, "--out", str(tmp_path / "c.pt")], "3-channel"),
                       (["analyze", sup, *three, "--out", str(tmp_path / "a")], "3-channel"),
                       (["train-gate", str(SMOKE), "--supernet", sup, *three, "--out",
                         str(tmp_path / "g")], "3-channel")):
        r = runner.invoke(app, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and "Traceback" not in r.output, (args, r.output)
        assert lines[-1].startswith(f"error: {sup}: data 'synthetic' does not fit its model") and text in lines[-1], args
    assert not (tmp_path / "c.pt").exists() and not (tmp_path / "g").exists()
    r = runner.invoke(app, ["train-supernet", str(SMOKE), "--set", "model.num_classes=5", "--out", str(tmp_path / "s")])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == (
        "error: recipe model tiny_ds_resnet: data 'synthetic' does not fit its model: 10 classes where the model has "
        "5 outputs"), r.output
    assert not (tmp_path / "s").exists()
    assert dsctl.build_model("tiny_ds_resnet", num_classes=1000, in_chans=1) is not None  # more outputs than classes: fine


def test_evaluation_reports_progress_per_batch(tmp_path) -> None:
    from dsctl.evaluation import evaluate_checkpoint
    from dsctl.train.progress import Progress

    class Record(Progress):
        def __init__(self) -> None:
            self.events: list[tuple] = []

        def start(self, description: str, total: int, completed: int = 0) -> None:
            self.events.append(("start", description, total))

        def advance(self, n: int = 1, **metrics: float) -> None:
            self.events.append(("advance", n))

        def finish(self, summary: str = "") -> None:
            self.events.append(("finish",))

    SupernetArtifact.from_model(dsctl.build_model("tiny_ds_resnet"), recipe=_recipe()).save(tmp_path / "final.pt")
    seen = Record()
    evaluate_checkpoint(tmp_path / "final.pt", width="0.5", device="cpu", progress=seen)
    batches = seen.events[0][2]
    assert seen.events[0][:2] == ("start", "evaluating k2 on synthetic") and batches >= 1
    assert seen.events[1:] == [("advance", 1)] * batches + [("finish",)]
