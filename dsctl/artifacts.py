"""Typed run artifacts: what one stage writes and the next one reads.

Every run folder holds checkpoints (``last.pt``, ``best.pt``, ``final.pt``). This module is the only one
that knows their keys: one frozen dataclass per run kind, sharing :class:`Artifact`,

* :class:`SupernetArtifact` (``train-supernet``, ``calibrate-bn``): weights, EMA weights, the BN
  calibration flag and the table of every sub-network (:class:`SubnetRow`);
* :class:`GateArtifact` (``train-gate``): supernet + gate weights, the routing window, the route costs
  (:class:`RouteCosts`, stored once by the trainer) and the final evaluation (:class:`GateReport`);
* :class:`StaticArtifact` (``baseline``): a plain network, rebuilt from :class:`StaticMeta` and the tensor
  shapes of its state dict, and its final scores (:class:`StaticReport`),

each with the :class:`TrainingState` of a resumable ``last.pt`` when it has one. :func:`read_artifact`
loads one (``torch.load(weights_only=True)`` through :mod:`dsctl.checkpoint`), checks its kind against
what the caller expects and maps format-1 files; :meth:`Artifact.save` writes one atomically.

Example:
    >>> gate = read_artifact("runs/gate", expect=GateArtifact)  # doctest: +SKIP
    >>> model = gate.build_model()  # doctest: +SKIP
    >>> lo, hi = gate.window; gate.costs.route_macs[lo : hi + 1]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from dsctl import __version__, registry
from dsctl.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from dsctl.config import Recipe, apply_overrides, recipe_from_dict
from dsctl.errors import CheckpointError
from dsctl.routing import Calibration
from dsctl.spec import LARGEST, SliceSpec, width_label

if TYPE_CHECKING:
    from dsctl.data.build import DataInfo
    from dsctl.models.base import Supernet

__all__ = ["Artifact", "ModelArtifact", "SupernetArtifact", "GateArtifact", "StaticArtifact", "TrainingState",
           "RouteCosts", "SubnetRow", "StaticMeta", "StaticReport", "GateReport", "read_artifact", "route_costs"]

A = TypeVar("A", bound="Artifact")
M = TypeVar("M", bound="ModelArtifact")


# -- typed values inside artifacts ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TrainingState:
    """What a resumable ``last.pt`` adds: optimizer, scheduler and RNG states, and where the run stands.

    ``smoothed`` holds the running averages (EMA 0.9) of the training values that progress and the
    ``train_*`` columns of metrics.csv show, ``last_metrics`` what the current epoch's last optimizer step
    showed; both are empty in files written before they were stored.
    """

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    epoch: int          # 0-based, current
    batch: int          # micro-batches done in it
    global_step: int    # optimizer steps
    best_score: float = -math.inf
    smoothed: dict[str, float] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RouteCosts:
    """MACs of every indexed sub-network k (``route_macs[k]``) and of the gate itself, on one image at the
    artifact's input size (fused multiply-adds, fvcore)."""

    route_macs: tuple[int, ...]
    gate_macs: int

    @classmethod
    def measure(cls, model: Supernet, input_size: int) -> RouteCosts:
        from dsctl.flops import gate_macs, macs_table

        return cls(tuple(macs_table(model, input_size)), gate_macs(model, input_size))


@dataclass(frozen=True, kw_only=True)
class SubnetRow:
    """One sub-network of a supernet, evaluated: ``index`` is k of an indexed sub-network (None for the
    full network outside them), ``width`` its slimming ratio (None likewise)."""

    spec: SliceSpec
    index: int | None
    width: float | None
    macs: int
    params: int
    top1: float
    top5: float
    loss: float

    @property
    def label(self) -> str:
        return f"k{self.index}" if self.index is not None else LARGEST

    @property
    def width_label(self) -> str:
        return str(width_label(self.width))

    def to_row(self) -> dict[str, Any]:
        """The row of ``subnets.csv`` and ``summary.json``."""
        return {"subnet": self.label, "width": width_label(self.width),
                "macs": self.macs, "params": self.params, "top1": self.top1, "top5": self.top5, "loss": self.loss}


