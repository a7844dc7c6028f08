"""Weights in and out in the formats users hold (timm, torchvision, Hugging Face Hub folders, dsctl runs).

In: :func:`read_state_dict` reads a ``.safetensors`` file (recognised by its header, whatever its name, on
every torch dsctl allows), a ``torch.save`` file (``weights_only=True``; a timm ``train.py`` checkpoint's
``args`` namespace is allowed, no other Python object), or a folder holding ``model.safetensors`` or
``pytorch_model.bin``; from a training checkpoint it takes the EMA weights where there are some (as timm's
own loader does) unless asked for the trained ones, and says which set it took. :func:`load_full_width` puts
such a state dict into a supernet at full width with a strict key check (only keys dsctl alone has may be
missing), or a dsctl supernet run's whole state (gate and per-width statistics included), or a dsctl
static baseline of the full width (its plain-network names mapped back to the supernet's).

Out: :func:`library_state_dict` is the full network under the library's own names (timm's / torchvision's:
the supernet's names without the gate and the narrower widths' BatchNorm statistics), which
:func:`save_safetensors` writes.
"""

from __future__ import annotations

import argparse
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dsctl.errors import CheckpointError

__all__ = ["LoadedWeights", "read_state_dict", "load_full_width", "library_state_dict", "save_safetensors",
           "load_safetensors", "is_safetensors", "HUB_FILES", "EMA_KEYS", "MODEL_KEYS"]

logger = logging.getLogger(__name__)

HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what a Hugging Face Hub model folder holds
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict")  # timm train.py, timm ModelEmaV3 users, dsctl
MODEL_KEYS = ("state_dict", "model")
_DSCTL_ONLY = re.compile(r"(^gate\.)|(_c\d+$)|(_k\d+$)")  # the gate; BN statistics of the narrower widths and kernels


@dataclass(frozen=True)
class LoadedWeights:
    """A plain state dict and where it came from: ``path`` (the file read) and ``tensor_set`` (the key of
    the checkpoint it was taken from, ``""`` for a flat state dict)."""

    state: dict[str, Tensor]
    path: Path
    tensor_set: str

    def describe(self) -> str:
        what = f"'{self.tensor_set}'" if self.tensor_set else "a flat state dict"
        ema = " (EMA weights)" if self.tensor_set in EMA_KEYS else ""
        return f"{self.path}: {len(self.state)} tensors from {what}{ema}"


