"""What a command's TARGET names: a registered model or a run's supernet/gate checkpoint.

``dsctl flops``, ``export`` and ``bench`` take either; :func:`load_model_target` turns one into the model
with its weights, where they came from, and the input size to measure at (the run's, for a checkpoint,
read from the artifact: the model itself is not changed).

Example:
    >>> t = load_model_target("tiny_ds_resnet")
    >>> t.source, t.input_size
    ('random init', 28)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsctl.artifacts import ModelArtifact, read_artifact
from dsctl.errors import DsctlError
from dsctl.models.base import Supernet
from dsctl.registry import build_model, list_models

__all__ = ["ModelTarget", "load_model_target"]


@dataclass(frozen=True)
class ModelTarget:
    """A supernet to measure or export. ``source``: the checkpoint path, the ``init_from`` file or
    ``"random init"``; ``input_size``: the run's resolution, else the model's default; ``artifact``: the
    checkpoint it was read from, if any."""

    model: Supernet
    source: str
    input_size: int
    artifact: ModelArtifact | None = None

    @classmethod
    def of_artifact(cls, art: ModelArtifact) -> ModelTarget:
        model = art.build_model()
        return cls(model, art.path, art.input_size or model.default_input_size, art)


def load_model_target(target: str | Path, *, num_classes: int | None = None, in_chans: int | None = None,
                      init_from: str | Path | None = None) -> ModelTarget:
    """A registered model name (random weights, or ``init_from`` a full-width state dict; ``num_classes``
    and ``in_chans`` set its head and stem) or a supernet/gate checkpoint file or run folder.

    Raises:
        DsctlError: ``target`` is neither, or ``init_from`` is given with a checkpoint.
        CheckpointError: the file is not a supernet or gate checkpoint.
    """
    from dsctl.weights import load_full_width

    name = str(target)
    if name in list_models():
        kwargs: dict[str, Any] = {}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        model = build_model(name, **kwargs)
        if init_from is not None:
            load_full_width(model, init_from)
        return ModelTarget(model, str(init_from) if init_from is not None else "random init", model.default_input_size)
    if init_from is not None:
        raise DsctlError("--init-from applies to a model name, not to a checkpoint")
    if Path(name).exists():
        return ModelTarget.of_artifact(read_artifact(name, ModelArtifact))
    raise DsctlError(f"{name!r} is neither a registered model ({', '.join(list_models())}) nor an existing file")
