"""Routing decisions: gate targets from a correctness matrix, the default window, and budget calibration.

Pure functions over tensors (no model): the gate trainer and ``dsctl analyze`` call them, tests check
them on hand-made matrices.

* :func:`member_correct`: which window members classify each sample right (the correctness matrix).
* :func:`gate_targets`: per sample, the window member the gate should pick (SGS rules).
* :func:`class_weights`: inverse-frequency weights against imbalanced targets.
* :func:`choose_window`: the ``size`` consecutive sub-networks around a MACs target.
* :func:`calibrate_offsets`: per-route logit offsets ``-lam * cost`` so that the routed average MACs on
  held-out samples meet a budget (a Lagrange price on MACs found by bisection).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from dsctl.errors import DsctlError

__all__ = ["member_correct", "gate_targets", "class_weights", "choose_window", "Calibration", "calibrate_offsets",
           "route_with_offsets"]


def member_correct(member_logits: Tensor, labels: Tensor) -> Tensor:
    """(W, N, C) window members' logits -> (N, W) bool: which members classify each sample right."""
    return (member_logits.argmax(-1) == labels[None]).T


def gate_targets(correct: Tensor, rule: str = "cheapest") -> Tensor:
    """Target index within the window per sample, from ``correct`` (N, W) bool (members ascending in cost).

    ``authors``: 0 where the window's smallest is right, else W - 1 (sandwich gate sparsification).
    ``cheapest``: the cheapest member that is right; 0 when none is (spending MACs on a sample that no
    member gets right buys nothing).

    Example:
        >>> c = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
        >>> gate_targets(c, "cheapest").tolist(), gate_targets(c, "authors").tolist()
        ([0, 1, 2, 0], [0, 2, 2, 2])
    """
    if correct.dim() != 2:
        raise ValueError(f"correct must be (N, W), got shape {tuple(correct.shape)}")
    n, w = correct.shape
    if rule == "authors":
        return torch.where(correct[:, 0], 0, w - 1).long()
    if rule == "cheapest":
        any_right = correct.any(1)
        first = correct.long().argmax(1)  # argmax returns the first maximum
        return torch.where(any_right, first, torch.zeros_like(first))
    raise ValueError(f"unknown gate target rule {rule!r} (allowed: authors, cheapest)")


def class_weights(targets: Tensor, num_classes: int) -> Tensor:
    """Inverse-frequency weights (0 for absent classes) for ``F.cross_entropy(weight=...)``: every
    present target class contributes equally to the weighted mean."""
    counts = torch.bincount(targets, minlength=num_classes).float()
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))


def choose_window(route_macs: list[int] | list[float], target_macs: float, size: int = 4) -> tuple[int, int]:
    """The ``size`` consecutive sub-networks whose MACs bracket ``target_macs`` and whose mean MACs is
    closest to it (ties: the cheaper window). ``route_macs`` are the per-route MACs, ascending.

    Raises:
        DsctlError: the target lies outside [cheapest, widest] route MACs.
    """
    k = len(route_macs)
    if not route_macs[0] <= target_macs <= route_macs[-1]:
        raise DsctlError(f"MACs target {target_macs / 1e6:.4g}M is outside what routing can spend "
                         f"(allowed: {route_macs[0] / 1e6:.4g}M..{route_macs[-1] / 1e6:.4g}M)")
    size = max(2, min(size, k))
    best: tuple[float, int] | None = None
    for lo in range(k - size + 1):
        hi = lo + size - 1
        if not route_macs[lo] <= target_macs <= route_macs[hi]:
            continue
        gap = abs(sum(route_macs[lo : hi + 1]) / size - target_macs)
        if best is None or gap < best[0]:
            best = (gap, lo)
    assert best is not None  # the full range brackets the target, so some window of any size does
    return best[1], best[1] + size - 1


def route_with_offsets(logits: Tensor, offsets: Tensor) -> Tensor:
    """Window-relative route per sample: argmax of logits (N, W) + offsets (W,)."""
    return (logits.float() + offsets.to(logits.device, torch.float32)).argmax(-1)


