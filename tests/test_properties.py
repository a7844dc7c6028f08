"""Property-based tests (hypothesis) over what users type: width strings, routing windows, recipe values.

Each property is the same contract: the input is accepted and means what it says, or it is refused with a
DsctlError (one line at the CLI), never another exception.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsctl
from dsctl.cli.train import _window_override
from dsctl.config import apply_overrides, load_recipe, recipe_from_dict, recipe_to_dict
from dsctl.errors import DsctlError, SpecError
from dsctl.routing import choose_window

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke" / "synthetic_tiny_ds_resnet.yaml"
SPACE = dsctl.build_model("tiny_ds_mobilenetv1").space
# examples per property: 60 in the default run; DSCTL_PROPERTY_EXAMPLES=2000 for a thorough search
EXAMPLES = int(os.environ.get("DSCTL_PROPERTY_EXAMPLES", "60"))
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# text that looks like what users type for a width, plus arbitrary unicode
width_text = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"\s*(k=|#)?-?[0-9]{0,3}(\.[0-9]{0,4})?(e-?[0-9])?\s*", fullmatch=True),
    st.sampled_from(["largest", "FULL", " Largest ", "nan", "inf", "-0", "1e-1", "k=", "#", "k=1.0", "０.５"]),
)


@FAST
@given(width_text)
def test_any_width_string_resolves_into_the_space_or_is_a_spec_error(text: str) -> None:
    try:
        spec = SPACE.resolve(text)
    except SpecError as err:
        assert "\n" not in str(err) and "allowed" in str(err)
        return
    assert spec in SPACE.all_specs()


@FAST
@given(st.integers(0, SPACE.num_subnets - 1), st.sampled_from(["{r}", "{r:.4f}", " {r:g} ", "{r:.6f}", "k={k}", "#{k}"]))
def test_every_way_of_writing_a_ratio_or_index_names_that_subnetwork(k: int, pattern: str) -> None:
    spec = SPACE.subnets[k]
    text = pattern.format(r=SPACE.ratio(spec), k=k)
    assert SPACE.resolve(text) == spec, text


@FAST
@given(st.one_of(st.text(max_size=10), st.from_regex(r"\s*[0-9]{1,2}\s*:\s*[0-9]{1,2}\s*", fullmatch=True)))
def test_window_option_gives_a_valid_recipe_value_or_one_line(text: str) -> None:
    try:
        overrides = _window_override(text)
    except DsctlError as err:
        assert "\n" not in str(err) and "--window" in str(err)
        return
    recipe = load_recipe(SMOKE, overrides)
    lo, hi = recipe.gate.window
    assert 0 <= lo < hi


@FAST
@given(st.lists(st.integers(1, 10**9), min_size=2, max_size=16, unique=True).map(sorted), st.floats(0, 1),
       st.integers(0, 20))
def test_chosen_window_brackets_the_target_and_has_the_asked_size(macs: list[int], where: float, size: int) -> None:
    target = macs[0] + where * (macs[-1] - macs[0])
    lo, hi = choose_window(macs, target, size)
    assert 0 <= lo < hi < len(macs)
    assert hi - lo + 1 == max(2, min(size, len(macs)))
    assert macs[lo] <= target <= macs[hi]


@FAST
@given(st.lists(st.integers(1, 10**9), min_size=2, max_size=8, unique=True).map(sorted),
       st.floats(allow_nan=True, allow_infinity=True))
def test_a_target_outside_the_routes_is_refused(macs: list[int], target: float) -> None:
    if macs[0] <= target <= macs[-1]:
        return
    with pytest.raises(DsctlError, match="outside what routing can spend"):
        choose_window(macs, target)


# recipe keys users override, and values of every YAML shape
KEYS = ["optim.lr", "optim.epochs", "optim.warmup_epochs", "optim.opt", "optim.sched", "data.batch_size",
        "data.input_size", "data.train_subset", "data.augment.hflip", "supernet.num_random", "supernet.target",
        "supernet.distill_weight", "gate.window", "gate.window_size", "gate.tau", "gate.holdout", "gate.decision",
        "baseline.width", "seed", "model.name", "model.kwargs.drop_rate", "optim", "data.source", "nope.key"]
yaml_values = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["null", "true", "[]", "[0, 3]", "[3, 0]", "{a: 1}", "'0.5'", "sgd", "cosine", "", "[1, 2, 3]",
                     ": bad", "{", "-1", "1e-3", ".nan", "tiny_ds_resnet", "none", "calibrated"]),
    st.text(max_size=8),
)


@settings(max_examples=2 * EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), yaml_values), max_size=3))
def test_any_override_gives_a_valid_recipe_or_a_recipe_error(pairs: list[tuple[str, str]]) -> None:
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        recipe = load_recipe(SMOKE, overrides)
    except DsctlError as err:
        assert str(err).strip(), overrides
        return
    again = recipe_from_dict(recipe_to_dict(recipe))  # what a run folder saves reads back as the same recipe
    assert again == recipe


@settings(max_examples=max(10, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(width_text, st.sampled_from(["0.5", "k=2", "largest"])))
def test_cli_width_is_exit_0_or_one_error_line(text: str) -> None:
    from typer.testing import CliRunner

    from dsctl.cli import app

    r = CliRunner().invoke(app, ["flops", "tiny_ds_resnet", "--width", text, "--input-size", "16"])
    assert "Traceback" not in r.output
    if r.exit_code != 0:
        lines = r.output.strip().splitlines()
        assert r.exit_code in (1, 2) and len(lines) == 1 and lines[0].startswith("error:"), (text, r.output)


def test_raw_mapping_values_never_escape_as_other_exceptions() -> None:
    base = recipe_to_dict(load_recipe(SMOKE))
    for bad in ({"optim": 3}, {"data": []}, {"gate": {"window": "0:3"}}, {"seed": "x"}, {"model": None}):
        with pytest.raises(DsctlError):
            recipe_from_dict({**base, **bad})
    assert apply_overrides(base, []) == base