@dataclass(frozen=True, kw_only=True)
class StaticMeta:
    """How a static network was made: ``method`` (uniform, l1, slimming) cut from the supernet (the
    artifact's model) at ``base_spec``; ``width`` is the slimming ratio of a uniform network."""

    method: str
    base_spec: SliceSpec
    variant: str = ""                    # display label, e.g. "w0.5" or "macs1.5M"
    width: float | None = None
    target_macs: int | None = None       # pruning baselines
    pruning_ratio: float | None = None

    @property
    def width_label(self) -> str:
        return "-" if self.width is None else str(self.width)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "base_spec": self.base_spec.to_json()}


@dataclass(frozen=True, kw_only=True)
class StaticReport:
    """Final validation scores of a static network (``elapsed_s``: training time, when it was trained)."""

    top1: float
    top5: float
    loss: float
    elapsed_s: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class GateReport:
    """What the gate trainer measured at the end (validation set, the decision rule in force) and the
    settings that produced it. ``histogram`` counts routes over all K sub-networks."""

    window: tuple[int, int]
    top1: float
    top5: float
    loss: float
    avg_macs: int               # validation average, the gate's own MACs included
    gate_macs: int
    histogram: tuple[int, ...]
    gate_sgs_acc: float
    complexity: str
    target_macs_m: float | None
    complexity_weight: float
    sgs_target: str
    decision: str               # "calibrated" or "argmax"
    calibration: Calibration | None = None
    # a latency budget (dsctl.headroom.LatencyBudget.to_dict(), plus "predicted_ms": the validation routes'
    # predicted latency per batch); None for a MACs target or none
    latency_budget: dict[str, Any] | None = None

    @property
    def target_latency_ms(self) -> float | None:
        return None if self.latency_budget is None else float(self.latency_budget["target_ms"])

    @property
    def latency_batch(self) -> int | None:
        return None if self.latency_budget is None else int(self.latency_budget["batch"])

    def to_dict(self) -> dict[str, Any]:
        """The ``final`` of ``summary.json``."""
        out = {**asdict(self), "window": list(self.window), "histogram": list(self.histogram)}
        del out["calibration"]
        out["decision_calibration"] = self.calibration.to_dict() if self.calibration is not None else None
        out["latency_budget"] = out.pop("latency_budget")
        return out


# -- artifacts ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Artifact:
    """What every run kind stores. ``path`` is where it was read from; ``format_version`` and
    ``dsctl_version`` are the file's (:meth:`save` always writes this dsctl's)."""

    KIND: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = "a dsctl checkpoint"

    model_name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, Tensor]
    space: dict[str, Any] = field(default_factory=dict)  # SearchSpace.to_dict(), for people reading the file
    recipe: dict[str, Any] = field(default_factory=dict)
    data_info: DataInfo | None = None
    completed: bool = True
    training: TrainingState | None = None
    path: str = ""
    format_version: int = FORMAT_VERSION
    dsctl_version: str | None = __version__

    @property
    def input_size(self) -> int | None:
        """The resolution the run trained and evaluated at (its recipe's ``data.input_size``)."""
        size = (self.recipe.get("data") or {}).get("input_size")
        return int(size) if size else None

    def recipe_config(self, overrides: Sequence[str] = ()) -> Recipe:
        """The run's recipe with dotted ``overrides`` applied; CheckpointError if it holds none."""
        if not self.recipe:
            raise CheckpointError(f"{self.path}: holds no recipe, so its data is unknown")
        return recipe_from_dict(apply_overrides(self.recipe, list(overrides)), source=f"{self.path} recipe")

    def check_data(self, info: DataInfo) -> None:
        """DataError (one line) when data of ``info`` cannot feed this run's model (channels, classes)."""
        from dsctl.data.build import check_fits

        kw, known = self.model_kwargs, self.data_info
        in_chans = kw.get("in_chans", known.in_chans if known is not None else None)
        num_classes = kw.get("num_classes", known.num_classes if known is not None else None)
        check_fits(info, in_chans=in_chans, num_classes=num_classes, what=self.path or self.model_name)

    def require_training(self) -> TrainingState:
        if self.training is None:
            raise CheckpointError(f"{self.path}: holds no training state to resume from (use the run's last.pt)")
        return self.training

    def save(self, path: str | Path) -> None:
        """Write to ``path`` atomically, in this dsctl's format."""
        save_checkpoint(path, self._payload())

    def _payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.KIND, "dsctl_version": __version__, "model_name": self.model_name,
                               "model_kwargs": dict(self.model_kwargs), "state_dict": self.state_dict,
                               "recipe": self.recipe, "completed": self.completed}
        if self.space:
            out["space"] = self.space
        if self.data_info is not None:
            out["data_info"] = asdict(self.data_info)
        if self.training is not None:
            t = self.training
            out.update(optimizer=t.optimizer, scheduler=t.scheduler, rng=t.rng, best_score=t.best_score,
                       position={"epoch": t.epoch, "batch": t.batch, "global_step": t.global_step,
                                 "smoothed": dict(t.smoothed), "last_metrics": dict(t.last_metrics)})
        return out


