"""Every recipe loads, and loads what its description says (issue 22: a recipe labelled as the authors' must
be the authors'; dsctl's own changes live in recipes named for them). Each recipe file has an entry here
with the fields its description names; a new recipe without one fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsctl.config import load_recipe

ROOT = Path(__file__).resolve().parents[1] / "recipes"

_AUTHORS_STAGE_I = {
    "supernet.target": "ib", "supernet.distill_weight": 1.0, "supernet.distill_ramp": 0.0,  # pure bootstrapping
    "supernet.ema_decay": 0.997, "supernet.num_random": 2, "supernet.sample": "interior",
    "supernet.label_smoothing": 0.1, "optim.opt": "sgd", "optim.lr": 0.08, "optim.weight_decay": 1e-4,
    "optim.epochs": 150, "optim.cooldown_epochs": 10, "optim.warmup_epochs": 5, "data.batch_size": 64,
    "data.augment.auto_augment": "rand-m9-mstd0.5", "data.augment.re_prob": 0.2, "data.augment.re_mode": "pixel",
    "data.augment.color_jitter": 0.06, "data.augment.interpolation": "random", "data.augment.mixup": 0.0,
}
EXPECTED: dict[str, dict[str, object]] = {
    "imagenet/ds_mobilenetv1.yaml": {**_AUTHORS_STAGE_I, "model.kwargs.drop_rate": 0.2},
    "imagenet/ds_mobilenetv1_dsctl.yaml": {**_AUTHORS_STAGE_I, "model.kwargs.drop_rate": 0.2,
                                           "supernet.distill_weight": 0.5, "supernet.distill_ramp": 0.5},
    "imagenet/ds_resnet50.yaml": {**_AUTHORS_STAGE_I, "model.name": "ds_resnet50"},
    "imagenet/ds_mobilenetv1_gate.yaml": {
        "gate.window": (0, 3), "gate.sgs_target": "authors", "gate.class_weighting": False, "gate.decision": "argmax",
        "gate.complexity": "authors", "gate.complexity_weight": 0.5, "optim.opt": "sgd", "optim.lr": 0.08,
        "optim.weight_decay": 0.01, "optim.epochs": 30},
    "imagenet/ds_mobilenetv1_gate_dsctl.yaml": {
        "gate.window": None, "gate.window_size": 3, "gate.sgs_target": "cheapest", "gate.class_weighting": True,
        "gate.decision": "calibrated", "gate.holdout": 0.1, "gate.complexity": "target", "optim.lr": 0.08,
        "optim.weight_decay": 0.01, "optim.epochs": 30},
    "imagenet/ds_deit_small.yaml": {
        "model.name": "ds_deit_small", "model.kwargs.drop_path_rate": 0.1, "optim.opt": "adamw", "optim.lr": 1e-3,
        "optim.weight_decay": 0.05, "optim.epochs": 300, "optim.warmup_epochs": 5, "optim.clip_grad": 5.0,
        "data.batch_size": 128, "supernet.target": "mvco", "supernet.ema_decay": 0.9998,
        "supernet.label_smoothing": 0.1, "data.augment.auto_augment": "rand-m9-mstd0.5-inc1",
        "data.augment.re_prob": 0.25, "data.augment.re_mode": "pixel", "data.augment.interpolation": "bicubic",
        "data.augment.mixup": 0.0, "data.augment.cutmix": 0.0},
    "quick/fashion_mnist_ds_mobilenetv1.yaml": {"model.name": "tiny_ds_mobilenetv1", "supernet.target": "ib",
                                                "supernet.num_random": 2, "data.source": "fashion_mnist"},
    "quick/fashion_mnist_ds_resnet.yaml": {"model.name": "tiny_ds_resnet", "supernet.target": "ib",
                                           "supernet.num_random": 2, "data.source": "fashion_mnist"},
    "quick/fashion_mnist_ds_resnet_gate.yaml": {"gate.sgs_target": "cheapest", "gate.decision": "calibrated",
                                                "gate.holdout": 0.1},
    "quickstart/fashion_mnist_ds_resnet.yaml": {"pipeline.gate_targets": (0.45, 0.6), "pipeline.baseline_width": "0.5",
                                                "pipeline.baseline_methods": ("uniform", "l1", "slimming")},
    "results/fashion_mnist_ds_resnet.yaml": {"data.train_subset": 24000, "optim.epochs": 6, "gate.window_size": 3,
                                             "gate.sgs_target": "cheapest", "gate.class_weighting": True,
                                             "gate.holdout": 0.1, "pipeline.gate_targets": (0.45, 0.6)},
    "results/fashion_mnist_ds_resnet_latency.yaml": {
        "model.kwargs.base_width": 16, "model.kwargs.layers": [1, 2, 2, 1], "model.kwargs.front_ratio": 0.25,
        "data.train_subset": 20000, "data.val_subset": None, "optim.epochs": 6, "gate.window_size": 3,
        "pipeline.gate_targets": (0.45, 0.6)},
    "results/fashion_mnist_ds_mobilenetv1_kernels.yaml": {
        "model.name": "tiny_ds_mobilenetv1pp", "data.train_subset": 20000, "data.val_subset": None, "optim.epochs": 6,
        "supernet.sample": "interior", "gate.sgs_target": "cheapest", "gate.class_weighting": True,
        "gate.decision": "calibrated", "gate.holdout": 0.1},
    "results/fashion_mnist_ds_vit_mlp.yaml": {
        "model.name": "tiny_ds_vit", "model.kwargs.mlp_ratios": (2, 3, 4), "data.train_subset": 40000,
        "data.val_subset": None, "optim.epochs": 3, "supernet.target": "mvco", "supernet.sample": "interior",
        "gate.sgs_target": "cheapest", "gate.class_weighting": True, "gate.decision": "calibrated",
        "gate.holdout": 0.1},
    "results/fashion_mnist_ds_resnet_finetune.yaml": {
        "model.kwargs.front_ratio": 0.25, "data.train_subset": 20000, "optim.epochs": 2, "optim.lr": 0.05,
        "optim.warmup_epochs": 0, "supernet.distill_weight": 0.5, "supernet.distill_ramp": 0.0},
    "results/fashion_mnist_ds_vit.yaml": {"model.name": "tiny_ds_vit", "supernet.target": "mvco",
                                          "gate.window_size": 2, "pipeline.gate_targets": (0.45, 0.6)},
    "bootstrap/digits_ds_resnet.yaml": {"optim.epochs": 15},
    "bootstrap/fashion_mnist_ds_resnet.yaml": {"data.train_subset": 2000, "data.val_subset": 5000, "optim.epochs": 6},
    "smoke/pipeline_synthetic.yaml": {"data.source": "synthetic"},
    "smoke/pipeline_synthetic_vit.yaml": {"data.source": "synthetic", "supernet.target": "mvco"},
    "smoke/synthetic_tiny_ds_resnet.yaml": {"data.source": "synthetic"},
}


def _field(recipe, dotted: str):
    value = recipe
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part)
    return tuple(value) if isinstance(value, list | tuple) and dotted != "model.kwargs.layers" else value


def test_every_recipe_has_an_entry() -> None:
    files = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.yaml")}
    assert files == set(EXPECTED), f"recipes without an entry: {files - set(EXPECTED)}; stale: {set(EXPECTED) - files}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_loads_what_its_description_says(name: str) -> None:
    recipe = load_recipe(ROOT / name)
    wrong = {k: (_field(recipe, k), v) for k, v in EXPECTED[name].items() if _field(recipe, k) != v}
    assert not wrong, f"{name}: field: (loaded, described) {wrong}"
