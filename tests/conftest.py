"""Shared fixtures: tiny models and deterministic inputs."""

from __future__ import annotations

import random

import pytest
import torch

import dsctl

TINY_MODELS = [n for n in dsctl.list_models() if n.startswith("tiny_")]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(params=TINY_MODELS)
def tiny_model(request) -> dsctl.Supernet:
    return dsctl.build_model(request.param)


def image_batch(model: dsctl.Supernet, n: int = 2, size: int | None = None) -> torch.Tensor:
    size = size or model.default_input_size
    return torch.randn(n, model.in_chans, size, size)