@dataclass(frozen=True, kw_only=True)
class ModelArtifact(Artifact):
    """An artifact holding supernet weights (a supernet or a gate run): :meth:`build_model` rebuilds it."""

    DESCRIPTION: ClassVar[str] = "a supernet or gate checkpoint"

    @classmethod
    def from_model(cls: type[M], model: Supernet, **fields: Any) -> M:
        """An artifact of ``model``'s name, constructor arguments, search space and current weights."""
        return cls(model_name=model.model_name, model_kwargs=dict(model.model_kwargs), space=model.space.to_dict(),
                   state_dict=model.state_dict(), **fields)

    def model_state_dict(self) -> dict[str, Tensor]:
        """The weights a rebuilt model gets."""
        return self.state_dict

    def build_model(self) -> Supernet:
        """The registered model with these weights. Its ``default_input_size`` is the family's; the run's
        resolution is :attr:`input_size`, which callers pass to MACs counts, exports and benchmarks."""
        model = registry.build_model(self.model_name, **self.model_kwargs)
        try:
            model.load_state_dict(self.model_state_dict())
        except RuntimeError as err:
            raise CheckpointError(f"{self.path}: weights do not match model {self.model_name!r}: "
                                  f"{str(err)[:300]}") from None
        return model


@dataclass(frozen=True, kw_only=True)
class SupernetArtifact(ModelArtifact):
    """A supernet run: ``subnets`` is the evaluation table of ``final.pt`` (empty before it)."""

    KIND: ClassVar[str] = "supernet"
    DESCRIPTION: ClassVar[str] = "a supernet checkpoint (from train-supernet)"

    ema_state_dict: dict[str, Tensor] | None = None
    calibrated: bool = False          # BN statistics re-estimated per sub-network
    calib_batches: int = 0
    subnets: tuple[SubnetRow, ...] = ()
    gate_macs: int | None = None

    def model_state_dict(self) -> dict[str, Tensor]:
        """The EMA weights when stored (the final model of a run with EMA), else the trained ones."""
        return self.ema_state_dict or self.state_dict

    @property
    def costs(self) -> RouteCosts | None:
        """Route costs from the sub-network table (None before ``final.pt``)."""
        indexed = sorted((r for r in self.subnets if r.index is not None), key=lambda r: r.index)
        if not indexed or self.gate_macs is None:
            return None
        return RouteCosts(tuple(r.macs for r in indexed), self.gate_macs)

    def _payload(self) -> dict[str, Any]:
        out = super()._payload()
        out.update(calibrated=self.calibrated, calib_batches=self.calib_batches,
                   subnets=[_subnet_row_dict(r) for r in self.subnets])
        if self.ema_state_dict is not None:
            out["ema_state_dict"] = self.ema_state_dict
        if self.gate_macs is not None:
            out["gate_macs"] = self.gate_macs
        return out


@dataclass(frozen=True, kw_only=True)
class GateArtifact(ModelArtifact):
    """A gate run: supernet + trained gate routing over ``window`` (sub-network indices, inclusive)."""

    KIND: ClassVar[str] = "gate"
    DESCRIPTION: ClassVar[str] = "a gate checkpoint (from train-gate)"

    window: tuple[int, int]
    costs: RouteCosts
    supernet: str = ""                # the supernet checkpoint the gate was trained on
    final: GateReport | None = None   # final.pt only

    def _payload(self) -> dict[str, Any]:
        out = super()._payload()
        out.update(window=list(self.window), route_macs=list(self.costs.route_macs), gate_macs=self.costs.gate_macs,
                   supernet=self.supernet)
        if self.final is not None:
            out["final"] = self.final.to_dict()
        return out


