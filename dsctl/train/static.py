"""Training plain (static) networks: the width-multiplier baseline and the train / fine-tune phases of the
pruning baselines. Same run folders, resume, metrics and progress as the supernet trainer.

A static network's checkpoint stores how to rebuild it without pickling modules: the supernet it was
cut from (``model_name``, ``model_kwargs``, ``base_spec``; the width-multiplier baseline is the supernet's
``to_uniform(base_spec)``, the others its ``to_static``) plus a ``state_dict`` whose shapes give the
(possibly pruned) channel counts; :func:`rebuild_static` shrinks the layers to those shapes (a pruned
transformer's head count follows its ``qkv`` rows).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.checkpoint import load_checkpoint, save_checkpoint
from dsctl.config import OptimConfig
from dsctl.errors import CheckpointError
from dsctl.registry import build_model
from dsctl.spec import SliceSpec
from dsctl.train.common import Dist, autocast, build_training, evaluate, get_rng_state, set_rng_state
from dsctl.train.data import TrainData
from dsctl.train.loop import Position, run_epochs
from dsctl.train.progress import LogProgress, Progress
from dsctl.train.run import RunDir, StopFlag

__all__ = ["StaticMeta", "train_static", "rebuild_static", "static_from_checkpoint", "fit_to_state_dict"]

StaticMeta = dict[str, Any]  # model_name, model_kwargs, base_spec, method, ... (stored in the checkpoint)


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


def rebuild_static(meta: StaticMeta, state: dict[str, Tensor]) -> nn.Module:
    """The static network a checkpoint describes, with its weights loaded."""
    supernet = build_model(meta["model_name"], **meta.get("model_kwargs", {}))
    spec = SliceSpec(tuple(meta["base_spec"]))
    base = supernet.to_uniform(spec) if meta.get("method") == "uniform" else supernet.to_static(spec)
    net = fit_to_state_dict(base, state)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"static network weights do not fit {meta['model_name']}: {str(err)[:200]}") from None
    return net.eval()


def static_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "static":
        raise CheckpointError(f"{ckpt['path']}: expected a static (baseline) checkpoint, got {ckpt.get('kind')!r}")
    return rebuild_static(ckpt["meta"], ckpt["state_dict"]), ckpt


def train_static(net: nn.Module, data: TrainData, optim: OptimConfig, run: RunDir, *, meta: StaticMeta,
                 label_smoothing: float = 0.1, extra_loss: Callable[[nn.Module], Tensor] | None = None,
                 device: torch.device = torch.device("cpu"), dist: Dist = Dist(), seed: int = 0,
                 recipe: dict[str, Any] | None = None, resume: bool = False, progress: Progress | None = None,
                 stop: StopFlag | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``net`` on labels (label smoothing, optional ``extra_loss(net)``); writes final.pt; returns the
    trained network and its final metrics row."""
    progress = progress or LogProgress()
    stop = stop if stop is not None else StopFlag()
    t0 = time.monotonic()
    net.to(device)
    optimizer, scheduler, epochs, steps = build_training(net, optim, data.steps_per_epoch())
    rng = random.Random(seed)
    pos = Position()
    if resume and run.last.is_file():
        ckpt = load_checkpoint(run.last, map_location=device)
        net = fit_to_state_dict(net, ckpt["state_dict"]).to(device)
        net.load_state_dict(ckpt["state_dict"])
        optimizer, scheduler, epochs, steps = build_training(net, optim, data.steps_per_epoch())
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(rng, ckpt["rng"])
        pos = Position.from_checkpoint(ckpt)
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
        return [{"model": meta.get("method", "static"), "top1": round(r.top1, 3), "top5": round(r.top5, 3),
                 "loss": round(r.loss, 5)}]

    def payload(p: Position, completed: bool) -> dict[str, Any]:
        return {"kind": "static", "model_name": meta["model_name"], "model_kwargs": meta.get("model_kwargs", {}),
                "meta": meta, "state_dict": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": get_rng_state(rng), "position": p.to_dict(),
                "best_score": p.best, "recipe": recipe or {}, "data_info": asdict(data.info), "completed": completed}

    def save(path, p: Position, completed: bool) -> None:
        if dist.main:
            save_checkpoint(path, payload(p, completed))

    pos = run_epochs(data=data, run=run, pos=pos, epochs=epochs, steps_per_epoch=steps, grad_accum=optim.grad_accum,
                     seed=seed, step=step, evaluate=evaluate_epoch, save=save, score=lambda rows: rows[0]["top1"],
                     progress=progress, stop=stop)
    r = evaluate(net, data.val, None, device, amp=optim.amp)
    final = {"top1": round(r.top1, 3), "top5": round(r.top5, 3), "loss": round(r.loss, 5),
             "elapsed_s": round(time.monotonic() - t0, 1)}
    if dist.main:
        out = payload(pos, True)
        for key in ("optimizer", "scheduler", "rng"):
            out.pop(key)
        out["final"] = final
        save_checkpoint(run.final, out)
    return net, final
