"""Stage I: supernet training with the sandwich rule and in-place bootstrapping (DESIGN.md section 5).

Per optimizer step, on one mini-batch: the largest network on the labels (label smoothing), ``n`` random
sub-networks (by default from the interior: neither the smallest nor the largest) and the smallest on a
mix of the labels and soft targets (``ib``: the EMA teacher's largest; ``eib``: the smallest gets the
mean of the teacher's largest and random predictions; ``id``: the online largest; ``none``: labels only),
backward after each member, then one optimizer step and one EMA update.

The soft targets' weight ``a`` in ``(1 - a) * CE(labels) + a * CE(soft)`` ramps from 0 to
``distill_weight`` over the first ``distill_ramp`` of the steps (:func:`distill_alpha`): distilling
toward a teacher that is not trained yet wrecks short schedules (measured: docs/design.md).

Example:
    >>> recipe = load_recipe("recipes/quick/fashion_mnist_ds_resnet.yaml")
    >>> model = build_model(recipe.model.name, num_classes=10, in_chans=1)
    >>> data = build_train_data(recipe.data)
    >>> result = train_supernet(model, data, recipe.supernet, recipe.optim, RunDir("runs/x"))
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.artifacts import SubnetRow, SupernetArtifact, read_artifact
from dsctl.config import OptimConfig, SupernetConfig
from dsctl.data.resumable import TwoViews
from dsctl.flops import MacsReport, gate_macs
from dsctl.layers.slim import SlimBatchNorm2d
from dsctl.models.base import Supernet
from dsctl.spec import SliceSpec
from dsctl.train.calibrate import recalibrate_bn
from dsctl.train.common import (
    Dist, EvalResult, autocast, build_training, evaluate, get_rng_state, set_rng_state, soft_cross_entropy, unwrap,
)
from dsctl.train.data import TrainData
from dsctl.train.progress import LogProgress, Progress
from dsctl.train.loop import Position, run_epochs
from dsctl.train.run import RunDir, StopFlag, environment

__all__ = ["SupernetResult", "train_supernet", "sandwich_step", "distill_alpha", "sample_members", "finalize_supernet",
           "subnet_table"]

logger = logging.getLogger(__name__)


@dataclass
class SupernetResult:
    run_dir: str
    epochs: int
    subnets: list[SubnetRow] = field(default_factory=list)
    elapsed_s: float = 0.0


def sandwich_step(model: nn.Module, teacher: nn.Module | None, x: Tensor | tuple[Tensor, Tensor], y: Tensor,
                  specs: list[SliceSpec], cfg: SupernetConfig, *, device: torch.device, amp: bool,
                  loss_scale: float = 1.0, sync_last: bool = True, alpha: float = 1.0) -> dict[str, float]:
    """Forward and backward every sandwich member on one batch; returns each member's loss.

    ``specs`` is ``[largest, random..., smallest]``. With multi-view consistency ``x`` is a pair of views:
    students see the first, the teacher the second. ``sync_last=False`` keeps DDP from reducing gradients
    (gradient accumulation). ``alpha`` is the soft targets' weight for the students (the rest on the
    labels). Gradients are accumulated into ``.grad``; the caller steps the optimizer.
    """
    x_student, x_teacher = (x if isinstance(x, tuple | list) else (x, x))
    largest, *randoms, smallest = specs
    targets: dict[str, Tensor] = {}
    if cfg.target in ("ib", "eib") and teacher is not None and alpha > 0:
        with torch.no_grad(), autocast(device, amp):
            targets["largest"] = F.softmax(teacher(x_teacher, largest).float(), -1)
            if cfg.target == "eib":
                preds = [targets["largest"]] + [F.softmax(teacher(x_teacher, s).float(), -1) for s in randoms]
                targets["ensemble"] = torch.stack(preds).mean(0)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    losses: dict[str, float] = {}
    members = [("largest", largest)] + [(f"random{i}", s) for i, s in enumerate(randoms)] + [("smallest", smallest)]
    for i, (name, spec) in enumerate(members):
        last = i == len(members) - 1
        ctx = model.no_sync() if ddp and not (last and sync_last) else nullcontext()
        with ctx:
            with autocast(device, amp):
                logits = model(x_student, spec).float()
            hard = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if name == "largest":
                loss = hard
                if cfg.target == "id":
                    targets["largest"] = F.softmax(logits.detach(), -1)
            elif cfg.target == "none" or "largest" not in targets or alpha == 0:
                loss = hard
            else:
                soft = targets["ensemble"] if name == "smallest" and cfg.target == "eib" else targets["largest"]
                loss = soft_cross_entropy(logits, soft) if alpha == 1 else (
                    (1 - alpha) * hard + alpha * soft_cross_entropy(logits, soft))
            (loss * loss_scale).backward()
        losses[name] = float(loss.detach())
    return losses


def sample_members(space, rng: random.Random, num_random: int, how: str = "interior") -> list[SliceSpec]:
    """Sandwich members ``[largest, random..., smallest]``; ``interior`` draws the random ones from the
    indexed sub-networks strictly between the smallest and the largest (all of them if there are none)."""
    pool = [s for s in space.subnets if s not in (space.smallest(), space.largest())] if how == "interior" else []
    pool = pool or list(space.subnets)
    return [space.largest(), *(pool[rng.randrange(len(pool))] for _ in range(num_random)), space.smallest()]


def distill_alpha(step: int, total_steps: int, weight: float, ramp: float) -> float:
    """Weight of the soft targets at optimizer step ``step`` (0-based) of ``total_steps``."""
    if ramp <= 0 or total_steps <= 0:
        return weight
    return weight * min(1.0, step / (ramp * total_steps))


def train_supernet(model: Supernet, data: TrainData, cfg: SupernetConfig, optim: OptimConfig, run: RunDir, *,
                   device: torch.device = torch.device("cpu"), dist: Dist = Dist(), seed: int = 0,
                   recipe: dict[str, Any] | None = None, resume: bool = False, progress: Progress | None = None,
                   stop: StopFlag | None = None) -> SupernetResult:
    """Train ``model`` in ``run``; resumable at any optimizer step; ends with BN recalibration and a table.

    Raises:
        TrainingInterrupted: ``stop`` was set (SIGINT/SIGTERM); ``run/last.pt`` holds the exact resume point.
    """
    progress = progress or LogProgress()
    stop = stop if stop is not None else StopFlag()
    t0 = time.monotonic()
    model.to(device)
    for p in model.routing_parameters():  # stage I never trains the slimming decision
        p.requires_grad_(False)
    optimizer, scheduler, epochs, steps = build_training(model, optim, data.steps_per_epoch())
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
        ema.module.eval()
    rng = random.Random(seed)
    pos = Position()
    if resume and run.last.is_file():
        last = read_artifact(run.last, SupernetArtifact, map_location=device, why="--resume")
        state = last.require_training()
        model.load_state_dict(last.state_dict)
        if ema is not None and last.ema_state_dict is not None:
            ema.module.load_state_dict(last.ema_state_dict)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        set_rng_state(rng, state.rng)
        pos = Position.from_state(state)
        logger.info("resuming %s at epoch %d, batch %d", run.path, pos.epoch + 1, pos.batch)
    train_model: nn.Module = model
    if cfg.sync_bn and dist.enabled:
        for m in model.modules():
            if isinstance(m, SlimBatchNorm2d):
                m.sync = True
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    amp = optim.amp
    specs: list[SliceSpec] = []
    running: dict[str, float] = {}

    def step(batch_idx: int, x, y: Tensor) -> dict[str, float] | None:
        nonlocal specs
        micro = batch_idx % optim.grad_accum
        if micro == 0:
            model.train()
            specs = sample_members(model.space, rng, cfg.num_random, cfg.sample)
        x = tuple(v.to(device, non_blocking=True) for v in x) if isinstance(x, list | tuple) else x.to(device)
        last_micro = micro == optim.grad_accum - 1
        alpha = distill_alpha(pos.global_step, epochs * steps, cfg.distill_weight, cfg.distill_ramp)
        losses = sandwich_step(train_model, ema.module if ema else None, x, y.to(device), specs, cfg, device=device,
                               amp=amp, loss_scale=1.0 / optim.grad_accum, sync_last=last_micro, alpha=alpha)
        for k, v in losses.items():
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        if not last_micro:
            return None
        if optim.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step_update(pos.global_step + 1)
        if ema is not None:
            ema.update(model, step=pos.global_step + 1)
        return {"loss_largest": running["largest"], "loss_smallest": running["smallest"],
                "lr": optimizer.param_groups[0]["lr"], "alpha": alpha}

    def evaluate_epoch(epoch: int) -> list[dict[str, Any]]:
        rows = []
        for spec in (model.space.smallest(), model.space.largest()):
            r = evaluate(model, data.val, spec, device, amp=amp)
            rows.append({"subnet": model.space.label(spec), "width": _width(model, spec), "top1": round(r.top1, 3),
                         "top5": round(r.top5, 3), "loss": round(r.loss, 5), "lr": optimizer.param_groups[0]["lr"]})
        return rows

    def save(path, p: Position, completed: bool) -> None:
        if not dist.main:
            return
        SupernetArtifact.from_model(
            model, recipe=recipe or {}, data_info=data.info, completed=completed,
            ema_state_dict=ema.module.state_dict() if ema is not None else None,
            training=p.training_state(optimizer, scheduler, get_rng_state(rng))).save(path)

    pos = run_epochs(data=data, run=run, pos=pos, epochs=epochs, steps_per_epoch=steps, grad_accum=optim.grad_accum,
                     seed=seed, step=step, evaluate=evaluate_epoch, save=save,
                     score=lambda rows: sum(r["top1"] for r in rows) / len(rows), progress=progress, stop=stop,
                     eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                     dataset=TwoViews(data.train) if cfg.mvco else data.train)
    final_model = ema.module if ema is not None else model
    subnets = finalize_supernet(final_model, data, cfg, run, device=device, dist=dist, seed=seed, recipe=recipe,
                                amp=amp, progress=progress)
    elapsed = time.monotonic() - t0
    run.write_json("summary.json", {"kind": "supernet", "model": model.model_name, "epochs": epochs,
                                    "steps_per_epoch": steps, "global_step": pos.global_step, "elapsed_s": round(elapsed, 1),
                                    "world_size": dist.world, "environment": environment(device),
                                    "data": asdict(data.info), "final": [r.to_row() for r in subnets]})
    return SupernetResult(str(run.path), epochs, subnets, elapsed)


def _width(model: Supernet, spec: SliceSpec) -> float | str:
    return model.space.ratio(spec) if spec in model.space.subnets else "largest"


def _subnet_row(model: Supernet, spec: SliceSpec, r: EvalResult, m: MacsReport) -> SubnetRow:
    indexed = spec in model.space.subnets
    return SubnetRow(spec=spec, index=model.space.index(spec) if indexed else None,
                     width=model.space.ratio(spec) if indexed else None, macs=m.macs, params=m.params,
                     top1=round(r.top1, 3), top5=round(r.top5, 3), loss=round(r.loss, 5))


def subnet_table(model: Supernet, data: TrainData, device: torch.device, *, amp: bool = False,
                 input_size: int | None = None, progress: Progress | None = None) -> list[SubnetRow]:
    """Evaluate every indexed sub-network and the full network: spec, index, width, macs, params, top1, top5, loss."""
    from dsctl.flops import count_subnet

    space = model.space
    specs = list(space.subnets) + ([space.full] if space.full not in space.subnets else [])
    progress = progress or Progress()
    progress.start("evaluating sub-networks", len(specs))
    rows = []
    for spec in specs:
        r = evaluate(model, data.val, spec, device, amp=amp)
        m = count_subnet(model, spec, input_size)
        rows.append(_subnet_row(model, spec, r, m))
        progress.advance(1, top1=r.top1)
    progress.finish()
    return rows


def finalize_supernet(model: Supernet, data: TrainData, cfg: SupernetConfig, run: RunDir, *, device: torch.device,
                      dist: Dist = Dist(), seed: int = 0, recipe: dict[str, Any] | None = None, amp: bool = False,
                      progress: Progress | None = None) -> list[SubnetRow]:
    """Recalibrate BN per sub-network, evaluate every one, write final.pt and subnets.csv."""
    progress = progress or Progress()
    model = unwrap(model)
    progress.start("recalibrating BN", 1)
    used = recalibrate_bn(model, data, seed=seed, device=device, num_batches=cfg.calib_batches, amp=amp)
    progress.advance(1)
    progress.finish(f"BN recalibrated on {used} batches per sub-network")
    rows = subnet_table(model, data, device, amp=amp, input_size=data.input_size, progress=progress)
    if dist.main:
        SupernetArtifact.from_model(
            model, recipe=recipe or {}, data_info=data.info, calibrated=used > 0 or not model.needs_bn_calibration, calib_batches=used,
            subnets=tuple(rows), gate_macs=gate_macs(model, data.input_size)).save(run.final)
        run.write_csv("subnets.csv", [r.to_row() for r in rows])
    return rows
