"""DS-MobileNetV1: the dynamic slimmable MobileNetV1 supernet (DESIGN.md section 3).

Block = depthwise 3x3 (stride) -> BN -> Swish -> SE -> pointwise 1x1 -> BN -> Swish, no residuals.
The gate is the SE of the first block of the first routed stage: it reads that block's depthwise output
(the previous stage's width) and decides the width of the block's pointwise conv and everything after.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.layers.gate import SlimGate
from dsctl.layers.slim import SlimBatchNorm2d, SlimConv2d, SlimLinear, SlimSqueezeExcite
from dsctl.layers.static import ClassifierHead
from dsctl.models.base import GatePoint, Supernet
from dsctl.models.common import StageConfig, build_space, init_weights
from dsctl.registry import register_model
from dsctl.spec import SliceSpec

__all__ = ["DSMobileNetV1", "SlimSeparableBlock", "ds_mobilenetv1", "tiny_ds_mobilenetv1", "ds_mobilenetv1pp",
           "tiny_ds_mobilenetv1pp"]

IMAGENET_STAGES = (
    StageConfig("stem", 1, 2, (16, 24)),
    StageConfig("s1", 1, 1, (32, 88)),
    StageConfig("s2", 2, 2, (48, 168)),
    StageConfig("s3", 2, 2, (96, 264)),
    StageConfig("s4", 6, 2, tuple(range(224, 641, 32)), routed=True),
    StageConfig("s5", 2, 2, tuple(range(736, 1153, 32)), routed=True),
)

# 28-32 px inputs: stride-1 stem, 3x3 -> 28 -> 14 -> 7 -> 7 -> 4 for a 28 px image.
TINY_STAGES = (
    StageConfig("stem", 1, 1, (8, 16)),
    StageConfig("s1", 1, 1, (16, 32)),
    StageConfig("s2", 1, 2, (24, 48)),
    StageConfig("s3", 2, 2, (32, 64)),
    StageConfig("s4", 2, 1, (48, 64, 80, 96, 112, 128), routed=True),
    StageConfig("s5", 1, 2, (96, 128, 160, 192, 224, 256), routed=True),
)


class SlimSeparableBlock(nn.Module):
    """Depthwise-separable block with SE; ``se=False`` leaves the SE to a gate placed by the model.

    ``kernels`` (DS-CNN++): the depthwise kernel sizes the block can run at; its depthwise weight is stored
    at the largest and a smaller size runs its centre, and both BatchNorms keep statistics per size (what
    they normalise changes with it). Without ``kernels`` the depthwise kernel is 3x3.
    (DS-Net's ``DSDepthwiseSeparable``; "DS" in dsctl's model names means dynamic slimmable.)
    """

    def __init__(self, in_choices: tuple[int, ...], out_choices: tuple[int, ...], stride: int, se: bool = True,
                 kernels: tuple[int, ...] = ()) -> None:
        super().__init__()
        c_in, c_out = in_choices[-1], out_choices[-1]
        size = kernels[-1] if kernels else 3
        self.dw = SlimConv2d(c_in, c_in, size, stride, size // 2, groups=c_in, bias=False)
        self.bn1 = SlimBatchNorm2d(in_choices, kernels=kernels)
        self.se = SlimSqueezeExcite(c_in, round(0.25 * c_in)) if se else None
        self.pw = SlimConv2d(c_in, c_out, 1, bias=False)
        self.bn2 = SlimBatchNorm2d(out_choices, kernels=kernels)

    def forward_dw(self, x: Tensor, kernel: int | None = None) -> Tensor:
        x = F.silu(self.bn1(self.dw(x, kernel=kernel), kernel), inplace=True)  # in place on the fresh BN output
        return x if self.se is None else self.se(x)

    def forward_pw(self, x: Tensor, out_channels: int, kernel: int | None = None) -> Tensor:
        return F.silu(self.bn2(self.pw(x, out_channels), kernel), inplace=True)

    def forward(self, x: Tensor, out_channels: int, kernel: int | None = None) -> Tensor:
        return self.forward_pw(self.forward_dw(x, kernel), out_channels, kernel)

    def static_halves(self, in_channels: int, out_channels: int, se: nn.Module | None = None,
                      kernel: int | None = None) -> tuple[list[nn.Module], list[nn.Module]]:
        """Plain-torch layers of :meth:`forward_dw` (depthwise at ``kernel``, BN, SiLU, SE or ``se``) and of
        :meth:`forward_pw` (pointwise, BN, SiLU)."""
        se = se if se is not None else (self.se.to_static(in_channels) if self.se is not None else nn.Identity())
        dw_half = [self.dw.to_static(in_channels, kernel=kernel), self.bn1.to_static(in_channels, kernel),
                   nn.SiLU(inplace=True), se]
        pw_half = [self.pw.to_static(in_channels, out_channels), self.bn2.to_static(out_channels, kernel),
                   nn.SiLU(inplace=True)]
        return dw_half, pw_half

    def to_static(self, in_channels: int, out_channels: int, kernel: int | None = None) -> nn.Sequential:
        dw_half, pw_half = self.static_halves(in_channels, out_channels, kernel=kernel)
        return nn.Sequential(*dw_half, *pw_half)


class DSMobileNetV1(Supernet):
    """Dynamic slimmable MobileNetV1 over ``stages`` (the first stage is the stem conv)."""

    def __init__(self, stages: tuple[StageConfig, ...], num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.2, default_input_size: int = 224) -> None:
        super().__init__()
        self.stage_cfgs = stages
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.default_input_size = default_input_size
        # stage_cfgs[0] is the stem conv; stage_cfgs[i], i >= 1, is self.stages[i - 1] (see _blocks)
        self.gate_stage = next(i for i, s in enumerate(stages) if s.routed)
        self.space = build_space(stages, gate_after=f"{stages[self.gate_stage].name}.b0.dw", cost=self._routed_macs)
        stem = stages[0]
        self.stem = SlimConv2d(in_chans, stem.choices[-1], 3, stem.stride, 1, bias=False)
        self.stem_bn = SlimBatchNorm2d(stem.choices)
        self.stages = nn.ModuleList()
        prev = stem.choices
        for i, cfg in enumerate(stages[1:], start=1):
            blocks = nn.ModuleList()
            for b in range(cfg.repeats):
                in_choices = prev if b == 0 else cfg.choices
                is_gate = i == self.gate_stage and b == 0  # its depthwise half runs before the gate: one kernel
                blocks.append(SlimSeparableBlock(in_choices, cfg.choices, cfg.stride if b == 0 else 1, se=not is_gate,
                                                 kernels=() if is_gate else cfg.kernels))
            self.stages.append(blocks)
            prev = cfg.choices
        gate_in = stages[self.gate_stage - 1].choices[-1]  # the gate reads the depthwise output: the input width
        self.gate = SlimGate(gate_in, round(0.25 * gate_in), self.space.num_subnets, attention=True)
        self.classifier = SlimLinear(prev[-1], num_classes)
        init_weights(self)

    def _routed_macs(self, spec: SliceSpec) -> int:
        """MACs of the routed part (the gate block's pointwise conv to the classifier) at the default input
        size, counted as fvcore counts them: what orders a kernel space's sub-networks (build_space)."""
        size = self.default_input_size
        for cfg in self.stage_cfgs[: self.gate_stage + 1]:
            size = -(-size // cfg.stride)
        w, macs = spec.widths, 0
        prev = w[self.gate_stage - 1]
        for i in range(self.gate_stage, len(self.stage_cfgs)):
            cfg = self.stage_cfgs[i]
            for b in range(cfg.repeats):
                if b == 0 and i > self.gate_stage:
                    size = -(-size // cfg.stride)
                kernel = spec.kernel(i) or 3
                if not (b == 0 and i == self.gate_stage):  # the gate block's depthwise half is in the front
                    reduce = round(0.25 * (cfg.choices[-1] if b else self.stage_cfgs[i - 1].choices[-1]))
                    macs += prev * kernel * kernel * size * size + 2 * prev * reduce
                macs += prev * w[i] * size * size
                prev = w[i]
        return macs + prev * self.num_classes

    def _blocks(self, i: int) -> nn.ModuleList:
        """The blocks of stage ``stage_cfgs[i]``, ``1 <= i`` (stage 0 is the stem conv, not in ``stages``)."""
        return self.stages[i - 1]

    @property
    def gate_block(self) -> SlimSeparableBlock:
        """The first block of the first routed stage: the gate is its SE, so it runs in two halves
        (``forward_dw`` up to the gate, ``forward_pw`` at the routed width)."""
        return self._blocks(self.gate_stage)[0]

    def _to_gate(self, x: Tensor, widths: tuple[int, ...], points: dict[str, Tensor] | None = None) -> Tensor:
        """Stem, the stages before the gate, and the gate block's depthwise half: the gate's input.

        ``points`` (if given) receives each stage's globally pooled output, (N, C), by stage name.
        """
        x = F.silu(self.stem_bn(self.stem(x, widths[0])), inplace=True)
        if points is not None:
            points[self.stage_cfgs[0].name] = x.mean((2, 3))
        for i in range(1, self.gate_stage):
            for block in self._blocks(i):
                x = block(x, widths[i])
            if points is not None:
                points[self.stage_cfgs[i].name] = x.mean((2, 3))
        return self.gate_block.forward_dw(x)

    def forward_pre(self, x: Tensor, spec: SliceSpec, encode: bool = False) -> GatePoint:
        x = self._to_gate(x, spec.widths)
        e = self.gate.encode(x)
        return GatePoint(self.gate.attend(x, e), e)

    def probe_points(self, x: Tensor, spec: SliceSpec) -> dict[str, Tensor]:
        """Pooled output of every stage before the gate's stage, and the pooled gate input (what the gate's
        encoder reads) under the name ``space.gate_after``."""
        points: dict[str, Tensor] = {}
        h = self._to_gate(x, self.space.check(spec).widths, points)
        points[self.space.gate_after] = h.mean((2, 3))
        return points

    def forward_post(self, h: Tensor, spec: SliceSpec) -> Tensor:
        w = spec.widths
        h = self.gate_block.forward_pw(h, w[self.gate_stage])
        for block in list(self._blocks(self.gate_stage))[1:]:  # a ModuleList slice is a new ModuleList
            h = block(h, w[self.gate_stage], spec.kernel(self.gate_stage))
        for i in range(self.gate_stage + 1, len(self.stage_cfgs)):
            for block in self._blocks(i):
                h = block(h, w[i], spec.kernel(i))
        h = h.mean((2, 3))
        if self.training and self.drop_rate > 0 and spec == self.space.full:
            h = F.dropout(h, self.drop_rate, training=True)
        return self.classifier(h)

    def routed_blocks(self) -> list[tuple[int, nn.Module]]:
        # the gate block runs in two halves (forward_dw / forward_pw), so its routed output is its bn2's
        out: list[tuple[int, nn.Module]] = [(self.gate_stage, self.gate_block.bn2)]
        out += [(self.gate_stage, b) for b in self._blocks(self.gate_stage)[1:]]
        for i in range(self.gate_stage + 1, len(self.stage_cfgs)):
            out += [(i, b) for b in self._blocks(i)]
        return out

    def to_static_parts(self, spec: SliceSpec, *, attention: bool = True) -> tuple[nn.Sequential, nn.Sequential]:
        w = self.space.check(spec).widths
        pre: list[nn.Module] = [self.stem.to_static(self.in_chans, w[0]), self.stem_bn.to_static(w[0]),
                                nn.SiLU(inplace=True)]
        post: list[nn.Module] = []
        prev = w[0]
        for i in range(1, len(self.stage_cfgs)):
            for block in self._blocks(i):
                if block is self.gate_block:  # split after its SE, the gate's attention head: pre ends with it
                    se = self.gate.static_attention(prev) if attention else nn.Identity()
                    dw_half, pw_half = block.static_halves(prev, w[i], se=se)
                    pre.extend(dw_half if attention else dw_half[:-1])
                    post.extend(pw_half)
                else:
                    (pre if i < self.gate_stage else post).append(block.to_static(prev, w[i], spec.kernel(i)))
                prev = w[i]
        post.append(ClassifierHead(self.classifier.to_static(prev)))
        return nn.Sequential(*pre).eval(), nn.Sequential(*post).eval()


@register_model
def ds_mobilenetv1(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2) -> DSMobileNetV1:
    """DS-MobileNetV1 as the authors' released supernet: 14 sub-networks, rho in [0.35:0.05:1.0], 224 px."""
    return DSMobileNetV1(IMAGENET_STAGES, num_classes, in_chans, drop_rate, default_input_size=224)


@register_model
def tiny_ds_mobilenetv1(num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0) -> DSMobileNetV1:
    """CPU-sized DS-MobileNetV1 for 28-32 px inputs (stride-1 stem): 6 sub-networks, rho 0.375..1.0."""
    return DSMobileNetV1(TINY_STAGES, num_classes, in_chans, drop_rate, default_input_size=28)


def _with_kernels(stages: tuple[StageConfig, ...], kernels: tuple[int, ...]) -> tuple[StageConfig, ...]:
    return tuple(dataclasses.replace(s, kernels=kernels) if s.routed else s for s in stages)


@register_model
def ds_mobilenetv1pp(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2) -> DSMobileNetV1:
    """DS-MobileNetV1 with kernel-size slicing (DS-CNN++): the routed stages' depthwise convs at 3x3, 5x5 or
    7x7 (the centre of one stored 7x7 kernel) for every width: 42 sub-networks ordered by MACs, 224 px."""
    return DSMobileNetV1(_with_kernels(IMAGENET_STAGES, (3, 5, 7)), num_classes, in_chans, drop_rate,
                         default_input_size=224)


@register_model
def tiny_ds_mobilenetv1pp(num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0) -> DSMobileNetV1:
    """CPU-sized DS-MobileNetV1 with kernel-size slicing (3/5/7 depthwise kernels in the routed stages) for
    28-32 px inputs: 18 sub-networks ordered by MACs."""
    return DSMobileNetV1(_with_kernels(TINY_STAGES, (3, 5, 7)), num_classes, in_chans, drop_rate, default_input_size=28)