@dataclass(frozen=True)
class Calibration:
    """The fitted decision rule: route = argmax(logits + offsets) over the window.

    ``unit`` is what the route costs are in: ``MACs`` (per sample, the gate's own excluded) or ``ms``
    (milliseconds per sample at a deployment batch size, the front and gate included: a latency budget).
    """

    offsets: tuple[float, ...]   # per window member, added to the gate logits
    price: float                 # lam: offsets = -lam * (cost - cost_min) / (cost_max - cost_min)
    target: float                # average routed cost asked for
    achieved: float              # average routed cost reached on the held-out samples
    samples: int
    met: bool                    # |achieved / target - 1| <= tolerance
    unit: str = "MACs"

    @property
    def error(self) -> float:
        return self.achieved / self.target - 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "offsets": list(self.offsets), "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Read :meth:`to_dict`'s output (also the older ``target_macs`` / ``avg_macs`` keys)."""
        return cls(offsets=tuple(d["offsets"]), price=d["price"], target=d.get("target", d.get("target_macs")),
                   achieved=d.get("achieved", d.get("avg_macs")), samples=int(d["samples"]), met=bool(d["met"]),
                   unit=d.get("unit", "MACs"))


def _avg_cost(logits: Tensor, scaled: Tensor, costs: Tensor, lam: float) -> float:
    return float(costs[route_with_offsets(logits, -lam * scaled)].mean())


def calibrate_offsets(logits: Tensor, costs: list[float] | Tensor, target: float, *,
                      tolerance: float = 0.02, iters: int = 100, unit: str = "MACs") -> Calibration:
    """Fit ``offsets = -lam * scaled_cost`` so the routed average cost on ``logits`` meets ``target``
    (a cost in ``unit``: MACs, or ms per sample for a latency budget).

    The routed cost is non-increasing in the price ``lam``, so bisection finds the smallest price whose
    average cost does not exceed the target (spending as much of the budget as possible without going
    over); the other side of the step is taken instead when it is closer. With continuous logits each
    step of the curve moves one sample, so N held-out samples reach the target within about
    (max cost - min cost) / N.

    Args:
        logits: (N, W) raw gate logits over the window on held-out samples.
        costs: (W,) MACs of each window member (ascending).
        target: the average routed cost to reach, in ``unit``.
    """
    logits = logits.detach().float().cpu()
    costs_t = torch.as_tensor(costs, dtype=torch.float64)
    if logits.dim() != 2 or logits.shape[1] != costs_t.numel() or logits.shape[0] == 0:
        raise ValueError(f"logits must be (N>0, {costs_t.numel()}), got {tuple(logits.shape)}")
    lo_c, hi_c = float(costs_t[0]), float(costs_t[-1])
    if not lo_c <= target <= hi_c:
        if unit == "MACs":
            raise DsctlError(f"MACs target {target / 1e6:.4g}M is outside the window's routes "
                             f"(allowed: {lo_c / 1e6:.4g}M..{hi_c / 1e6:.4g}M)")
        raise DsctlError(f"target {target:.4g} {unit} is outside the window's routes "
                         f"(allowed: {lo_c:.4g}..{hi_c:.4g} {unit})")
    scaled = ((costs_t - lo_c) / max(hi_c - lo_c, 1e-12)).float()
    spread = float(logits.max() - logits.min()) + 1.0
    min_step = float(torch.diff(scaled).min()) if scaled.numel() > 1 else 1.0
    bound = 2 * spread / max(min_step, 1e-6)
    lo_lam, hi_lam = -bound, bound          # avg(lo_lam) = widest member, avg(hi_lam) = cheapest member
    for _ in range(iters):
        mid = 0.5 * (lo_lam + hi_lam)
        if _avg_cost(logits, scaled, costs_t, mid) <= target:
            hi_lam = mid
        else:
            lo_lam = mid
    under, over = _avg_cost(logits, scaled, costs_t, hi_lam), _avg_cost(logits, scaled, costs_t, lo_lam)
    lam, avg = (hi_lam, under) if abs(under - target) <= abs(over - target) else (lo_lam, over)
    offsets = tuple(float(v) for v in (-lam * scaled))
    met = abs(avg / target - 1.0) <= tolerance
    return Calibration(offsets, lam, float(target), avg, int(logits.shape[0]), met, unit)
