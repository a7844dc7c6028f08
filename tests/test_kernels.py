"""Kernel-size slicing (DS-CNN++): a smaller kernel is the centre of the stored one, BatchNorm keeps
statistics per kernel size, and the kernel family's sub-networks are ordered by MACs and export exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsctl
from dsctl.errors import SpecError
from dsctl.flops import count_target
from dsctl.layers.slim import SlimBatchNorm2d, SlimConv2d
from dsctl.spec import SliceSpec


@pytest.mark.parametrize("depthwise", [True, False])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (5, 2), (7, 1)])
def test_conv_runs_the_centre_of_its_kernel_and_keeps_the_output_size(depthwise: bool, kernel: int, stride: int) -> None:
    conv = SlimConv2d(8, 8, 7, stride, 3, groups=8 if depthwise else 1, bias=False).eval()
    x = torch.randn(2, 8 if depthwise else 6, 9, 9)
    lo = (7 - kernel) // 2
    weight = conv.weight[: x.shape[1] if depthwise else 8, : 1 if depthwise else x.shape[1], lo:lo + kernel, lo:lo + kernel]
    expected = F.conv2d(x, weight, None, stride, kernel // 2, 1, x.shape[1] if depthwise else 1)
    with torch.no_grad():
        out = conv(x, kernel=kernel)
        assert out.shape[-2:] == conv(x).shape[-2:]
        torch.testing.assert_close(out, expected)
        static = conv.to_static(x.shape[1], kernel=kernel)
        assert static.kernel_size == (kernel, kernel)
        torch.testing.assert_close(static(x), expected)


def test_conv_refuses_a_kernel_it_cannot_centre() -> None:
    conv = SlimConv2d(4, 4, 5, 1, 2, groups=4, bias=False)
    for bad in (4, 7, 0):
        with pytest.raises(ValueError, match=f"cannot run a {bad}x{bad}"):
            conv(torch.randn(1, 4, 6, 6), kernel=bad)


def test_batchnorm_keeps_statistics_per_width_and_kernel() -> None:
    bn = SlimBatchNorm2d((4, 8), kernels=(3, 5, 7)).train()
    names = set(dict(bn.named_buffers()))
    assert {"running_mean", "running_mean_c4", "running_mean_k3", "running_mean_c4_k5"} <= names
    assert "running_mean_k7" not in names  # the largest kernel uses the plain names
    bn(torch.randn(6, 4, 3, 3) + 5.0, kernel=3)
    assert bn.running_mean_c4_k3.abs().sum() > 0
    for name in ("running_mean", "running_mean_c4", "running_mean_c4_k5", "running_mean_k3"):
        assert getattr(bn, name).abs().sum() == 0, name
    with pytest.raises(ValueError, match="kernel 9"):
        bn(torch.randn(2, 4, 3, 3), kernel=9)


def test_kernel_family_orders_its_subnets_by_fvcore_macs_and_names_them() -> None:
    model = dsctl.build_model("tiny_ds_mobilenetv1pp")
    space = model.space
    assert space.slices_kernels and space.num_subnets == 18
    macs = [r.macs for r in count_target("tiny_ds_mobilenetv1pp") if r.subnet != "largest"]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)
    assert {space.kernel_of(s) for s in space.subnets} == {3, 5, 7}
    assert space.resolve("0.5@5") == SliceSpec((8, 16, 24, 32, 64, 128), (0, 0, 0, 0, 5, 5))
    assert space.name(space.resolve("0.5@5")) == "0.5@5"
    with pytest.raises(SpecError, match="names 3 sub-networks"):
        space.resolve("0.5")
    with pytest.raises(SpecError, match="kernel 9 not allowed"):
        space.check(SliceSpec((8, 16, 24, 32, 64, 128), (0, 0, 0, 0, 9, 9)))
    with pytest.raises(SpecError, match="kernel sizes"):
        space.check(SliceSpec((8, 16, 24, 32, 64, 128)))
    spec = space.subnets[4]
    assert SliceSpec.from_json(spec.to_json()) == spec
    with pytest.raises(SpecError, match="slices no kernel"):
        dsctl.build_model("tiny_ds_mobilenetv1").space.check(spec)


def test_kernel_subnets_export_with_cropped_kernels_and_route_like_their_statics() -> None:
    from dsctl.export import export_routed

    model = dsctl.build_model("tiny_ds_mobilenetv1pp").eval()
    space = model.space
    x = torch.randn(5, 1, 28, 28)
    for size in (3, 5, 7):
        spec = space.resolve(f"0.625@{size}")
        static = model.to_static(spec)
        kernels = {m.kernel_size[0] for m in static.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
        assert size in kernels and kernels <= {3, size}
        with torch.no_grad():
            torch.testing.assert_close(static(x), model(x, spec), atol=1e-5, rtol=1e-4)
    routed = export_routed(model, (6, 8))  # 0.625 at 3, 5 and 7: routes differ by kernel only
    with torch.no_grad():
        h, routes = routed.front(x)
        for i, tail in enumerate(routed.tails):
            torch.testing.assert_close(tail(h), model.forward_post(h, space.subnets[6 + i]), atol=1e-5, rtol=1e-4)


def test_vit_mlp_routed_apart_orders_by_fvcore_macs_exports_and_masks_exactly() -> None:
    """DS-ViT with mlp_ratios: every head count at every MLP ratio, ordered by MACs (a narrower MLP can come
    before fewer heads), each exported exactly, and the masked reference equal to each route's output."""
    from dsctl.flops import count_subnet

    model = dsctl.build_model("tiny_ds_vit", mlp_ratios=[1, 2, 4]).eval()
    space = model.space
    assert space.routes_mlp and space.num_subnets == 9
    macs = [count_subnet(model, s).macs for s in space.subnets]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)
    names = [space.name(s) for s in space.subnets]
    assert names.index("1@mlp1") < names.index("0.75@mlp4")  # the MLP shrinks before the heads do
    assert space.full == SliceSpec((64, 64, 64), (), (0, 0, 256))
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        for spec in space.subnets[::2]:
            torch.testing.assert_close(model.to_static(spec)(x), model(x, spec), atol=1e-5, rtol=1e-4)
        h = model.forward_pre(x, space.subnets[0]).features
        routes = torch.tensor([0, 3, 5, 8, 2, 7])
        masked = model.forward_post_masked(h, routes, space.subnets[-1])
        for i, r in enumerate(routes.tolist()):
            torch.testing.assert_close(masked[i], model.forward_post(h[i:i + 1], space.subnets[r])[0],
                                       atol=1e-5, rtol=1e-4)
        # a window's last member by MACs (0.75@mlp4) has fewer heads than the one before it (1@mlp1)
        lo, hi = names.index("1@mlp1"), names.index("0.75@mlp4")
        routes = torch.tensor([lo, hi, lo, hi, hi, lo])
        masked = model.forward_post_masked(h, routes, space.subnets[hi])
        for i, r in enumerate(routes.tolist()):
            torch.testing.assert_close(masked[i], model.forward_post(h[i:i + 1], space.subnets[r])[0],
                                       atol=1e-5, rtol=1e-4)
    assert space.resolve("0.75@mlp2") == SliceSpec((64, 32, 48), (), (0, 0, 96))
    with pytest.raises(SpecError, match="names 3 sub-networks of different MLP ratios"):
        space.resolve("0.75")
    with pytest.raises(SpecError, match="MLP hidden width 100 not allowed"):
        space.check(SliceSpec((64, 32, 48), (), (0, 0, 100)))
    with pytest.raises(ValueError, match="end at mlp_ratio 4"):
        dsctl.build_model("tiny_ds_vit", mlp_ratios=[1, 2])


