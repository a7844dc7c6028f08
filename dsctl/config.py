"""Recipe schema and loader: YAML file + dotted overrides -> a frozen, validated `Recipe`.

A recipe is one YAML file whose nested sections mirror the classes below (`model`, `data`, `optim`,
`supernet`, `gate`, `export`, `measure`). Every section is a frozen pydantic model that forbids unknown
keys, so a typo such as `data.bogus` is an error naming its dotted path instead of a silently ignored
setting. Library functions take only the sections they need, never the whole recipe.

Example:
    >>> from dsctl.config import load_recipe
    >>> recipe = load_recipe("recipes/tiny.yaml", ["optim.lr=0.1", "gate.window=[0,3]"])  # doctest: +SKIP
    >>> recipe.optim.lr  # doctest: +SKIP
    0.1

This module must stay importable without torch.
"""

from __future__ import annotations

import math

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from dsctl.errors import RecipeError

__all__ = [
    "AugmentConfig", "BaselineConfig", "DataConfig", "ExportConfig", "GateConfig", "MeasureConfig", "ModelConfig",
    "OptimConfig", "PipelineConfig", "Recipe", "SupernetConfig", "apply_overrides", "load_recipe", "recipe_from_dict",
    "recipe_to_dict", "save_recipe",
]

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(BaseModel):
    """Which registered model to build, and how."""

    model_config = _FROZEN

    name: str
    num_classes: int | None = Field(default=None, gt=0)  # None: take it from the data
    kwargs: dict[str, Any] = Field(default_factory=dict)  # extra builder keyword arguments
    init_from: str | None = None  # weights file, Hub folder or dsctl run to start from (dsctl.weights)
    init_ema: bool = True  # from a training checkpoint, its EMA weights where it holds them


class AugmentConfig(BaseModel):
    """Training augmentation, passed to `timm.data.create_transform` (or the CIFAR-style pipeline)."""

    model_config = _FROZEN

    hflip: float = Field(default=0.5, ge=0.0, le=1.0)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    auto_augment: str | None = None  # timm string, e.g. "rand-m9-mstd0.5"
    re_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    re_mode: Literal["const", "rand", "pixel"] = "const"  # random erasing fill (timm's modes; the authors: pixel)
    interpolation: Literal["bilinear", "bicubic", "random"] = "bilinear"  # RandomResizedCrop's (timm; random: per image)
    color_jitter: float | None = Field(default=None, ge=0.0)
    crop_pct: float | None = Field(default=None, gt=0.0, le=1.0)
    simple: bool = False  # True: pad-and-random-crop + hflip (CIFAR style) instead of RandomResizedCrop
    # Mixup / CutMix on training batches (timm.data.Mixup; off at 0): Beta(alpha, alpha) mixing, applied with
    # probability mixup_prob, CutMix instead of Mixup with probability mixup_switch_prob when both are on.
    # Stage I and the baselines train on the mixed soft labels; stage II (the gate) never mixes.
    mixup: float = Field(default=0.0, ge=0.0)
    cutmix: float = Field(default=0.0, ge=0.0)
    mixup_prob: float = Field(default=1.0, ge=0.0, le=1.0)
    mixup_switch_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0.0 < v[0] <= v[1] <= 1.0):
            raise ValueError("scale must satisfy 0 < min <= max <= 1")
        return v

    @field_validator("ratio")
    @classmethod
    def _check_ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0.0 < v[0] <= v[1]):
            raise ValueError("ratio must satisfy 0 < min <= max")
        return v


