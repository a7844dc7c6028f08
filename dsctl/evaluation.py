"""``evaluate_checkpoint``: evaluate a saved supernet (at a width) or dynamic model on its validation data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsctl.checkpoint import load_checkpoint, model_from_checkpoint
from dsctl.config import apply_overrides, recipe_from_dict
from dsctl.errors import CheckpointError, DsctlError
from dsctl.flops import count_subnet, gate_macs, macs_table
from dsctl.train.common import evaluate, resolve_device
from dsctl.train.data import build_train_data
from dsctl.train.gate import evaluate_dynamic

__all__ = ["evaluate_checkpoint"]


def _evaluate_static(ckpt: dict[str, Any], recipe, dev, *, width: str | None, dynamic: bool) -> dict[str, Any]:
    from dsctl.flops import count_macs, count_params
    from dsctl.train.static import rebuild_static

    if width is not None or dynamic:
        raise DsctlError(f"{ckpt['path']}: a baseline network has one fixed width (drop --width / --dynamic)")
    meta = ckpt["meta"]
    net = rebuild_static(meta, ckpt["state_dict"])
    data = build_train_data(recipe.data)
    macs = count_macs(net, data.input_size, data.info.in_chans)
    r = evaluate(net.to(dev), data.val, None, dev)
    return {"model": meta["model_name"], "data": data.info.name, "checkpoint": ckpt["path"],
            "subnet": f"{meta['method']} {meta.get('variant', '')}", "width": str(meta.get("width") or "-"),
            "top1": r.top1, "top5": r.top5, "loss": r.loss, "samples": r.samples, "macs": macs,
            "params": count_params(net)}


def evaluate_checkpoint(path: str | Path, *, width: str | None = None, dynamic: bool = False,
                        overrides: list[str] = (), device: str = "auto") -> dict[str, Any]:  # type: ignore[assignment]
    """Evaluate a checkpoint on the validation split of its recipe's data (``overrides`` may change it).

    Gate checkpoints are evaluated dynamically (argmax routing, grouped sliced inference) unless a width
    is given; supernet checkpoints need a width (default: the full network) and cannot be ``dynamic``.
    """
    ckpt = load_checkpoint(path)
    if not ckpt.get("recipe"):
        raise CheckpointError(f"{ckpt['path']}: holds no recipe, so its data is unknown")
    recipe = recipe_from_dict(apply_overrides(ckpt["recipe"], list(overrides)))
    dev = resolve_device(device)
    if ckpt.get("kind") == "static":
        return _evaluate_static(ckpt, recipe, dev, width=width, dynamic=dynamic)
    model, _ = model_from_checkpoint(ckpt["path"])
    model.to(dev).eval()
    data = build_train_data(recipe.data)
    is_gate = ckpt.get("kind") == "gate"
    if dynamic and not is_gate:
        raise DsctlError(f"{ckpt['path']}: --dynamic needs a gate checkpoint (from train-gate); this is a supernet")
    base = {"model": model.model_name, "data": data.info.name, "checkpoint": ckpt["path"]}
    if is_gate and width is None:
        window = tuple(ckpt["window"])
        route_macs = ckpt.get("route_macs") or macs_table(model, data.input_size)
        g = ckpt.get("gate_macs", gate_macs(model, data.input_size))
        r = evaluate_dynamic(model, data.val, window, dev, route_macs=route_macs, gate_macs=g)  # type: ignore[arg-type]
        return {**base, "subnet": f"dynamic[{window[0]}:{window[1]}]", "width": "dynamic", "top1": r.top1,
                "top5": r.top5, "loss": r.loss, "samples": r.samples, "macs": r.avg_macs, "histogram": r.histogram,
                "gate_sgs_acc": r.gate_sgs_acc}
    spec = model.space.resolve(width or "largest")
    r = evaluate(model, data.val, spec, dev)
    m = count_subnet(model, spec, data.input_size)
    return {**base, "subnet": model.space.label(spec), "width": m.width if m.width is not None else "largest",
            "top1": r.top1, "top5": r.top5, "loss": r.loss, "samples": r.samples, "macs": m.macs, "params": m.params}
