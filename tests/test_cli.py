"""CLI: exit codes, one-line errors, options reaching the library."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from dsctl.cli import app

runner = CliRunner()


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    out = result.output.strip()
    assert "Traceback" not in out
    assert out.startswith("error:") and len(out.splitlines()) <= 2, out  # rich may wrap one long line
    return out


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("models", "flops", "export"):
        assert cmd in result.output


def test_models_json() -> None:
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    rows = {r["model"]: r for r in json.loads(result.output)}
    assert rows["ds_mobilenetv1"]["subnets"] == 14 and rows["ds_resnet50"]["routed_stages"] == ["layer2", "layer3", "layer4"]


def test_flops_csv(tmp_path) -> None:
    out = tmp_path / "f.csv"
    result = runner.invoke(app, ["flops", "tiny_ds_resnet", "--all", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert {"model", "subnet", "width", "macs", "params", "input_size"} <= set(rows[0])
    assert len(rows) == 7 and rows[0]["subnet"] == "k0" and int(rows[0]["macs"]) < int(rows[-1]["macs"])


def test_export_model_width(tmp_path) -> None:
    out = tmp_path / "m.pt2"
    result = runner.invoke(app, ["export", "--model", "tiny_ds_mobilenetv1", "--width", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.pt2.json").read_text())["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("args, needle", [
    (["flops", "resnet9000"], "neither a registered model"),
    (["flops", "tiny_ds_resnet", "--width", "0.3"], "width 0.3 is not in the search space"),
    (["export", "--model", "tiny_ds_resnet", "--width", "0.33"], "allowed: 0.25"),
    (["export", "/no/such/checkpoint.pt", "--width", "0.5"], "neither a registered model"),
    (["export", "--model", "tiny_ds_resnet", "--format", "zip"], "unknown --format 'zip'"),
])
def test_bad_input_gives_one_line(args: list[str], needle: str) -> None:
    assert needle in _one_line_error(runner.invoke(app, args))


def test_corrupt_checkpoint_is_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in _one_line_error(runner.invoke(app, ["flops", str(bad)]))


@pytest.mark.parametrize("args, needle", [
    (["train-supernet", "/no/such/recipe.yaml"], "/no/such/recipe.yaml"),
    (["train-supernet", "recipes/smoke/synthetic_tiny_ds_resnet.yaml", "--set", "optim.lrr=1"], "optim.lrr"),
    (["train-supernet", "recipes/smoke/synthetic_tiny_ds_resnet.yaml", "--data", "imagenet21k"], "--data 'imagenet21k'"),
    (["train-gate", "recipes/smoke/synthetic_tiny_ds_resnet.yaml"], "--supernet"),
    (["train-supernet", "recipes/smoke/synthetic_tiny_ds_resnet.yaml", "--device", "tpu"], "unknown device 'tpu'"),
])
def test_training_commands_reject_bad_input(args: list[str], needle: str, monkeypatch) -> None:
    import pathlib

    monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])
    assert needle in _one_line_error(runner.invoke(app, args))


def test_train_supernet_passes_recipe_and_options_to_library(monkeypatch, tmp_path) -> None:
    import pathlib

    import dsctl.train.launch as launch

    seen = {}

    def fake(recipe, out, **kwargs):
        seen.update(recipe=recipe, out=out, **kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(launch, "launch_supernet", fake)
    recipe = pathlib.Path(__file__).resolve().parents[1] / "recipes/smoke/synthetic_tiny_ds_resnet.yaml"
    runner.invoke(app, ["train-supernet", str(recipe), "--out", str(tmp_path / "r"), "--set", "optim.lr=0.3",
                        "--seed", "7", "--data", "synthetic", "--device", "cpu"])
    assert seen["recipe"].optim.lr == 0.3 and seen["recipe"].seed == 7 and seen["device"] == "cpu"
    assert seen["out"] == tmp_path / "r" and seen["resume"] is False


def test_bad_checkpoint_files_give_one_line_without_unsafe_advice(tmp_path) -> None:
    import torch

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    expected = {"empty.pt": "empty file", "random.pt": "truncated/corrupt", "evil.pt": "does not unpickle"}
    for name, text in expected.items():
        result = runner.invoke(app, ["eval", str(tmp_path / name)])
        assert result.exit_code == 1, (name, result.output)
        out = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert text in out and "Traceback" not in out and "weights_only" not in out, out
        assert "this must never run" not in out


@pytest.mark.parametrize("args, text", [
    (["flops", "tiny_ds_resnet", "--width", "0.5", "--all"], "--width and --all"),
    (["eval", "runs/none.pt", "--width", "0.5", "--dynamic"], "--width 0.5 and --dynamic"),
    (["baseline", "recipes/smoke/synthetic_tiny_ds_resnet.yaml", "--method", "l1", "--width", "0.5",
      "--target-macs", "1.0"], "--width 0.5 and --target-macs 1"),
    (["train-gate", "recipes/smoke/synthetic_tiny_ds_resnet.yaml", "--supernet", "x", "--window", "3:3"],
     "0 <= A < B <= K-1"),
])
def test_conflicting_or_bad_flags_are_one_line_errors(args, text) -> None:
    result = runner.invoke(app, args)
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 1 and text in out and "Traceback" not in out, out


def test_command_line_that_does_not_parse_is_one_line_and_exit_2(capsys) -> None:
    """Through the entry point (``dsctl.cli:main``), not the test runner: once as the installed program would
    run (a subprocess), the other cases in-process."""
    import subprocess
    import sys

    from dsctl.cli import main

    r = subprocess.run([sys.executable, "-m", "dsctl", "flops", "tiny_ds_resnet", "--widht", "0.5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: No such option: --widht (Possible options: --width) (see: dsctl flops --help)"]
    for args, code, text in ((["flops"], 2, "Missing argument"), (["flops", "--width"], 2, "requires an argument"),
                             (["flops", "tiny_ds_resnet", "--width", "0.3"], 1, "not in the search space")):
        with pytest.raises(SystemExit) as info:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == code and len(err) == 1 and text in err[0], (args, err)


def test_ctrl_c_in_any_command_exits_130() -> None:
    """Every command is wrapped by handle_errors (quickstart too): KeyboardInterrupt means exit 130, not 1."""
    import typer

    from dsctl.cli._common import handle_errors

    @handle_errors
    def command() -> None:
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 130


def test_models_table_never_cuts_a_model_name_at_80_columns() -> None:
    import os
    import subprocess
    import sys

    import dsctl

    r = subprocess.run([sys.executable, "-m", "dsctl", "models"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 0
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    for name in dsctl.list_models():
        assert f" {name} " in r.stdout


def test_out_and_csv_that_name_a_folder_or_an_impossible_place_are_one_line(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    for args in (["flops", "tiny_ds_resnet", "--csv", str(tmp_path)],
                 ["flops", "tiny_ds_resnet", "--csv", str(tmp_path / "file" / "x.csv")],
                 ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "rep")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert r.output.strip().splitlines()[-1].startswith("error:") and r.output.count("error:") == 1, r.output


def test_error_lines_keep_bracketed_values() -> None:
    """Rich markup must not eat '[0, 3]'-like text of a message (the --window message lost its rule)."""
    r = runner.invoke(app, ["train-gate", "recipes/smoke/synthetic_tiny_ds_resnet.yaml", "--supernet", "x",
                            "--set", "gate.window=[3,1]"])
    assert r.exit_code == 1 and "[A, B] with 0 <= A < B" in r.output and "(got [3, 1])" in r.output, r.output
    r = runner.invoke(app, ["train-gate", "recipes/smoke/synthetic_tiny_ds_resnet.yaml", "--supernet", "x",
                            "--window", "3:1"])
    assert r.exit_code == 1 and "0 <= A < B <= K-1" in r.output, r.output


@pytest.mark.parametrize("where", ["init_from", "export_file", "export_pt2", "dynamic_folder"])
def test_a_code_carrying_pickle_never_runs_in_any_loader(tmp_path, where: str) -> None:
    """--init-from, an exported sub-network (.pt or .pt2 with a sidecar) and a dynamic export folder: each
    refuses a file whose unpickling would call a function, in one line, without calling it."""
    import json

    import torch

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = {"state_dict": {"w": Evil()}}
    if where == "init_from":
        torch.save(evil, tmp_path / "evil.pt")
        args = ["flops", "tiny_ds_resnet", "--init-from", str(tmp_path / "evil.pt")]
    elif where in ("export_file", "export_pt2"):
        name = "evil.ts.pt" if where == "export_file" else "evil.pt2"
        torch.save(evil, tmp_path / name)
        (tmp_path / f"{name}.json").write_text(json.dumps({"model": "tiny_ds_resnet", "in_chans": 1, "input_size": 28}))
        args = ["bench", str(tmp_path / name), "--batch", "1", "--min-run-time", "0.05"]
    else:
        folder = tmp_path / "dyn"
        folder.mkdir()
        torch.save(evil, folder / "front.pt2")
        torch.save(evil, folder / "route0.pt2")
        (folder / "dynamic.json").write_text(json.dumps({"kind": "dynamic", "window": [0, 0], "num_classes": 10,
                                                         "model": "tiny_ds_resnet", "in_chans": 1, "input_size": 28}))
        args = ["bench", str(folder), "--batch", "1", "--min-run-time", "0.05"]
    result = runner.invoke(app, args)
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 1 and "Traceback" not in out and "weights_only" not in out, out
    assert out.strip().splitlines()[-1].startswith("error:"), out
    assert not marker.exists()


def test_tables_never_cut_a_number_or_a_name(monkeypatch) -> None:
    """Issue 24: off a terminal a table prints at the width it needs; on a narrow terminal its cells wrap.
    Either way every value is there whole and nothing ends in an ellipsis."""
    import io

    from dsctl.cli._common import _Console, table

    values = ["tiny_ds_mobilenetv1", "static-export-w0.875", "11.6123", "10.1987", "123456789.25"]
    t = table("a wide table", ["model", "kind", "p50 (ms)", "p90 (ms)", "MACs"], [values])
    monkeypatch.delenv("COLUMNS", raising=False)
    piped = _Console(file=io.StringIO(), width=40)
    piped.print(t)
    text = piped.file.getvalue()
    assert "…" not in text and all(v in text for v in values)
    narrow = _Console(file=io.StringIO(), width=40, force_terminal=True, color_system=None)
    narrow.print(t)
    text = narrow.file.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 40
    from collections import Counter

    have, need = Counter(text), Counter("".join(values))
    assert all(have[c] >= n for c, n in need.items())  # wrapped, every character still printed


def test_tensorboard_sink_writes_steps_and_evaluations_and_plot_draws_metrics(tmp_path) -> None:
    """Issue 24 item 1: the TensorBoard sink's scalars read back with TensorBoard's own reader; dsctl plot
    draws a run's metrics.csv."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dsctl.train.sinks import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "tb")
    for step in range(1, 4):
        sink.step(step, {"loss_largest": 2.0 / step, "lr": 0.1})
    sink.epoch(3, [{"subnet": "k0", "top1": 71.5, "loss": 0.9}, {"subnet": "k6", "top1": 80.0, "loss": 0.7}])
    sink.close()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"train/loss_largest", "train/lr", "val_top1/k0", "val_top1/k6", "val_loss/k0"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("train/loss_largest")] == [2.0, 1.0, pytest.approx(2 / 3)]
    assert events.Scalars("val_top1/k6")[0].value == 80.0 and events.Scalars("val_top1/k6")[0].step == 3

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,subnet,top1,loss,train_loss_largest\n0,k0,60,1.2,1.5\n0,k6,70,1.0,1.5\n"
                                     "1,k0,65,1.1,1.2\n1,k6,75,0.9,1.2\n")
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0 and (run / "training_curves.png").stat().st_size > 10_000
    result = runner.invoke(app, ["plot", str(tmp_path / "tb")])
    assert result.exit_code == 1 and "no metrics.csv" in result.output


@pytest.mark.slow  # one smoke training: about 10 s
def test_train_supernet_tensorboard_flag_writes_the_runs_scalars(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_commands import SMOKE

    result = runner.invoke(app, ["train-supernet", str(SMOKE), "--out", str(tmp_path / "r"), "--tensorboard", "-q"])
    assert result.exit_code == 0, result.output
    tags = set(EventAccumulator(str(tmp_path / "r" / "tensorboard")).Reload().Tags()["scalars"])
    assert {"train/loss_largest", "train/lr"} <= tags and any(t.startswith("val_top1/") for t in tags)
