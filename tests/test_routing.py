"""Routing decisions on hand-made inputs: gate targets, class weights, default window, budget calibration."""

from __future__ import annotations

import pytest
import torch

from dsctl.errors import DsctlError
from dsctl.routing import calibrate_offsets, choose_window, class_weights, gate_targets, route_with_offsets

# rows: samples; columns: window members, cheapest first
CORRECT = torch.tensor([
    [1, 1, 1, 1],   # easy: every member right
    [0, 1, 1, 1],   # first right at member 1
    [0, 0, 0, 1],   # only the widest
    [0, 0, 0, 0],   # hopeless
    [0, 1, 0, 1],   # not monotone: cheapest right is 1
    [1, 0, 0, 0],   # only the smallest
], dtype=torch.bool)


def test_cheapest_correct_targets() -> None:
    assert gate_targets(CORRECT, "cheapest").tolist() == [0, 1, 3, 0, 1, 0]


def test_authors_targets_use_only_the_smallest() -> None:
    assert gate_targets(CORRECT, "authors").tolist() == [0, 3, 3, 3, 3, 0]


def test_unknown_rule_is_an_error() -> None:
    with pytest.raises(ValueError, match="allowed: authors, cheapest"):
        gate_targets(CORRECT, "oracle")


def test_class_weights_balance_present_classes() -> None:
    t = torch.tensor([0, 0, 0, 1, 3])
    w = class_weights(t, 4)
    assert w.tolist() == pytest.approx([1 / 3, 1.0, 0.0, 1.0])
    # every present class carries the same total weight
    totals = torch.zeros(4).index_add_(0, t, w[t])
    assert totals[[0, 1, 3]].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_choose_window_brackets_the_target() -> None:
    macs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert choose_window(macs, 2.5, 4) == (0, 3)      # mean 2.5
    assert choose_window(macs, 4.6, 4) == (2, 5)      # mean 4.5: closer than (1, 4) at 3.5 or (3, 6) at 5.5
    assert choose_window(macs, 1.2, 4) == (0, 3)      # only windows that bracket the target count
    assert choose_window(macs, 6.5, 2) == (5, 6)
    assert choose_window(macs, 3.0, 10) == (0, 6)    # window larger than the space: all of it
    with pytest.raises(DsctlError, match="allowed: 1e-06M..7e-06M"):
        choose_window(macs, 0.5, 4)


def test_calibration_meets_the_budget_with_imbalanced_scores() -> None:
    g = torch.Generator().manual_seed(3)
    n = 2000
    hard = torch.rand(n, generator=g) < 0.15
    # a 3-way gate whose scores favour the cheapest member (the imbalanced prior) and lean wide on hard samples
    logits = torch.stack([torch.full((n,), 2.0), torch.zeros(n), hard.float() * 1.5], 1)
    logits = logits + 0.7 * torch.randn(n, 3, generator=g)
    costs = [1.0e6, 2.0e6, 4.0e6]
    assert float(torch.tensor(costs)[logits.argmax(1)].mean()) < 1.3e6  # argmax alone hardly spends anything
    for target in (1.5e6, 2.2e6, 3.0e6):
        cal = calibrate_offsets(logits, costs, target)
        routes = route_with_offsets(logits, torch.tensor(cal.offsets))
        spent = float(torch.tensor(costs)[routes].mean())
        assert spent == pytest.approx(cal.achieved)
        assert abs(spent / target - 1) <= 0.02 and cal.met
        # the samples that go widest are mostly the hard ones
        assert hard[routes == 2].float().mean() > hard.float().mean()


def test_calibration_reports_an_unreachable_budget() -> None:
    logits = torch.zeros(100, 2)  # a gate that cannot tell samples apart: all-or-nothing
    cal = calibrate_offsets(logits, [1.0, 3.0], 2.0)
    assert not cal.met and cal.achieved in (1.0, 3.0)
    with pytest.raises(DsctlError, match="outside the window"):
        calibrate_offsets(logits, [1.0, 3.0], 5.0)