class DataConfig(BaseModel):
    """Dataset source, location, loader sizes and augmentation."""

    model_config = _FROZEN

    source: Literal["fashion_mnist", "mnist", "cifar10", "cifar100", "folder", "synthetic"] = "fashion_mnist"
    # a timm model name (e.g. resnet50, deit_small_patch16_224): normalise with the mean and std of its
    # pretrained configuration, the normalisation the weights it names were trained with (runs that start
    # from them: --init-from, dsctl convert); None: the data set's own statistics
    norm_from: str | None = None
    root: str | None = None
    channels: Literal[1, 3] = 3  # image folders only: 1 reads every image as grayscale, 3 as RGB
    input_size: int = Field(default=224, gt=0)
    batch_size: int = Field(default=64, gt=0)
    eval_batch_size: int | None = Field(default=None, gt=0)  # None: same as batch_size
    workers: int = Field(default=2, ge=0)
    train_subset: int | None = Field(default=None, gt=0)  # first N training samples
    val_subset: int | None = Field(default=None, gt=0)  # first N validation samples
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    synthetic_classes: int = Field(default=10, gt=0)
    synthetic_train_size: int = Field(default=256, gt=0)
    synthetic_val_size: int = Field(default=64, gt=0)
    synthetic_channels: int = Field(default=3, gt=0)


