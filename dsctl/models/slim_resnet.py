"""DS-ResNet: ResNet-50 layout with stages 2-4 routed by one slimming ratio (DESIGN.md section 3).

The stem and stage 1 are not sliced. In routed stages the bottleneck output and its mid width
(output / 4) both scale with rho in {0.25, 0.375, ..., 1.0}; projection shortcuts are sliced like any
conv. Parameter names follow torchvision/timm ``resnet50``, so its state dict loads into the full width.
The gate reads the end of stage 1 (no attention head, so the full network stays exactly ResNet-50).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.layers.gate import SlimGate
from dsctl.layers.slim import SlimBatchNorm2d, SlimConv2d, SlimLinear
from dsctl.layers.static import Bottleneck, ClassifierHead
from dsctl.models.base import GatePoint, Supernet
from dsctl.models.common import StageConfig, build_space, init_weights
from dsctl.registry import register_model
from dsctl.spec import SliceSpec

__all__ = ["DSResNet", "SlimBottleneck", "ds_resnet50", "tiny_ds_resnet"]

RATIOS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
EXPANSION = 4


def _routed(width: int) -> tuple[int, ...]:
    return tuple(int(width * r) for r in RATIOS)


def resnet_stages(stem: int, base: int, layers: tuple[int, int, int, int], stem_stride: int) -> tuple[StageConfig, ...]:
    """Stem + 4 bottleneck stages; stage widths base*4, *8, *16, *32 (outputs), routed from stage 2."""
    outs = [base * EXPANSION * 2**i for i in range(4)]
    return (
        StageConfig("stem", 1, stem_stride, (stem,)),
        StageConfig("layer1", layers[0], 1, (outs[0],)),
        StageConfig("layer2", layers[1], 2, _routed(outs[1]), routed=True),
        StageConfig("layer3", layers[2], 2, _routed(outs[2]), routed=True),
        StageConfig("layer4", layers[3], 2, _routed(outs[3]), routed=True),
    )


class SlimBottleneck(nn.Module):
    """1x1 (mid) -> 3x3 (mid, stride) -> 1x1 (out) with mid = out // 4, plus shortcut, then ReLU."""

    def __init__(self, in_choices: tuple[int, ...], out_choices: tuple[int, ...], stride: int) -> None:
        super().__init__()
        c_in, c_out = in_choices[-1], out_choices[-1]
        mid_choices = tuple(c // EXPANSION for c in out_choices)
        mid = mid_choices[-1]
        self.conv1 = SlimConv2d(c_in, mid, 1, bias=False)
        self.bn1 = SlimBatchNorm2d(mid_choices)
        self.conv2 = SlimConv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = SlimBatchNorm2d(mid_choices)
        self.conv3 = SlimConv2d(mid, c_out, 1, bias=False)
        self.bn3 = SlimBatchNorm2d(out_choices)
        self.downsample: nn.ModuleList | None = None
        if stride != 1 or in_choices != out_choices:
            self.downsample = nn.ModuleList([SlimConv2d(c_in, c_out, 1, stride, bias=False), SlimBatchNorm2d(out_choices)])

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor, out_channels: int) -> Tensor:
        mid = out_channels // EXPANSION
        h = F.relu(self.bn1(self.conv1(x, mid)))
        h = F.relu(self.bn2(self.conv2(h, mid)))
        h = self.bn3(self.conv3(h, out_channels))
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x, out_channels))
        return F.relu(h + shortcut)

    def to_static(self, in_channels: int, out_channels: int) -> Bottleneck:
        mid = out_channels // EXPANSION
        body = nn.Sequential(
            self.conv1.to_static(in_channels, mid), self.bn1.to_static(mid), nn.ReLU(),
            self.conv2.to_static(mid, mid), self.bn2.to_static(mid), nn.ReLU(),
            self.conv3.to_static(mid, out_channels), self.bn3.to_static(out_channels),
        )
        shortcut = None
        if self.downsample is not None:
            shortcut = nn.Sequential(self.downsample[0].to_static(in_channels, out_channels),
                                     self.downsample[1].to_static(out_channels))
        return Bottleneck(body, shortcut)


