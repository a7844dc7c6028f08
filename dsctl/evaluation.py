"""``evaluate_checkpoint``: evaluate a saved supernet (at a width), dynamic model or baseline on its
validation data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsctl.artifacts import Artifact, GateArtifact, StaticArtifact, read_artifact
from dsctl.config import Recipe
from dsctl.errors import DsctlError
from dsctl.flops import count_subnet
from dsctl.spec import width_label
from dsctl.train.common import evaluate, resolve_device
from dsctl.train.data import build_train_data
from dsctl.train.gate import evaluate_dynamic

__all__ = ["EvalReport", "evaluate_checkpoint"]


@dataclass(frozen=True)
class EvalReport:
    """One model evaluated on its validation data. ``macs``: fused multiply-adds of one image (for a
    dynamic model, the average over the data, the gate's own included); ``params`` for static networks,
    ``histogram`` (routes over all K sub-networks) and ``gate_sgs_acc`` for dynamic ones."""

    model: str
    data: str
    checkpoint: str
    subnet: str
    width: float | str
    top1: float
    top5: float
    loss: float
    samples: int
    macs: float
    params: int | None = None
    histogram: list[int] | None = None
    gate_sgs_acc: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """``dsctl eval --json``: the fields that apply to this kind of model."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def _evaluate_static(art: StaticArtifact, recipe: Recipe, dev, *, width: str | None) -> EvalReport:
    from dsctl.flops import count_macs, count_params

    if width is not None:
        raise DsctlError(f"{art.path}: a baseline network has one fixed width (drop --width)")
    net = art.build_network()
    data = build_train_data(recipe.data)
    macs = count_macs(net, data.input_size, data.info.in_chans)
    r = evaluate(net.to(dev), data.val, None, dev)
    return EvalReport(art.model_name, data.info.name, art.path, f"{art.meta.method} {art.meta.variant}",
                      art.meta.width_label, r.top1, r.top5, r.loss, r.samples, macs, params=count_params(net))


def evaluate_checkpoint(path: str | Path, *, width: str | None = None, dynamic: bool = False,
                        overrides: list[str] = (), device: str = "auto") -> EvalReport:  # type: ignore[assignment]
    """Evaluate a checkpoint on the validation split of its recipe's data (``overrides`` may change it).

    Gate checkpoints are evaluated dynamically (the gate's decision rule, grouped sliced inference) unless
    a width is given; supernet checkpoints need a width (default: the full network) and cannot be
    ``dynamic``; baseline checkpoints take neither.
    """
    art = read_artifact(path, GateArtifact if dynamic else Artifact, why="--dynamic" if dynamic else "")
    recipe = art.recipe_config(overrides)
    dev = resolve_device(device)
    if isinstance(art, StaticArtifact):
        return _evaluate_static(art, recipe, dev, width=width)
    model = art.build_model()
    model.to(dev).eval()
    data = build_train_data(recipe.data)
    if isinstance(art, GateArtifact) and width is None:
        lo, hi = art.window
        r = evaluate_dynamic(model, data.val, art.window, dev, route_macs=list(art.costs.route_macs),
                             gate_macs=art.costs.gate_macs)
        return EvalReport(model.model_name, data.info.name, art.path, f"dynamic[{lo}:{hi}]", "dynamic", r.top1,
                          r.top5, r.loss, r.samples, r.avg_macs, histogram=r.histogram, gate_sgs_acc=r.gate_sgs_acc)
    spec = model.space.resolve(width or "largest")
    r = evaluate(model, data.val, spec, dev)
    m = count_subnet(model, spec, data.input_size)
    return EvalReport(model.model_name, data.info.name, art.path, model.space.label(spec), width_label(m.width),
                      r.top1, r.top5, r.loss, r.samples, m.macs, params=m.params)
