"""MACs against hand computations (independent of the model code) and monotonicity in width.

Convention (DESIGN.md section 7): conv and linear multiply-adds, plus every average pooling (SE squeeze,
final global pool) at its input size C*H*W; max pooling, BatchNorm and element-wise ops count nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import dsctl
from dsctl.flops import count_macs, count_subnet, gate_macs
from tests.conftest import cpu_sized_model


def _conv(h: int, c_in: int, c_out: int, k: int, groups: int = 1) -> int:
    return h * h * c_out * (c_in // groups) * k * k


def _out(h: int, stride: int) -> int:
    return (h - 1) // stride + 1


def _pool(h: int, c: int) -> int:
    """Global average pooling of a c x h x h map: its input size."""
    return c * h * h


def resnet_macs(size: int, widths: tuple[int, ...], layers: tuple[int, ...], in_chans: int, classes: int,
                imagenet_stem: bool) -> int:
    """Bottleneck ResNet MACs written out from the paper's layout."""
    stem_w, *stage_w = widths
    if imagenet_stem:
        h = _out(size, 2)
        macs = _conv(h, in_chans, stem_w, 7)
        h = _out(h, 2)  # max-pool: not counted
    else:
        h = size
        macs = _conv(h, in_chans, stem_w, 3)
    c = stem_w
    for i, (w, n) in enumerate(zip(stage_w, layers)):
        for b in range(n):
            stride = 2 if (i > 0 and b == 0) else 1
            mid = w // 4
            h_out = _out(h, stride)
            macs += _conv(h, c, mid, 1) + _conv(h_out, mid, mid, 3) + _conv(h_out, mid, w, 1)
            if b == 0:
                macs += _conv(h_out, c, w, 1)
            c, h = w, h_out
    return macs + _pool(h, c) + c * classes


def mobilenet_macs(size: int, widths: tuple[int, ...], repeats: tuple[int, ...], strides: tuple[int, ...],
                   in_chans: int, classes: int, se_max_in: tuple[int, ...]) -> int:
    """Stem conv + (dw 3x3, SE pool + 1x1 pair on the pooled vector, pw 1x1) per block + pool + classifier."""
    h = _out(size, strides[0])
    macs = _conv(h, in_chans, widths[0], 3)
    c = widths[0]
    blocks = [(i, b) for i, n in enumerate(repeats) for b in range(n)]
    for (i, b), se_in in zip(blocks, se_max_in):
        w = widths[i + 1]
        h = _out(h, strides[i + 1] if b == 0 else 1)
        r = round(0.25 * se_in)
        macs += _conv(h, c, c, 3, groups=c) + _pool(h, c) + c * r + r * c + _conv(h, c, w, 1)
        c = w
    return macs + _pool(h, c) + c * classes


def test_resnet50_full_matches_hand_count_and_known_values() -> None:
    model = dsctl.build_model("ds_resnet50")
    r = count_subnet(model, model.space.full, 224)
    assert r.macs == resnet_macs(224, (64, 256, 512, 1024, 2048), (3, 4, 6, 3), 3, 1000, True)
    assert r.macs == 4_089_184_256 + 2048 * 7 * 7  # ResNet-50's ~4.1 GMACs + the final global pool
    assert r.params == 25_557_032  # torchvision resnet50 parameter count


@pytest.mark.parametrize("k", [0, 3, 6])
def test_tiny_resnet_matches_hand_count(k: int) -> None:
    model = dsctl.build_model("tiny_ds_resnet")
    spec = model.space.subnets[k]
    r = count_subnet(model, spec, 28)
    assert r.macs == resnet_macs(28, spec.widths, (1, 1, 1, 1), 1, 10, False)


@pytest.mark.parametrize("k", [0, 2, 5])
def test_tiny_ds_mobilenetv1_matches_hand_count(k: int) -> None:
    # 28 px, stride-1 stem: 28 -> 28 -> 14 -> 7 -> 7 -> 4, so stage 5 and the final pool read a 4x4 map
    model = dsctl.build_model("tiny_ds_mobilenetv1")
    spec = model.space.subnets[k]
    se_max_in = (16, 32, 48, 64, 64, 128, 128)
    expected = mobilenet_macs(28, spec.widths, (1, 1, 2, 2, 1), (1, 1, 2, 2, 1, 2), 1, 10, se_max_in)
    assert count_subnet(model, spec, 28).macs == expected


def ds_mobilenetv1_macs(stem: int, s1: int, s2: int, s3: int, s4: int, s5: int) -> int:
    """DS-MobileNetV1 at 224 px written out block by block from DESIGN.md section 3.

    Stem 3x3/2 conv; each DS block: depthwise 3x3 (stride) -> SE (average pool of the depthwise output,
    1x1 reduce to round(0.25 x the block's maximum input channels), 1x1 expand back) -> pointwise 1x1;
    global pool; linear to 1000 classes. The gate is the SE of stage 4's first block. SE biases, BN,
    Swish, ReLU, sigmoid and the SE multiply are not multiply-adds of a weight layer.
    """
    # (input channels, output channels, output resolution, maximum input channels) of each DS block
    blocks = [(stem, s1, 112, 24), (s1, s2, 56, 88), (s2, s2, 56, 168), (s2, s3, 28, 168), (s3, s3, 28, 264),
              (s3, s4, 14, 264), *[(s4, s4, 14, 640)] * 5, (s4, s5, 7, 640), (s5, s5, 7, 1152)]
    macs = 112 * 112 * stem * 3 * 3 * 3
    for c_in, c_out, h, c_max in blocks:
        r = round(0.25 * c_max)
        macs += h * h * c_in * 3 * 3          # depthwise
        macs += c_in * h * h                  # SE squeeze: average pool over the h x h map
        macs += c_in * r + r * c_in           # SE reduce and expand, on the pooled 1x1 vector
        macs += h * h * c_in * c_out          # pointwise
    return macs + s5 * 7 * 7 + s5 * 1000      # global pool, classifier