class DSResNet(Supernet):
    """Bottleneck ResNet supernet; ``imagenet_stem`` selects 7x7/2 + max-pool versus a CIFAR 3x3/1 stem."""

    def __init__(self, stages: tuple[StageConfig, ...], num_classes: int = 1000, in_chans: int = 3,
                 imagenet_stem: bool = True, default_input_size: int = 224, gate_reduce: int = 64) -> None:
        super().__init__()
        self.stage_cfgs = stages
        self.num_classes, self.in_chans, self.imagenet_stem = num_classes, in_chans, imagenet_stem
        self.default_input_size = default_input_size
        self.gate_stage = next(i for i, s in enumerate(stages) if s.routed)
        self.space = build_space(stages, gate_after=stages[self.gate_stage - 1].name)
        stem_c = stages[0].choices[-1]
        if imagenet_stem:
            self.conv1 = SlimConv2d(in_chans, stem_c, 7, 2, 3, bias=False)
        else:
            self.conv1 = SlimConv2d(in_chans, stem_c, 3, stages[0].stride, 1, bias=False)
        self.bn1 = SlimBatchNorm2d(stages[0].choices)
        prev = stages[0].choices
        for i, cfg in enumerate(stages[1:], start=1):
            blocks = nn.ModuleList()
            for b in range(cfg.repeats):
                blocks.append(SlimBottleneck(prev if b == 0 else cfg.choices, cfg.choices, cfg.stride if b == 0 else 1))
            setattr(self, f"layer{i}", blocks)
            prev = cfg.choices
        self.gate = SlimGate(stages[self.gate_stage - 1].choices[-1], gate_reduce, self.space.num_subnets, attention=False)
        self.fc = SlimLinear(prev[-1], num_classes)
        init_weights(self, zero_init_last=(SlimBottleneck,))

    def layers(self) -> list[nn.ModuleList]:
        return [getattr(self, f"layer{i}") for i in range(1, len(self.stage_cfgs))]

    def _stem(self, x: Tensor, width: int) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x, width)))
        return F.max_pool2d(x, 3, 2, 1) if self.imagenet_stem else x

    def forward_pre(self, x: Tensor, spec: SliceSpec, encode: bool = False) -> GatePoint:
        w = spec.widths
        x = self._stem(x, w[0])
        for i, blocks in enumerate(self.layers()[: self.gate_stage - 1], start=1):
            for block in blocks:
                x = block(x, w[i])
        if not encode:  # no attention head here: the encoder only serves routing
            return GatePoint(x, None)
        e = self.gate.encode(x)
        return GatePoint(self.gate.attend(x, e), e)

    def forward_post(self, h: Tensor, spec: SliceSpec) -> Tensor:
        w = spec.widths
        for i, blocks in enumerate(self.layers()[self.gate_stage - 1 :], start=self.gate_stage):
            for block in blocks:
                h = block(h, w[i])
        return self.fc(h.mean((2, 3)))

    def routed_blocks(self) -> list[tuple[int, nn.Module]]:
        return [(i, b) for i, blocks in enumerate(self.layers(), start=1) if i >= self.gate_stage for b in blocks]

    def to_static_parts(self, spec: SliceSpec) -> tuple[nn.Sequential, nn.Sequential]:
        w = self.space.check(spec).widths
        stem_pool: nn.Module = nn.MaxPool2d(3, 2, 1) if self.imagenet_stem else nn.Identity()
        pre: list[nn.Module] = [self.conv1.to_static(self.in_chans, w[0]), self.bn1.to_static(w[0]), nn.ReLU(), stem_pool]
        post: list[nn.Module] = []
        prev = w[0]
        for i, blocks in enumerate(self.layers(), start=1):
            for block in blocks:
                (pre if i < self.gate_stage else post).append(block.to_static(prev, w[i]))
                prev = w[i]
        post.append(ClassifierHead(self.fc.to_static(prev)))
        return nn.Sequential(*pre).eval(), nn.Sequential(*post).eval()


@register_model
def ds_resnet50(num_classes: int = 1000, in_chans: int = 3) -> DSResNet:
    """DS-ResNet-50 (224 px): 7 sub-networks, rho in {0.25, 0.375, ..., 1.0}; k=6 is exactly ResNet-50."""
    return DSResNet(resnet_stages(64, 64, (3, 4, 6, 3), 2), num_classes, in_chans, imagenet_stem=True)


@register_model
def tiny_ds_resnet(num_classes: int = 10, in_chans: int = 1, base_width: int = 8,
                   layers: tuple[int, int, int, int] = (1, 1, 1, 1)) -> DSResNet:
    """CPU-sized DS-ResNet for 28-32 px inputs (3x3 stride-1 stem, no max-pool): 7 sub-networks."""
    layers = tuple(layers)  # type: ignore[assignment]
    if len(layers) != 4 or min(layers) < 1:
        raise ValueError(f"layers must be 4 positive block counts, got {layers}")
    stages = resnet_stages(2 * base_width, base_width, layers, 1)
    return DSResNet(stages, num_classes, in_chans, imagenet_stem=False, default_input_size=28,
                    gate_reduce=max(8, base_width * 2))
