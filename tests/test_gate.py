"""Stage II: SGS targets, grouped inference, complexity pressure, and a gate that learns difficulty."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import dsctl
from dsctl.artifacts import RouteCosts
from dsctl.config import GateConfig, OptimConfig, SupernetConfig
from dsctl.data import DataInfo
from dsctl.dynamic import DynamicNet, check_window, dynamic_forward, forward_routed
from dsctl.flops import gate_macs, macs_table
from dsctl.train.common import Dist
from dsctl.train.data import TrainData
from dsctl.evaluation import evaluate_dynamic
from dsctl.train.gate import complexity_loss, sgs_targets, train_gate
from dsctl.train.run import RunDir
from dsctl.train.supernet import train_supernet
from dsctl.train.trainer import RunContext


def test_sgs_targets_on_hand_made_predictions() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    # right, wrong, right, wrong -> smallest (0), largest (W-1)
    assert sgs_targets(logits, labels, 4).tolist() == [0, 3, 0, 3]


def test_window_validation() -> None:
    model = dsctl.build_model("tiny_ds_resnet")
    assert check_window(model, None) == (0, 6)
    try:
        check_window(model, (2, 9))
    except dsctl.SpecError as err:
        assert "0 <= A < B <= 6" in str(err)
    else:
        raise AssertionError


def _graded_gate(model, x: torch.Tensor) -> None:
    """A hand-set gate whose choice grows with the input's feature magnitude, so routes are mixed."""
    gate = model.gate
    k = gate.num_subnets
    with torch.no_grad():
        gate.reduce.weight.zero_()
        gate.reduce.bias.zero_()
        gate.reduce.weight[0].fill_(1.0 / gate.reduce.in_channels)
        e0 = model.forward_pre(x, model.space.smallest(), encode=True).encoding.flatten(1)[:, 0]
        j = torch.arange(k, dtype=torch.float32)
        gate.head.weight.zero_()
        gate.head.weight[:, 0] = j
        gate.head.bias.copy_(-(j**2) * float(e0.max()) / (2 * 4))  # argmax_j j*e0 - j^2 c = round(e0 / 2c)


