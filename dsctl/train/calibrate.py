"""``recalibrate_checkpoint``: BN recalibration of a saved supernet as its own step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsctl.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from dsctl.config import recipe_from_dict
from dsctl.config import apply_overrides
from dsctl.errors import CheckpointError
from dsctl.train.common import calibrate_bn, resolve_device
from dsctl.train.data import build_train_data
from dsctl.train.progress import Progress
from dsctl.train.supernet import CALIBRATION_EPOCH, subnet_table

__all__ = ["recalibrate_checkpoint"]


def recalibrate_checkpoint(path: str | Path, *, overrides: list[str] = (), batches: int | None = None,  # type: ignore[assignment]
                           out: str | Path | None = None, device: str = "auto",
                           progress: Progress | None = None) -> tuple[Path, list[dict[str, Any]] | None]:
    """Reset and re-estimate BN statistics of every sub-network on the checkpoint's training data.

    The data comes from the recipe stored in the checkpoint (``overrides`` may change it, e.g. the root).
    Writes the checkpoint (in place, or to ``out``) with ``calibrated=True`` and the per-sub-network table,
    and returns where it wrote and that table. A family without BatchNorm (DS-ViT) has nothing to
    calibrate: nothing is read or written, and the table is None.
    """
    ckpt = load_checkpoint(path)
    model, _ = model_from_checkpoint(ckpt["path"])
    if not model.needs_bn_calibration:
        return Path(ckpt["path"]), None
    if not ckpt.get("recipe"):
        raise CheckpointError(f"{ckpt['path']}: holds no recipe, so its training data is unknown")
    recipe = recipe_from_dict(apply_overrides(ckpt["recipe"], list(overrides)))
    dev = resolve_device(device)
    model.to(dev)
    data = build_train_data(recipe.data)
    specs = list(model.space.subnets) + ([model.space.full] if model.space.full not in model.space.subnets else [])
    n = batches or recipe.supernet.calib_batches
    calibrate_bn(model, data.loader(seed=recipe.seed, epoch=CALIBRATION_EPOCH), specs, dev, num_batches=n)
    rows = subnet_table(model, data, dev, input_size=data.input_size, progress=progress)
    target = Path(out) if out else Path(ckpt["path"])
    payload = {k: v for k, v in ckpt.items() if k not in ("path", "format_version", "ema_state_dict")}
    payload.update(state_dict=model.cpu().state_dict(), calibrated=True, calib_batches=n, subnets=rows)
    save_checkpoint(target, payload)
    return target, rows