@dataclass(frozen=True, kw_only=True)
class StaticArtifact(Artifact):
    """A static baseline: a plain network cut from the supernet ``model_name`` (see :class:`StaticMeta`)."""

    KIND: ClassVar[str] = "static"
    DESCRIPTION: ClassVar[str] = "a static baseline checkpoint (from baseline)"

    meta: StaticMeta
    final: StaticReport | None = None

    def build_network(self) -> nn.Module:
        """The network in eval mode, its (possibly pruned) layers shaped by the state dict."""
        from dsctl.train.static import fit_to_state_dict  # dsctl.train.static imports this module

        supernet = registry.build_model(self.model_name, **self.model_kwargs)
        spec = self.meta.base_spec
        base = supernet.to_uniform(spec) if self.meta.method == "uniform" else supernet.to_static(spec)
        net = fit_to_state_dict(base, self.state_dict)
        try:
            net.load_state_dict(self.state_dict)
        except RuntimeError as err:
            raise CheckpointError(f"{self.path}: static network weights do not fit {self.model_name}: "
                                  f"{str(err)[:200]}") from None
        return net.eval()

    def _payload(self) -> dict[str, Any]:
        out = super()._payload()
        out["meta"] = self.meta.to_dict()
        if self.final is not None:
            out["final"] = self.final.to_dict()
        return out


def route_costs(artifact: SupernetArtifact | GateArtifact, model: Supernet, input_size: int) -> RouteCosts:
    """The artifact's stored route costs if they hold at ``input_size``, else ``model``'s measured now."""
    stored = artifact.costs
    if stored is not None and input_size == artifact.input_size:
        return stored
    return RouteCosts.measure(model, input_size)


# -- reading ------------------------------------------------------------------------------------------------
_KINDS: dict[str, type[Artifact]] = {c.KIND: c for c in (SupernetArtifact, GateArtifact, StaticArtifact)}


def read_artifact(path: str | Path, expect: type[A] = Artifact, *, map_location: str | torch.device = "cpu",
                  why: str = "") -> A:  # type: ignore[assignment]
    """Read a checkpoint file (or a run folder's final/best/last) as the artifact of its kind.

    Args:
        path: Checkpoint file or run folder.
        expect: The artifact class the caller needs (:class:`ModelArtifact` for a supernet or a gate,
            :class:`Artifact` for any kind).
        why: What needs it, for the error line (e.g. ``"--dynamic"``).

    Raises:
        CheckpointError: one line naming the file: unreadable, not a dsctl checkpoint, a newer format, a
            malformed one, or another kind than ``expect``.

    Example:
        >>> sup = read_artifact("runs/supernet", expect=SupernetArtifact)  # doctest: +SKIP
        >>> [(r.label, r.top1) for r in sup.subnets]  # doctest: +SKIP
    """
    raw = load_checkpoint(path, map_location)
    p = raw["path"]
    if raw["format_version"] < 2:
        raw = _upgrade_v1(raw)
    cls = _KINDS.get(raw.get("kind"))
    if cls is None:
        raise CheckpointError(f"{p}: unknown checkpoint kind {raw.get('kind')!r} "
                              f"(allowed: {', '.join(_KINDS)})")
    if not issubclass(cls, expect):
        lead = f"{why} needs" if why else "expected"
        raise CheckpointError(f"{p}: {lead} {expect.DESCRIPTION}, not {cls.DESCRIPTION}")
    try:
        return _parse(cls, raw)  # type: ignore[return-value]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{p}: malformed {cls.KIND} checkpoint ({type(err).__name__}: {err})") from None


def _parse(cls: type[Artifact], raw: dict[str, Any]) -> Artifact:
    common: dict[str, Any] = {
        "model_name": raw["model_name"], "model_kwargs": dict(raw.get("model_kwargs") or {}),
        "state_dict": raw["state_dict"], "space": raw.get("space") or {}, "recipe": raw.get("recipe") or {},
        "data_info": _data_info(raw.get("data_info")), "completed": bool(raw.get("completed", "optimizer" not in raw)),
        "training": _training(raw), "path": raw["path"], "format_version": int(raw["format_version"]),
        "dsctl_version": raw.get("dsctl_version")}
    if cls is SupernetArtifact:
        return SupernetArtifact(**common, ema_state_dict=raw.get("ema_state_dict"),
                                calibrated=bool(raw.get("calibrated", False)),
                                calib_batches=int(raw.get("calib_batches", 0)),
                                subnets=tuple(_subnet_row(r) for r in raw.get("subnets") or ()),
                                gate_macs=raw.get("gate_macs"))
    if cls is GateArtifact:
        lo, hi = raw["window"]
        final = raw.get("final")
        return GateArtifact(**common, window=(int(lo), int(hi)),
                            costs=RouteCosts(tuple(int(m) for m in raw["route_macs"]), int(raw["gate_macs"])),
                            supernet=str(raw.get("supernet") or ""), final=_gate_report(final) if final else None)
    final = raw.get("final")
    return StaticArtifact(**common, meta=_static_meta(raw["meta"]), final=StaticReport(**final) if final else None)


