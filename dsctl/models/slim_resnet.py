"""DS-ResNet: ResNet-50 layout with the stages after the gate routed by one slimming ratio (DESIGN.md section 3).

The stem and stage 1 are not sliced. The gate reads the output of stage 1, 2 or 3 (``gate_after``);
the stages after it are routed: the bottleneck output and its mid width (output / 4) both scale with rho
in {0.25, 0.375, ..., 1.0}; projection shortcuts are sliced like any conv. Sliceable stages before the
gate (stage 2, and 3 when the gate is later) run at a fixed ratio (``pre_gate_ratio``) in every indexed
sub-network and at full width in the full network. Parameter names follow torchvision/timm
``resnet50``, so its state dict loads into the full width. The gate has no attention head, so the full
network stays exactly ResNet-50 wherever the gate sits.
"""

from __future__ import annotations

import torch
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
GATE_POSITIONS = (1, 2, 3)
EXPANSION = 4


def _routed(width: int) -> tuple[int, ...]:
    return tuple(int(width * r) for r in RATIOS)


def resnet_stages(stem: int, base: int, layers: tuple[int, int, int, int], stem_stride: int, gate_after: int = 1,
                  pre_gate_ratio: float = 0.25, front_ratio: float = 1.0) -> tuple[StageConfig, ...]:
    """Stem + 4 bottleneck stages with outputs base*4, *8, *16, *32.

    ``layer1`` is never sliced; ``layer2`` .. ``layer{gate_after}`` choose between ``pre_gate_ratio`` of
    their width (indexed sub-networks) and their full width (the full network); later stages are routed.
    ``front_ratio`` scales the stem's and layer1's one width (every sub-network, the full one included).

    Raises:
        ValueError: ``gate_after`` not in 1, 2, 3 or ``pre_gate_ratio`` not one of the ratios.
    """
    if gate_after not in GATE_POSITIONS:
        raise ValueError(f"gate_after={gate_after!r} is not a gate position "
                         f"(allowed: {', '.join(map(str, GATE_POSITIONS))}: the stage whose output the gate reads)")
    if pre_gate_ratio not in RATIOS:
        raise ValueError(f"pre_gate_ratio={pre_gate_ratio!r} is not a slimming ratio "
                         f"(allowed: {', '.join(f'{r:g}' for r in RATIOS)})")
    if not 0 < front_ratio <= 1:
        raise ValueError(f"front_ratio={front_ratio!r} is not a width ratio (allowed: 0 < front_ratio <= 1)")
    outs = [base * EXPANSION * 2**i for i in range(4)]

    def stage(n: int, width: int) -> StageConfig:
        name, stride = f"layer{n}", 1 if n == 1 else 2
        if n == 1:
            return StageConfig(name, layers[0], stride, (max(EXPANSION, int(width * front_ratio)),))
        if n <= gate_after:
            return StageConfig(name, layers[n - 1], stride, tuple(sorted({int(width * pre_gate_ratio), width})))
        return StageConfig(name, layers[n - 1], stride, _routed(width), routed=True)

    stem_choices = (max(1, int(stem * front_ratio)),)
    return (StageConfig("stem", 1, stem_stride, stem_choices), *(stage(n, w) for n, w in enumerate(outs, start=1)))


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
        # in place on fresh BN outputs, as torchvision does (BN's backward does not need its output)
        h = F.relu(self.bn1(self.conv1(x, mid)), inplace=True)
        h = F.relu(self.bn2(self.conv2(h, mid)), inplace=True)
        h = self.bn3(self.conv3(h, out_channels))
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x, out_channels))
        h += shortcut
        return F.relu(h, inplace=True)

    def to_static(self, in_channels: int, out_channels: int) -> Bottleneck:
        mid = out_channels // EXPANSION
        body = nn.Sequential(
            self.conv1.to_static(in_channels, mid), self.bn1.to_static(mid), nn.ReLU(inplace=True),
            self.conv2.to_static(mid, mid), self.bn2.to_static(mid), nn.ReLU(inplace=True),
            self.conv3.to_static(mid, out_channels), self.bn3.to_static(out_channels),
        )
        shortcut = None
        if self.downsample is not None:
            shortcut = nn.Sequential(self.downsample[0].to_static(in_channels, out_channels),
                                     self.downsample[1].to_static(out_channels))
        return Bottleneck(body, shortcut)


