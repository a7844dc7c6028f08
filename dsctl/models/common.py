"""Pieces shared by the CNN families: stage configs, search-space construction, weight init."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dsctl.layers.slim import SlimBatchNorm2d
from dsctl.spec import SearchSpace, SliceSpec, StageSpace

__all__ = ["StageConfig", "build_space", "init_weights"]


@dataclass(frozen=True)
class StageConfig:
    """One slimmable stage: ``repeats`` blocks, the first with ``stride``; all output one of ``choices``.

    ``routed`` stages follow the sub-network index k (choice k); the others run at their first choice
    in every indexed sub-network and at their last choice in the full-width network. ``kernels`` (routed
    stages only): the kernel sizes its sliceable depthwise convolutions can run at (DS-CNN++).
    """

    name: str
    repeats: int
    stride: int
    choices: tuple[int, ...]
    routed: bool = False
    kernels: tuple[int, ...] = ()


def build_space(stages: tuple[StageConfig, ...], gate_after: str,
                cost: Callable[[SliceSpec], float] | None = None) -> SearchSpace:
    """Indexed sub-networks: non-routed stages at their first choice, routed ones at choice k, k = 0..K-1.

    With kernel choices (DS-CNN++), every width choice k runs at every kernel size (one size for all the
    kernel-sliced stages of a sub-network), and the sub-networks are ordered by ``cost`` (their MACs; ties
    keep the narrower kernel first), so the gate's index still grows with cost.
    """
    routed = [s for s in stages if s.routed]
    counts = {len(s.choices) for s in routed}
    if len(counts) != 1:
        raise ValueError(f"routed stages need the same number of choices, got {sorted(counts)}")
    (k_count,) = counts
    if any(s.kernels and not s.routed for s in stages):
        raise ValueError("only routed stages can slice kernels")
    kernel_sets = {s.kernels for s in routed}
    space_stages = tuple(StageSpace(s.name, s.choices, s.routed, s.kernels) for s in stages)
    full = SliceSpec(tuple(s.choices[-1] for s in stages))

    def widths(k: int) -> tuple[int, ...]:
        return tuple(s.choices[k] if s.routed else s.choices[0] for s in stages)

    if kernel_sets == {()}:
        subnets = tuple(SliceSpec(widths(k)) for k in range(k_count))
    else:
        if len(kernel_sets) != 1:
            raise ValueError(f"kernel-sliced routed stages need the same kernel choices, got {sorted(kernel_sets)}")
        if cost is None:
            raise ValueError("a space with kernel choices needs a cost to order its sub-networks")
        (sizes,) = kernel_sets
        specs = [SliceSpec(widths(k), tuple(size if s.kernels else 0 for s in stages))
                 for k in range(k_count) for size in sizes]
        subnets = tuple(sorted(specs, key=cost))
        full = SliceSpec(full.widths, tuple(s.kernels[-1] if s.kernels else 0 for s in stages))
    return SearchSpace(stages=space_stages, subnets=subnets, full=full, gate_after=gate_after)


def init_weights(model: nn.Module, zero_init_last: tuple[type, ...] = ()) -> None:
    """Kaiming-normal (fan_out) convs, unit/zero BN affine, small normal linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, SlimBatchNorm2d | nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, zero_init_last):
            m.zero_init_last()