def test_quickstart_refuses_an_ambiguous_baseline_width_before_training(tmp_path) -> None:
    """A bare ratio names three sub-networks of a kernel space: the pipeline says so before any stage runs."""
    from pathlib import Path

    from dsctl.config import load_recipe
    from dsctl.pipeline import run_pipeline

    smoke = Path(__file__).resolve().parents[1] / "recipes/smoke/pipeline_synthetic.yaml"
    recipe = load_recipe(smoke, ["model.name=tiny_ds_mobilenetv1pp", "pipeline.baseline_width='0.5'"])
    with pytest.raises(SpecError, match="width 0.5 names 3 sub-networks"):
        run_pipeline(recipe, tmp_path / "qs", device="cpu")
    assert not (tmp_path / "qs").exists()


def test_models_table_names_the_kernel_and_mlp_choices() -> None:
    """dsctl models' ratio cell: the width range, and what every width also runs at."""
    from dsctl.cli.inspect import _ratio_range
    from dsctl.registry import describe_models

    rows = {r["model"]: r for r in describe_models()}
    assert _ratio_range(rows["tiny_ds_mobilenetv1pp"]) == "0.375 .. 1 x kernel 3/5/7"
    assert _ratio_range(rows["tiny_ds_mobilenetv1"]) == "0.375 .. 1"
    vit = {**rows["tiny_ds_vit"], "space": dsctl.build_model("tiny_ds_vit", mlp_ratios=[2, 4]).space.to_dict()}
    assert _ratio_range(vit) == "0.5 .. 1 x mlp 2/4"