def _training(raw: dict[str, Any]) -> TrainingState | None:
    if "optimizer" not in raw:
        return None
    p = raw["position"]
    return TrainingState(optimizer=raw["optimizer"], scheduler=raw["scheduler"], rng=raw["rng"], epoch=p["epoch"],
                         batch=p["batch"], global_step=p["global_step"],
                         best_score=float(raw.get("best_score", -math.inf)), smoothed=dict(p.get("smoothed") or {}),
                         last_metrics=dict(p.get("last_metrics") or {}))


def _data_info(d: dict[str, Any] | None) -> DataInfo | None:
    if not d:
        return None
    from dsctl.data.build import DataInfo

    known = {f.name for f in dataclasses.fields(DataInfo)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
    return DataInfo(**values)


def _subnet_row(d: dict[str, Any]) -> SubnetRow:
    return SubnetRow(spec=SliceSpec.from_json(d["spec"]), index=d["index"], width=d["width"], macs=int(d["macs"]),
                     params=int(d["params"]), top1=d["top1"], top5=d["top5"], loss=d["loss"])


def _subnet_row_dict(r: SubnetRow) -> dict[str, Any]:
    return {**asdict(r), "spec": r.spec.to_json()}


def _static_meta(d: dict[str, Any]) -> StaticMeta:
    return StaticMeta(method=d["method"], base_spec=SliceSpec.from_json(d["base_spec"]), variant=d.get("variant") or "",
                      width=d.get("width"), target_macs=d.get("target_macs"), pruning_ratio=d.get("pruning_ratio"))


def _gate_report(d: dict[str, Any]) -> GateReport:
    cal = d.get("decision_calibration")
    lo, hi = d["window"]
    return GateReport(
        window=(int(lo), int(hi)), top1=d["top1"], top5=d["top5"], loss=d["loss"], avg_macs=int(d["avg_macs"]),
        gate_macs=int(d["gate_macs"]), histogram=tuple(int(c) for c in d["histogram"]), gate_sgs_acc=d["gate_sgs_acc"],
        complexity=d["complexity"], target_macs_m=d.get("target_macs_m"), complexity_weight=d["complexity_weight"],
        sgs_target=d["sgs_target"], decision=d["decision"],
        calibration=None if not cal else Calibration.from_dict(cal), latency_budget=d.get("latency_budget"))


# -- format 1 (dsctl 0.1.0 before typed artifacts) -----------------------------------------------------------
def _upgrade_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint's keys in format 2: sub-network rows named by spec and index instead of a
    label, a static network's meta without the model (stored beside it) and with its width as a ratio."""
    raw = {**raw, "kind": raw.get("kind", "supernet")}
    if raw["kind"] == "supernet" and raw.get("subnets"):
        space = raw.get("space")
        if not space:
            space = registry.build_model(raw["model_name"], **(raw.get("model_kwargs") or {})).space.to_dict()
        raw["subnets"] = [_v1_subnet_row(r, space) for r in raw["subnets"]]
    if raw["kind"] == "static":
        meta = raw["meta"]
        raw["meta"] = {**meta, "width": _ratio(meta.get("width"))}
    return raw


def _v1_subnet_row(r: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    label = str(r["subnet"])
    index = int(label[1:]) if label.startswith("k") else None
    spec = space["subnets"][index] if index is not None else space["full"]
    return {**r, "spec": spec, "index": index, "width": None if index is None else float(r["width"])}


def _ratio(width: Any) -> float | None:
    """A format-1 width (the text the user gave, e.g. ``"0.5"``) as a ratio; None if it is not a number."""
    try:
        return None if width is None else float(width)
    except ValueError:
        return None
