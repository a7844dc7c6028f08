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


@pytest.mark.parametrize("name, full_indexed", [("ds_mobilenetv1", False), ("tiny_ds_resnet", True),
                                                ("tiny_ds_vit", False)])
def test_all_specs_lists_each_indexed_subnet_then_the_full_network_once(name: str, full_indexed: bool) -> None:
    space = dsctl.build_model(name).space
    specs = space.all_specs()
    assert specs[: space.num_subnets] == space.subnets and len(set(specs)) == len(specs)
    assert (space.full in space.subnets) == full_indexed and specs[-1] == space.full


def test_width_names_indexed_subnets_by_ratio_and_the_full_network_largest() -> None:
    from dsctl.spec import width_label

    space = dsctl.build_model("ds_mobilenetv1").space
    assert space.width(space.subnets[3]) == 0.5 and space.width(space.full) is None
    assert space.ratio(space.full) == space.ratio(space.subnets[-1]) == 1.0  # why the full network has no ratio name
    assert width_label(space.width(space.full)) == "largest" and width_label(0.5) == 0.5
    for spec in space.all_specs():  # what is shown resolves back to the same network
        assert space.resolve(width_label(space.width(spec))) == spec
