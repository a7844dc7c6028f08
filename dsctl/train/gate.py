"""Stage II: gate training with the supernet frozen (DESIGN.md section 6) and decision calibration
(dynamic evaluation: :func:`dsctl.evaluation.evaluate_dynamic`).

Per step: the window's members run sliced (no gradient); their per-sample correctness gives each sample
a gate target (:func:`dsctl.routing.gate_targets`: the authors' SGS rule or the cheapest member that is
right); the loss is ``task_weight * CE(routed output) + sgs_weight * CE_w(gate logits, target) +
complexity``, with ``CE_w`` weighted by inverse target frequency (``class_weighting``), the routed output
through straight-through Gumbel-softmax and the complexity term on the expected MACs under the gate's
probabilities:

* ``authors``: ``complexity_weight * (E[MACs] / 1e9)^2`` (the papers' 0.5 x (MMACs/1000)^2 at weight 0.5);
* ``target``: ``complexity_weight * (E[MACs] / target - 1)^2``, two-sided: it pulls a cost below the
  target up as well as a cost above it down;
* ``none``.

After training, ``decision: calibrated`` fits per-route logit offsets on a held-out part of the training
data so that the average MACs spent there (gate included) equal ``target_macs_m``
(:func:`dsctl.routing.calibrate_offsets`); the offsets live in the gate's ``route_bias`` buffer, so the
checkpoint, ``dsctl eval`` and the dynamic export all route with them. ``argmax`` keeps the authors' rule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.artifacts import GateArtifact, GateReport, RouteCosts
from dsctl.config import GateConfig, OptimConfig
from dsctl.dynamic import forward_routed, gate_logits
from dsctl.routing import Calibration, calibrate_offsets, class_weights, gate_targets, member_correct
from dsctl.errors import DsctlError
from dsctl.evaluation import DynamicEval, evaluate_dynamic
from dsctl.headroom import LatencyBudget
from dsctl.models.base import Supernet
from dsctl.train.common import autocast
from dsctl.train.timing import RunTime
from dsctl.train.trainer import RunContext, Trainer

__all__ = ["sgs_targets", "complexity_loss", "calibrate_gate", "GateResult", "GateTrainer", "train_gate"]

logger = logging.getLogger(__name__)


def sgs_targets(smallest_logits: Tensor, labels: Tensor, window_size: int) -> Tensor:
    """Sandwich gate sparsification: index 0 (window's smallest) where it is right, else the largest."""
    right = smallest_logits.argmax(-1) == labels
    return torch.where(right, torch.zeros_like(labels), torch.full_like(labels, window_size - 1))


def complexity_loss(expected_macs: Tensor, cfg: GateConfig, target_macs: float | None = None) -> Tensor:
    """The gate's complexity term; ``target_macs`` (default: ``cfg.target_macs_m``) is what ``target`` pulls
    toward (a latency budget's equivalent MACs, :meth:`~dsctl.headroom.LatencyBudget.equivalent_macs`)."""
    if cfg.complexity == "none" or cfg.complexity_weight == 0:
        return expected_macs.new_zeros(())
    if cfg.complexity == "authors":
        return cfg.complexity_weight * (expected_macs / 1e9) ** 2
    if target_macs is None and cfg.target_macs_m is not None:
        target_macs = cfg.target_macs_m * 1e6
    if target_macs is None:
        raise DsctlError("gate.complexity='target' needs a budget: gate.target_macs_m (--target-macs) or "
                         "gate.target_latency_ms (--target-latency)")
    return cfg.complexity_weight * (expected_macs / target_macs - 1.0) ** 2


@torch.no_grad()
def window_logits(model: Supernet, loader, window: tuple[int, int], device: torch.device, *,
                  amp: bool = False) -> Tensor:
    """Raw gate logits over the window for every sample of ``loader``, shape (N, W), float32 on CPU."""
    model.eval()
    out = []
    for x, _ in loader:
        with autocast(device, amp):
            point = model.forward_pre(x.to(device), model.space.subnets[window[0]], encode=True)
            out.append(gate_logits(model, point.encoding, window).float().cpu())
    return torch.cat(out)


def calibrate_gate(model: Supernet, loader, window: tuple[int, int], device: torch.device, *, costs: list[float],
                   target: float, unit: str = "MACs", tolerance: float = 0.02, amp: bool = False) -> Calibration:
    """Fit the decision offsets on held-out data so the average routed cost meets ``target`` (``costs``: each
    window member's, in ``unit``: MACs without the gate's, or ms per sample for a latency budget), and store
    them in the gate (:meth:`SlimGate.set_route_bias`)."""
    logits = window_logits(model, loader, window, device, amp=amp)
    cal = calibrate_offsets(logits, [float(c) for c in costs], target, tolerance=tolerance, unit=unit)
    model.gate.set_route_bias(list(cal.offsets), window)
    if not cal.met:
        logger.warning("decision calibration reached %.4g %s per sample on %d held-out samples for a %.4g target "
                       "(%+.1f%%): the gate's scores do not separate the samples finely enough",
                       cal.achieved, unit, cal.samples, cal.target, 100 * cal.error)
    return cal


@dataclass
class GateResult:
    run_dir: str
    window: tuple[int, int]
    final: GateReport
    elapsed_s: float = 0.0
    time: RunTime | None = None  # where the time went (also in summary.json)


class GateTrainer(Trainer):
    """Stage II on the trainer skeleton: the window's members run sliced, the gate head learns to route."""

    artifact_type = GateArtifact
    ddp_options = None  # the routed forward is not ``model.forward``: gradients are all-reduced by hand

    def __init__(self, model: Supernet, ctx: RunContext, cfg: GateConfig, optim: OptimConfig, *,
                 window: tuple[int, int], costs: RouteCosts, source: str = "", holdout=None,
                 latency: LatencyBudget | None = None) -> None:
        super().__init__(ctx, optim)
        lo, hi = window
        self.model, self.cfg, self.window, self.costs, self.source = model, cfg, (lo, hi), costs, source
        self.latency = latency
        # what the complexity term pulls toward: the MACs target, or the latency budget's equivalent MACs
        self.loss_target_macs = cfg.target_macs_m * 1e6 if cfg.target_macs_m is not None else (
            latency.equivalent_macs() if latency is not None else None)
        self.holdout = holdout
        model.to(ctx.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.routing_parameters():
            p.requires_grad_(True)
        if cfg.target_macs_m is not None:
            target = cfg.target_macs_m * 1e6
            low, high = costs.route_macs[lo] + costs.gate_macs, costs.route_macs[hi] + costs.gate_macs
            if not low <= target <= high:
                raise DsctlError(f"gate.target_macs_m={cfg.target_macs_m:g} is outside what window {lo}:{hi} can "
                                 f"spend (allowed: {low / 1e6:.4g}..{high / 1e6:.4g}, the gate's own MACs included)")
        self.calibrate = cfg.decision == "calibrated" and (cfg.target_macs_m is not None or latency is not None)
        if self.calibrate and holdout is None:
            raise DsctlError("gate.decision='calibrated' needs held-out training data (gate.holdout)")
        self.window_macs = torch.tensor(costs.route_macs[lo : hi + 1], dtype=torch.float32, device=ctx.device)

    def trainable(self) -> nn.Module:
        return nn.ParameterList(self.model.routing_parameters())

    def backward(self, x: Tensor, y: Tensor, *, first: bool, last: bool) -> dict[str, float]:
        cfg, (lo, hi) = self.cfg, self.window
        self.model.eval()  # BN statistics stay frozen
        with autocast(self.ctx.device, self.optim.amp):
            out = forward_routed(self.model, x, self.window, self.window_macs, tau=cfg.tau)
        targets = gate_targets(member_correct(out.member_logits, y), cfg.sgs_target)
        weight = class_weights(targets, hi - lo + 1) if cfg.class_weighting else None
        task = F.cross_entropy(out.logits, y)
        sgs = F.cross_entropy(out.gate_logits, targets, weight=weight)
        cplx = complexity_loss(out.expected_macs, cfg, self.loss_target_macs)
        loss = cfg.task_weight * task + cfg.sgs_weight * sgs + cplx
        with self.clock.phase("backward"):
            (loss / self.optim.grad_accum).backward()
        return {k: float(v.detach()) for k, v in (("task", task), ("sgs", sgs), ("macs_m", out.expected_macs / 1e6))}

    def step_metrics(self) -> dict[str, float]:
        return {}

    def _evaluate(self) -> DynamicEval:
        return evaluate_dynamic(self.model, self.ctx.data.val, self.window, self.ctx.device,
                                route_macs=list(self.costs.route_macs), gate_macs=self.costs.gate_macs,
                                amp=self.optim.amp, rule=self.cfg.sgs_target)

    def evaluate(self, epoch: int) -> list[dict[str, Any]]:
        r, (lo, hi) = self._evaluate(), self.window
        return [{"model": f"dynamic[{lo}:{hi}]", "top1": round(r.top1, 3), "top5": round(r.top5, 3),
                 "loss": round(r.loss, 5), "avg_macs": round(r.avg_macs), "gate_sgs_acc": round(r.gate_sgs_acc, 2),
                 "histogram": " ".join(str(c) for c in r.histogram[lo : hi + 1])}]

    def artifact(self, completed: bool, **fields: Any) -> GateArtifact:
        return GateArtifact.from_model(self.model, window=self.window, costs=self.costs, supernet=self.source,
                                       recipe=self.ctx.recipe, data_info=self.ctx.data.info, completed=completed,
                                       **fields)

    def finish(self) -> GateResult:
        cfg, costs, progress = self.cfg, self.costs, self.ctx.progress
        calibration: Calibration | None = None
        lo, hi = self.window
        if self.calibrate:
            progress.start("calibrating the decision rule on held-out data", 1)
            if self.latency is not None:  # per-sample ms at the deployment batch, front and gate included
                b = self.latency
                calibration = calibrate_gate(self.model, self.holdout, self.window, self.ctx.device,
                                             costs=list(b.route_ms[lo : hi + 1]), target=b.per_sample_ms, unit="ms",
                                             tolerance=cfg.budget_tolerance, amp=self.optim.amp)
                done = (f"held-out routes predict {calibration.achieved * b.batch:.4g} ms per batch of {b.batch} for "
                        f"a {b.target_ms:.4g} ms target ({100 * calibration.error:+.2f}%)")
            else:
                calibration = calibrate_gate(self.model, self.holdout, self.window, self.ctx.device,
                                             costs=list(costs.route_macs[lo : hi + 1]),
                                             target=cfg.target_macs_m * 1e6 - costs.gate_macs,
                                             tolerance=cfg.budget_tolerance, amp=self.optim.amp)
                done = (f"held-out routed MACs {calibration.achieved / 1e6:.4g}M for a "
                        f"{calibration.target / 1e6:.4g}M target ({100 * calibration.error:+.2f}%)")
            progress.advance(1)
            progress.finish(done)
        r = self._evaluate()
        latency = None
        if self.latency is not None:
            latency = {**self.latency.to_dict(), "predicted_ms": round(self.latency.predicted_ms(r.histogram), 4)}
        final = GateReport(window=self.window, top1=round(r.top1, 3), top5=round(r.top5, 3), loss=round(r.loss, 5),
                           avg_macs=round(r.avg_macs), gate_macs=costs.gate_macs, histogram=tuple(r.histogram),
                           gate_sgs_acc=round(r.gate_sgs_acc, 2), complexity=cfg.complexity,
                           target_macs_m=cfg.target_macs_m, complexity_weight=cfg.complexity_weight,
                           sgs_target=cfg.sgs_target, decision="calibrated" if calibration is not None else "argmax",
                           calibration=calibration, latency_budget=latency)
        if self.ctx.dist.main:
            self.artifact(True, final=final).save(self.ctx.run.final)
        timing = self.write_summary("gate", final.to_dict(), supernet=self.source)
        return GateResult(str(self.ctx.run.path), self.window, final, timing.elapsed_s, timing)


def train_gate(model: Supernet, ctx: RunContext, cfg: GateConfig, optim: OptimConfig, *, window: tuple[int, int],
               costs: RouteCosts, source: str = "", holdout=None, latency: LatencyBudget | None = None) -> GateResult:
    """Train the slimming head of ``model``'s gate over ``window``; the supernet and its BN stay frozen.

    ``costs`` are the MACs of every indexed sub-network (absolute index) and of the gate; ``source`` is the
    supernet checkpoint (recorded in the artifact). ``holdout`` (a loader over training samples the gate
    never trains on) serves the decision calibration when ``cfg.decision == "calibrated"`` and a MACs
    target is set, or ``latency`` (a latency budget, :func:`dsctl.headroom.latency_budget`): then the decision
    is calibrated on the budget's per-sample times and the complexity term pulls toward its equivalent MACs.

    Raises:
        DsctlError: the MACs target lies outside what the window can spend, or calibration lacks data.
        TrainingInterrupted: ``ctx.stop`` was set; ``last.pt`` holds the exact resume point.
    """
    return GateTrainer(model, ctx, cfg, optim, window=window, costs=costs, source=source, holdout=holdout,
                       latency=latency).fit()
