"""The trainer skeleton: one run of any trainer, from resume point to summary.

A :class:`RunContext` is what a run takes from its surroundings (run folder, data, device, ranks, seed,
recipe, resume, progress, stop); :func:`dsctl.train.launch.prepare_run` builds one. :class:`Trainer`
owns what every trainer does the same way:

* the optimizer and scheduler over the trainable parameters, and the resume from ``last.pt`` (weights,
  optimizer, scheduler, RNGs, :class:`Position` with the smoothed training losses);
* the optimizer step: gradient accumulation, gradients reduced across ranks (by DDP or by hand),
  gradient clipping, ``scheduler.step_update``;
* the epoch loop: resumable data order, progress, interruption, the NaN check, evaluation, metrics.csv,
  then ``best.pt``, then ``last.pt``.

A trainer supplies what differs: the module it trains, the per-batch loss (:meth:`Trainer.backward`),
the per-epoch evaluation rows, its artifact and the final step. Example (what ``train_static`` does)::

    ctx = RunContext(RunDir("runs/x"), data)
    net, report = StaticTrainer(net, ctx, optim, cut_from=supernet, meta=meta).fit()
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dsctl.artifacts import Artifact, TrainingState, read_artifact
from dsctl.config import OptimConfig
from dsctl.errors import DsctlError
from dsctl.layers.slim import SlimBatchNorm2d
from dsctl.train.common import Dist, build_training, get_rng_state, set_rng_state
from dsctl.train.data import TrainData
from dsctl.train.progress import LogProgress, Progress
from dsctl.train.run import RunDir, StopFlag, TrainingInterrupted, catch_signals, environment
from dsctl.train.timing import PhaseClock, RunTime

__all__ = ["NonFiniteLoss", "Position", "RunContext", "Trainer", "sync_batchnorm"]

logger = logging.getLogger(__name__)


class NonFiniteLoss(DsctlError):
    """A training loss became NaN or infinite; the run stopped without saving the damaged weights."""


@dataclass
class RunContext:
    """What a trainer takes from its surroundings; ``recipe`` is the resolved recipe stored in checkpoints."""

    run: RunDir
    data: TrainData
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: Dist = field(default_factory=Dist)
    seed: int = 0
    recipe: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    progress: Progress = field(default_factory=LogProgress)
    stop: StopFlag = field(default_factory=StopFlag)
    tensorboard: bool = False  # live scalars to <run>/tensorboard (dsctl.train.sinks); not part of the recipe

    def sub(self, name: str) -> RunContext:
        """The same run in the sub-folder ``name`` (a phase of a multi-phase run, e.g. a baseline's ``dense``)."""
        return dataclasses.replace(self, run=RunDir(self.run / name, main=self.dist.main))


@dataclass
class Position:
    """Where a run stands: ``epoch`` (0-based, current), ``batch`` (micro-batches done in it), optimizer steps,
    the best score so far, the smoothed training values (EMA 0.9, continued by the next step) and what the
    epoch's last optimizer step showed (its rows' ``train_*`` columns)."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best: float = float("-inf")
    smoothed: dict[str, float] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)

    def smooth(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.smoothed[k] = 0.9 * self.smoothed.get(k, v) + 0.1 * v

    @classmethod
    def from_state(cls, state: TrainingState) -> Position:
        return cls(state.epoch, state.batch, state.global_step, state.best_score, dict(state.smoothed),
                   dict(state.last_metrics))

    def training_state(self, optimizer: torch.optim.Optimizer, scheduler: Any, rng: dict[str, Any]) -> TrainingState:
        """What a resumable checkpoint stores at this position."""
        return TrainingState(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng,
                             epoch=self.epoch, batch=self.batch, global_step=self.global_step, best_score=self.best,
                             smoothed=dict(self.smoothed), last_metrics=dict(self.last_metrics))


@contextmanager
def sync_batchnorm(model: nn.Module, enabled: bool) -> Iterator[None]:
    """While active (and ``enabled``), slim BN layers use batch statistics over all ranks; restored after."""
    layers = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d)] if enabled else []
    saved = [m.sync for m in layers]
    for m in layers:
        m.sync = True
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.sync = s


class Trainer:
    """One training run. Subclasses set ``model`` and implement the hooks below; :meth:`fit` runs the rest.

    During :meth:`fit`, ``train_model`` is ``model`` or its DDP wrapper (what :meth:`backward` calls), ``pos``
    the :class:`Position`, ``rng`` the trainer's own random draws (checkpointed), ``epochs`` and ``steps``
    (optimizer steps per epoch) the schedule's.

    Hooks: :meth:`backward` (forward and backward one micro-batch, return its display values),
    :meth:`evaluate` (an epoch's metric rows), :meth:`artifact` (a checkpoint of the current weights) and
    :meth:`finish` (the final step, after the last epoch; returns the trainer's result). Optional:
    :meth:`trainable`, :meth:`restore`, :meth:`after_step`, :meth:`step_metrics`, :meth:`training`.
    """

    artifact_type: ClassVar[type[Artifact]] = Artifact
    ddp_options: ClassVar[dict[str, Any] | None] = {}
    """Keyword arguments of the DDP wrapper under torchrun; None: no wrapper, gradients are all-reduced by hand."""

    model: nn.Module
    eval_every: int = 1
    checkpoint_every: int = 0  # also save last.pt every N optimizer steps (0: per epoch)
    dataset: Dataset | None = None  # the training set as the loader reads it (default: the data's)
    mixes: bool = False  # trains on Mixup/CutMix batches when the recipe turns them on (not the gate)

    def __init__(self, ctx: RunContext, optim: OptimConfig) -> None:
        self.ctx, self.optim = ctx, optim
        self.rng = random.Random(ctx.seed)  # the trainer's own draws (sandwich members); checkpointed
        self.pos = Position()
        self.t0 = time.monotonic()
        self.clock = PhaseClock()  # where this process's time goes (summary.json "time_s"); hooks add phases
        self.images = 0  # images trained by this process (all ranks)
        self.mixup = build_mixup(ctx) if self.mixes else None

    # -- what a trainer supplies -------------------------------------------------------------------------
    def trainable(self) -> nn.Module:
        """The module whose parameters (those with ``requires_grad``) the optimizer steps."""
        return self.model

    def restore(self, last: Artifact) -> None:
        """Load the weights of a resume point."""
        self.model.load_state_dict(last.state_dict)

    def backward(self, x: Tensor | tuple[Tensor, ...], y: Tensor, *, first: bool, last: bool) -> dict[str, float]:
        """Forward and backward one micro-batch (loss scaled by ``1 / grad_accum``; ``first``/``last``: its
        place in the accumulation group); returns the values to smooth and display."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimizer step (e.g. an EMA update)."""

    def step_metrics(self) -> dict[str, float]:
        """Values shown after an optimizer step besides the smoothed ones."""
        return {"lr": self.lr}

    def evaluate(self, epoch: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def score(self, rows: list[dict[str, Any]]) -> float:
        """What ``best.pt`` maximises: the mean top-1 of the epoch's rows."""
        return sum(r["top1"] for r in rows) / len(rows)

    def artifact(self, completed: bool, **fields: Any) -> Artifact:
        raise NotImplementedError

    def training(self) -> AbstractContextManager:
        """A context active while the epochs run (e.g. synchronised BN)."""
        return nullcontext()

    def finish(self) -> Any:
        raise NotImplementedError

    # -- the skeleton ---------------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def fit(self) -> Any:
        """Resume if asked, run the remaining epochs, then :meth:`finish`.

        Raises:
            TrainingInterrupted: ``ctx.stop`` was set (SIGINT/SIGTERM); ``last.pt`` holds the exact resume point.
            NonFiniteLoss: a training value became NaN or infinite.
        """
        ctx = self.ctx
        last = None
        if ctx.resume and ctx.run.last.is_file():
            last = read_artifact(ctx.run.last, self.artifact_type, map_location=ctx.device, why="--resume")
            self.restore(last)
        self.optimizer, self.scheduler, self.epochs, self.steps = build_training(
            self.trainable(), self.optim, ctx.data.steps_per_epoch())
        self.params = [p for p in self.trainable().parameters() if p.requires_grad]
        if last is not None:
            state = last.require_training()
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            set_rng_state(self.rng, state.rng)
            self.pos = Position.from_state(state)
            logger.info("resuming %s at epoch %d, batch %d", ctx.run.path, self.pos.epoch + 1, self.pos.batch)
        self.train_model = self.model
        if ctx.dist.enabled and self.ddp_options is not None:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids,
                                                                   **self.ddp_options)
        self.sink = None
        if ctx.tensorboard and ctx.dist.main:
            from dsctl.train.sinks import TensorBoardSink

            self.sink = TensorBoardSink(ctx.run.path / "tensorboard", purge_step=self.pos.global_step or None)
        try:
            with self.training():
                self._epochs()
        finally:
            if self.sink is not None:
                self.sink.close()
        with self.clock.phase("finish"):
            return self.finish()

    def write_summary(self, kind: str, final: Any, **extra: Any) -> RunTime:
        """Write summary.json (what ran, where, how long and where the time went, final numbers)."""
        elapsed = time.monotonic() - self.t0
        ctx = self.ctx
        timing = RunTime(round(elapsed, 1), self.clock.breakdown(elapsed), self.images)
        self.ctx.run.write_json("summary.json", {
            "kind": kind, "model": getattr(self.model, "model_name", ""), **extra, "epochs": self.epochs,
            "steps_per_epoch": self.steps, "global_step": self.pos.global_step, "elapsed_s": timing.elapsed_s,
            "time_s": timing.phases_s, "images_trained": self.images,
            "images_per_s": round(timing.images_per_s, 1), "world_size": ctx.dist.world,
            "environment": environment(ctx.device), "data": asdict(ctx.data.info), "final": final})
        logger.info("%s run time: %s", kind, timing.describe())
        return timing

    def _step(self, batch_idx: int, x: Tensor | tuple[Tensor, ...], y: Tensor) -> dict[str, float] | None:
        """One micro-batch; after the last of an accumulation group, the optimizer step and its display values."""
        device, accum = self.ctx.device, self.optim.grad_accum
        x = tuple(v.to(device, non_blocking=True) for v in x) if isinstance(x, list | tuple) else x.to(device)
        y = y.to(device)
        if self.mixup is not None and x.shape[0] % 2 == 0:  # timm mixes pairs: an odd last batch stays as it is
            x, y = self.mixup(x, y)
        micro = batch_idx % accum
        self.pos.smooth(self.backward(x, y, first=micro == 0, last=micro == accum - 1))
        if micro != accum - 1:
            return None
        if self.ctx.dist.enabled and self.ddp_options is None:
            for p in self.params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(self.ctx.dist.world)
        if self.optim.clip_grad:
            nn.utils.clip_grad_norm_(self.params, self.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step_update(self.pos.global_step + 1)
        self.after_step()
        return {**self.pos.smoothed, **self.step_metrics()}

    def _save(self, path, completed: bool) -> None:
        if self.ctx.dist.main:
            with self.clock.phase("checkpoint"):
                rng = get_rng_state(self.rng)
                state = self.pos.training_state(self.optimizer, self.scheduler, rng)
                self.artifact(completed, training=state).save(path)

    def _interrupted(self) -> TrainingInterrupted:
        self._save(self.ctx.run.last, False)
        self.ctx.progress.finish()
        return TrainingInterrupted(f"interrupted at epoch {self.pos.epoch + 1}, batch {self.pos.batch}; "
                                   f"resume with --resume {self.ctx.run.path}")

    def _epochs(self) -> None:
        """Run epochs ``pos.epoch .. epochs-1``; raise TrainingInterrupted (after saving) when ``stop`` is set."""
        ctx, pos, epochs = self.ctx, self.pos, self.epochs
        run, progress, stop = ctx.run, ctx.progress, ctx.stop
        batches_per_epoch = self.steps * self.optim.grad_accum
        with catch_signals(stop):
            while pos.epoch < epochs:
                loader = ctx.data.loader(seed=ctx.seed, epoch=pos.epoch, start_batch=pos.batch, dataset=self.dataset)
                progress.start(f"epoch {pos.epoch + 1}/{epochs}", self.steps, pos.batch // self.optim.grad_accum)
                t_epoch, seen = time.monotonic(), 0
                for x, y in _batches(loader, stop, self.clock):
                    if pos.batch >= batches_per_epoch:
                        break
                    with self.clock.phase("step"):
                        metrics = self._step(pos.batch, x, y)
                    pos.batch += 1
                    seen += y.shape[0]
                    self.images += y.shape[0] * ctx.dist.world
                    if metrics is None:
                        continue
                    pos.global_step += 1
                    if _any_rank(not all(math.isfinite(v) for v in metrics.values()), ctx.dist):
                        progress.finish()
                        bad = ", ".join(f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v))
                        bad = bad or "another rank"
                        kept = f"{run.last} is the last good checkpoint" if run.last.is_file() else "no checkpoint yet"
                        raise NonFiniteLoss(f"training stopped at epoch {pos.epoch + 1}, batch {pos.batch}: {bad} "
                                            f"({kept}; nothing was saved after it); try a lower optim.lr, "
                                            "optim.clip_grad, or optim.amp=false")
                    pos.last_metrics = metrics
                    if self.sink is not None:
                        self.sink.step(pos.global_step, metrics)
                    progress.advance(1, **metrics, img_s=seen * ctx.dist.world / max(time.monotonic() - t_epoch, 1e-9))
                    if _any_rank(bool(stop), ctx.dist):
                        raise self._interrupted()
                    if self.checkpoint_every and pos.global_step % self.checkpoint_every == 0:
                        self._save(run.last, False)
                if stop and pos.batch < batches_per_epoch:  # the loader ended early because of a signal
                    raise self._interrupted()
                rows: list[dict[str, Any]] = []
                if (pos.epoch + 1) % self.eval_every == 0 or pos.epoch + 1 == epochs:
                    train = {f"train_{k}": round(v, 5) for k, v in pos.last_metrics.items()}
                    with self.clock.phase("evaluate"):
                        evaluated = self.evaluate(pos.epoch)
                    rows = [{"epoch": pos.epoch, **r, **train, "epoch_s": round(time.monotonic() - t_epoch, 1)}
                            for r in evaluated]
                s = self.score(rows) if rows else float("-inf")
                improved = s > pos.best
                pos.best = max(pos.best, s)
                # metrics, then best.pt, then last.pt: a kill between the writes leaves files that the resumed
                # epoch rewrites, never an epoch that last.pt counts as done with its rows or best.pt missing
                run.append_metrics(rows, keep_before_epoch=pos.epoch)
                if self.sink is not None and rows:
                    self.sink.epoch(pos.global_step, rows)
                pos.epoch, pos.batch, pos.last_metrics = pos.epoch + 1, 0, {}
                if improved:
                    self._save(run.best, pos.epoch == epochs)
                self._save(run.last, pos.epoch == epochs)
                progress.finish(f"epoch {pos.epoch}/{epochs}: " + ", ".join(
                    f"{r.get('subnet', r.get('model', ''))} top1 {r['top1']:.2f}" for r in rows))


def build_mixup(ctx: RunContext):
    """timm's Mixup/CutMix for the recipe's ``data.augment`` (None when both are off). Labels come out as
    mixed one-hot vectors; the trainers' cross-entropy adds the label smoothing (as timm's own would).

    Raises:
        RecipeError: Mixup/CutMix with multi-view consistency (two views of one image cannot be mixed alike).
    """
    aug = ((ctx.recipe.get("data") or {}).get("augment") or {})
    if not (aug.get("mixup", 0.0) > 0 or aug.get("cutmix", 0.0) > 0):
        return None
    if ((ctx.recipe.get("supernet") or {}).get("target")) == "mvco":
        from dsctl.errors import RecipeError

        raise RecipeError("data.augment.mixup/cutmix cannot be combined with supernet.target=mvco (its two views "
                          "of one image would be mixed apart); turn one off")
    import numpy as np
    from timm.data import Mixup

    np.random.seed(ctx.seed + 1_000 * ctx.dist.rank)  # timm draws from numpy's RNG; checkpointed with the rest
    return Mixup(mixup_alpha=aug.get("mixup", 0.0), cutmix_alpha=aug.get("cutmix", 0.0),
                 prob=aug.get("mixup_prob", 1.0), switch_prob=aug.get("mixup_switch_prob", 0.5),
                 mode=aug.get("mixup_mode", "batch"), label_smoothing=0.0, num_classes=ctx.data.info.num_classes)


def _batches(loader, stop: StopFlag, clock: PhaseClock):
    """The loader's batches; a signal that also killed its worker processes still ends in a clean stop.
    The time spent waiting for them is the clock's ``data`` phase."""
    with clock.phase("data"):
        it = iter(loader)  # starts the workers, if any
    while True:
        try:
            with clock.phase("data"):
                batch = next(it)
        except StopIteration:
            return
        except RuntimeError:
            if stop:  # e.g. SIGTERM sent to the whole process group: workers died first
                return
            raise
        yield batch


def _any_rank(local: bool, dist: Dist) -> bool:
    """Whether ``local`` holds on any rank (all ranks must stop at the same step, or the others hang)."""
    if not dist.enabled:
        return local
    import torch.distributed as tdist

    flag = torch.tensor([1.0 if local else 0.0])
    if tdist.get_backend() == "nccl":
        flag = flag.cuda()
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return bool(flag.item() > 0)