class DSResNet(Supernet):
    """Bottleneck ResNet supernet; ``imagenet_stem`` selects 7x7/2 + max-pool versus a CIFAR 3x3/1 stem.

    The gate reads the output of the last stage that is not routed; the routed stages must come last.
    ``gate_conv`` gives the gate a 3x3 conv encoder (see :class:`~dsctl.layers.gate.SlimGate`).
    """

    def __init__(self, stages: tuple[StageConfig, ...], num_classes: int = 1000, in_chans: int = 3,
                 imagenet_stem: bool = True, default_input_size: int = 224, gate_reduce: int = 64,
                 gate_conv: bool = False) -> None:
        super().__init__()
        routed = [s.routed for s in stages]
        if routed[0] or not routed[-1] or routed != sorted(routed):
            raise ValueError(f"routed stages must be the last ones, after the stem (got routed={routed})")
        self.stage_cfgs = stages
        self.num_classes, self.in_chans, self.imagenet_stem = num_classes, in_chans, imagenet_stem
        self.default_input_size = default_input_size
        self.space = build_space(stages, gate_after=[s.name for s in stages if not s.routed][-1])
        stem_c = stages[0].choices[-1]
        if imagenet_stem:
            self.conv1 = SlimConv2d(in_chans, stem_c, 7, 2, 3, bias=False)
        else:
            self.conv1 = SlimConv2d(in_chans, stem_c, 3, stages[0].stride, 1, bias=False)
        self.bn1 = SlimBatchNorm2d(stages[0].choices)
        prev = stages[0].choices
        for cfg in stages[1:]:
            blocks = nn.ModuleList()
            for b in range(cfg.repeats):
                blocks.append(SlimBottleneck(prev if b == 0 else cfg.choices, cfg.choices, cfg.stride if b == 0 else 1))
            setattr(self, cfg.name, blocks)
            prev = cfg.choices
        # sized to what it reads: the gate only runs in indexed sub-networks, where its input width is fixed
        self.gate = SlimGate(self.gate_in_channels, gate_reduce, self.space.num_subnets, attention=False, conv=gate_conv)
        self.fc = SlimLinear(prev[-1], num_classes)
        init_weights(self, zero_init_last=(SlimBottleneck,))

    @property
    def gate_in_channels(self) -> int:
        return self.space.stage_widths(self.space.smallest())[self.space.gate_after]

    def gate_in_size(self, input_size: int) -> int:
        def out(h: int, stride: int) -> int:  # every conv and pool here pads to "same"
            return (h - 1) // stride + 1

        h = out(input_size, 2 if self.imagenet_stem else self.stage_cfgs[0].stride)
        if self.imagenet_stem:
            h = out(h, 2)  # max-pool
        for _, cfg, _ in self._layers(until_gate=True):
            h = out(h, cfg.stride)
        return h

    def _layers(self, until_gate: bool = False) -> list[tuple[int, StageConfig, nn.ModuleList]]:
        """(spec index, config, blocks) of the bottleneck stages, in order; ``until_gate``: the ones before it."""
        return [(i, cfg, getattr(self, cfg.name)) for i, cfg in enumerate(self.stage_cfgs)
                if i > 0 and not (until_gate and cfg.routed)]

    def _stem(self, x: Tensor, width: int) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x, width)), inplace=True)
        return F.max_pool2d(x, 3, 2, 1) if self.imagenet_stem else x

    def forward_pre(self, x: Tensor, spec: SliceSpec, encode: bool = False) -> GatePoint:
        w = spec.widths
        x = self._stem(x, w[0])
        for i, _, blocks in self._layers(until_gate=True):
            for block in blocks:
                x = block(x, w[i])
        if not encode:  # no attention head here: the encoder only serves routing
            return GatePoint(x, None)
        e = self.gate.encode(x)
        return GatePoint(self.gate.attend(x, e), e)

    def forward_post(self, h: Tensor, spec: SliceSpec) -> Tensor:
        w = spec.widths
        for i, cfg, blocks in self._layers():
            if cfg.routed:
                for block in blocks:
                    h = block(h, w[i])
        return self.fc(h.mean((2, 3)))

    @torch.no_grad()
    def probe_points(self, x: Tensor, spec: SliceSpec) -> dict[str, Tensor]:
        """Pooled features after the stem and after every stage but the last (the gate positions and more)."""
        w = self.space.check(spec).widths
        x = self._stem(x, w[0])
        points = {"stem": x.mean((2, 3))}
        for i, cfg, blocks in self._layers()[:-1]:
            for block in blocks:
                x = block(x, w[i])
            points[cfg.name] = x.mean((2, 3))
        return points

    def routed_blocks(self) -> list[tuple[int, nn.Module]]:
        return [(i, b) for i, cfg, blocks in self._layers() if cfg.routed for b in blocks]

    def to_static_parts(self, spec: SliceSpec, *, attention: bool = True) -> tuple[nn.Sequential, nn.Sequential]:
        # the DS-ResNet gate has no attention head: ``attention`` changes nothing
        w = self.space.check(spec).widths
        stem_pool: nn.Module = nn.MaxPool2d(3, 2, 1) if self.imagenet_stem else nn.Identity()
        pre: list[nn.Module] = [self.conv1.to_static(self.in_chans, w[0]), self.bn1.to_static(w[0]),
                                nn.ReLU(inplace=True), stem_pool]
        post: list[nn.Module] = []
        prev = w[0]
        for i, cfg, blocks in self._layers():
            for block in blocks:
                (post if cfg.routed else pre).append(block.to_static(prev, w[i]))
                prev = w[i]
        post.append(ClassifierHead(self.fc.to_static(prev)))
        return nn.Sequential(*pre).eval(), nn.Sequential(*post).eval()


