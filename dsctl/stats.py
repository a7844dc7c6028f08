"""Paired comparisons of two classifiers on the same images: the accuracy difference with its 95% interval.

Two models evaluated on the same n images are compared per image: ``b`` images only the first gets right,
``c`` only the second. The difference in accuracy is ``(b - c) / n`` and its variance, for paired
proportions, ``((b + c) - (b - c)^2 / n) / n^2`` (the Wald interval of the matched-pairs difference, the
counterpart of McNemar's test; it reads straight off the correctness matrix ``dsctl analyze`` records, so it
can be recomputed by hand). :func:`verdict` turns an interval and a threshold into "met", "missed" or
"within noise".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PairedDiff", "paired_diff", "verdict", "Z95"]

Z95 = 1.959963984540054


@dataclass(frozen=True)
class PairedDiff:
    """Accuracy of A minus accuracy of B, in points, with its 95% interval; ``only_a`` / ``only_b``: the
    images only A / only B gets right, ``n`` the images compared."""

    diff: float
    low: float
    high: float
    only_a: int
    only_b: int
    n: int

    def describe(self) -> str:
        return f"{self.diff:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_diff(a: Tensor, b: Tensor) -> PairedDiff:
    """Paired difference of two per-image correctness vectors (bool, same images in the same order).

    >>> r = paired_diff(torch.tensor([True, True, False, True]), torch.tensor([True, False, False, False]))
    >>> r.diff, r.only_a, r.only_b
    (50.0, 2, 0)
    """
    a, b = a.bool().flatten(), b.bool().flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"two non-empty correctness vectors of one length needed, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.numel()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    d = (only_a - only_b) / n
    var = max(((only_a + only_b) - (only_a - only_b) ** 2 / n) / n**2, 0.0)
    half = Z95 * math.sqrt(var)
    return PairedDiff(100 * d, 100 * (d - half), 100 * (d + half), only_a, only_b, n)


def verdict(r: PairedDiff, at_least: float) -> str:
    """"met" when the whole interval is at or above ``at_least`` (points), "missed" when it is all below,
    "within noise" when it straddles it."""
    if r.low >= at_least:
        return "met"
    if r.high < at_least:
        return "missed"
    return "within noise"
