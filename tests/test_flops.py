"""MACs against hand computations (independent of the model code) and monotonicity in width."""

from __future__ import annotations

import pytest
import torch

import dsctl
from dsctl.flops import count_macs, count_subnet


def _conv(h: int, c_in: int, c_out: int, k: int, groups: int = 1) -> int:
    return h * h * c_out * (c_in // groups) * k * k


def _out(h: int, stride: int) -> int:
    return (h - 1) // stride + 1


def resnet_macs(size: int, widths: tuple[int, ...], layers: tuple[int, ...], in_chans: int, classes: int,
                imagenet_stem: bool) -> int:
    """Bottleneck ResNet MACs written out from the paper's layout."""
    stem_w, *stage_w = widths
    if imagenet_stem:
        h = _out(size, 2)
        macs = _conv(h, in_chans, stem_w, 7)
        h = _out(h, 2)  # max-pool
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
    return macs + c * classes


def mobilenet_macs(size: int, widths: tuple[int, ...], repeats: tuple[int, ...], strides: tuple[int, ...],
                   in_chans: int, classes: int, se_max_in: tuple[int, ...]) -> int:
    """Stem conv + (dw 3x3, SE 1x1 pair on the pooled vector, pw 1x1) per block + classifier."""
    h = _out(size, strides[0])
    macs = _conv(h, in_chans, widths[0], 3)
    c = widths[0]
    blocks = [(i, b) for i, n in enumerate(repeats) for b in range(n)]
    for (i, b), se_in in zip(blocks, se_max_in):
        w = widths[i + 1]
        h = _out(h, strides[i + 1] if b == 0 else 1)
        r = round(0.25 * se_in)
        macs += _conv(h, c, c, 3, groups=c) + c * r + r * c + _conv(h, c, w, 1)
        c = w
    return macs + c * classes


def test_resnet50_full_matches_hand_count_and_known_values() -> None:
    model = dsctl.build_model("ds_resnet50")
    r = count_subnet(model, model.space.full, 224)
    assert r.macs == resnet_macs(224, (64, 256, 512, 1024, 2048), (3, 4, 6, 3), 3, 1000, True)
    assert 4.08e9 < r.macs < 4.12e9  # ResNet-50: ~4.1 GMACs
    assert r.params == 25_557_032  # torchvision resnet50 parameter count


@pytest.mark.parametrize("k", [0, 3, 6])
def test_tiny_resnet_matches_hand_count(k: int) -> None:
    model = dsctl.build_model("tiny_ds_resnet")
    spec = model.space.subnets[k]
    r = count_subnet(model, spec, 28)
    assert r.macs == resnet_macs(28, spec.widths, (1, 1, 1, 1), 1, 10, False)


def test_ds_mobilenetv1_matches_hand_count() -> None:
    model = dsctl.build_model("ds_mobilenetv1")
    repeats = (1, 2, 2, 6, 2)
    strides = (2, 1, 2, 2, 2, 2)
    # SE reduce width = round(0.25 x the block's maximum input channels)
    se_max_in = (24, 88, 168, 168, 264, 264, 640, 640, 640, 640, 640, 640, 1152)
    for spec in (model.space.smallest(), model.space.subnets[7], model.space.full):
        expected = mobilenet_macs(224, spec.widths, repeats, strides, 3, 1000, se_max_in)
        assert count_subnet(model, spec, 224).macs == expected


def test_single_conv_count() -> None:
    assert count_macs(torch.nn.Conv2d(3, 8, 3, padding=1), 8) == 8 * 8 * 8 * 27


@pytest.mark.parametrize("name", dsctl.list_models())
def test_macs_never_decrease_with_width(name: str) -> None:
    model = dsctl.build_model(name)
    size = model.default_input_size if name.startswith("tiny_") else 64
    macs = [count_subnet(model, s, size).macs for s in (*model.space.subnets, model.space.full)]
    assert all(a <= b for a, b in zip(macs, macs[1:])), macs
    assert macs[0] < macs[-1]
