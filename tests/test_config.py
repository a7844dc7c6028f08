"""Tests for the recipe schema, loader and overrides (dsctl.config)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from dsctl.config import (
    DataConfig,
    GateConfig,
    Recipe,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    save_recipe,
)
from dsctl.errors import DsctlError, RecipeError

RECIPE = """\
description: tiny test recipe
seed: 3
model:
  name: tiny_resnet
  kwargs: {width_mult: 1.0}
data:
  source: synthetic
  input_size: 32
  batch_size: 16
  augment:
    hflip: 0.25
    scale: [0.5, 1.0]
optim:
  lr: 0.05
  epochs: 2
gate:
  window: [1, 3]
measure:
  batch_sizes: [1, 8]
"""


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_valid_recipe(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, RECIPE))
    assert recipe.model.name == "tiny_resnet"
    assert recipe.model.kwargs == {"width_mult": 1.0}
    assert recipe.data.source == "synthetic"
    assert recipe.data.augment.scale == (0.5, 1.0)  # YAML list accepted for a tuple field
    assert recipe.gate.window == (1, 3)
    assert recipe.measure.batch_sizes == (1, 8)
    assert recipe.optim.opt == "sgd"  # default kept
    assert recipe.seed == 3


def test_round_trip_through_yaml_and_json(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, RECIPE))
    out = tmp_path / "resolved.yaml"
    save_recipe(recipe, out)
    assert load_recipe(out) == recipe
    plain = recipe_to_dict(recipe)
    assert plain["gate"]["window"] == [1, 3]  # tuples become lists
    assert recipe_from_dict(json.loads(json.dumps(plain))) == recipe


def test_recipe_is_frozen(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, RECIPE))
    with pytest.raises(Exception):
        recipe.seed = 5  # type: ignore[misc]
    assert recipe.seed == 3


def test_unknown_key_names_dotted_path_and_allowed_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, RECIPE.replace("  batch_size: 16\n", "  batch_size: 16\n  bogus: 1\n"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "recipe.yaml: data.bogus: unknown key" in msg
    assert "source" in msg and "batch_size" in msg  # allowed keys listed


def test_unknown_nested_and_top_level_keys(tmp_path: Path) -> None:
    text = RECIPE.replace("    hflip: 0.25\n", "    hflp: 0.25\n") + "extra_section: {}\n"
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, text))
    msg = str(info.value)
    assert "data.augment.hflp: unknown key" in msg
    assert "extra_section: unknown key" in msg


def test_wrong_type_names_path_and_value(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, RECIPE.replace("lr: 0.05", "lr: abc")))
    msg = str(info.value)
    assert "recipe.yaml: optim.lr:" in msg
    assert "'abc'" in msg


def test_several_errors_in_one_message(tmp_path: Path) -> None:
    text = RECIPE.replace("lr: 0.05", "lr: abc").replace("source: synthetic", "source: imagenet22k")
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, text))
    msg = str(info.value)
    assert "optim.lr" in msg and "data.source" in msg
    assert "fashion_mnist" in msg  # allowed values listed for a Literal


def test_missing_required_model(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"model: Field required"):
        load_recipe(_write(tmp_path, "seed: 1\n"))


def test_window_validation() -> None:
    with pytest.raises(RecipeError, match=r"gate.window: window must be"):
        recipe_from_dict({"model": {"name": "m"}, "gate": {"window": [3, 1]}})
    with pytest.raises(RecipeError, match=r"gate.window"):
        recipe_from_dict({"model": {"name": "m"}, "gate": {"window": [-1, 2]}})
    with pytest.raises(RecipeError, match=r"gate.window: .*0 <= A < B"):  # one member: nothing to route
        recipe_from_dict({"model": {"name": "m"}, "gate": {"window": [2, 2]}})
    assert GateConfig(window=(0, 1)).window == (0, 1)


def test_overrides_number_bool_list_nested_and_kwargs(tmp_path: Path) -> None:
    recipe = load_recipe(
        _write(tmp_path, RECIPE),
        [
            "optim.lr=0.1",
            "optim.amp=false",
            "gate.window=[0,3]",
            "data.augment.hflip=0",
            "model.kwargs.drop_rate=0.2",
            "model.kwargs.new_block={depth: 2}",
            "export.width=null",
            "description=hello world",
        ],
    )
    assert recipe.optim.lr == 0.1
    assert recipe.optim.amp is False
    assert recipe.gate.window == (0, 3)
    assert recipe.data.augment.hflip == 0.0
    assert recipe.model.kwargs == {"width_mult": 1.0, "drop_rate": 0.2, "new_block": {"depth": 2}}
    assert recipe.export.width is None
    assert recipe.description == "hello world"


def test_override_creates_missing_section(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, "model: {name: m}\n"), ["supernet.num_random=0"])
    assert recipe.supernet.num_random == 0


def test_unknown_override_key_lists_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, RECIPE), ["optim.learning_rate=0.1"])
    msg = str(info.value)
    assert "optim.learning_rate" in msg
    assert "lr" in msg and "weight_decay" in msg
    with pytest.raises(RecipeError, match=r"unknown key 'optimizer'"):
        load_recipe(_write(tmp_path, RECIPE), ["optimizer.lr=0.1"])
    with pytest.raises(RecipeError, match=r"not a section"):
        load_recipe(_write(tmp_path, RECIPE), ["optim.lr.x=0.1"])


def test_override_without_equals_rejected(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"no '='"):
        load_recipe(_write(tmp_path, RECIPE), ["optim.lr"])


def test_override_value_validated(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"data.batch_size"):
        load_recipe(_write(tmp_path, RECIPE), ["data.batch_size=0"])


def test_apply_overrides_does_not_mutate_input() -> None:
    raw = {"model": {"name": "m"}, "optim": {"lr": 1.0}}
    out = apply_overrides(raw, ["optim.lr=2"])
    assert out["optim"]["lr"] == 2
    assert raw["optim"]["lr"] == 1.0


def test_missing_recipe_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match="nope.yaml"):
        load_recipe(missing)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  name: m\ndata: [unclosed\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:" in str(info.value)
    assert "invalid YAML" in str(info.value)


def test_top_level_not_mapping(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(_write(tmp_path, "- a\n- b\n"))


def test_errors_are_dsctl_and_value_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "missing.yaml")
    assert isinstance(info.value, DsctlError) and isinstance(info.value, ValueError)


def test_defaults_match_spec() -> None:
    recipe = Recipe.model_validate({"model": {"name": "m"}})
    assert recipe.data == DataConfig()
    assert recipe.data.source == "fashion_mnist" and recipe.data.input_size == 224
    assert recipe.optim.lr == 0.08 and recipe.optim.epochs == 150
    assert recipe.supernet.target == "ib" and recipe.supernet.ema_decay == 0.997
    assert recipe.gate.window is None and recipe.export.format == "pt2"
    assert recipe.measure.batch_sizes == (1, 32)
    assert yaml.safe_load(yaml.safe_dump(recipe_to_dict(recipe))) == recipe_to_dict(recipe)


def test_config_module_does_not_import_torch() -> None:
    import dsctl.config

    tree = ast.parse(Path(dsctl.config.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "torch" not in imported


def test_every_shipped_recipe_loads() -> None:
    root = Path(__file__).resolve().parents[1] / "recipes"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 7
    for f in files:
        recipe = load_recipe(f)
        assert recipe.model.name, f
    quick = [f.name for f in files if "fashion" in f.name and "ds_resnet" in f.name]
    assert "fashion_mnist_ds_resnet.yaml" in quick
