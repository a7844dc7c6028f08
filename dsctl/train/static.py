"""Training plain (static) networks: the width-multiplier baseline and the train / fine-tune phases of the
pruning baselines. Same run folders, resume, metrics and progress as the supernet trainer.

A static network's checkpoint (:class:`dsctl.artifacts.StaticArtifact`) stores how to rebuild it without
pickling modules: the supernet it was cut from (``model_name``, ``model_kwargs``, ``meta.base_spec``) plus
a ``state_dict`` whose shapes give the (possibly pruned) channel counts; :func:`fit_to_state_dict` shrinks
the layers to those shapes. The width-multiplier baseline is the supernet's ``to_uniform(base_spec)``, the
others its ``to_static`` (a pruned transformer's head count follows its ``qkv`` rows).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.artifacts import StaticArtifact, StaticMeta, StaticReport, read_artifact
from dsctl.config import OptimConfig
from dsctl.train.common import Dist, autocast, build_training, evaluate, get_rng_state, set_rng_state
from dsctl.train.data import TrainData
from dsctl.train.loop import Position, run_epochs
from dsctl.train.progress import LogProgress, Progress
from dsctl.train.run import RunDir, StopFlag

__all__ = ["train_static", "fit_to_state_dict"]


def fit_to_state_dict(module: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Replace Conv2d / BatchNorm2d / Linear layers whose shapes differ from ``state`` by layers of its shapes."""
    for name, child in list(module.named_modules()):
        key = f"{name}.weight" if name else "weight"
        if key not in state or not isinstance(child, nn.Conv2d | nn.BatchNorm2d | nn.Linear):
            continue
        shape = state[key].shape
        if tuple(child.weight.shape) == tuple(shape):
            continue
        if isinstance(child, nn.Conv2d):
            depthwise = child.groups > 1 and child.groups == child.in_channels
            out_c = shape[0]
            in_c = out_c if depthwise else shape[1]
            new: nn.Module = nn.Conv2d(in_c, out_c, child.kernel_size, child.stride, child.padding, child.dilation,
                                       out_c if depthwise else 1, bias=child.bias is not None)
        elif isinstance(child, nn.BatchNorm2d):
            new = nn.BatchNorm2d(shape[0], eps=child.eps, momentum=child.momentum)
        else:
            new = nn.Linear(shape[1], shape[0], bias=child.bias is not None)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
    return module


def train_static(net: nn.Module, data: TrainData, optim: OptimConfig, run: RunDir, *, meta: StaticMeta,
                 model_name: str, model_kwargs: dict[str, Any], label_smoothing: float = 0.1,
                 extra_loss: Callable[[nn.Module], Tensor] | None = None, device: torch.device = torch.device("cpu"),
                 dist: Dist = Dist(), seed: int = 0, recipe: dict[str, Any] | None = None, resume: bool = False,
                 progress: Progress | None = None, stop: StopFlag | None = None) -> tuple[nn.Module, StaticReport]:
    """Train ``net`` (cut from the supernet ``model_name(**model_kwargs)`` as ``meta`` says) on labels (label
    smoothing, optional ``extra_loss(net)``); writes final.pt; returns the trained network and its scores."""
    progress = progress or LogProgress()
    stop = stop if stop is not None else StopFlag()
    t0 = time.monotonic()
    net.to(device)
    optimizer, scheduler, epochs, steps = build_training(net, optim, data.steps_per_epoch())
    rng = random.Random(seed)
    pos = Position()
    if resume and run.last.is_file():
        last = read_artifact(run.last, StaticArtifact, map_location=device, why="--resume")
        state = last.require_training()
        net = fit_to_state_dict(net, last.state_dict).to(device)
        net.load_state_dict(last.state_dict)
        optimizer, scheduler, epochs, steps = build_training(net, optim, data.steps_per_epoch())
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        set_rng_state(rng, state.rng)
        pos = Position.from_state(state)
    train_net: nn.Module = net
    if dist.enabled:
        train_net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    running: dict[str, float] = {}

    def step(batch_idx: int, x: Tensor, y: Tensor) -> dict[str, float] | None:
        net.train()
        x, y = x.to(device), y.to(device)
        with autocast(device, optim.amp):
            logits = train_net(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if extra_loss is not None:
            loss = loss + extra_loss(net)
        (loss / optim.grad_accum).backward()
        value = float(loss.detach())
        running["loss"] = 0.9 * running.get("loss", value) + 0.1 * value
        if batch_idx % optim.grad_accum != optim.grad_accum - 1:
            return None
        if optim.clip_grad:
            nn.utils.clip_grad_norm_(net.parameters(), optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step_update(pos.global_step + 1)
        return {"loss": running["loss"], "lr": optimizer.param_groups[0]["lr"]}

    def evaluate_epoch(epoch: int) -> list[dict[str, Any]]:
        r = evaluate(net, data.val, None, device, amp=optim.amp)
        return [{"model": meta.method, "top1": round(r.top1, 3), "top5": round(r.top5, 3),
                 "loss": round(r.loss, 5)}]

    def artifact(completed: bool, **fields: Any) -> StaticArtifact:
        return StaticArtifact(model_name=model_name, model_kwargs=dict(model_kwargs), state_dict=net.state_dict(),
                              meta=meta, recipe=recipe or {}, data_info=data.info, completed=completed, **fields)

    def save(path, p: Position, completed: bool) -> None:
        if dist.main:
            artifact(completed, training=p.training_state(optimizer, scheduler, get_rng_state(rng))).save(path)

    pos = run_epochs(data=data, run=run, pos=pos, epochs=epochs, steps_per_epoch=steps, grad_accum=optim.grad_accum,
                     seed=seed, step=step, evaluate=evaluate_epoch, save=save, score=lambda rows: rows[0]["top1"],
                     progress=progress, stop=stop)
    r = evaluate(net, data.val, None, device, amp=optim.amp)
    final = StaticReport(top1=round(r.top1, 3), top5=round(r.top5, 3), loss=round(r.loss, 5),
                         elapsed_s=round(time.monotonic() - t0, 1))
    if dist.main:
        artifact(True, final=final).save(run.final)
    return net, final