@register_model
def ds_resnet50(num_classes: int = 1000, in_chans: int = 3, gate_after: int = 1, pre_gate_ratio: float = 0.25,
                gate_conv: bool = False) -> DSResNet:
    """DS-ResNet-50 (224 px): 7 sub-networks, rho in {0.25, 0.375, ..., 1.0}; the full network is ResNet-50.

    Args:
        gate_after: the stage (1, 2 or 3) whose output the gate reads; the stages after it are routed.
        pre_gate_ratio: width ratio of the sliceable stages before the gate in every indexed sub-network.
        gate_conv: a 3x3 conv encoder in the gate instead of a 1x1 on the pooled features.
    """
    stages = resnet_stages(64, 64, (3, 4, 6, 3), 2, gate_after, pre_gate_ratio)
    return DSResNet(stages, num_classes, in_chans, imagenet_stem=True, gate_conv=gate_conv)


@register_model
def tiny_ds_resnet(num_classes: int = 10, in_chans: int = 1, base_width: int = 8,
                   layers: tuple[int, int, int, int] = (1, 1, 1, 1), gate_after: int = 1,
                   pre_gate_ratio: float = 0.25, gate_conv: bool = False, front_ratio: float = 1.0) -> DSResNet:
    """CPU-sized DS-ResNet for 28-32 px inputs (3x3 stride-1 stem, no max-pool): 7 sub-networks.

    ``gate_after``, ``pre_gate_ratio`` and ``gate_conv`` as in :func:`ds_resnet50`. ``front_ratio``: the
    stem and layer1 (never sliced) at this ratio of their width, in every sub-network. At full width they
    run at full resolution and cost more than the routed stages of the smallest sub-network (base 16: 54%
    of its time at batch 32, 2 threads), so the time of the routed sub-networks can hardly follow their
    MACs; at 0.25 the front is about a quarter of the smallest's time. (A front sliced only in the indexed
    sub-networks, full in the full one, would make the full network and the widest indexed one share the
    routed stages' BatchNorm statistics, which are kept per channel count, while their inputs differ.)
    """
    layers = tuple(layers)  # type: ignore[assignment]
    if len(layers) != 4 or min(layers) < 1:
        raise ValueError(f"layers must be 4 positive block counts, got {layers}")
    stages = resnet_stages(2 * base_width, base_width, layers, 1, gate_after, pre_gate_ratio, front_ratio)
    return DSResNet(stages, num_classes, in_chans, imagenet_stem=False, default_input_size=28,
                    gate_reduce=max(8, base_width * 2), gate_conv=gate_conv)
