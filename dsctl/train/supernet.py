"""Stage I: supernet training with the sandwich rule and in-place bootstrapping (DESIGN.md section 5).

Per optimizer step, on one mini-batch: the largest network on the labels (label smoothing), ``n`` random
sub-networks (by default from the interior: neither the smallest nor the largest) and the smallest on a
mix of the labels and soft targets (``ib``: the EMA teacher's largest; ``eib``: the smallest gets the
mean of the teacher's largest and random predictions; ``id``: the online largest; ``none``: labels only;
``mvco``: multi-view consistency, ``ib`` with two augmented views per image, the students on view A and
the EMA teacher on view B), backward after each member, then one optimizer step and one EMA update.

The soft targets' weight ``a`` in ``(1 - a) * CE(labels) + a * CE(soft)`` ramps from 0 to
``distill_weight`` over the first ``distill_ramp`` of the steps (:func:`distill_alpha`): distilling
toward a teacher that is not trained yet wrecks short schedules (measured: docs/design.md).

Example:
    >>> recipe = load_recipe("recipes/quick/fashion_mnist_ds_resnet.yaml")
    >>> model = build_model(recipe.model.name, num_classes=10, in_chans=1)
    >>> ctx = RunContext(RunDir("runs/x"), build_run_data(recipe.data), seed=recipe.seed)
    >>> result = train_supernet(model, ctx, recipe.supernet, recipe.optim)
"""

from __future__ import annotations

import logging
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.artifacts import SubnetRow, SupernetArtifact
from dsctl.config import OptimConfig, SupernetConfig
from dsctl.data.resumable import TwoViews
from dsctl.flops import MacsReport, gate_macs
from dsctl.models.base import Supernet
from dsctl.spec import SliceSpec
from dsctl.train.calibrate import recalibrate_bn
from dsctl.train.common import EvalResult, autocast, evaluate, soft_cross_entropy, unwrap
from dsctl.train.data import TrainData
from dsctl.train.progress import Progress
from dsctl.train.timing import PhaseClock, RunTime
from dsctl.train.trainer import RunContext, Trainer, sync_batchnorm

logger = logging.getLogger(__name__)

__all__ = ["SupernetResult", "SupernetTrainer", "train_supernet", "sandwich_step", "distill_alpha", "sample_members",
           "finalize_supernet", "subnet_table"]


@dataclass
class SupernetResult:
    run_dir: str
    epochs: int
    subnets: list[SubnetRow] = field(default_factory=list)
    elapsed_s: float = 0.0
    bn_recalibrated: bool = True  # False for families without BatchNorm (nothing to recalibrate)
    time: RunTime | None = None  # where the time went (also in summary.json)


def sandwich_step(model: nn.Module, teacher: nn.Module | None, x: Tensor | tuple[Tensor, Tensor], y: Tensor,
                  specs: list[SliceSpec], cfg: SupernetConfig, *, device: torch.device, amp: bool,
                  loss_scale: float = 1.0, sync_last: bool = True, alpha: float = 1.0,
                  clock: PhaseClock | None = None) -> dict[str, float]:
    """Forward and backward every sandwich member on one batch; returns each member's loss.

    ``specs`` is ``[largest, random..., smallest]``. With multi-view consistency (``cfg.two_views``) ``x``
    is a pair of views of the same images: every member (students and the largest) sees the first, the
    EMA teacher the second, so each student is distilled toward the teacher's prediction on the other view. ``sync_last=False`` keeps DDP from reducing gradients
    (gradient accumulation). ``alpha`` is the soft targets' weight for the students (the rest on the
    labels). Gradients are accumulated into ``.grad``; the caller steps the optimizer. ``clock`` times the
    teacher's forward (``teacher``) and the backward passes (``backward``).
    """
    if cfg.two_views and not isinstance(x, tuple | list):
        raise ValueError("multi-view consistency needs two views per image: x = (view_a, view_b)")
    clock = clock or PhaseClock()  # nobody reads a throwaway clock
    x_student, x_teacher = (x if isinstance(x, tuple | list) else (x, x))
    largest, *randoms, smallest = specs
    targets: dict[str, Tensor] = {}
    if cfg.target in ("ib", "eib", "mvco") and teacher is not None and alpha > 0:
        with clock.phase("teacher"), torch.no_grad(), autocast(device, amp):
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
            with clock.phase("backward"):
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


