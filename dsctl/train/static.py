"""Training plain (static) networks: the width-multiplier baseline and the train / fine-tune phases of the
pruning baselines, on the trainer skeleton (:mod:`dsctl.train.trainer`) like the supernet and gate trainers.

A static network's checkpoint (:class:`dsctl.artifacts.StaticArtifact`) stores how to rebuild it without
pickling modules: the supernet it was cut from (``model_name``, ``model_kwargs``, ``meta.base_spec``) plus
a ``state_dict`` whose shapes give the (possibly pruned) channel counts; :func:`fit_to_state_dict` shrinks
the layers to those shapes. The width-multiplier baseline is the supernet's ``to_uniform(base_spec)``, the
others its ``to_static`` (a pruned transformer's head count follows its ``qkv`` rows).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.artifacts import StaticArtifact, StaticMeta, StaticReport
from dsctl.config import OptimConfig
from dsctl.models.base import Supernet
from dsctl.train.common import autocast, evaluate
from dsctl.train.trainer import RunContext, Trainer

__all__ = ["StaticTrainer", "train_static", "fit_to_state_dict"]


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


class StaticTrainer(Trainer):
    """A plain network on labels (label smoothing, optional ``extra_loss(net)``) on the trainer skeleton."""

    mixes = True

    artifact_type = StaticArtifact

    def __init__(self, net: nn.Module, ctx: RunContext, optim: OptimConfig, *, cut_from: Supernet, meta: StaticMeta,
                 label_smoothing: float = 0.1, extra_loss: Callable[[nn.Module], Tensor] | None = None) -> None:
        super().__init__(ctx, optim)
        self.model, self.meta = net.to(ctx.device), meta
        self.model_name, self.model_kwargs = cut_from.model_name, dict(cut_from.model_kwargs)
        self.label_smoothing, self.extra_loss = label_smoothing, extra_loss

    def restore(self, last: StaticArtifact) -> None:
        self.model = fit_to_state_dict(self.model, last.state_dict).to(self.ctx.device)  # pruned shapes
        self.model.load_state_dict(last.state_dict)

    def backward(self, x: Tensor, y: Tensor, *, first: bool, last: bool) -> dict[str, float]:
        self.model.train()
        with autocast(self.ctx.device, self.optim.amp):
            logits = self.train_model(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.extra_loss is not None:
            loss = loss + self.extra_loss(self.model)
        with self.clock.phase("backward"):
            (loss / self.optim.grad_accum).backward()
        return {"loss": float(loss.detach())}

    def _evaluate(self):
        return evaluate(self.model, self.ctx.data.val, None, self.ctx.device, amp=self.optim.amp)

    def evaluate(self, epoch: int) -> list[dict[str, Any]]:
        r = self._evaluate()
        return [{"model": self.meta.method, "top1": round(r.top1, 3), "top5": round(r.top5, 3),
                 "loss": round(r.loss, 5)}]

    def artifact(self, completed: bool, **fields: Any) -> StaticArtifact:
        return StaticArtifact(model_name=self.model_name, model_kwargs=self.model_kwargs,
                              state_dict=self.model.state_dict(), meta=self.meta, recipe=self.ctx.recipe,
                              data_info=self.ctx.data.info, completed=completed, **fields)

    def finish(self) -> tuple[nn.Module, StaticReport]:
        r = self._evaluate()
        final = StaticReport(top1=round(r.top1, 3), top5=round(r.top5, 3), loss=round(r.loss, 5),
                             elapsed_s=round(time.monotonic() - self.t0, 1))
        if self.ctx.dist.main:
            self.artifact(True, final=final).save(self.ctx.run.final)
        return self.model, final


def train_static(net: nn.Module, ctx: RunContext, optim: OptimConfig, *, cut_from: Supernet, meta: StaticMeta,
                 label_smoothing: float = 0.1,
                 extra_loss: Callable[[nn.Module], Tensor] | None = None) -> tuple[nn.Module, StaticReport]:
    """Train ``net`` (cut from the supernet ``cut_from`` as ``meta`` says) on labels (label smoothing, optional
    ``extra_loss(net)``); writes final.pt; returns the trained network and its scores."""
    return StaticTrainer(net, ctx, optim, cut_from=cut_from, meta=meta, label_smoothing=label_smoothing,
                         extra_loss=extra_loss).fit()
