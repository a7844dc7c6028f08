"""Plain ``torch.nn`` building blocks of exported static sub-networks.

These hold no widths and no dsctl logic; exported files are TorchScript / ``torch.export`` archives of
them, so they load without dsctl installed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SqueezeExcite", "Bottleneck", "ClassifierHead"]


class SqueezeExcite(nn.Module):
    """x * sigmoid(expand(relu(reduce(mean(x)))))."""

    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d) -> None:
        super().__init__()
        self.reduce = reduce
        self.expand = expand

    def forward(self, x: Tensor) -> Tensor:
        e = torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.expand(e))


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 -> 3x3 (stride) -> 1x1, plus identity or projection shortcut, then ReLU."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ClassifierHead(nn.Module):
    """Global average pool -> (dropout) -> linear."""

    def __init__(self, fc: nn.Linear, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(x.mean((2, 3))))