def is_safetensors(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file: an 8-byte little-endian header length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = Path(path).stat().st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def save_safetensors(state: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` (contiguous CPU copies) as safetensors, atomically (a temporary file renamed)."""
    from safetensors.torch import save

    from dsctl.checkpoint import atomic_write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _torch_file(path: Path) -> object:
    from dsctl.checkpoint import _load_weights_only

    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; older: Namespace is refused
    if safe is None:
        return _load_weights_only(path, "cpu", "state dict")
    with safe([argparse.Namespace]):  # timm train.py stores its arguments: plain data, no code
        return _load_weights_only(path, "cpu", "state dict")


def _resolve_file(path: Path) -> Path:
    if path.is_dir():
        for name in HUB_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a folder without a weights file (looked for {', '.join(HUB_FILES)})")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return path


def _is_flat(d: dict) -> bool:
    return bool(d) and all(isinstance(v, Tensor) for v in d.values())


def read_state_dict(path: str | Path, *, ema: bool = True) -> LoadedWeights:
    """A flat state dict from a weights file or Hub folder (see the module docstring); ``module.``
    prefixes (DataParallel / DDP) are removed.

    ``ema``: take the EMA weights of a training checkpoint where it holds them (timm's default); False
    takes the trained weights (``state_dict`` / ``model``).

    Raises:
        CheckpointError: a missing file, a folder without weights, an unreadable or unsafe file, or a
            checkpoint holding no state dict (naming the keys it has).
    """
    p = _resolve_file(Path(path))
    raw = load_safetensors(p) if is_safetensors(p) else _torch_file(p)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{p}: expected a state dict, found {type(raw).__name__}")
    key = ""
    if not _is_flat(raw):
        order = (*EMA_KEYS, *MODEL_KEYS) if ema else (*MODEL_KEYS, *EMA_KEYS)
        key = next((k for k in order if isinstance(raw.get(k), dict) and _is_flat(raw[k])), "")
        if not key:
            keys = ", ".join(sorted(map(str, raw))[:10])
            raise CheckpointError(f"{p}: no state dict in this checkpoint (looked for "
                                  f"{', '.join((*EMA_KEYS, *MODEL_KEYS))}; it has: {keys})")
        raw = raw[key]
    state = {k.removeprefix("module."): v for k, v in raw.items()}
    return LoadedWeights(state, p, key)


def _static_to_supernet_names(model, spec) -> dict[str, str]:
    """``model.to_uniform(spec)``'s state-dict keys (the network a uniform baseline trains: the static
    sub-network for CNNs, a DeiT of that width for DS-ViT) -> the supernet keys they were copied from.

    Every supernet tensor is filled with its own distinct values, the static network is cut from it, and
    each static tensor is matched to the supernet tensor it equals (at full width every copy is whole, though
    perhaps reshaped)."""
    import copy

    probe = copy.deepcopy(model)
    names: dict[tuple, str] = {}
    seen: set[int] = set()  # a tensor shared by two modules (an SE's encoder and the gate's) is filled once
    with torch.no_grad():
        for i, (name, t) in enumerate(probe.state_dict(keep_vars=True).items()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if t.is_floating_point():
                t.copy_(torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape) * 1e-3 + i)
                names[(t.numel(), float(t.flatten()[0]))] = name
            else:
                t.fill_(i)
                names[(t.numel(), int(t.flatten()[0]) if t.numel() else -1)] = name
        static = probe.to_uniform(spec)
        out = {}
        for key, t in static.state_dict().items():
            first = (float(t.flatten()[0]) if t.is_floating_point() else int(t.flatten()[0])) if t.numel() else -1
            found = names.get((t.numel(), first))  # by size: a static SE holds a 1x1 conv's weight as a Linear's
            if found is not None:
                out[key] = found
    return out


def _from_static_artifact(model, path: Path) -> str:
    from dsctl.artifacts import StaticArtifact, read_artifact

    art = read_artifact(path, StaticArtifact)
    full = model.space.full
    if art.meta.method != "uniform" or art.meta.base_spec != full:
        raise CheckpointError(f"{path}: a {art.meta.method} baseline at {art.meta.variant}; only a full-width "
                              "uniform baseline (dsctl baseline --method uniform --width largest) holds every "
                              "channel of the supernet")
    if art.model_name != model.model_name:
        raise CheckpointError(f"{path}: a baseline of {art.model_name!r}, not of {model.model_name!r}")
    names = _static_to_supernet_names(model, full)
    missing = sorted(set(art.state_dict) - set(names))
    if missing:
        raise CheckpointError(f"{path}: static weights without a supernet twin: {', '.join(missing[:5])}")
    own = model.state_dict()
    _load_checked(model, {names[k]: v.reshape(own[names[k]].shape) for k, v in art.state_dict.items()}, path)
    return f"{path}: the full-width static baseline's {len(names)} tensors, mapped to the supernet's names"


def _load_checked(model, state: dict[str, Tensor], path: Path) -> None:
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not _DSCTL_ONLY.search(k))
    shapes = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if unexpected or missing or shapes:
        parts = [f"{name}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for name, keys in (("unexpected", unexpected), ("missing", missing), ("shape mismatch", shapes)) if keys]
        raise CheckpointError(f"{path}: does not match {model.model_name!r} at full width ({'; '.join(parts)})")
    model.load_state_dict(state, strict=False)
    _fill_narrow_bn_stats(model, set(state))


def _fill_narrow_bn_stats(model, loaded: set[str]) -> None:
    """Narrower widths' BN statistics not in the file start as the first channels of the full width's (a
    better start than zeros and ones; BN recalibration re-estimates them)."""
    from dsctl.layers.slim import SlimBatchNorm2d

    for name, m in model.named_modules():
        if isinstance(m, SlimBatchNorm2d):
            m.narrow_stats_from_full(keep=[c for c in m.choices if f"{name}.running_mean_c{c}" in loaded])


def load_full_width(model, path: str | Path, *, ema: bool = True) -> str:
    """Load weights into ``model`` (a supernet) and return one line saying what was loaded.

    ``path``: a plain full-width state dict (timm / torchvision names; only the gate and the narrower
    widths' BN statistics may be missing, which start from the full width's), a Hub folder, a dsctl
    supernet checkpoint or run folder of the same model (every tensor, strictly), or a dsctl full-width
    uniform baseline (its names mapped back).

    Raises:
        CheckpointError: unreadable, or keys or shapes that do not match (listed).
    """
    from dsctl.checkpoint import find_checkpoint, load_checkpoint

    p = Path(path)
    dsctl_file = None
    if p.is_dir() and not any((p / name).is_file() for name in HUB_FILES):
        dsctl_file = find_checkpoint(p)
    elif p.is_file() and not is_safetensors(p):
        try:
            dsctl_file = Path(load_checkpoint(p)["path"])
        except CheckpointError:
            dsctl_file = None
    if dsctl_file is not None:
        from dsctl.artifacts import ModelArtifact, read_artifact

        kind = load_checkpoint(dsctl_file).get("kind")
        if kind == "static":
            return _from_static_artifact(model, dsctl_file)
        art = read_artifact(dsctl_file, ModelArtifact)
        if art.model_name != model.model_name:
            raise CheckpointError(f"{dsctl_file}: a checkpoint of {art.model_name!r}, not of {model.model_name!r}")
        try:
            model.load_state_dict(art.model_state_dict())
        except RuntimeError as err:
            raise CheckpointError(f"{dsctl_file}: weights do not match {model.model_name!r} as built here: "
                                  f"{str(err)[:300]}") from None
        ema_note = " (EMA weights)" if getattr(art, "ema_state_dict", None) else ""
        return f"{dsctl_file}: the dsctl {art.KIND} checkpoint's weights{ema_note}"
    loaded = read_state_dict(p, ema=ema)
    _load_checked(model, loaded.state, loaded.path)
    return loaded.describe()


def library_state_dict(model) -> dict[str, Tensor]:
    """The full network's weights under the library's names: the supernet's state dict without the gate
    and the narrower widths' BN statistics (for ``ds_resnet50`` timm's / torchvision's ``resnet50``, for
    ``ds_deit_*`` timm's DeiT)."""
    return {k: v for k, v in model.state_dict().items() if not _DSCTL_ONLY.search(k)}
