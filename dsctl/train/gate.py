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
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.artifacts import GateArtifact, GateReport, RouteCosts, read_artifact
from dsctl.config import GateConfig, OptimConfig
from dsctl.dynamic import forward_routed, gate_logits
from dsctl.routing import Calibration, calibrate_offsets, class_weights, gate_targets, member_correct
from dsctl.errors import DsctlError
from dsctl.evaluation import evaluate_dynamic
from dsctl.models.base import Supernet
from dsctl.train.common import (
    Dist, autocast, build_training, get_rng_state, set_rng_state,
)
from dsctl.train.data import TrainData
from dsctl.train.loop import Position, run_epochs
from dsctl.train.progress import LogProgress, Progress
from dsctl.train.run import RunDir, StopFlag, environment

__all__ = ["sgs_targets", "complexity_loss", "calibrate_gate", "GateResult", "train_gate"]

logger = logging.getLogger(__name__)


def sgs_targets(smallest_logits: Tensor, labels: Tensor, window_size: int) -> Tensor:
    """Sandwich gate sparsification: index 0 (window's smallest) where it is right, else the largest."""
    right = smallest_logits.argmax(-1) == labels
    return torch.where(right, torch.zeros_like(labels), torch.full_like(labels, window_size - 1))


def complexity_loss(expected_macs: Tensor, cfg: GateConfig) -> Tensor:
    if cfg.complexity == "none" or cfg.complexity_weight == 0:
        return expected_macs.new_zeros(())
    if cfg.complexity == "authors":
        return cfg.complexity_weight * (expected_macs / 1e9) ** 2
    if cfg.target_macs_m is None:
        raise DsctlError("gate.complexity='target' needs gate.target_macs_m (or --target-macs)")
    return cfg.complexity_weight * (expected_macs / (cfg.target_macs_m * 1e6) - 1.0) ** 2


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


def calibrate_gate(model: Supernet, loader, window: tuple[int, int], device: torch.device, *, route_macs: list[int],
                   gate_macs: int, target_macs: float, tolerance: float = 0.02, amp: bool = False) -> Calibration:
    """Fit the decision offsets on held-out data so the average MACs (gate included) meet ``target_macs``,
    and store them in ``model.gate.route_bias`` (zero outside the window)."""
    lo, hi = window
    logits = window_logits(model, loader, window, device, amp=amp)
    cal = calibrate_offsets(logits, [float(m) for m in route_macs[lo : hi + 1]], target_macs - gate_macs,
                            tolerance=tolerance)
    bias = torch.zeros_like(model.gate.route_bias)
    bias[lo : hi + 1] = torch.tensor(cal.offsets, dtype=bias.dtype)
    model.gate.route_bias.copy_(bias)
    if not cal.met:
        logger.warning("decision calibration reached %.4gM routed MACs on %d held-out samples for a %.4gM target "
                       "(%+.1f%%): the gate's scores do not separate the samples finely enough",
                       cal.avg_macs / 1e6, cal.samples, cal.target_macs / 1e6, 100 * cal.error)
    return cal


@dataclass
class GateResult:
    run_dir: str
    window: tuple[int, int]
    final: GateReport
    elapsed_s: float = 0.0


