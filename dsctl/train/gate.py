"""Stage II: gate training with the supernet frozen (DESIGN.md section 6), and dynamic evaluation.

Per step: the window's members run sliced (no gradient); sandwich gate sparsification (SGS) gives each
sample a target (the window's smallest if it is right, else the window's largest); the loss is
``task_weight * CE(routed output) + sgs_weight * CE(gate logits, SGS target) + complexity``, where the
routed output goes through straight-through Gumbel-softmax and the complexity term is computed from
the expected MACs under the gate's probabilities:

* ``authors``: ``complexity_weight * (E[MACs] / 1e9)^2`` (the papers' 0.5 x (MMACs/1000)^2 at weight 0.5);
* ``target``: ``complexity_weight * max(0, E[MACs] / target - 1)^2``, only above a MACs target;
* ``none``.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.checkpoint import load_checkpoint, save_checkpoint
from dsctl.config import GateConfig, OptimConfig
from dsctl.dynamic import average_macs, forward_routed, gate_logits, grouped_post
from dsctl.errors import DsctlError
from dsctl.models.base import Supernet
from dsctl.train.common import (
    Dist, all_reduce_sum, autocast, build_training, get_rng_state, set_rng_state,
)
from dsctl.train.data import TrainData
from dsctl.train.loop import Position, run_epochs
from dsctl.train.progress import LogProgress, Progress
from dsctl.train.run import RunDir, StopFlag, environment

__all__ = ["sgs_targets", "complexity_loss", "DynamicEval", "evaluate_dynamic", "GateResult", "train_gate"]

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
    return cfg.complexity_weight * F.relu(expected_macs / (cfg.target_macs_m * 1e6) - 1.0) ** 2


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
                     route_macs: list[int], gate_macs: int, amp: bool = False) -> DynamicEval:
    """Real dynamic inference (argmax routing, grouped sliced sub-networks) over ``loader``."""
    model.eval()
    lo, hi = window
    k = model.space.num_subnets
    hist = torch.zeros(k, dtype=torch.float64)
    c1 = c5 = loss_sum = n = sgs_right = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(device, amp):  # one pass to the gate serves the routed groups and the SGS reference
            point = model.forward_pre(x, model.space.subnets[lo], encode=True)
            routes = gate_logits(model, point.encoding, window).argmax(-1) + lo
            logits = grouped_post(model, point.features, routes)
            smallest = model.forward_post(point.features, model.space.subnets[lo])
        logits = logits.float()
        hist += torch.bincount(routes.cpu(), minlength=k).double()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), 1).indices
        c1 += float((top[:, 0] == y).sum())
        c5 += float((top == y[:, None]).any(1).sum())
        sgs_right += float((sgs_targets(smallest.float(), y, hi - lo + 1) + lo == routes).sum())
        n += y.numel()
    c1, c5, loss_sum, n, sgs_right, *counts = all_reduce_sum([c1, c5, loss_sum, n, sgs_right, *hist.tolist()], device)
    histogram = [int(c) for c in counts]
    return DynamicEval(100 * c1 / n, 100 * c5 / n, loss_sum / n, int(n), histogram,
                       average_macs(histogram, route_macs, gate_macs), 100 * sgs_right / n)


@dataclass
class GateResult:
    run_dir: str
    window: tuple[int, int]
    final: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0


def train_gate(model: Supernet, data: TrainData, cfg: GateConfig, optim: OptimConfig, run: RunDir, *,
               window: tuple[int, int], route_macs: list[int], gate_macs: int, device: torch.device,
               dist: Dist = Dist(), seed: int = 0, recipe: dict[str, Any] | None = None, source: str = "",
               resume: bool = False, progress: Progress | None = None, stop: StopFlag | None = None) -> GateResult:
    """Train the slimming head of ``model``'s gate over ``window``; the supernet and its BN stay frozen.

    ``route_macs`` are the MACs of every indexed sub-network (absolute index), ``gate_macs`` the gate's own.
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
    window_macs = torch.tensor(route_macs[lo : hi + 1], dtype=torch.float32, device=device)
    rng = random.Random(seed)
    pos = Position()
    if resume and run.last.is_file():
        ckpt = load_checkpoint(run.last, map_location=device)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(rng, ckpt["rng"])
        pos = Position.from_checkpoint(ckpt)
    running: dict[str, float] = {}

    def step(batch_idx: int, x: Tensor, y: Tensor) -> dict[str, float] | None:
        x, y = x.to(device), y.to(device)
        model.eval()  # BN statistics stay frozen
        with autocast(device, optim.amp):
            out = forward_routed(model, x, window, window_macs, tau=cfg.tau)
        targets = sgs_targets(out.member_logits[0], y, hi - lo + 1)
        task = F.cross_entropy(out.logits, y)
        sgs = F.cross_entropy(out.gate_logits, targets)
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
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step_update(pos.global_step + 1)
        return dict(running)

    def evaluate_epoch(epoch: int) -> list[dict[str, Any]]:
        r = evaluate_dynamic(model, data.val, window, device, route_macs=route_macs, gate_macs=gate_macs, amp=optim.amp)
        return [{"model": f"dynamic[{lo}:{hi}]", "top1": round(r.top1, 3), "top5": round(r.top5, 3),
                 "loss": round(r.loss, 5), "avg_macs": round(r.avg_macs), "gate_sgs_acc": round(r.gate_sgs_acc, 2),
                 "histogram": " ".join(str(c) for c in r.histogram[lo : hi + 1])}]

    def payload(p: Position, completed: bool) -> dict[str, Any]:
        return {
            "kind": "gate", "model_name": model.model_name, "model_kwargs": model.model_kwargs,
            "space": model.space.to_dict(), "state_dict": model.state_dict(), "window": [lo, hi],
            "route_macs": list(route_macs), "gate_macs": gate_macs, "input_size": data.input_size,
            "supernet": source, "recipe": recipe or {}, "calibrated": True, "data_info": asdict(data.info),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": get_rng_state(rng),
            "position": p.to_dict(), "best_score": p.best, "completed": completed,
        }

    def save(path, p: Position, completed: bool) -> None:
        if dist.main:
            save_checkpoint(path, payload(p, completed))

    pos = run_epochs(data=data, run=run, pos=pos, epochs=epochs, steps_per_epoch=steps, grad_accum=optim.grad_accum,
                     seed=seed, step=step, evaluate=evaluate_epoch, save=save, score=lambda rows: rows[0]["top1"],
                     progress=progress, stop=stop)
    r = evaluate_dynamic(model, data.val, window, device, route_macs=route_macs, gate_macs=gate_macs, amp=optim.amp)
    final = {"window": [lo, hi], "top1": round(r.top1, 3), "top5": round(r.top5, 3), "loss": round(r.loss, 5),
             "avg_macs": round(r.avg_macs), "gate_macs": gate_macs, "histogram": r.histogram,
             "gate_sgs_acc": round(r.gate_sgs_acc, 2), "complexity": cfg.complexity,
             "target_macs_m": cfg.target_macs_m, "complexity_weight": cfg.complexity_weight}
    if dist.main:
        final_payload = payload(pos, True)
        for key in ("optimizer", "scheduler", "rng"):
            final_payload.pop(key)
        final_payload["final"] = final
        save_checkpoint(run.final, final_payload)
    elapsed = time.monotonic() - t0
    run.write_json("summary.json", {"kind": "gate", "model": model.model_name, "supernet": source, "epochs": epochs,
                                    "elapsed_s": round(elapsed, 1), "environment": environment(device),
                                    "data": asdict(data.info), "final": final})
    return GateResult(str(run.path), window, final, elapsed)

