"""Shared fixtures: tiny models and deterministic inputs."""

from __future__ import annotations

import os
import random

import pytest
import torch

import dsctl
from dsctl.registry import model_kwargs_allowed

TINY_MODELS = [n for n in dsctl.list_models() if n.startswith("tiny_")]

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one torch thread each
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(params=TINY_MODELS)
def tiny_model(request) -> dsctl.Supernet:
    return dsctl.build_model(request.param)


def cpu_sized_model(name: str) -> tuple[dsctl.Supernet, int]:
    """A registered model and an input size cheap enough for CPU tests: ``tiny_*`` models at their own size,
    the others at 64 px (built for 64 px where the builder fixes the input size, as a ViT's does)."""
    if name.startswith("tiny_"):
        model = dsctl.build_model(name)
        return model, model.default_input_size
    kwargs = {"img_size": 64} if "img_size" in model_kwargs_allowed(name) else {}
    return dsctl.build_model(name, **kwargs), 64


def image_batch(model: dsctl.Supernet, n: int = 2, size: int | None = None) -> torch.Tensor:
    size = size or model.default_input_size
    return torch.randn(n, model.in_chans, size, size)
