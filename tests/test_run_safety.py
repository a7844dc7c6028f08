"""Run folders tell the truth and survive faults: provenance, one writer at a time, no folder from a failed start, NaN stops."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsctl.config import load_recipe
from dsctl.errors import DsctlError
from dsctl.provenance import ProvenanceError, RunLockedError, data_identity
from dsctl.train.launch import prepare_run

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke" / "synthetic_tiny_ds_resnet.yaml"


def _prepare(out: Path, *overrides: str, resume: bool = False, allow_changed: bool = False):
    return prepare_run(load_recipe(SMOKE, list(overrides)), out, device="cpu", resume=resume,
                       allow_changed=allow_changed)


def test_new_run_records_recipe_data_and_code(tmp_path: Path) -> None:
    _prepare(tmp_path / "r")
    rec = json.loads((tmp_path / "r" / "provenance.json").read_text())
    assert rec["recipe"]["optim"]["lr"] == 0.05 and rec["data"]["source"] == "synthetic"
    assert rec["data"]["train_size"] == 128 and rec["data"]["hash"] and rec["commit"] and rec["dsctl_version"]


def test_resume_with_other_recipe_or_data_is_refused_naming_the_difference(tmp_path: Path) -> None:
    out = tmp_path / "r"
    _prepare(out)
    _prepare(out, resume=True)  # same inputs: fine
    with pytest.raises(ProvenanceError, match=r"recipe optim.lr 0.05 -> 0.1"):
        _prepare(out, "optim.lr=0.1", resume=True)
    with pytest.raises(ProvenanceError, match=r"data (hash|train_size)"):
        _prepare(out, "data.synthetic_train_size=96", resume=True)
    recipe_before = (out / "recipe.yaml").read_text()
    assert "0.1" not in recipe_before.split("lr:")[1].split("\n")[0]  # a refused resume rewrote nothing
    _prepare(out, "optim.lr=0.1", resume=True, allow_changed=True)
    rec = json.loads((out / "provenance.json").read_text())
    assert rec["recipe"]["optim"]["lr"] == 0.05  # the record keeps how the folder began ...
    assert any("optim.lr 0.05 -> 0.1" in d for c in rec["changes"] for d in c["accepted"])  # ... and what changed


def test_data_identity_changes_with_file_contents(tmp_path: Path) -> None:
    from dsctl.config import DataConfig
    from tests.test_data import _make_idx_dataset

    _make_idx_dataset(tmp_path)
    cfg = DataConfig(source="fashion_mnist", root=str(tmp_path), input_size=28)
    first = data_identity(cfg, 20, 10)
    assert set(first["files"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                   "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    _make_idx_dataset(tmp_path, n_train=21)
    assert data_identity(cfg, 20, 10)["hash"] != first["hash"]


_HOLD = """
import sys, time
from pathlib import Path
from dsctl.provenance import run_lock
run_lock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_second_writer_is_refused_and_a_killed_writers_lock_is_not_stale(tmp_path: Path) -> None:
    out = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"being written by pid {holder.pid} on"):
            _prepare(out)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    time.sleep(0.1)
    _prepare(out)  # the kernel dropped the dead process's lock
    assert (out / "provenance.json").is_file()


def test_failed_validation_leaves_no_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "r"
    with pytest.raises(DsctlError, match="batch_size=999"):
        _prepare(out, "data.batch_size=999")
    assert not out.exists()


def test_quickstart_refuses_a_finished_stage_made_from_other_inputs(tmp_path: Path) -> None:
    from dsctl.pipeline import _stage
    from dsctl.train.launch import current_provenance

    out = tmp_path / "stage"
    prep = _prepare(out)
    (out / "final.pt").write_bytes(b"")  # finished (the check runs before anything reads it)
    ran = []
    now = current_provenance(load_recipe(SMOKE, ["optim.epochs=3"]), prep.data)
    with pytest.raises(ProvenanceError, match=r"quickstart stage supernet: .*optim.epochs 2 -> 3"):
        _stage(out, "supernet", ran.append, now, allow_changed=False)
    _stage(out, "supernet", ran.append, current_provenance(load_recipe(SMOKE), prep.data), allow_changed=False)
    assert ran == []  # same inputs: skipped as done


def test_a_nan_loss_stops_training_with_one_line_and_saves_nothing_damaged(tmp_path: Path) -> None:
    import torch

    from dsctl.checkpoint import load_checkpoint
    from dsctl.train.launch import launch_supernet
    from dsctl.train.trainer import NonFiniteLoss

    out = tmp_path / "r"
    recipe = load_recipe(SMOKE, ["optim.lr=1e30", "supernet.checkpoint_every=1", "optim.epochs=1"])
    with pytest.raises(NonFiniteLoss, match=r"training stopped at epoch 1, batch \d+: loss_\w+=(nan|inf)"):
        launch_supernet(recipe, out, device="cpu")
    assert not (out / "final.pt").exists()
    if (out / "last.pt").exists():
        state = load_checkpoint(out / "last.pt")["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow  # two trainings through the CLI
def test_a_full_disk_is_one_line_and_the_run_resumes_to_its_end(tmp_path: Path, monkeypatch) -> None:
    """The disk fills while an epoch's checkpoint is written: exit 1 with one line, no temporary left,
    and the same command with --resume finishes the run."""
    import errno

    import torch
    from typer.testing import CliRunner

    from dsctl.cli import app

    out = tmp_path / "r"
    real_save = torch.save
    calls = {"n": 0}

    def full_disk_once(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint write (after epoch 2's last.pt was due)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_once)
    args = ["train-supernet", str(SMOKE), "--out", str(out), "--device", "cpu", "-q"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    assert "No space left on device" in r.output and "disk is full" in r.output and "Traceback" not in r.output
    assert not list(out.glob(".*.tmp"))
    r = CliRunner().invoke(app, ["train-supernet", str(SMOKE), "--resume", str(out), "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    assert (out / "final.pt").is_file()
