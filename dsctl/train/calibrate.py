"""``recalibrate_checkpoint``: BN recalibration of a saved supernet as its own step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dsctl.artifacts import SubnetRow, SupernetArtifact, read_artifact
from dsctl.flops import gate_macs
from dsctl.train.common import calibrate_bn, resolve_device
from dsctl.train.data import build_run_data
from dsctl.train.progress import Progress
from dsctl.train.supernet import CALIBRATION_EPOCH, subnet_table

__all__ = ["recalibrate_checkpoint"]


def recalibrate_checkpoint(path: str | Path, *, overrides: list[str] = (), batches: int | None = None,  # type: ignore[assignment]
                           out: str | Path | None = None, device: str = "auto",
                           progress: Progress | None = None) -> tuple[Path, list[SubnetRow] | None]:
    """Reset and re-estimate BN statistics of every sub-network on the checkpoint's training data.

    The data comes from the recipe stored in the checkpoint (``overrides`` may change it, e.g. the root).
    Writes the checkpoint (in place, or to ``out``) with ``calibrated=True`` and the per-sub-network table,
    and returns where it wrote and that table. A family without BatchNorm (DS-ViT) has nothing to
    calibrate: nothing is read or written, and the table is None.
    """
    sup = read_artifact(path, SupernetArtifact, why="calibrate-bn")
    recipe = sup.recipe_config(overrides)
    model = sup.build_model()
    if not model.needs_bn_calibration:
        return Path(sup.path), None
    dev = resolve_device(device)
    model.to(dev)
    data = build_run_data(recipe.data)
    specs = model.space.all_specs()
    n = batches or recipe.supernet.calib_batches
    calibrate_bn(model, data.loader(seed=recipe.seed, epoch=CALIBRATION_EPOCH), specs, dev, num_batches=n)
    rows = subnet_table(model, data, dev, input_size=data.input_size, progress=progress)
    target = Path(out) if out else Path(sup.path)
    same_size = data.input_size == sup.input_size  # route costs are stored for the recipe's input size only
    dataclasses.replace(sup, state_dict=model.cpu().state_dict(), ema_state_dict=None, calibrated=True,
                        calib_batches=n, subnets=tuple(rows),
                        gate_macs=gate_macs(model, data.input_size) if same_size else None).save(target)
    return target, rows