class SupernetTrainer(Trainer):
    """Stage I on the trainer skeleton: sandwich members per step, EMA teacher, BN recalibration at the end."""

    mixes = True

    artifact_type = SupernetArtifact
    ddp_options: ClassVar[dict[str, Any] | None] = {"broadcast_buffers": False}  # BN statistics stay per rank

    def __init__(self, model: Supernet, ctx: RunContext, cfg: SupernetConfig, optim: OptimConfig) -> None:
        super().__init__(ctx, optim)
        self.model, self.cfg = model.to(ctx.device), cfg
        for p in model.routing_parameters():  # stage I never trains the slimming decision
            p.requires_grad_(False)
        self.ema = None
        if cfg.ema_decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
            self.ema.module.eval()
        self.eval_every, self.checkpoint_every = cfg.eval_every, cfg.checkpoint_every
        self.dataset = TwoViews(ctx.data.train) if cfg.two_views else ctx.data.train
        self.specs: list[SliceSpec] = []

    def restore(self, last: SupernetArtifact) -> None:
        self.model.load_state_dict(last.state_dict)
        if self.ema is not None and last.ema_state_dict is not None:
            self.ema.module.load_state_dict(last.ema_state_dict)

    def training(self) -> AbstractContextManager:
        return sync_batchnorm(self.model, self.cfg.sync_bn and self.ctx.dist.enabled)

    def alpha(self) -> float:
        """The soft targets' weight at the current optimizer step."""
        return distill_alpha(self.pos.global_step, self.epochs * self.steps, self.cfg.distill_weight,
                             self.cfg.distill_ramp)

    def backward(self, x, y: Tensor, *, first: bool, last: bool) -> dict[str, float]:
        if first:
            self.model.train()
            self.specs = sample_members(self.model.space, self.rng, self.cfg.num_random, self.cfg.sample)
        losses = sandwich_step(self.train_model, self.ema.module if self.ema else None, x, y, self.specs, self.cfg,
                               device=self.ctx.device, amp=self.optim.amp, loss_scale=1.0 / self.optim.grad_accum,
                               sync_last=last, alpha=self.alpha(), clock=self.clock)
        return {"loss_largest": losses["largest"], "loss_smallest": losses["smallest"]}

    def after_step(self) -> None:
        if self.ema is not None:
            with self.clock.phase("ema"):
                self.ema.update(self.model, step=self.pos.global_step + 1)

    def step_metrics(self) -> dict[str, float]:
        return {"lr": self.lr, "alpha": self.alpha()}

    def evaluate(self, epoch: int) -> list[dict[str, Any]]:
        rows, space = [], self.model.space
        for spec in (space.smallest(), space.largest()):
            r = evaluate(self.model, self.ctx.data.val, spec, self.ctx.device, amp=self.optim.amp)
            rows.append({"subnet": space.label(spec), "width": _width(self.model, spec), "top1": round(r.top1, 3),
                         "top5": round(r.top5, 3), "loss": round(r.loss, 5), "lr": self.lr})
        return rows

    def artifact(self, completed: bool, **fields: Any) -> SupernetArtifact:
        ema = self.ema.module.state_dict() if self.ema is not None else None
        return SupernetArtifact.from_model(self.model, recipe=self.ctx.recipe, data_info=self.ctx.data.info,
                                           completed=completed, ema_state_dict=ema, **fields)

    def finish(self) -> SupernetResult:
        final_model = self.ema.module if self.ema is not None else self.model
        subnets = finalize_supernet(final_model, self.ctx, self.cfg, amp=self.optim.amp)
        timing = self.write_summary("supernet", [r.to_row() for r in subnets])
        return SupernetResult(str(self.ctx.run.path), self.epochs, subnets, timing.elapsed_s,
                              self.model.needs_bn_calibration, timing)


def train_supernet(model: Supernet, ctx: RunContext, cfg: SupernetConfig, optim: OptimConfig) -> SupernetResult:
    """Train ``model`` in ``ctx.run``; resumable at any optimizer step; ends with BN recalibration and a table.

    Raises:
        TrainingInterrupted: ``ctx.stop`` was set (SIGINT/SIGTERM); ``last.pt`` holds the exact resume point.
    """
    return SupernetTrainer(model, ctx, cfg, optim).fit()


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
    specs = space.all_specs()
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


def finalize_supernet(model: Supernet, ctx: RunContext, cfg: SupernetConfig, *, amp: bool = False) -> list[SubnetRow]:
    """Recalibrate BN per sub-network (families without BatchNorm skip it), evaluate every one, write final.pt
    and subnets.csv."""
    model, data = unwrap(model), ctx.data
    used = 0
    if model.needs_bn_calibration:
        ctx.progress.start("recalibrating BN", 1)
        used = recalibrate_bn(model, data, seed=ctx.seed, device=ctx.device, num_batches=cfg.calib_batches, amp=amp)
        ctx.progress.advance(1)
        ctx.progress.finish(f"BN recalibrated on {used} batches per sub-network")
    else:
        logger.info("%s has no BatchNorm: nothing to recalibrate", model.model_name)
    rows = subnet_table(model, data, ctx.device, amp=amp, input_size=data.input_size, progress=ctx.progress)
    if ctx.dist.main:
        SupernetArtifact.from_model(
            model, recipe=ctx.recipe, data_info=data.info, calibrated=used > 0 or not model.needs_bn_calibration,
            calib_batches=used, subnets=tuple(rows), gate_macs=gate_macs(model, data.input_size)).save(ctx.run.final)
        ctx.run.write_csv("subnets.csv", [r.to_row() for r in rows])
    return rows
