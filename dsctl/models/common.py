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
    in every indexed sub-network and at their last choice in the full-width network. Routed stages only:
    ``kernels``, the kernel sizes its sliceable depthwise convolutions can run at (DS-CNN++);
    ``mlp_ratios``, the MLP hidden-width ratios its transformer blocks can run at, apart from the heads.
    """

    name: str
    repeats: int
    stride: int
    choices: tuple[int, ...]
    routed: bool = False
    kernels: tuple[int, ...] = ()
    mlp_ratios: tuple[float, ...] = ()


def build_space(stages: tuple[StageConfig, ...], gate_after: str,
                cost: Callable[[SliceSpec], float] | None = None) -> SearchSpace:
    """Indexed sub-networks: non-routed stages at their first choice, routed ones at choice k, k = 0..K-1.

    With kernel choices (DS-CNN++) or MLP ratios, every width choice k runs at every kernel size or MLP
    ratio (one value for all the routed stages of a sub-network), and the sub-networks are ordered by
    ``cost`` (their MACs; ties keep the smaller kernel or ratio first), so the gate's index still grows with
    cost.
    """
    routed = [s for s in stages if s.routed]
    counts = {len(s.choices) for s in routed}
    if len(counts) != 1:
        raise ValueError(f"routed stages need the same number of choices, got {sorted(counts)}")
    (k_count,) = counts
    if any((s.kernels or s.mlp_ratios) and not s.routed for s in stages):
        raise ValueError("only routed stages can slice kernels or route their MLP")
    space_stages = tuple(StageSpace(s.name, s.choices, s.routed, s.kernels, s.mlp_ratios) for s in stages)

    def widths(k: int) -> tuple[int, ...]:
        return tuple(s.choices[k] if s.routed else s.choices[0] for s in stages)

    sizes = _shared([s.kernels for s in routed], "kernel choices")
    ratios = _shared([s.mlp_ratios for s in routed], "MLP ratios")
    kernel_sets = [tuple(size if s.kernels else 0 for s in stages) for size in sizes] or [()]

    def hidden_sets(w: tuple[int, ...]) -> list[tuple[int, ...]]:
        return [tuple(int(c * r) if s.mlp_ratios else 0 for s, c in zip(stages, w)) for r in ratios] or [()]

    specs = [SliceSpec(widths(k), kv, hv) for k in range(k_count) for kv in kernel_sets for hv in hidden_sets(widths(k))]
    if len(specs) > k_count:
        if cost is None:
            raise ValueError("a space with kernel or MLP choices needs a cost to order its sub-networks")
        specs = sorted(specs, key=cost)
    top = tuple(s.choices[-1] for s in stages)
    full = SliceSpec(top, kernel_sets[-1], hidden_sets(top)[-1])
    return SearchSpace(stages=space_stages, subnets=tuple(specs), full=full, gate_after=gate_after)


def _shared(values: list[tuple], what: str) -> tuple:
    """The one non-empty tuple of ``values`` that every routed stage with one shares (() when none has one)."""
    found = {v for v in values if v}
    if len(found) > 1 or (found and any(not v for v in values)):
        raise ValueError(f"routed stages need the same {what}, got {sorted(set(values))}")
    return next(iter(found), ())


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
