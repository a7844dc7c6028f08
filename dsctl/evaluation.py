"""Evaluation on validation data: ``evaluate_checkpoint`` (a saved supernet at a width, a dynamic model or a
baseline, what ``dsctl eval`` prints) and ``evaluate_dynamic`` (a supernet routed by its gate; the gate
trainer's per-epoch evaluation too). Static sub-networks: :func:`dsctl.train.common.evaluate`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsctl.artifacts import Artifact, GateArtifact, StaticArtifact, read_artifact
from dsctl.config import Recipe
from dsctl.dynamic import average_macs
from dsctl.errors import DsctlError
from dsctl.flops import count_subnet
from dsctl.models.base import Supernet
from dsctl.routing import gate_targets, member_correct
from dsctl.spec import width_label
from dsctl.train.common import all_reduce_sum, autocast, evaluate, resolve_device
from dsctl.train.data import build_run_data
from dsctl.train.progress import Progress

__all__ = ["DynamicEval", "EvalReport", "evaluate_checkpoint", "evaluate_dynamic"]


@dataclass
class DynamicEval:
    """Dynamic-model evaluation: accuracy, route histogram over all K sub-networks, average MACs."""

    top1: float
    top5: float
    loss: float
    samples: int
    histogram: list[int]
    avg_macs: float
    gate_sgs_acc: float

    @property
    def avg_macs_m(self) -> float:
        return self.avg_macs / 1e6


@torch.no_grad()
def evaluate_dynamic(model: Supernet, loader, window: tuple[int, int], device: torch.device, *,
                     route_macs: list[int], gate_macs: int, amp: bool = False, rule: str = "authors",
                     progress=None) -> DynamicEval:
    """Real dynamic inference (the gate's decision rule, grouped sliced sub-networks) over ``loader``.

    ``gate_sgs_acc`` is the agreement of the routes with the gate targets of ``rule`` (computed on every
    window member's output, so this costs the whole window once per batch).
    """
    model.eval()
    lo, hi = window
    k = model.space.num_subnets
    hist = torch.zeros(k, dtype=torch.float64)
    c1 = c5 = loss_sum = n = sgs_right = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(device, amp):  # one pass to the gate serves the routed groups and the SGS reference
            point = model.forward_pre(x, model.space.subnets[lo], encode=True)
            routes = model.gate.decide(point.encoding, window)
            members = torch.stack([model.forward_post(point.features, s).float()
                                   for s in model.space.subnets[lo : hi + 1]])
        # every member ran already (for the gate-target agreement): the routed output is a row of theirs,
        # equal to grouped inference (tests/test_gate.py) without a second pass
        logits = members[routes - lo, torch.arange(routes.numel(), device=routes.device)]
        hist += torch.bincount(routes.cpu(), minlength=k).double()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), 1).indices
        c1 += float((top[:, 0] == y).sum())
        c5 += float((top == y[:, None]).any(1).sum())
        sgs_right += float((gate_targets(member_correct(members, y), rule) + lo == routes).sum())
        n += y.numel()
        if progress is not None:
            progress.advance()
    c1, c5, loss_sum, n, sgs_right, *counts = all_reduce_sum([c1, c5, loss_sum, n, sgs_right, *hist.tolist()], device)
    histogram = [int(c) for c in counts]
    return DynamicEval(100 * c1 / n, 100 * c5 / n, loss_sum / n, int(n), histogram,
                       average_macs(histogram, route_macs, gate_macs), 100 * sgs_right / n)


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


def _evaluate_static(art: StaticArtifact, recipe: Recipe, dev, *, width: str | None, progress) -> EvalReport:
    from dsctl.flops import count_macs, count_params

    if width is not None:
        raise DsctlError(f"{art.path}: a baseline network has one fixed width (drop --width)")
    data = build_run_data(recipe.data)
    art.check_data(data.info)
    net = art.build_network()
    macs = count_macs(net, data.input_size, data.info.in_chans)
    progress.start(f"evaluating {art.meta.method} {art.meta.variant} on {data.info.name}", len(data.val))
    r = evaluate(net.to(dev), data.val, None, dev, progress=progress)
    progress.finish()
    return EvalReport(art.model_name, data.info.name, art.path, f"{art.meta.method} {art.meta.variant}",
                      art.meta.width_label, r.top1, r.top5, r.loss, r.samples, macs, params=count_params(net))


def evaluate_checkpoint(path: str | Path, *, width: str | None = None, dynamic: bool = False,
                        overrides: list[str] = (), device: str = "auto",  # type: ignore[assignment]
                        progress: Progress | None = None) -> EvalReport:
    """Evaluate a checkpoint on the validation split of its recipe's data (``overrides`` may change it).

    Gate checkpoints are evaluated dynamically (the gate's decision rule, grouped sliced inference) unless
    a width is given; supernet checkpoints need a width (default: the full network) and cannot be
    ``dynamic``; baseline checkpoints take neither. ``progress`` follows the batches (default: silent).
    """
    progress = progress or Progress()
    art = read_artifact(path, GateArtifact if dynamic else Artifact, why="--dynamic" if dynamic else "")
    recipe = art.recipe_config(overrides)
    dev = resolve_device(device)
    if isinstance(art, StaticArtifact):
        return _evaluate_static(art, recipe, dev, width=width, progress=progress)
    data = build_run_data(recipe.data)
    art.check_data(data.info)
    model = art.build_model()
    model.to(dev).eval()
    if isinstance(art, GateArtifact) and width is None:
        lo, hi = art.window
        progress.start(f"evaluating dynamic[{lo}:{hi}] on {data.info.name}", len(data.val))
        r = evaluate_dynamic(model, data.val, art.window, dev, route_macs=list(art.costs.route_macs),
                             gate_macs=art.costs.gate_macs, progress=progress)
        progress.finish()
        return EvalReport(model.model_name, data.info.name, art.path, f"dynamic[{lo}:{hi}]", "dynamic", r.top1,
                          r.top5, r.loss, r.samples, r.avg_macs, histogram=r.histogram, gate_sgs_acc=r.gate_sgs_acc)
    spec = model.space.resolve(width or "largest")
    progress.start(f"evaluating {model.space.label(spec)} on {data.info.name}", len(data.val))
    r = evaluate(model, data.val, spec, dev, progress=progress)
    progress.finish()
    m = count_subnet(model, spec, data.input_size)
    return EvalReport(model.model_name, data.info.name, art.path, model.space.label(spec), width_label(m.width),
                      r.top1, r.top5, r.loss, r.samples, m.macs, params=m.params)
