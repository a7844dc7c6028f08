"""Training machinery shared by the supernet, gate and baseline trainers.

Device and process-group setup, optimizer and scheduler (timm factories), soft-target losses and
``evaluate`` (top-1/top-5/loss, reduced across ranks). BN recalibration lives in :mod:`dsctl.train.calibrate`.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.config import OptimConfig
from dsctl.errors import DsctlError
from dsctl.spec import SliceSpec

__all__ = [
    "Dist", "setup_dist", "resolve_device", "build_optimizer", "build_scheduler", "build_training", "soft_cross_entropy",
    "EvalResult", "evaluate", "autocast", "unwrap", "all_reduce_sum", "get_rng_state", "set_rng_state",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """Process-group facts: ``rank``/``world``/``local_rank``; ``main`` is the rank that writes files."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; DsctlError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DsctlError(f"--device {name}: CUDA is not available on this machine (allowed here: auto, cpu)")
        return torch.device(name)
    raise DsctlError(f"unknown device {name!r} (allowed: auto, cpu, cuda, cuda:N)")


def setup_dist(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when launched by torchrun (RANK/WORLD_SIZE set); else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when ``enabled`` (no loss scaling needed); plain float32 elsewhere."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2`` over the trainable parameters (no weight decay on biases and norms)."""
    from timm.optim import create_optimizer_v2

    try:
        return create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    except (AssertionError, ValueError) as err:
        raise DsctlError(f"optim.opt={cfg.opt!r}: {err}") from None


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int):
    """timm ``create_scheduler_v2`` stepped per optimizer update; returns (scheduler, total epochs)."""
    from timm.scheduler import create_scheduler_v2

    try:
        sched, epochs = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs,
            step_on_epochs=False, updates_per_epoch=steps_per_epoch,
        )
    except (AssertionError, ValueError) as err:
        raise DsctlError(f"optim.sched={cfg.sched!r}: {err}") from None
    if sched is None:
        raise DsctlError(f"optim.sched={cfg.sched!r} is not a scheduler timm knows (e.g. cosine, step, plateau)")
    return sched, epochs


def build_training(model: nn.Module, cfg: OptimConfig, steps_per_epoch_batches: int):
    """Optimizer and per-update scheduler for one trainer; returns (optimizer, scheduler, epochs, steps).

    ``steps_per_epoch_batches`` counts batches; an optimizer step takes ``cfg.grad_accum`` of them.
    """
    steps = steps_per_epoch_batches // cfg.grad_accum
    if steps == 0:
        raise DsctlError(f"no full optimizer step per epoch ({steps_per_epoch_batches} batches, "
                         f"grad_accum {cfg.grad_accum})")
    optimizer = build_optimizer(model, cfg)
    scheduler, epochs = build_scheduler(optimizer, cfg, steps)
    return optimizer, scheduler, epochs, steps


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy to a soft target distribution, batch mean."""
    return -(target_probs * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@dataclass(frozen=True)
class EvalResult:
    top1: float
    top5: float
    loss: float
    samples: int


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, spec: SliceSpec | None, device: torch.device, *,
             amp: bool = False, max_batches: int | None = None, progress=None) -> EvalResult:
    """Top-1 / top-5 (percent) and mean cross-entropy of ``model(x, spec)``, summed across ranks.

    ``spec=None`` calls ``model(x)`` (static or dynamic models). ``progress`` (a started
    :class:`~dsctl.train.progress.Progress`) advances once per batch.
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = n = 0.0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x) if spec is None else model(x, spec)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        correct1 += float(hit[:, 0].sum())
        correct5 += float(hit.any(1).sum())
        n += y.numel()
        if progress is not None:
            progress.advance()
    correct1, correct5, loss_sum, n = all_reduce_sum([correct1, correct5, loss_sum, n], device)
    model.train(was_training)
    if n == 0:
        raise DsctlError("evaluation saw no samples (empty validation set?)")
    return EvalResult(100.0 * correct1 / n, 100.0 * correct5 / n, loss_sum / n, int(n))


def get_rng_state(rng: random.Random) -> dict:
    """The trainer's spec-sampling RNG and torch's RNGs (everything a resumed run must continue)."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()  # timm's Mixup draws from numpy's global RNG
    state: dict = {"python": rng.getstate(), "torch": torch.get_rng_state(),
                   "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(rng: random.Random, state: dict) -> None:
    py = state["python"]
    rng.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"].cpu())  # checkpoints may be loaded onto a GPU
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