def test_grouped_inference_equals_per_sample() -> None:
    for name in ("tiny_ds_resnet", "tiny_ds_mobilenetv1"):
        model = dsctl.build_model(name).eval()
        x = torch.randn(24, model.in_chans, 28, 28) * torch.linspace(0.0, 4.0, 24)[:, None, None, None]
        _graded_gate(model, x)
        logits, routes = dynamic_forward(model, x, (0, 4))
        assert len(set(routes.tolist())) > 1, "test needs mixed routes"
        with torch.no_grad():
            for i in range(x.shape[0]):
                alone = model(x[i : i + 1], model.space.subnets[int(routes[i])])
                torch.testing.assert_close(logits[i : i + 1], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(DynamicNet(model, (0, 4))(x), logits)


def test_grouped_inference_keeps_channels_last() -> None:
    """Each route's group reaches its sub-network in the input's memory format, in the supernet and in the
    deployable routed model (gathering rows with ``index_select`` returns NCHW and made every routed layer
    run in the slower layout: DS-ResNet-50's routed model at batch 64 took 1.2x its static tails' time)."""
    from dsctl.export import export_routed

    model = dsctl.build_model("tiny_ds_resnet", in_chans=3).eval()  # one channel: NCHW and NHWC coincide
    x = torch.randn(24, model.in_chans, 28, 28) * torch.linspace(0.0, 4.0, 24)[:, None, None, None]
    _graded_gate(model, x)
    x = x.contiguous(memory_format=torch.channels_last)
    seen: list[bool] = []

    def record(_module, args) -> None:
        h = args[0]
        assert h.shape[-1] > 1 and h.shape[1] > 1, "the check needs a real 4-d layout"
        seen.append(h.is_contiguous(memory_format=torch.channels_last))

    routed = export_routed(model, (0, 4)).eval()
    hooks = [t.register_forward_pre_hook(record) for t in routed.tails]
    hooks.append(model.routed_blocks()[0][1].register_forward_pre_hook(record))
    with torch.no_grad():
        routes = dynamic_forward(model, x, (0, 4))[1]
        routed(x)
    for h in hooks:
        h.remove()
    assert len(set(routes.tolist())) > 1, "test needs mixed routes"
    assert len(seen) >= 4 and all(seen), seen


def test_routed_training_forward_equals_chosen_subnet() -> None:
    model = dsctl.build_model("tiny_ds_mobilenetv1").eval()
    x = torch.randn(8, 1, 28, 28) * torch.linspace(0.0, 4.0, 8)[:, None, None, None]
    _graded_gate(model, x)
    macs = torch.tensor(macs_table(model)[1:4], dtype=torch.float32)
    out = forward_routed(model, x, (1, 3), macs, tau=1.0)
    with torch.no_grad():
        for i in range(8):
            ref = model(x[i : i + 1], model.space.subnets[1 + int(out.routes[i])])
            torch.testing.assert_close(out.logits[i : i + 1].detach(), ref, atol=1e-5, rtol=1e-4)
    out.logits.sum().backward()
    assert model.gate.head.weight.grad is not None and model.gate.head.weight.grad.abs().sum() > 0


def test_complexity_loss_forms() -> None:
    macs = torch.tensor(2.0e9)
    assert float(complexity_loss(macs, GateConfig(complexity="authors", complexity_weight=0.5))) == 2.0
    cfg = GateConfig(complexity="target", complexity_weight=1.0, target_macs_m=1000.0)
    assert float(complexity_loss(macs, cfg)) == 1.0
    # two-sided: a cost below the target is pulled up too
    assert float(complexity_loss(torch.tensor(0.5e9), cfg)) == pytest.approx(0.25)
    assert float(complexity_loss(torch.tensor(1.0e9), cfg)) == 0.0


@pytest.fixture(autouse=True)
def _one_thread():
    """Training results must not depend on how many threads the machine gives the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Difficulty(Dataset):
    """Class patterns plus noise: a ``hard`` fraction of the samples (every 1/hard-th index) gets strong
    noise, the rest weak noise."""

    def __init__(self, n: int, seed: int, hard: float = 0.5) -> None:
        g = torch.Generator().manual_seed(0)
        self.patterns = torch.randn(4, 1, 16, 16, generator=g)
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        noise = torch.randn(n, 1, 16, 16, generator=g)
        self.hard = torch.rand(n, generator=g) < hard
        easy_scale = 0.2 + 1.3 * torch.rand(n, generator=g)  # difficulty varies within the easy part too
        scale = torch.where(self.hard, 6.0, easy_scale)[:, None, None, None]
        self.x = self.patterns[self.labels] + scale * noise

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], int(self.labels[i])


def _data(train: Dataset, val: Dataset) -> TrainData:
    info = DataInfo(4, 1, (0.0,), (1.0,), "difficulty", len(train), len(val))
    return TrainData(train, DataLoader(val, batch_size=64), info, 32, 0, Dist(), 16)


@pytest.mark.slow
def test_gate_routes_hard_samples_wider_and_complexity_makes_it_cheaper(tmp_path) -> None:
    torch.manual_seed(0)
    train, val = _Difficulty(1024, 1), _Difficulty(512, 2)
    data = _data(train, val)
    model = dsctl.build_model("tiny_ds_resnet", num_classes=4, base_width=4)
    optim = OptimConfig(lr=0.1, epochs=3, warmup_epochs=0, weight_decay=0.0, amp=False)
    train_supernet(model, RunContext(RunDir(tmp_path / "sup"), data),
                   SupernetConfig(calib_batches=8, ema_decay=0.0, target="none"), optim)
    window = (0, 6)
    route_macs = macs_table(model, 16)
    g_optim = OptimConfig(lr=0.2, epochs=4, warmup_epochs=0, weight_decay=0.0, amp=False)
    results = {}
    for name, weight in (("light", 0.0), ("heavy", 1e8)):
        m = dsctl.build_model("tiny_ds_resnet", num_classes=4, base_width=4)
        m.load_state_dict(model.state_dict())
        cfg = GateConfig(window=window, complexity="authors", complexity_weight=weight)
        train_gate(m, RunContext(RunDir(tmp_path / name), data), cfg, g_optim, window=window,
                   costs=RouteCosts(tuple(route_macs), gate_macs(m)))
        _, routes = dynamic_forward(m.eval(), val.x, window)
        results[name] = (routes.float(), evaluate_dynamic(m, data.val, window, torch.device("cpu"),
                                                          route_macs=route_macs, gate_macs=gate_macs(m)))
    routes, _ = results["light"]
    assert routes[val.hard].mean() > routes[~val.hard].mean() + 0.5, (routes[val.hard].mean(), routes[~val.hard].mean())
    assert results["heavy"][1].avg_macs < results["light"][1].avg_macs


@pytest.mark.slow
def test_calibrated_gate_meets_its_budget_when_hard_samples_are_rare(tmp_path) -> None:
    torch.manual_seed(0)
    train, val, held = _Difficulty(1024, 1, 0.15), _Difficulty(2048, 2, 0.15), _Difficulty(1024, 3, 0.15)
    data = _data(train, val)
    model = dsctl.build_model("tiny_ds_resnet", num_classes=4, base_width=4)
    optim = OptimConfig(lr=0.1, epochs=3, warmup_epochs=0, weight_decay=0.0, amp=False)
    train_supernet(model, RunContext(RunDir(tmp_path / "sup"), data),
                   SupernetConfig(calib_batches=8, ema_decay=0.0, target="none"), optim)
    route_macs, g_macs = macs_table(model, 16), gate_macs(model)
    window = (0, 6)
    target = 0.5 * (route_macs[0] + route_macs[6]) + g_macs
    cfg = GateConfig(window=window, complexity="target", complexity_weight=1.0, target_macs_m=target / 1e6)
    g_optim = OptimConfig(lr=0.05, epochs=4, warmup_epochs=0, weight_decay=0.0, amp=False)
    result = train_gate(model, RunContext(RunDir(tmp_path / "gate"), data), cfg, g_optim, window=window,
                        costs=RouteCosts(tuple(route_macs), g_macs), holdout=DataLoader(held, batch_size=256))
    cal = result.final.calibration
    assert cal is not None and cal.met and abs(cal.error) <= 0.02, cal
    on_test = evaluate_dynamic(model, data.val, window, torch.device("cpu"), route_macs=route_macs, gate_macs=g_macs)
    assert abs(on_test.avg_macs / target - 1) <= 0.05, (on_test.avg_macs, target)
    _, routes = dynamic_forward(model.eval(), val.x, window)
    assert routes[val.hard].float().mean() > routes[~val.hard].float().mean() + 1.0
    # the same gate under plain argmax hardly spends: the budget comes from the calibration
    model.gate.route_bias.zero_()
    argmax = evaluate_dynamic(model, data.val, window, torch.device("cpu"), route_macs=route_macs, gate_macs=g_macs)
    assert abs(argmax.avg_macs / target - 1) > 0.05


@pytest.mark.slow  # two gate trainings
def test_gate_run_resumes_to_identical_head(tmp_path) -> None:
    from pathlib import Path

    from dsctl.artifacts import GateArtifact, read_artifact
    from dsctl.config import load_recipe
    from dsctl.train.launch import launch_gate, launch_supernet
    from dsctl.train.progress import Progress
    from dsctl.train.run import StopFlag, TrainingInterrupted

    smoke = Path(__file__).resolve().parents[1] / "recipes/smoke/synthetic_tiny_ds_resnet.yaml"
    launch_supernet(load_recipe(smoke, ["optim.epochs=1"]), tmp_path / "sup", device="cpu")
    recipe = load_recipe(smoke, ["optim.epochs=2", "gate.window=[0,3]"])
    launch_gate(recipe, tmp_path / "sup", tmp_path / "a", device="cpu")

    class StopAt(Progress):
        def __init__(self, flag: StopFlag) -> None:
            self.flag, self.n = flag, 0

        def advance(self, n: int = 1, **metrics: float) -> None:
            self.n += n
            if self.n == 11:
                self.flag.set()

    flag = StopFlag()
    try:
        launch_gate(recipe, tmp_path / "sup", tmp_path / "b", device="cpu", progress=StopAt(flag), stop=flag)
    except TrainingInterrupted:
        pass
    else:
        raise AssertionError("expected an interruption")
    launch_gate(recipe, tmp_path / "sup", tmp_path / "b", device="cpu", resume=True)
    a = read_artifact(tmp_path / "a" / "final.pt", GateArtifact).state_dict
    b = read_artifact(tmp_path / "b" / "final.pt", GateArtifact).state_dict
    assert torch.equal(a["gate.head.weight"], b["gate.head.weight"])
    assert torch.equal(a["gate.reduce.weight"], b["gate.reduce.weight"])