def train_gate(model: Supernet, data: TrainData, cfg: GateConfig, optim: OptimConfig, run: RunDir, *,
               window: tuple[int, int], route_macs: list[int], gate_macs: int, device: torch.device,
               dist: Dist = Dist(), seed: int = 0, recipe: dict[str, Any] | None = None, source: str = "",
               resume: bool = False, progress: Progress | None = None, stop: StopFlag | None = None,
               holdout=None) -> GateResult:
    """Train the slimming head of ``model``'s gate over ``window``; the supernet and its BN stay frozen.

    ``route_macs`` are the MACs of every indexed sub-network (absolute index), ``gate_macs`` the gate's own.
    ``holdout`` (a loader over training samples the gate never trains on) serves the decision
    calibration when ``cfg.decision == "calibrated"`` and a MACs target is set.

    Raises:
        DsctlError: the MACs target lies outside what the window can spend, or calibration lacks data.
    """
    progress = progress or LogProgress()
    stop = stop if stop is not None else StopFlag()
    t0 = time.monotonic()
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = model.routing_parameters()
    for p in trainable:
        p.requires_grad_(True)
    optimizer, scheduler, epochs, steps = build_training(nn.ParameterList(trainable), optim, data.steps_per_epoch())
    lo, hi = window
    calibrate = cfg.decision == "calibrated" and cfg.target_macs_m is not None
    if cfg.target_macs_m is not None:
        target = cfg.target_macs_m * 1e6
        low, high = route_macs[lo] + gate_macs, route_macs[hi] + gate_macs
        if not low <= target <= high:
            raise DsctlError(f"gate.target_macs_m={cfg.target_macs_m:g} is outside what window {lo}:{hi} can spend "
                             f"(allowed: {low / 1e6:.4g}..{high / 1e6:.4g}, the gate's own MACs included)")
    if calibrate and holdout is None:
        raise DsctlError("gate.decision='calibrated' needs held-out training data (gate.holdout)")
    window_macs = torch.tensor(route_macs[lo : hi + 1], dtype=torch.float32, device=device)
    rng = random.Random(seed)
    pos = Position()
    if resume and run.last.is_file():
        last = read_artifact(run.last, GateArtifact, map_location=device, why="--resume")
        state = last.require_training()
        model.load_state_dict(last.state_dict)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        set_rng_state(rng, state.rng)
        pos = Position.from_state(state)
    running: dict[str, float] = {}
    calibration: Calibration | None = None

    def step(batch_idx: int, x: Tensor, y: Tensor) -> dict[str, float] | None:
        x, y = x.to(device), y.to(device)
        model.eval()  # BN statistics stay frozen
        with autocast(device, optim.amp):
            out = forward_routed(model, x, window, window_macs, tau=cfg.tau)
        targets = gate_targets(member_correct(out.member_logits, y), cfg.sgs_target)
        weight = class_weights(targets, hi - lo + 1) if cfg.class_weighting else None
        task = F.cross_entropy(out.logits, y)
        sgs = F.cross_entropy(out.gate_logits, targets, weight=weight)
        cplx = complexity_loss(out.expected_macs, cfg)
        loss = cfg.task_weight * task + cfg.sgs_weight * sgs + cplx
        (loss / optim.grad_accum).backward()
        for k, v in (("task", task), ("sgs", sgs), ("macs_m", out.expected_macs / 1e6)):
            value = float(v.detach())
            running[k] = 0.9 * running.get(k, value) + 0.1 * value
        if batch_idx % optim.grad_accum != optim.grad_accum - 1:
            return None
        if dist.enabled:
            for p in trainable:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(dist.world)
        if optim.clip_grad:
            nn.utils.clip_grad_norm_(trainable, optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step_update(pos.global_step + 1)
        return dict(running)

    def evaluate_epoch(epoch: int) -> list[dict[str, Any]]:
        r = evaluate_dynamic(model, data.val, window, device, route_macs=route_macs, gate_macs=gate_macs, amp=optim.amp,
                             rule=cfg.sgs_target)
        return [{"model": f"dynamic[{lo}:{hi}]", "top1": round(r.top1, 3), "top5": round(r.top5, 3),
                 "loss": round(r.loss, 5), "avg_macs": round(r.avg_macs), "gate_sgs_acc": round(r.gate_sgs_acc, 2),
                 "histogram": " ".join(str(c) for c in r.histogram[lo : hi + 1])}]

    def artifact(completed: bool, **fields: Any) -> GateArtifact:
        return GateArtifact.from_model(model, window=(lo, hi), costs=RouteCosts(tuple(route_macs), gate_macs),
                                       supernet=source, recipe=recipe or {}, data_info=data.info, completed=completed,
                                       **fields)

    def save(path, p: Position, completed: bool) -> None:
        if dist.main:
            artifact(completed, training=p.training_state(optimizer, scheduler, get_rng_state(rng))).save(path)

    pos = run_epochs(data=data, run=run, pos=pos, epochs=epochs, steps_per_epoch=steps, grad_accum=optim.grad_accum,
                     seed=seed, step=step, evaluate=evaluate_epoch, save=save, score=lambda rows: rows[0]["top1"],
                     progress=progress, stop=stop)
    if calibrate:
        progress.start("calibrating the decision rule on held-out data", 1)
        calibration = calibrate_gate(model, holdout, window, device, route_macs=route_macs, gate_macs=gate_macs,
                                     target_macs=cfg.target_macs_m * 1e6, tolerance=cfg.budget_tolerance,
                                     amp=optim.amp)
        progress.advance(1)
        progress.finish(f"held-out routed MACs {calibration.avg_macs / 1e6:.4g}M for a "
                        f"{calibration.target_macs / 1e6:.4g}M target ({100 * calibration.error:+.2f}%)")
    r = evaluate_dynamic(model, data.val, window, device, route_macs=route_macs, gate_macs=gate_macs, amp=optim.amp,
                         rule=cfg.sgs_target)
    final = GateReport(window=(lo, hi), top1=round(r.top1, 3), top5=round(r.top5, 3), loss=round(r.loss, 5),
                       avg_macs=round(r.avg_macs), gate_macs=gate_macs, histogram=tuple(r.histogram),
                       gate_sgs_acc=round(r.gate_sgs_acc, 2), complexity=cfg.complexity,
                       target_macs_m=cfg.target_macs_m, complexity_weight=cfg.complexity_weight,
                       sgs_target=cfg.sgs_target, decision="calibrated" if calibration is not None else "argmax",
                       calibration=calibration)
    if dist.main:
        artifact(True, final=final).save(run.final)
    elapsed = time.monotonic() - t0
    run.write_json("summary.json", {"kind": "gate", "model": model.model_name, "supernet": source, "epochs": epochs,
                                    "elapsed_s": round(elapsed, 1), "environment": environment(device),
                                    "data": asdict(data.info), "final": final.to_dict()})
    return GateResult(str(run.path), window, final, elapsed)