class OptimConfig(BaseModel):
    """Optimizer and LR schedule, named as in timm (`create_optimizer_v2`, `create_scheduler_v2`)."""

    model_config = _FROZEN

    opt: str = "sgd"  # timm name: "sgd" is Nesterov SGD, "momentum" is plain SGD with momentum
    lr: float = Field(default=0.08, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    sched: str = "cosine"
    epochs: int = Field(default=150, gt=0)
    warmup_epochs: int = Field(default=5, ge=0)
    warmup_lr: float = Field(default=1e-6, ge=0.0)
    min_lr: float = Field(default=1e-6, ge=0.0)
    cooldown_epochs: int = Field(default=0, ge=0)
    grad_accum: int = Field(default=1, ge=1)
    amp: bool = True
    clip_grad: float | None = Field(default=None, gt=0.0)


class SupernetConfig(BaseModel):
    """Supernet training: sandwich sampling, distillation target and its schedule, EMA, BN calibration.

    ``distill_weight`` and ``distill_ramp`` make bootstrapping safe on any schedule: a student's loss is
    ``(1 - a) * CE(labels) + a * CE(teacher)`` with ``a`` rising linearly from 0 to ``distill_weight``
    over the first ``distill_ramp`` of the optimizer steps (``distill_ramp: 0`` starts at full weight;
    ``distill_weight: 1, distill_ramp: 0`` is the authors' pure in-place bootstrapping).
    ``sample: interior`` draws the random members from the sub-networks strictly between the smallest
    and the largest (the authors' rule); ``all`` draws from every indexed sub-network.

    ``target: mvco`` (multi-view consistency, DS-Net++): every image is loaded as two augmented views;
    the students see view A and are distilled toward the EMA teacher's prediction (as the largest) on
    view B. It equals ``target: ib`` with ``mvco: true``; ``mvco: true`` with ``eib`` gives the ensemble
    teacher on view B. Both need the EMA teacher (``ema_decay > 0``); ``mvco: true`` with ``id`` or
    ``none`` is an error (no teacher to show the other view).
    """

    model_config = _FROZEN

    num_random: int = Field(default=2, ge=0)
    sample: Literal["interior", "all"] = "interior"
    target: Literal["ib", "eib", "id", "none", "mvco"] = "ib"
    distill_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    distill_ramp: float = Field(default=0.5, ge=0.0, le=1.0)
    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    ema_decay: float = Field(default=0.997, ge=0.0, le=1.0)
    mvco: bool = False
    calib_batches: int = Field(default=20, ge=0)
    eval_every: int = Field(default=1, ge=1)
    sync_bn: bool = False
    checkpoint_every: int = Field(default=0, ge=0)  # also save last.pt every N optimizer steps (0: per epoch)

    @pydantic.model_validator(mode="after")
    def _check_views(self) -> SupernetConfig:
        if self.mvco and self.target in ("id", "none"):
            raise ValueError(f"mvco: true shows the EMA teacher a second view, but target {self.target!r} has no "
                             "teacher (allowed with mvco: ib, eib, mvco)")
        if self.two_views and self.ema_decay == 0:
            raise ValueError("multi-view consistency distils toward the EMA teacher: it needs ema_decay > 0")
        return self

    @property
    def two_views(self) -> bool:
        """Whether training loads two augmented views per image (students A, EMA teacher B)."""
        return self.mvco or self.target == "mvco"


class GateConfig(BaseModel):
    """Gate training: which sub-networks the gate may choose, its targets, losses and decision rule.

    * ``window``: (first, last) sub-network index; None: the ``window_size`` sub-networks around
      ``target_macs_m`` (default 3: those that bracket it with the mean cost closest to it), all of them
      when no target is set.
    * ``sgs_target``: ``authors`` (the window's smallest if it is right, else its widest) or
      ``cheapest`` (the cheapest window member that is right; the cheapest when none is).
    * ``class_weighting``: weight the gate's cross-entropy by the inverse frequency of each target.
    * ``complexity``: ``authors`` (0.5 x (GMACs)^2 at weight 0.5), ``target`` (two-sided:
      ``weight * (E[MACs] / target - 1)^2``, pulls cost up as well as down), ``none``.
    * ``decision``: ``calibrated`` (per-route offsets fitted after training on ``holdout`` of the training
      data so the average MACs there meet ``target_macs_m``) or ``argmax`` (the authors' rule).
    * ``target_latency_ms`` (instead of ``target_macs_m``): a latency budget in milliseconds per batch of
      ``latency_batch`` images, against a table of every sub-network's latency on the deployment device
      (``latency_table``: the latency.csv or analysis.json of ``dsctl analyze`` run there; None: timed on
      the training device before training). The window is the ``window_size`` sub-networks around it by
      time, and the decision is calibrated on time (:mod:`dsctl.headroom`).
    """

    model_config = _FROZEN

    window: tuple[int, int] | None = None
    window_size: int = Field(default=3, ge=2)
    tau: float = Field(default=1.0, gt=0.0)
    sgs_target: Literal["authors", "cheapest"] = "cheapest"
    class_weighting: bool = True
    complexity: Literal["authors", "target", "none"] = "authors"
    complexity_weight: float = Field(default=0.5, ge=0.0)
    target_macs_m: float | None = Field(default=None, gt=0.0)
    sgs_weight: float = Field(default=1.0, ge=0.0)
    task_weight: float = Field(default=1.0, ge=0.0)
    decision: Literal["calibrated", "argmax"] = "calibrated"
    holdout: float = Field(default=0.1, gt=0.0, le=0.5)  # fraction of the training data kept for calibration
    budget_tolerance: float = Field(default=0.02, gt=0.0, lt=1.0)
    target_latency_ms: float | None = Field(default=None, gt=0.0)
    latency_batch: int = Field(default=32, gt=0)
    latency_table: str | None = None

    @pydantic.model_validator(mode="after")
    def _check_budget(self) -> GateConfig:
        if self.target_latency_ms is not None and self.target_macs_m is not None:
            raise ValueError(f"target_latency_ms={self.target_latency_ms:g} and target_macs_m={self.target_macs_m:g} "
                             "are two budgets for one gate (give one)")
        return self

    @property
    def has_budget(self) -> bool:
        return self.target_macs_m is not None or self.target_latency_ms is not None

    @field_validator("window")
    @classmethod
    def _check_window(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 <= v[0] < v[1]):
            raise ValueError("window must be [A, B] with 0 <= A < B (B at most the model's last sub-network index)")
        return v


class BaselineConfig(BaseModel):
    """Static baselines: width multiplier (uniform), L1-norm filter pruning (l1), network slimming."""

    model_config = _FROZEN

    method: Literal["uniform", "l1", "slimming"] = "uniform"
    width: str | None = None  # a slimming ratio of the supernet's space; l1/slimming prune to its MACs
    target_macs_m: float | None = Field(default=None, gt=0.0)
    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    finetune_epochs: int = Field(default=2, ge=0)
    finetune_lr: float | None = Field(default=None, gt=0.0)  # None: optim.lr / 10
    slimming_lambda: float = Field(default=1e-4, ge=0.0)  # L1 on BN scales during slimming's training


class PipelineConfig(BaseModel):
    """The whole experiment (``dsctl quickstart``): supernet, gates at several MACs targets, baselines, report."""

    model_config = _FROZEN

    gate_targets: tuple[float, ...] = (0.45, 0.6)  # MACs targets as fractions of the full-width network's
    gate_window: tuple[int, int] | None = None
    gate_optim: OptimConfig = Field(default_factory=lambda: OptimConfig(
        opt="adamw", lr=0.002, weight_decay=0.01, epochs=3, warmup_epochs=0, min_lr=1e-5))
    gate_complexity_weight: float = Field(default=1.0, ge=0.0)
    baseline_methods: tuple[Literal["uniform", "l1", "slimming"], ...] = ("uniform", "l1", "slimming")
    baseline_width: str = "0.5"
    uniform_widths: tuple[str, ...] = ()  # extra width-multiplier baselines (beside baseline_width)
    report_batch: int = Field(default=32, gt=0)
    report_min_run_time_s: float = Field(default=0.5, gt=0.0)


class ExportConfig(BaseModel):
    """Defaults of ``dsctl export CHECKPOINT`` when --width / --format are not given."""

    model_config = _FROZEN

    width: str | None = None
    format: Literal["torchscript", "pt2", "onnx", "aoti", "safetensors"] = "pt2"


class MeasureConfig(BaseModel):
    """Defaults of ``dsctl bench CHECKPOINT`` when --batch / --threads / --min-run-time are not given."""

    model_config = _FROZEN

    batch_sizes: tuple[PositiveInt, ...] = (1, 32)
    warmup: int = Field(default=10, ge=0)
    min_run_time_s: float = Field(default=1.0, gt=0.0)
    threads: int | None = Field(default=None, gt=0)


class Recipe(BaseModel):
    """A whole experiment recipe: one section per stage, plus a seed and a free-text description."""

    model_config = _FROZEN

    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    supernet: SupernetConfig = Field(default_factory=SupernetConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    seed: int = 0
    description: str = ""


# --------------------------------------------------------------------------------------------------
# Schema walking


def _section_class(model_cls: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The nested section class behind `key`, or None if the field is a leaf."""
    annotation = model_cls.model_fields[key].annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _is_free_form(model_cls: type[BaseModel], key: str) -> bool:
    """True for dict-valued fields (`model.kwargs`), whose keys the schema does not fix."""
    annotation = model_cls.model_fields[key].annotation
    return getattr(annotation, "__origin__", None) is dict


def _allowed(model_cls: type[BaseModel]) -> str:
    return ", ".join(model_cls.model_fields)


def _class_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The section class at a location inside `Recipe`, or None if it is not a section."""
    cls: type[BaseModel] = Recipe
    for part in loc:
        if not isinstance(part, str) or part not in cls.model_fields:
            return None
        sub = _section_class(cls, part)
        if sub is None:
            return None
        cls = sub
    return cls


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


# --------------------------------------------------------------------------------------------------
# Overrides


def _parse_override(override: str) -> tuple[list[str], Any]:
    if "=" not in override:
        raise RecipeError(
            f"override {override!r} has no '='; write it as dotted.key=value, e.g. optim.lr=0.1"
        )
    key, raw = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise RecipeError(f"override {override!r} has an empty key part; write it as dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {override!r}: value {raw!r} is not valid YAML ({exc})") from None
    return parts, value


def _check_override_path(parts: list[str], override: str) -> None:
    """Reject a dotted path that does not exist in the schema (keys under `model.kwargs` are free)."""
    cls: type[BaseModel] = Recipe
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "the top level"
        if part not in cls.model_fields:
            raise RecipeError(
                f"override {override!r}: unknown key {'.'.join(parts[: i + 1])!r} "
                f"(allowed under {here}: {_allowed(cls)})"
            )
        if _is_free_form(cls, part):
            return
        sub = _section_class(cls, part)
        if sub is None:
            if i != len(parts) - 1:
                raise RecipeError(
                    f"override {override!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section, "
                    f"so it has no key {parts[i + 1]!r}"
                )
            return
        cls = sub


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides to a raw (not yet validated) recipe mapping.

    Args:
        raw: The recipe as loaded from YAML. It is not modified.
        overrides: Strings such as `optim.lr=0.1`, `gate.window=[0,3]` or `model.kwargs.drop_rate=0.2`.
            Each value is parsed with `yaml.safe_load`, so numbers, booleans, lists and `null` work.

    Returns:
        A new nested dict with the overrides applied.

    Raises:
        RecipeError: An override without `=`, with a value that is not YAML, with a key path that is not
            in the schema (the message lists the valid keys at that level), or one that descends into a
            recipe value that is not a mapping.
    """
    result = _deep_copy(raw)
    for override in overrides:
        parts, value = _parse_override(override)
        _check_override_path(parts, override)
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(
                    f"override {override!r}: recipe value at {'.'.join(parts[: i + 1])!r} is "
                    f"{child!r}, not a mapping"
                )
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Validation and (de)serialization


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_error(err: Mapping[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    path = _dotted(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        parent = _class_at(loc[:-1])
        allowed = f" (allowed: {_allowed(parent)})" if parent is not None else ""
        return f"{path}: unknown key{allowed}"
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind == "missing" or "input" not in err:
        return f"{path}: {msg}"
    return f"{path}: {msg} (got {_short_repr(err['input'])})"


def recipe_from_dict(data: Mapping[str, Any], *, source: str = "recipe") -> Recipe:
    """Validate a plain nested mapping into a `Recipe`.

    Args:
        data: Nested mapping mirroring the schema (as read from YAML).
        source: Name used at the start of each error line, usually the recipe file name.

    Returns:
        The validated, frozen recipe.

    Raises:
        RecipeError: One error listing every bad field by dotted path, e.g.
            `recipe.yaml: optim.lr: Input should be a valid number (got 'abc')`.
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: the top level must be a mapping of sections, got {_short_repr(data)}")
    bad = _non_finite(data, "")
    if bad:
        raise RecipeError(f"{source}: {bad[0]}: {bad[1]} is not a finite number (no recipe value may be NaN or "
                          "infinite)")
    try:
        return Recipe.model_validate(dict(data))
    except pydantic.ValidationError as exc:
        lines = [f"{source}: {_format_error(e)}" for e in exc.errors()]
        raise RecipeError("\n".join(lines)) from None


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """The dotted path and value of the first NaN or infinite float in a nested recipe mapping, if any."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "<top>", value
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found = _non_finite(child, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a YAML recipe, apply dotted overrides, and validate it.

    Args:
        path: The recipe file.
        overrides: `dotted.key=value` strings applied after loading, e.g. `["optim.lr=0.1"]`.

    Returns:
        The validated, frozen recipe.

    Raises:
        RecipeError: The file is missing or unreadable, is not valid YAML (the message gives the line),
            its top level is not a mapping, an override is malformed or names an unknown key, or a field
            fails validation (every bad field is named by its dotted path).

    Example:
        >>> recipe = load_recipe("recipes/tiny.yaml", ["data.batch_size=32"])  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe file {path}: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: the top level must be a mapping of sections "
            f"({_allowed(Recipe)}), got {type(raw).__name__}"
        )
    raw = apply_overrides(raw, overrides)
    return recipe_from_dict(raw, source=path.name)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain, JSON- and YAML-safe nested dict of a recipe (tuples become lists).

    Args:
        recipe: The recipe to convert.

    Returns:
        A dict that `recipe_from_dict` turns back into an equal recipe.
    """
    return recipe.model_dump(mode="json")


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write a recipe as YAML (the resolved recipe a run folder keeps).

    Args:
        recipe: The recipe to save.
        path: Destination file; its parent folder must exist.

    Raises:
        RecipeError: The file cannot be written.
    """
    text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot write recipe to {path}: {exc}") from None
