"""Pieces shared by the CNN families: stage configs, search-space construction, weight init."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dsctl.layers.slim import SlimBatchNorm2d
from dsctl.spec import SearchSpace, SliceSpec, StageSpace

__all__ = ["StageConfig", "build_space", "init_weights"]


@dataclass(frozen=True)
class StageConfig:
    """One slimmable stage: ``repeats`` blocks, the first with ``stride``; all output one of ``choices``.

    ``routed`` stages follow the sub-network index k (choice k); the others run at their first choice
    in every indexed sub-network and at their last choice in the full-width network.
    """

    name: str
    repeats: int
    stride: int
    choices: tuple[int, ...]
    routed: bool = False


def build_space(stages: tuple[StageConfig, ...], gate_after: str) -> SearchSpace:
    """Indexed sub-networks k = 0..K-1: non-routed stages at their first choice, routed ones at choice k."""
    routed = [s for s in stages if s.routed]
    counts = {len(s.choices) for s in routed}
    if len(counts) != 1:
        raise ValueError(f"routed stages need the same number of choices, got {sorted(counts)}")
    (k_count,) = counts
    subnets = tuple(
        SliceSpec(tuple(s.choices[k] if s.routed else s.choices[0] for s in stages)) for k in range(k_count)
    )
    return SearchSpace(
        stages=tuple(StageSpace(s.name, s.choices, s.routed) for s in stages),
        subnets=subnets,
        full=SliceSpec(tuple(s.choices[-1] for s in stages)),
        gate_after=gate_after,
    )


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
