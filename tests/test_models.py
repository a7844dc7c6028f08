"""Contract tests over every registered model (timm-style), plus export equality for the tiny ones."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import dsctl
from dsctl.export import export_subnet
from tests.conftest import TINY_MODELS, cpu_sized_model, image_batch


@pytest.mark.parametrize("name", dsctl.list_models())
def test_forward_backward_smallest_and_largest(name: str) -> None:
    model, size = cpu_sized_model(name)  # reduced resolution on CPU
    model.train()
    x = image_batch(model, 2, size)
    for spec in (model.space.smallest(), model.space.largest()):
        model.zero_grad()
        out = model(x, spec)
        assert out.shape == (2, model.num_classes)
        out.logsumexp(1).sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_exported_equals_sliced_supernet_for_every_subnet(name: str) -> None:
    model = dsctl.build_model(name)
    model.train()
    x = image_batch(model, 8)
    with torch.no_grad():  # give every width non-trivial BN statistics
        for spec in (*model.space.subnets, model.space.full):
            model(x + 0.5, spec)
    model.eval()
    for spec in (*model.space.subnets, model.space.full):
        static = export_subnet(model, spec)
        assert not any(type(m).__module__.startswith("dsctl.layers.slim") for m in static.modules())
        with torch.no_grad():
            torch.testing.assert_close(static(x), model(x, spec), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_interleaved_widths_keep_their_own_bn_statistics(name: str) -> None:
    """Training other widths on other data leaves the BN statistics that only width ``a`` uses untouched.

    Hooks record which (layer, channel count, kernel size) choices each width runs; layers before the gate
    run at one width for every sub-network and legitimately share their statistics, so only the choices
    ``a`` alone uses are compared with ``twin``, which never saw the other widths.
    """
    from dsctl.layers.slim import SlimBatchNorm2d

    model = dsctl.build_model(name).train()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, SlimBatchNorm2d)}
    if not norms:
        pytest.skip(f"{name} has no batch norm")
    seen: set[tuple[str, int, int | None]] = set()
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: seen.add((n, args[0].shape[1], (*args, None)[1])))
             for n, m in norms.items()]
    x = image_batch(model, 4)
    specs = [*model.space.subnets, model.space.full]
    a = specs[0]
    with torch.no_grad():
        model(x, a)
        used_by_a, seen = set(seen), set()
        twin = copy.deepcopy(model)
        for spec in random.Random(0).sample(specs[1:], len(specs) - 1):
            model(image_batch(model, 4) * 3.0 + 2.0, spec)
    for h in hooks:
        h.remove()
    only_a = used_by_a - seen
    assert len(only_a) >= len(norms) // 4, "width a should own the statistics of most sliced layers"
    twin_norms = dict(twin.named_modules())
    for n, c, k in only_a:
        for mine, theirs in zip(norms[n].stats(c, k), twin_norms[n].stats(c, k), strict=True):
            torch.testing.assert_close(mine, theirs)
    moved = [(n, c) for n, c, k in seen if not torch.equal(norms[n].stats(c, k)[0], twin_norms[n].stats(c, k)[0])]
    assert moved  # the other widths did update their own statistics


def test_search_space_is_as_designed_for_ds_mobilenetv1() -> None:
    space = dsctl.build_model("ds_mobilenetv1").space
    assert space.num_subnets == 14
    assert space.ratios() == tuple(round(0.35 + 0.05 * k, 6) for k in range(14))
    assert space.subnets[0].widths == (16, 32, 48, 96, 224, 736)
    assert space.subnets[13].widths == (16, 32, 48, 96, 640, 1152)
    assert space.full.widths == (24, 88, 168, 264, 640, 1152)
    assert space.routed_stages == ("s4", "s5")


def test_ds_mobilenetv1_blocks_have_se_swish_no_residual() -> None:
    model = dsctl.build_model("ds_mobilenetv1")
    blocks = [b for stage in model.stages for b in stage]
    assert [len(stage) for stage in model.stages] == [1, 2, 2, 6, 2]
    # every block has an SE, except the gate block whose SE is the gate's attention head
    assert sum(b.se is None for b in blocks) == 1 and model.gate_block.se is None and model.stages[3][0].se is None
    assert model.gate.expand is not None and model.gate.reduce.out_channels == round(0.25 * 264)
    assert blocks[1].se.reduce.out_channels == round(0.25 * 88)


@pytest.mark.parametrize("name, count, digest", [("tiny_ds_mobilenetv1", 228, "384daa1792026636"),
                                                 ("ds_mobilenetv1", 840, "ad2cec176195a28a")])
def test_ds_mobilenetv1_state_dict_names_and_shapes_are_those_checkpoints_hold(name, count, digest) -> None:
    """Recorded before SlimDSBlock became SlimSeparableBlock and the gate block got a name: class names and
    code structure may change, the names and shapes a saved checkpoint holds may not."""
    import hashlib

    sd = dsctl.build_model(name).state_dict()
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items())
    assert (len(sd), hashlib.sha256(text.encode()).hexdigest()[:16]) == (count, digest)


def test_ds_resnet50_space_and_timm_names() -> None:
    model = dsctl.build_model("ds_resnet50")
    space = model.space
    assert space.ratios() == (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    assert space.subnets[-1] == space.full
    assert space.full.widths == (64, 256, 512, 1024, 2048)
    keys = set(model.state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer4.2.conv3.weight",
                "layer3.5.bn2.weight", "fc.weight", "fc.bias"):
        assert key in keys
    assert model.state_dict()["layer4.0.conv2.weight"].shape == (512, 512, 3, 3)


@pytest.mark.parametrize("gate_after", [1, 3])
def test_resnet50_state_dict_loads_through_init_from(tmp_path, gate_after: int) -> None:
    """The full network is exactly ResNet-50 wherever the gate sits."""
    import torchvision

    from dsctl.weights import load_full_width as load_pretrained

    ref = torchvision.models.resnet50()
    ref.eval()
    path = tmp_path / "resnet50.pth"
    torch.save(ref.state_dict(), path)
    model = dsctl.build_model("ds_resnet50", gate_after=gate_after).eval()
    load_pretrained(model, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x, model.space.full), ref(x), atol=1e-4, rtol=1e-4)


def test_unknown_model_and_bad_option_are_clear() -> None:
    with pytest.raises(dsctl.DsctlError, match="known models: .*tiny_ds_resnet"):
        dsctl.build_model("resnet9000")
    with pytest.raises(dsctl.DsctlError, match="no option depth"):
        dsctl.build_model("tiny_ds_resnet", depth=3)


def test_front_ratio_narrows_stem_and_layer1_in_every_subnet() -> None:
    """``front_ratio``: the stem and layer1 at a fraction of their width in every sub-network, the full one
    included (so no two sub-networks with equal routed widths see different inputs); exports equal the
    supernet, routed model included."""
    from dsctl.dynamic import DynamicNet
    from dsctl.export import export_routed
    from dsctl.flops import macs_table

    model = dsctl.build_model("tiny_ds_resnet", base_width=8, front_ratio=0.25)
    widths = model.space.stage_widths
    assert {widths(s)["stem"] for s in (*model.space.subnets, model.space.full)} == {4}
    assert {widths(s)["layer1"] for s in (*model.space.subnets, model.space.full)} == {8}
    assert model.gate_in_channels == 8 and model.space.full == model.space.subnets[-1]
    plain = dsctl.build_model("tiny_ds_resnet", base_width=8)
    assert macs_table(model)[0] < macs_table(plain)[0] / 2
    model.train()
    x = image_batch(model, 8)
    with torch.no_grad():
        for spec in model.space.subnets:
            model(x + 0.5, spec)
    model.eval()
    for spec in (model.space.smallest(), model.space.subnets[3], model.space.full):
        with torch.no_grad():
            torch.testing.assert_close(export_subnet(model, spec)(x), model(x, spec), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(export_routed(model, (0, 6))(x), DynamicNet(model, (0, 6))(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="front_ratio=0"):
        dsctl.build_model("tiny_ds_resnet", front_ratio=0.0)
