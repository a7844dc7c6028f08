"""The epoch loop every trainer shares: resumable data order, progress, interruption, checkpoints, metrics.

Trainers supply three callables: ``step(batch_idx, x, y)`` (returns display metrics after an optimizer
step, or None after a gradient-accumulation micro-batch), ``evaluate(epoch)`` (metric rows) and
``save(path, position, completed)``. The loop owns where the run is (:class:`Position`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import Dataset

from dsctl.artifacts import TrainingState
from dsctl.errors import DsctlError
from dsctl.train.data import TrainData
from dsctl.train.progress import Progress
from dsctl.train.run import RunDir, StopFlag, TrainingInterrupted, catch_signals

__all__ = ["NonFiniteLoss", "Position", "run_epochs"]


def _batches(loader, stop: StopFlag):
    """The loader's batches; a signal that also killed its worker processes still ends in a clean stop."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError:
            if stop:  # e.g. SIGTERM sent to the whole process group: workers died first
                return
            raise
        yield batch


class NonFiniteLoss(DsctlError):
    """A training loss became NaN or infinite; the run stopped without saving the damaged weights."""


def _any_rank(local: bool, data: TrainData) -> bool:
    """Whether ``local`` holds on any rank (all ranks must stop at the same step, or the others hang)."""
    if not data.dist.enabled:
        return local
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if local else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


@dataclass
class Position:
    """Where a run stands: ``epoch`` (0-based, current), ``batch`` (micro-batches done in it), optimizer steps."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best: float = float("-inf")

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "global_step": self.global_step}

    @classmethod
    def from_state(cls, state: TrainingState) -> Position:
        return cls(state.epoch, state.batch, state.global_step, state.best_score)

    def training_state(self, optimizer: Optimizer, scheduler: Any, rng: dict[str, Any]) -> TrainingState:
        """What a resumable checkpoint stores at this position."""
        return TrainingState(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng,
                             epoch=self.epoch, batch=self.batch, global_step=self.global_step, best_score=self.best)


def run_epochs(*, data: TrainData, run: RunDir, pos: Position, epochs: int, steps_per_epoch: int, grad_accum: int,
               seed: int, step: Callable[[int, Tensor | tuple[Tensor, ...], Tensor], dict[str, float] | None],
               evaluate: Callable[[int], list[dict[str, Any]]], save: Callable[[Path, Position, bool], None],
               score: Callable[[list[dict[str, Any]]], float], progress: Progress, stop: StopFlag,
               eval_every: int = 1, checkpoint_every: int = 0, dataset: Dataset | None = None) -> Position:
    """Run epochs ``pos.epoch .. epochs-1``; raise TrainingInterrupted (after saving) when ``stop`` is set."""
    batches_per_epoch = steps_per_epoch * grad_accum
    with catch_signals(stop):
        while pos.epoch < epochs:
            loader = data.loader(seed=seed, epoch=pos.epoch, start_batch=pos.batch, dataset=dataset)
            progress.start(f"epoch {pos.epoch + 1}/{epochs}", steps_per_epoch, pos.batch // grad_accum)
            t_epoch, seen, last_metrics = time.monotonic(), 0, {}
            for x, y in _batches(loader, stop):
                if pos.batch >= batches_per_epoch:
                    break
                metrics = step(pos.batch, x, y)
                pos.batch += 1
                seen += y.shape[0]
                if metrics is None:
                    continue
                pos.global_step += 1
                if _any_rank(not all(math.isfinite(v) for v in metrics.values()), data):
                    progress.finish()
                    bad = ", ".join(f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v)) or "another rank"
                    kept = f"{run.last} is the last good checkpoint" if run.last.is_file() else "no checkpoint yet"
                    raise NonFiniteLoss(f"training stopped at epoch {pos.epoch + 1}, batch {pos.batch}: {bad} "
                                        f"({kept}; nothing was saved after it); try a lower optim.lr, "
                                        "optim.clip_grad, or optim.amp=false")
                last_metrics = metrics
                progress.advance(1, **metrics, img_s=seen * data.dist.world / max(time.monotonic() - t_epoch, 1e-9))
                if _any_rank(bool(stop), data):
                    save(run.last, pos, False)
                    progress.finish()
                    raise TrainingInterrupted(f"interrupted at epoch {pos.epoch + 1}, batch {pos.batch}; "
                                              f"resume with --resume {run.path}")
                if checkpoint_every and pos.global_step % checkpoint_every == 0:
                    save(run.last, pos, False)
            if stop and pos.batch < batches_per_epoch:  # the loader ended early because of a signal
                save(run.last, pos, False)
                progress.finish()
                raise TrainingInterrupted(f"interrupted at epoch {pos.epoch + 1}, batch {pos.batch}; "
                                          f"resume with --resume {run.path}")
            rows: list[dict[str, Any]] = []
            if (pos.epoch + 1) % eval_every == 0 or pos.epoch + 1 == epochs:
                rows = [{"epoch": pos.epoch, **r, **{f"train_{k}": round(v, 5) for k, v in last_metrics.items()},
                         "epoch_s": round(time.monotonic() - t_epoch, 1)} for r in evaluate(pos.epoch)]
            s = score(rows) if rows else float("-inf")
            improved = s > pos.best
            pos.best = max(pos.best, s)
            # metrics, then best.pt, then last.pt: a kill between the writes leaves files that the resumed
            # epoch rewrites, never an epoch that last.pt counts as done with its rows or best.pt missing
            run.append_metrics(rows, keep_before_epoch=pos.epoch)
            pos.epoch, pos.batch = pos.epoch + 1, 0
            if improved:
                save(run.best, pos, pos.epoch == epochs)
            save(run.last, pos, pos.epoch == epochs)
            progress.finish(f"epoch {pos.epoch}/{epochs}: " + ", ".join(
                f"{r.get('subnet', r.get('model', ''))} top1 {r['top1']:.2f}" for r in rows))
    return pos
