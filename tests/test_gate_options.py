"""DS-ResNet gate position (after stage 1, 2 or 3), the conv gate, and the gate's route_bias decision offsets."""

from __future__ import annotations

import pytest
import torch

import dsctl
from dsctl.artifacts import GateArtifact, RouteCosts, read_artifact
from dsctl.dynamic import DynamicNet, dynamic_forward, masked_forward
from dsctl.export import export_routed, export_subnet
from dsctl.flops import gate_macs
from tests.conftest import image_batch

POSITIONS = (1, 2, 3)


def _with_bn_stats(model: dsctl.Supernet, x: torch.Tensor) -> dsctl.Supernet:
    """Give every width non-trivial BN statistics, then switch to eval mode."""
    model.train()
    with torch.no_grad():
        for spec in (*model.space.subnets, model.space.full):
            model(x + 0.5, spec)
    return model.eval()


def graded_gate(model: dsctl.Supernet, x: torch.Tensor) -> None:
    """A hand-set gate whose choice grows with the input's mean feature, so routes are mixed.

    Encoder channel 0 = mean feature (centre tap of a 1x1 or 3x3 conv, ReLU'd features are >= 0);
    head logit j = j*e0 - j^2*c, whose argmax is about e0 / 2c.
    """
    gate = model.gate
    k = gate.num_subnets
    with torch.no_grad():
        w = gate.reduce.weight
        w.zero_()
        gate.reduce.bias.zero_()
        w[0, :, w.shape[-2] // 2, w.shape[-1] // 2] = 1.0 / w.shape[1]
        e0 = model.forward_pre(x, model.space.smallest(), encode=True).encoding.flatten(1)[:, 0]
        j = torch.arange(k, dtype=torch.float32)
        gate.head.weight.zero_()
        gate.head.weight[:, 0] = j
        gate.head.bias.copy_(-(j**2) * float(e0.max()) / (2 * (k - 1)))


def graded_batch(model: dsctl.Supernet, n: int = 24) -> torch.Tensor:
    return image_batch(model, n) * torch.linspace(0.0, 4.0, n)[:, None, None, None]


@pytest.mark.parametrize("gate_after", POSITIONS)
def test_gate_position_sets_the_space(gate_after: int) -> None:
    model = dsctl.build_model("tiny_ds_resnet", gate_after=gate_after)
    space = model.space
    assert space.gate_after == f"layer{gate_after}"
    assert space.routed_stages == tuple(f"layer{n}" for n in range(gate_after + 1, 5))
    assert space.ratios() == (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    # pre-gate sliceable stages: 0.25 of their width in every indexed sub-network, full width in the full net
    full = space.stage_widths(space.full)
    for spec in space.subnets:
        widths = space.stage_widths(spec)
        for n in range(2, gate_after + 1):
            assert widths[f"layer{n}"] == full[f"layer{n}"] // 4
    assert space.smallest().widths == (16, 32, 16, 32, 64)  # k0 is the same network wherever the gate sits
    assert (space.full in space.subnets) == (gate_after == 1)
    assert model.gate_in_channels == space.stage_widths(space.smallest())[f"layer{gate_after}"]
    point = model.forward_pre(image_batch(model), space.smallest(), encode=True)
    assert point.features.shape[1:] == (model.gate_in_channels, model.gate_in_size(28), model.gate_in_size(28))


def test_pre_gate_ratio_and_validation() -> None:
    model = dsctl.build_model("tiny_ds_resnet", gate_after=3, pre_gate_ratio=0.5)
    assert model.space.smallest().widths == (16, 32, 32, 64, 64)
    model = dsctl.build_model("tiny_ds_resnet", gate_after=2, pre_gate_ratio=1.0)
    assert model.space.stages[2].choices == (64,) and model.space.subnets[-1] == model.space.full
    with pytest.raises(ValueError, match=r"gate_after=4 .*allowed: 1, 2, 3"):
        dsctl.build_model("tiny_ds_resnet", gate_after=4)
    with pytest.raises(ValueError, match=r"pre_gate_ratio=0.3 .*allowed: 0.25, 0.375, .*, 1"):
        dsctl.build_model("ds_resnet50", pre_gate_ratio=0.3)


@pytest.mark.parametrize("gate_conv", [False, True])
@pytest.mark.parametrize("gate_after", POSITIONS)
def test_gate_position_forward_and_export_for_every_subnet(gate_after: int, gate_conv: bool) -> None:
    model = dsctl.build_model("tiny_ds_resnet", gate_after=gate_after, gate_conv=gate_conv).train()
    x = image_batch(model, 4)
    for spec in (model.space.smallest(), model.space.largest()):
        model.zero_grad()
        out = model(x, spec)
        assert out.shape == (4, model.num_classes)
        out.logsumexp(1).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    _with_bn_stats(model, x)
    for spec in (*model.space.subnets, model.space.full):
        with torch.no_grad():
            torch.testing.assert_close(export_subnet(model, spec)(x), model(x, spec), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gate_conv", [False, True])
@pytest.mark.parametrize("gate_after", POSITIONS)
def test_routed_inference_equals_per_sample_forward(gate_after: int, gate_conv: bool) -> None:
    model = dsctl.build_model("tiny_ds_resnet", gate_after=gate_after, gate_conv=gate_conv)
    x = graded_batch(model)
    _with_bn_stats(model, x)
    graded_gate(model, x)
    window = (0, 6)
    logits, routes = dynamic_forward(model, x, window)
    assert len(set(routes.tolist())) > 2, "test needs mixed routes"
    with torch.no_grad():
        for i in range(x.shape[0]):
            alone = model(x[i : i + 1], model.space.subnets[int(routes[i])])
            torch.testing.assert_close(logits[i : i + 1], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(export_routed(model, window)(x), logits, atol=1e-5, rtol=1e-4)


def test_probe_points_are_pooled_features_at_each_position() -> None:
    model = dsctl.build_model("tiny_ds_resnet", gate_after=2).eval()
    x = image_batch(model, 3)
    for spec in (model.space.smallest(), model.space.full):
        points = model.probe_points(x, spec)
        widths = model.space.stage_widths(spec)
        assert list(points) == ["stem", "layer1", "layer2", "layer3"]
        assert all(p.shape == (3, widths[name]) and not p.requires_grad for name, p in points.items())
    with torch.no_grad():
        gate_point = model.forward_pre(x, model.space.smallest()).features.mean((2, 3))
    torch.testing.assert_close(model.probe_points(x, model.space.smallest())["layer2"], gate_point)
    with pytest.raises(NotImplementedError, match="probe_points"):
        dsctl.Supernet.probe_points(model, x, model.space.smallest())


def test_gate_macs_hand_count() -> None:
    # conv gate after layer2 of the tiny net at 28 px: input 16 ch (0.25 x 64) at 14x14, encoder 16, K = 7
    model = dsctl.build_model("tiny_ds_resnet", gate_after=2, gate_conv=True)
    conv, pool, head = 14 * 14 * 16 * 16 * 9, 16 * 14 * 14, 16 * 7
    assert gate_macs(model) == conv + pool + head
    assert gate_macs(model, 32) == 16 * 16 * (16 * 16 * 9 + 16) + head  # 32 px -> 16x16 at the gate
    # 1x1 gate after layer1: pool the 32 x 28 x 28 input, then 32 -> 16, then the head
    model = dsctl.build_model("tiny_ds_resnet")
    assert gate_macs(model) == 32 * 28 * 28 + 32 * 16 + 16 * 7
    # ds_resnet50 conv gate after layer3 at 224 px: 256 ch (0.25 x 1024) at 14x14, encoder 64, K = 7
    model = dsctl.build_model("ds_resnet50", gate_after=3, gate_conv=True)
    assert model.gate_in_size(224) == 14
    assert gate_macs(model, 224) == 14 * 14 * 64 * 256 * 9 + 64 * 14 * 14 + 64 * 7


def graded_conv_gate_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny DS-ResNet (conv gate after layer 2) with BN statistics and a hand-set gate giving mixed routes."""
    model = dsctl.build_model("tiny_ds_resnet", gate_after=2, gate_conv=True)
    x = graded_batch(model)
    _with_bn_stats(model, x)
    graded_gate(model, x)
    return model, x


def test_route_bias_shifts_the_decision_everywhere() -> None:
    model, x = graded_conv_gate_model()
    window = (1, 5)
    plain_logits, plain = dynamic_forward(model, x, window)
    assert model.gate.route_bias.dtype == torch.float32 and not model.gate.route_bias.any()
    with torch.no_grad():
        model.gate.route_bias.copy_(torch.tensor([0.0, 0.0, 0.05, -5.0, 0.0, -0.03, 50.0]))  # k6 is outside the window
        e = model.forward_pre(x, model.space.subnets[1], encode=True).encoding
        expected = (model.gate.route_logits(e)[:, 1:6] + model.gate.route_bias[1:6]).argmax(-1) + 1
    logits, routes = dynamic_forward(model, x, window)
    assert torch.equal(routes, expected) and torch.equal(model.gate.decide(e, window), expected)
    assert not torch.equal(routes, plain) and 3 not in routes.tolist() and routes.max() <= 5
    assert torch.equal(DynamicNet(model, window).routes(x), routes)
    with torch.no_grad():
        # masking at the window's widest is exact for samples routed there, and masks the ones the offsets moved
        masked = masked_forward(model, x, window)
        widest, moved = routes == 5, (plain == 5) & (routes != 5)
        assert widest.any() and moved.any()
        torch.testing.assert_close(masked[widest], logits[widest], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(masked[moved], plain_logits[moved], atol=1e-4)
        torch.testing.assert_close(export_routed(model, window)(x), logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["pooled", "conv", "attention"])
def test_static_gate_decides_like_the_gate(kind: str) -> None:
    from dsctl.layers.gate import SlimGate

    gate = SlimGate(24, 8, 6, attention=kind == "attention", conv=kind == "conv")
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
        gate.route_bias.normal_(std=0.1)
    h = torch.randn(16, 20, 5, 5) + 3 * torch.randn(16, 20, 1, 1)  # sliced input: 20 of 24 channels
    window = (1, 4)
    static = gate.to_static(20, window)
    assert not any(type(m).__module__.startswith("dsctl.layers.slim") for m in static.modules())
    with torch.no_grad():
        e = gate.encode(h)
        features, routes = static(h)
        torch.testing.assert_close(features, gate.attend(h, e))
        assert torch.equal(routes + 1, gate.decide(e, window))
        assert len(set(routes.tolist())) > 1


def test_route_bias_survives_checkpoints_and_old_state_dicts_load(tmp_path) -> None:
    model = dsctl.build_model("tiny_ds_resnet", gate_after=3)
    bias = torch.linspace(-1.0, 1.0, model.gate.num_subnets)
    model.gate.route_bias.copy_(bias)
    state = model.state_dict()
    assert torch.equal(state["gate.route_bias"], bias)
    GateArtifact.from_model(model, window=(0, 3), costs=RouteCosts((1, 2, 3, 4, 5, 6, 7), 1)).save(tmp_path / "c.pt")
    loaded = read_artifact(tmp_path / "c.pt", GateArtifact).build_model()
    assert torch.equal(loaded.gate.route_bias, bias)
    old = {k: v for k, v in state.items() if k != "gate.route_bias"}  # written before route_bias existed
    loaded.load_state_dict(old)  # strict
    assert loaded.gate.route_bias.shape == bias.shape and not loaded.gate.route_bias.any()
    assert "gate.route_bias" not in old