@pytest.fixture(scope="module")
def ds_mobilenetv1() -> dsctl.Supernet:
    return dsctl.build_model("ds_mobilenetv1")


@pytest.mark.parametrize("k", [*range(14), "full"])
def test_ds_mobilenetv1_subnets_match_layout_count(ds_mobilenetv1: dsctl.Supernet, k: int | str) -> None:
    # DESIGN.md section 3: sub-network k keeps 16/32/48/96 before the gate and runs stages 4 and 5 at
    # 224 + 32k and 736 + 32k; the full network is 24/88/168/264/640/1152
    widths = (24, 88, 168, 264, 640, 1152) if k == "full" else (16, 32, 48, 96, 224 + 32 * k, 736 + 32 * k)
    spec = ds_mobilenetv1.space.full if k == "full" else ds_mobilenetv1.space.subnets[k]
    assert spec.widths == widths
    assert count_subnet(ds_mobilenetv1, spec, 224).macs == ds_mobilenetv1_macs(*widths)


def test_ds_mobilenetv1_pooling_share(ds_mobilenetv1: dsctl.Supernet) -> None:
    # smallest sub-network: 13 SE squeezes (the gate's included) + the final pool = 885,920 MACs of
    # average pooling on top of its 132,004,224 conv and linear MACs
    pooled = (16 * 112**2 + 32 * 56**2 + 48 * 56**2 + 48 * 28**2 + 96 * 28**2 + 96 * 14**2 + 5 * 224 * 14**2
              + 224 * 7**2 + 736 * 7**2) + 736 * 7**2
    assert pooled == 885_920
    assert count_subnet(ds_mobilenetv1, ds_mobilenetv1.space.smallest(), 224).macs == 132_004_224 + pooled


def test_single_conv_count() -> None:
    assert count_macs(torch.nn.Conv2d(3, 8, 3, padding=1), 8) == 8 * 8 * 8 * 27


def test_gate_macs_count_the_gates_own_pooling() -> None:
    # tiny_ds_resnet: the 1x1 gate pools layer1's 32 x 28 x 28 output, reduces 32 -> 16, head 16 -> K = 7
    assert gate_macs(dsctl.build_model("tiny_ds_resnet")) == 32 * 28 * 28 + 32 * 16 + 16 * 7
    # ds_resnet50 at 224 px: 256 x 56 x 56 pooled, 256 -> 64, 64 -> 7
    assert gate_macs(dsctl.build_model("ds_resnet50"), 224) == 256 * 56 * 56 + 256 * 64 + 64 * 7
    # ds_mobilenetv1: the gate is stage 4's first SE, whose pool and encoder every route already counts;
    # only the slimming head (66 -> 14) is added
    assert gate_macs(dsctl.build_model("ds_mobilenetv1")) == 66 * 14


class _Apply(torch.nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.mark.parametrize(("fn", "expected"), [
    (lambda x: x.mean((2, 3)), 4 * 6 * 6),                        # global average pool: its input size
    (lambda x: x.mean((-1, -2), keepdim=True), 4 * 6 * 6),
    (lambda x: F.adaptive_avg_pool2d(x, 1), 4 * 6 * 6),
    (lambda x: F.avg_pool2d(x, 2), 4 * 6 * 6),
    (lambda x: F.max_pool2d(x, 2), 0),                             # max pooling: not counted
    (lambda x: F.adaptive_max_pool2d(x, 1), 0),
    (lambda x: x.mean(1, keepdim=True), 0),                        # channel statistics, not pooling
    (lambda x: x - x.mean(-1, keepdim=True), 0),                   # a LayerNorm-like centring
    (lambda x: x.mean((1, 2, 3)), 0),
    (lambda x: x.mean(), 0),                                       # a full mean, as in a loss
    (lambda x: F.layer_norm(x, (6,)), 0),
], ids=["mean23", "mean-1-2", "adaptive_avg", "avg_pool", "max_pool", "adaptive_max", "mean1", "center-1",
        "mean123", "mean_all", "layer_norm"])
def test_only_average_pooling_over_space_counts(fn: Callable[[torch.Tensor], torch.Tensor], expected: int) -> None:
    assert count_macs(_Apply(fn), 6, in_chans=4) == expected


@pytest.mark.parametrize("name", [n if n.startswith("tiny_") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in dsctl.list_models()])  # the 224 px families trace for seconds
def test_macs_never_decrease_with_width(name: str) -> None:
    model, size = cpu_sized_model(name)
    macs = [count_subnet(model, s, size).macs for s in (*model.space.subnets, model.space.full)]
    assert all(a <= b for a, b in zip(macs, macs[1:])), macs
    assert macs[0] < macs[-1]
