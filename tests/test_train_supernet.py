"""Stage I: target modes, run folder contents, exact kill-and-resume, recalibration, torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dsctl
from dsctl.artifacts import SupernetArtifact, read_artifact
from dsctl.config import SupernetConfig, load_recipe, recipe_to_dict
from dsctl.train.launch import build_supernet_for, launch_supernet
from dsctl.train.progress import Progress
from dsctl.train.run import StopFlag, TrainingInterrupted
from dsctl.train.supernet import sandwich_step

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes/smoke/synthetic_tiny_ds_resnet.yaml"


def _batch(model, n=8):
    return torch.randn(n, model.in_chans, 16, 16), torch.randint(0, model.num_classes, (n,))


@pytest.mark.parametrize("target", ["ib", "eib", "id", "none"])
def test_sandwich_targets(target: str) -> None:
    model = dsctl.build_model("tiny_ds_resnet").train()
    teacher = dsctl.build_model("tiny_ds_resnet").eval()
    x, y = _batch(model)
    space = model.space
    specs = [space.largest(), space.subnets[3], space.smallest()]
    cfg = SupernetConfig(target=target, label_smoothing=0.0)
    losses = sandwich_step(model, teacher, x, y, specs, cfg, device=torch.device("cpu"), amp=False)
    assert set(losses) == {"largest", "random0", "smallest"}
    assert all(p.grad is not None for p in model.layer4.parameters())
    with torch.no_grad():  # train-mode outputs use batch statistics, so they are reproducible
        small = model(x, space.smallest())
        largest_online = F.softmax(model(x, space.largest()), -1)
        t_largest = F.softmax(teacher(x, space.largest()), -1)
        t_random = F.softmax(teacher(x, space.subnets[3]), -1)
    expected_target = {
        "ib": t_largest, "eib": (t_largest + t_random) / 2, "id": largest_online, "none": F.one_hot(y, 10).float(),
    }[target]
    expected = -(expected_target * F.log_softmax(small, -1)).sum(-1).mean()
    assert losses["smallest"] == pytest.approx(float(expected), rel=1e-4)
    assert losses["largest"] == pytest.approx(float(F.cross_entropy(model(x, space.largest()), y).detach()), rel=1e-4)


def test_mvco_teacher_sees_the_other_view() -> None:
    model = dsctl.build_model("tiny_ds_resnet").train()
    teacher = dsctl.build_model("tiny_ds_resnet").eval()
    (xa, y), (xb, _) = _batch(model), _batch(model)
    specs = [model.space.largest(), model.space.smallest()]
    cfg = SupernetConfig(target="ib", label_smoothing=0.0, num_random=0, mvco=True)
    losses = sandwich_step(model, teacher, (xa, xb), y, specs, cfg, device=torch.device("cpu"), amp=False)
    with torch.no_grad():
        target = F.softmax(teacher(xb, model.space.largest()), -1)
        expected = -(target * F.log_softmax(model(xa, model.space.smallest()), -1)).sum(-1).mean()
    assert losses["smallest"] == pytest.approx(float(expected), rel=1e-4)


def test_run_folder_contents(tmp_path) -> None:
    recipe = load_recipe(SMOKE)
    result = launch_supernet(recipe, tmp_path / "run", device="cpu")
    run = tmp_path / "run"
    for name in ("recipe.yaml", "metrics.csv", "last.pt", "best.pt", "final.pt", "subnets.csv", "summary.json"):
        assert (run / name).is_file(), name
    assert load_recipe(run / "recipe.yaml") == recipe
    metrics = list(csv.DictReader((run / "metrics.csv").open()))
    assert [(r["epoch"], r["subnet"]) for r in metrics] == [("0", "k0"), ("0", "k6"), ("1", "k0"), ("1", "k6")]
    rows = list(csv.DictReader((run / "subnets.csv").open()))
    assert {"subnet", "width", "macs", "params", "top1", "top5", "loss"} <= set(rows[0]) and len(rows) == 7
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2
    # where the time went: every phase timed, nothing counted twice (phases + other = elapsed, 0.1 s rounding)
    phases = summary["time_s"]
    assert {"data", "step", "backward", "teacher", "ema", "evaluate", "checkpoint", "finish", "other"} <= set(phases)
    assert sum(phases.values()) == pytest.approx(summary["elapsed_s"], abs=0.1 * len(phases))
    assert phases["step"] > phases["ema"] and summary["images_trained"] == 2 * 128
    assert result.time is not None and result.time.images == 2 * 128
    final = read_artifact(run / "final.pt", SupernetArtifact)
    assert final.calibrated and final.subnets == tuple(result.subnets) and len(result.subnets) == 7
    assert final.costs is not None and final.costs.route_macs == tuple(r.macs for r in result.subnets)


class _StopAt(Progress):
    def __init__(self, flag: StopFlag, after: int) -> None:
        self.flag, self.after, self.n = flag, after, 0

    def advance(self, n: int = 1, **metrics: float) -> None:
        self.n += n
        if self.n == self.after:
            self.flag.set()


def _rows(run: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "epoch_s"} for r in csv.DictReader((run / "metrics.csv").open())]


@pytest.mark.slow  # two trainings each
@pytest.mark.parametrize(("stop_after", "position", "extra"), [
    (9, (1, 3, 9), []), (6, (0, 6, 6), []),
    (9, (1, 3, 9), ["data.augment.mixup=0.8", "data.augment.cutmix=1.0"]),  # timm's numpy draws resume too
])
def test_interrupted_mid_epoch_resumes_to_identical_weights(tmp_path, stop_after, position, extra) -> None:
    # 6 steps per epoch: stopped mid-epoch 2, or after the last step of epoch 1 before its evaluation
    recipe = load_recipe(SMOKE, ["optim.epochs=2", "data.synthetic_train_size=96", *extra])
    launch_supernet(recipe, tmp_path / "a", device="cpu")
    flag = StopFlag()
    with pytest.raises(TrainingInterrupted, match="resume with --resume"):
        launch_supernet(recipe, tmp_path / "b", device="cpu", progress=_StopAt(flag, stop_after), stop=flag)
    state = read_artifact(tmp_path / "b" / "last.pt", SupernetArtifact).require_training()
    assert (state.epoch, state.batch, state.global_step) == position
    assert set(state.smoothed) == {"loss_largest", "loss_smallest"}
    launch_supernet(recipe, tmp_path / "b", device="cpu", resume=True)
    a = read_artifact(tmp_path / "a" / "final.pt", SupernetArtifact).state_dict
    b = read_artifact(tmp_path / "b" / "final.pt", SupernetArtifact).state_dict
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # every column but the timing, the smoothed train_loss_* included (continued, not restarted, by the resume)
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")
    assert "train_loss_smallest" in _rows(tmp_path / "a")[0]


def test_existing_run_needs_resume(tmp_path) -> None:
    recipe = load_recipe(SMOKE, ["optim.epochs=1"])
    launch_supernet(recipe, tmp_path / "r", device="cpu")
    with pytest.raises(dsctl.DsctlError, match="already holds a run"):
        launch_supernet(recipe, tmp_path / "r", device="cpu")


def test_build_supernet_takes_classes_and_channels_from_data() -> None:
    from dsctl.train.data import build_run_data

    recipe = load_recipe(SMOKE, ["data.synthetic_classes=7", "data.synthetic_channels=3"])
    model = build_supernet_for(recipe, build_run_data(recipe.data))
    assert model.num_classes == 7 and model.in_chans == 3


def test_recipe_dict_roundtrip_keeps_checkpoint_loadable(tmp_path) -> None:
    recipe = load_recipe(SMOKE)
    torch.save({"r": recipe_to_dict(recipe)}, tmp_path / "x.pt")
    assert torch.load(tmp_path / "x.pt", weights_only=True)["r"]["model"]["name"] == "tiny_ds_resnet"


@pytest.mark.slow
def test_torchrun_two_processes_gloo_with_sync_bn(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsctl",
           "train-supernet", str(SMOKE), "--out", str(tmp_path / "ddp"), "--device", "cpu", "--quiet",
           "--set", "optim.epochs=1", "--set", "supernet.sync_bn=true"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert (tmp_path / "ddp" / "final.pt").is_file()


@pytest.mark.slow  # a training
def test_gradient_accumulation_steps_once_per_group(tmp_path) -> None:
    recipe = load_recipe(SMOKE, ["optim.epochs=1", "optim.grad_accum=2", "data.batch_size=8"])
    launch_supernet(recipe, tmp_path / "acc", device="cpu")
    state = read_artifact(tmp_path / "acc" / "last.pt", SupernetArtifact).require_training()
    assert (state.epoch, state.batch, state.global_step) == (1, 0, 8)  # 128 images / 8 per batch / 2 per step


def test_sync_batchnorm_holds_for_its_scope_only() -> None:
    from dsctl.layers.slim import SlimBatchNorm2d
    from dsctl.train.trainer import sync_batchnorm

    model = dsctl.build_model("tiny_ds_resnet")
    bns = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d)]
    with sync_batchnorm(model, True):
        assert bns and all(m.sync for m in bns)
    assert not any(m.sync for m in bns)
    with pytest.raises(RuntimeError, match="boom"), sync_batchnorm(model, True):
        raise RuntimeError("boom")
    assert not any(m.sync for m in bns)


def test_recalibration_re_estimates_bn_and_skips_a_family_without_it() -> None:
    from dsctl.train.calibrate import recalibrate_bn
    from dsctl.train.data import build_run_data

    data = build_run_data(load_recipe(SMOKE).data)
    cnn = dsctl.build_model("tiny_ds_resnet")
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    assert recalibrate_bn(cnn, data, seed=0, device=torch.device("cpu"), num_batches=2) == 2
    changed = {k for k, v in cnn.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("running_" in k or "num_batches" in k for k in changed)
    vit = dsctl.build_model("tiny_ds_vit")
    assert recalibrate_bn(vit, data, seed=0, device=torch.device("cpu"), num_batches=2) == 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


@pytest.mark.slow
def test_torchrun_kill_one_rank_fails_fast_and_the_run_resumes(tmp_path) -> None:
    """SIGKILL rank 1 of a 2-process gloo run mid-training: the job ends (non-zero) within seconds instead of
    hanging in a collective, and ``--resume`` finishes the run with the same number of steps as planned."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    common = ["--device", "cpu", "--quiet", "--set", "optim.epochs=6", "--set", "data.synthetic_train_size=512",
              "--set", "supernet.checkpoint_every=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsctl",
           "train-supernet", str(SMOKE), "--out", str(out), *common]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.pt").exists():  # training is under way and has saved a resume point
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        victim = next(c for c in _children(proc.pid) if _rank_of(c) == 1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    print(f"job ended {took:.1f} s after rank 1 was killed")
    assert took < 45, f"the surviving rank needed {took:.0f} s to stop"
    assert "Signal 9 (SIGKILL)" in err or "exitcode  : -9" in err, err[-3000:]
    assert not (out / "final.pt").exists()
    resume = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsctl",
              "train-supernet", "--resume", str(out), *common]
    done = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = read_artifact(out / "last.pt", SupernetArtifact).require_training()
    assert (state.epoch, state.global_step) == (6, 6 * 512 // 16 // 2)  # 2 ranks x batch 16
    assert (out / "final.pt").is_file() and json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_mixup_and_cutmix_come_from_timm_and_give_soft_labels() -> None:
    from dsctl.errors import RecipeError
    from dsctl.train.trainer import build_mixup

    class _Ctx:
        recipe = {"data": {"augment": {"mixup": 0.8, "cutmix": 1.0}}, "supernet": {"target": "ib"}}
        seed = 0

        class data:
            class info:
                num_classes = 10

        class dist:
            rank = 0

    mix = build_mixup(_Ctx)
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8)
    xm, ym = mix(x.clone(), y)
    assert ym.shape == (8, 10) and torch.allclose(ym.sum(1), torch.ones(8)) and not torch.equal(xm, x)
    assert (ym.max(1).values < 1).any()  # mixed, not one-hot
    _Ctx.recipe = {"data": {"augment": {}}}
    assert build_mixup(_Ctx) is None
    _Ctx.recipe = {"data": {"augment": {"mixup": 0.2}}, "supernet": {"target": "mvco"}}
    with pytest.raises(RecipeError, match="mvco"):
        build_mixup(_Ctx)
