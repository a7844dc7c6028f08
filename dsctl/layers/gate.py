"""The double-headed width gate (DESIGN.md section 4) and the Gumbel-softmax helper.

Shared encoder e = ReLU(W_r pool(X) + b_r), or with ``conv=True`` e = pool(ReLU(conv3x3(X))) for more
capacity. Attention head (optional): X * sigmoid(W_a e + b_a), trained with the supernet; it is the
squeeze-and-excitation of the block that holds the gate. With ``tokens=True`` the gate reads a
transformer's token sequence (N, T, C) instead of a feature map: the encoder reads the class token
(token 0) where a map would be pooled, and the attention head scales every token. Slimming head: logits over the K indexed
sub-networks, trained in stage II; a routing window restricts the decision to consecutive indices.
The decision at inference adds a per-route offset ``route_bias`` (zeros unless calibrated) to the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.layers.slim import SlimConv2d
from dsctl.layers.static import SqueezeExcite, StaticGate

__all__ = ["SlimGate", "gumbel_one_hot", "window_mask"]


class SlimGate(nn.Module):
    """Double-headed gate over a feature map whose active input channels may be sliced.

    Args:
        channels: maximum input channels.
        reduce_channels: width of the shared encoder.
        num_subnets: number of indexed sub-networks K, the routes (the slimming head's outputs).
        attention: whether the attention head multiplies the features (False: features pass unchanged).
        conv: encode with a 3x3 conv (stride 1, padding 1) and ReLU before the global pool, instead of a
            1x1 conv on the pooled features. Not combined with ``attention`` (the attention head is a
            block's squeeze-and-excitation, whose encoder reads the pooled features).
        tokens: read tokens (N, T, C) instead of maps (N, C, H, W). The encoder reads the first
            ``channels`` channels of the class token (all of them when the tokens are narrower, as when a
            model passes only its active width); ``attend`` scales every token by the same C gates.
            Not combined with ``conv``.

    Buffers:
        route_bias: (K,) float32 additive offsets of the routing decision (see :meth:`decide`); zeros
            by default, set by a calibration; saved in state dicts.

    Raises:
        ValueError: ``conv`` together with ``attention`` or ``tokens``.
    """

    def __init__(self, channels: int, reduce_channels: int, num_subnets: int, attention: bool = True,
                 conv: bool = False, tokens: bool = False) -> None:
        super().__init__()
        if conv and attention:
            raise ValueError("SlimGate: conv=True needs attention=False (the attention head is an SE that pools first)")
        if conv and tokens:
            raise ValueError("SlimGate: conv=True needs tokens=False (a 3x3 conv encoder reads a feature map)")
        self.conv = conv
        self.tokens = tokens
        if conv:
            self.reduce = SlimConv2d(channels, reduce_channels, 3, 1, 1, bias=True)
        else:
            self.reduce = SlimConv2d(channels, reduce_channels, 1, bias=True)
        self.expand = SlimConv2d(reduce_channels, channels, 1, bias=True) if attention else None
        self.head = nn.Linear(reduce_channels, num_subnets)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("route_bias", torch.zeros(num_subnets, dtype=torch.float32))

    @property
    def num_subnets(self) -> int:
        return self.head.out_features

    @property
    def attention(self) -> bool:
        """Whether the gate's attention head multiplies the features it reads."""
        return self.expand is not None

    def _squeeze(self, x: Tensor) -> Tensor:
        """What the 1x1 encoder reads, shape (N, C, 1, 1): the pooled map, or the class token."""
        if self.tokens:
            return x[:, 0, : self.reduce.in_channels, None, None]
        return x.mean((2, 3), keepdim=True)

    def encode(self, x: Tensor) -> Tensor:
        """Shared encoder, shape (N, reduce_channels, 1, 1)."""
        if self.conv:
            return F.relu(self.reduce(x)).mean((2, 3), keepdim=True)
        return F.relu(self.reduce(self._squeeze(x)))

    def attend(self, x: Tensor, e: Tensor) -> Tensor:
        """``x`` scaled by the attention head's gates (unchanged without one); tokens: the same gates for every token."""
        if self.expand is None:
            return x
        if self.tokens:  # (N, C, 1, 1) gates -> (N, 1, C), broadcast over the T tokens
            return x * torch.sigmoid(self.expand(e, x.shape[-1])).flatten(1)[:, None, :]
        return x * torch.sigmoid(self.expand(e, x.shape[1]))

    def route_logits(self, e: Tensor) -> Tensor:
        """Raw slimming-head logits, shape (N, K) (training uses these; no ``route_bias``)."""
        return self.head(e.flatten(1))

    def decide(self, e: Tensor, window: tuple[int, int]) -> Tensor:
        """Inference decision: absolute sub-network index per sample, shape (N,).

        ``argmax over k in [lo, hi] of route_logits(e)[:, k] + route_bias[k]``, plus ``lo``.
        """
        lo, hi = window
        scores = self.route_logits(e)[:, lo : hi + 1] + self.route_bias[lo : hi + 1]
        return scores.argmax(-1) + lo

    @torch.no_grad()
    def set_route_bias(self, offsets: list[float], window: tuple[int, int]) -> None:
        """Store calibrated decision offsets for the routes in ``window`` (inclusive); zero outside it."""
        lo, hi = window
        if len(offsets) != hi - lo + 1:
            raise ValueError(f"set_route_bias: {len(offsets)} offsets for window {window}")
        self.route_bias.zero_()
        self.route_bias[lo : hi + 1] = torch.tensor(offsets, dtype=self.route_bias.dtype)

    def routing_parameters(self) -> list[nn.Parameter]:
        """Parameters only routing uses: the slimming head, and the encoder when no attention head shares it."""
        params = list(self.head.parameters())
        if self.expand is None:
            params += list(self.reduce.parameters())
        return params

    def macs(self, in_channels: int, height: int, width: int) -> int:
        """MACs of the routing decision on one image whose gate input is ``in_channels x height x width``.

        Encoder (conv; average pooling counted as its input size, DESIGN.md section 7) plus slimming head.
        With an attention head the encoder is the block's SE, already part of every route: head only.
        Tokens: the encoder reads one class token (nothing pooled), so ``height`` and ``width`` do not matter.
        """
        head = self.head.in_features * self.head.out_features
        if self.expand is not None:
            return head
        r, pixels = self.reduce.out_channels, height * width
        if self.tokens:
            return in_channels * r + head
        if self.conv:  # 3x3 conv on the map, then pool its output
            return pixels * r * in_channels * 9 + r * pixels + head
        return in_channels * pixels + in_channels * r + head  # pool the input, then 1x1 on the vector

    @torch.no_grad()
    def static_attention(self, channels: int) -> nn.Module:
        """Plain-torch attention head reading ``channels`` active channels: what :meth:`attend` does after
        :meth:`encode` (a squeeze-and-excitation on maps; on tokens, the class token's encoding scales the
        first ``channels`` channels of every token). ``nn.Identity`` without an attention head."""
        if self.expand is None:
            return nn.Identity()
        reduce, expand = self.reduce.to_static(channels), self.expand.to_static(self.reduce.out_channels, channels)
        if self.tokens:
            from dsctl.layers.static_vit import TokenExcite

            return TokenExcite(reduce, expand, channels)
        return SqueezeExcite(reduce, expand)

    @torch.no_grad()
    def to_static(self, in_channels: int, window: tuple[int, int] | None = None) -> StaticGate:
        """Plain-torch gate reading ``in_channels``: returns (features, route index within ``window``).

        ``window`` (inclusive, default every route) restricts the head and ``route_bias``; the static
        gate's routes are 0 for the window's first sub-network. Tokens: the static gate reads (and its
        attention head scales) the first ``in_channels`` channels of a possibly wider token stream.
        """
        lo, hi = (0, self.num_subnets - 1) if window is None else window
        head = nn.Linear(self.head.in_features, hi - lo + 1, device=self.head.weight.device, dtype=self.head.weight.dtype)
        head.weight.copy_(self.head.weight[lo : hi + 1])
        head.bias.copy_(self.head.bias[lo : hi + 1])
        expand = None if self.expand is None else self.expand.to_static(self.reduce.out_channels, in_channels)
        return StaticGate(self.reduce.to_static(in_channels), expand, head, self.route_bias[lo : hi + 1],
                          pool_first=not self.conv, tokens=self.tokens).eval()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # checkpoints written before route_bias existed decide by plain argmax: zero offsets
        state_dict.setdefault(prefix + "route_bias", torch.zeros_like(self.route_bias))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def window_mask(num_subnets: int, window: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Additive mask: 0 inside the inclusive ``window`` of sub-network indices, -inf outside."""
    lo, hi = window
    mask = torch.full((num_subnets,), float("-inf"), device=device)
    mask[lo : hi + 1] = 0.0
    return mask


def gumbel_one_hot(logits: Tensor, tau: float = 1.0) -> Tensor:
    """Straight-through Gumbel-softmax: hard one-hot forward, soft-sample gradients backward."""
    return F.gumbel_softmax(logits, tau=tau, hard=True, dim=-1)
