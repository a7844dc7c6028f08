"""BN recalibration of a supernet, in one place: how statistics are re-estimated (:func:`calibrate_bn`),
for which sub-networks and on which batches (:func:`recalibrate_bn`: what ``train-supernet`` does at its
end and ``train-gate`` does to a supernet that was not recalibrated), and ``calibrate-bn`` as its own step
(:func:`recalibrate_checkpoint`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dsctl.artifacts import SubnetRow, SupernetArtifact, read_artifact
from dsctl.errors import DsctlError
from dsctl.flops import gate_macs
from dsctl.layers.slim import SlimBatchNorm2d
from dsctl.models.base import Supernet
from dsctl.spec import SliceSpec
from dsctl.train.common import autocast, resolve_device
from dsctl.train.data import TrainData, build_run_data
from dsctl.train.progress import Progress

__all__ = ["CALIBRATION_EPOCH", "calibrate_bn", "recalibrate_bn", "recalibrate_checkpoint"]

CALIBRATION_EPOCH = 1_000_000  # a data-order seed distinct from every training epoch


@torch.no_grad()
def calibrate_bn(model: nn.Module, loader: Iterable, specs: Sequence[SliceSpec], device: torch.device, *,
                 num_batches: int, amp: bool = False) -> int:
    """Recalibrate BatchNorm statistics for every spec: reset, then average over ``num_batches`` batches.

    Each batch is forwarded once per spec in train mode without gradients; statistics are cumulative
    averages (momentum None), so the result does not depend on the order of specs. Returns the number of
    batches used. Gradients and weights are untouched.
    """
    bns = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d | nn.BatchNorm2d)]
    if not bns or num_batches <= 0:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    used = 0
    try:
        for i, batch in enumerate(loader):
            if i >= num_batches:
                break
            x = batch[0].to(device, non_blocking=True)
            with autocast(device, amp):
                for spec in specs:
                    model(x, spec)
            used += 1
    finally:
        for m, (momentum, _) in zip(bns, saved):
            m.momentum = momentum
        model.train(was_training)
    if used == 0:
        raise DsctlError("BN calibration saw no batches (empty training set?)")
    if dist.is_available() and dist.is_initialized():  # average statistics across ranks
        for m in bns:
            for name, buf in m.named_buffers(recurse=False):
                if buf.is_floating_point():
                    dist.all_reduce(buf)
                    buf.div_(dist.get_world_size())
    return used


def recalibrate_bn(model: Supernet, data: TrainData, *, seed: int, device: torch.device, num_batches: int,
                   amp: bool = False) -> int:
    """Re-estimate the BN statistics of every indexed sub-network and the full network on ``num_batches``
    training batches (a data order of their own); returns the batches used (0 for a family without BN)."""
    if not model.needs_bn_calibration:
        return 0
    space = model.space
    specs = space.all_specs()
    loader = data.loader(seed=seed, epoch=CALIBRATION_EPOCH)
    return calibrate_bn(model, loader, specs, device, num_batches=num_batches, amp=amp)


def recalibrate_checkpoint(path: str | Path, *, overrides: list[str] = (), batches: int | None = None,  # type: ignore[assignment]
                           out: str | Path | None = None, device: str = "auto",
                           progress: Progress | None = None) -> tuple[Path, list[SubnetRow] | None]:
    """Reset and re-estimate BN statistics of every sub-network on the checkpoint's training data.

    The data comes from the recipe stored in the checkpoint (``overrides`` may change it, e.g. the root).
    Writes the checkpoint (in place, or to ``out``) with ``calibrated=True`` and the per-sub-network table,
    and returns where it wrote and that table. A family without BatchNorm (DS-ViT) has nothing to
    calibrate: nothing is read or written, and the table is None.
    """
    from dsctl.train.supernet import subnet_table  # supernet.py calls recalibrate_bn

    sup = read_artifact(path, SupernetArtifact, why="calibrate-bn")
    recipe = sup.recipe_config(overrides)
    model = sup.build_model()
    if not model.needs_bn_calibration:
        return Path(sup.path), None
    dev = resolve_device(device)
    model.to(dev)
    data = build_run_data(recipe.data)
    sup.check_data(data.info)
    n = batches or recipe.supernet.calib_batches
    recalibrate_bn(model, data, seed=recipe.seed, device=dev, num_batches=n)
    rows = subnet_table(model, data, dev, input_size=data.input_size, progress=progress)
    target = Path(out) if out else Path(sup.path)
    same_size = data.input_size == sup.input_size  # route costs are stored for the recipe's input size only
    dataclasses.replace(sup, state_dict=model.cpu().state_dict(), ema_state_dict=None, calibrated=True,
                        calib_batches=n, subnets=tuple(rows),
                        gate_macs=gate_macs(model, data.input_size) if same_size else None).save(target)
    return target, rows
