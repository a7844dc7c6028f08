"""SearchSpace lookups and errors."""

from __future__ import annotations

import random

import pytest

import dsctl
from dsctl.errors import SpecError
from dsctl.spec import SliceSpec


def test_resolve_ratio_index_and_largest() -> None:
    space = dsctl.build_model("ds_mobilenetv1").space
    assert space.resolve("0.5") == space.subnets[3]
    assert space.resolve(0.35) == space.smallest()
    assert space.resolve("k=2") == space.subnets[2]
    assert space.resolve("largest") == space.full
    assert space.label(space.full) == "largest" and space.label(space.subnets[4]) == "k4"


def test_bad_width_lists_valid_ratios() -> None:
    space = dsctl.build_model("ds_mobilenetv1").space
    with pytest.raises(SpecError, match=r"0\.33 is not in the search space \(allowed: 0\.35, 0\.4,"):
        space.resolve("0.33")
    with pytest.raises(SpecError, match="not a number"):
        space.resolve("wide")


def test_check_names_stage_and_value() -> None:
    space = dsctl.build_model("tiny_ds_resnet").space
    bad = SliceSpec((16, 32, 33, 128, 256))
    with pytest.raises(SpecError, match=r"stage 'layer2': width 33 not allowed"):
        space.check(bad)


def test_sample_uses_callers_rng() -> None:
    space = dsctl.build_model("tiny_ds_resnet").space
    a = [space.sample(random.Random(3)) for _ in range(5)]
    b = [space.sample(random.Random(3)) for _ in range(5)]
    assert a == b and all(s in space.subnets for s in a)
