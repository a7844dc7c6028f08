"""The double-headed width gate (DESIGN.md section 4) and the Gumbel-softmax helper.

Shared encoder e = ReLU(W_r pool(X) + b_r). Attention head (optional): X * sigmoid(W_a e + b_a), trained
with the supernet; it is the squeeze-and-excitation of the block that holds the gate. Slimming head:
logits over the K indexed sub-networks, trained in stage II; a routing window masks the logits outside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.layers.slim import SlimConv2d

__all__ = ["SlimGate", "gumbel_one_hot", "window_mask"]


class SlimGate(nn.Module):
    """Double-headed gate over a feature map whose active input channels may be sliced.

    Args:
        channels: maximum input channels.
        reduce_channels: width of the shared encoder.
        num_routes: number of indexed sub-networks K (the slimming head's outputs).
        attention: whether the attention head multiplies the features (False: features pass unchanged).
    """

    def __init__(self, channels: int, reduce_channels: int, num_routes: int, attention: bool = True) -> None:
        super().__init__()
        self.reduce = SlimConv2d(channels, reduce_channels, 1, bias=True)
        self.expand = SlimConv2d(reduce_channels, channels, 1, bias=True) if attention else None
        self.head = nn.Linear(reduce_channels, num_routes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def num_routes(self) -> int:
        return self.head.out_features

    def encode(self, x: Tensor) -> Tensor:
        """Shared encoder, shape (N, reduce_channels, 1, 1)."""
        return F.relu(self.reduce(x.mean((2, 3), keepdim=True)))

    def attend(self, x: Tensor, e: Tensor) -> Tensor:
        if self.expand is None:
            return x
        return x * torch.sigmoid(self.expand(e, x.shape[1]))

    def route_logits(self, e: Tensor) -> Tensor:
        """Slimming-head logits, shape (N, K)."""
        return self.head(e.flatten(1))


def window_mask(num_routes: int, window: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Additive mask: 0 inside the inclusive ``window`` of sub-network indices, -inf outside."""
    lo, hi = window
    mask = torch.full((num_routes,), float("-inf"), device=device)
    mask[lo : hi + 1] = 0.0
    return mask


def gumbel_one_hot(logits: Tensor, tau: float = 1.0) -> Tensor:
    """Straight-through Gumbel-softmax: hard one-hot forward, soft-sample gradients backward."""
    return F.gumbel_softmax(logits, tau=tau, hard=True, dim=-1)
