"""Width-sliceable transformer layers for DS-ViT (DESIGN.md section 3, "DS-ViT").

A token tensor (N, T, d) tells each layer its active embedding width d, as a channel count does for the
conv layers in :mod:`dsctl.layers.slim`. Attention slices whole heads: with ``head_dim`` fixed, width d
runs ``d // head_dim`` heads. Parameter names and shapes follow timm's ``VisionTransformer`` (``qkv``
laid out as [q; k; v], each [D, D]), so a timm state dict loads at full width. Each layer has a
``to_static`` returning the plain ``torch.nn`` module for one width.

``forward_masked`` runs a layer at one width for the whole batch with a per-sample 0/1 channel mask
``keep`` (N, 1, d): sample i computes exactly what the layer computes at its own narrower width, at the
cost of the wider one (the benchmark's "masking" reference; never used to train or deploy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.layers.slim import KeptSlices, SlimLinear
from dsctl.layers.static_vit import Attention, Mlp

__all__ = ["SlimLayerNorm", "SlimQKVLinear", "SlimAttention", "SlimMlp"]


class SlimLayerNorm(KeptSlices, nn.LayerNorm):
    """LayerNorm over the active last-dim width d, with the affine sliced to ``[:d]``."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        d = x.shape[-1]
        if d == self.normalized_shape[0]:
            return F.layer_norm(x, (d,), self.weight, self.bias, self.eps)
        weight, bias = self.kept(d, lambda: (self.weight[:d], self.bias[:d]))  # views, kept in eval mode
        return F.layer_norm(x, (d,), weight, bias, self.eps)

    def forward_masked(self, x: Tensor, keep: Tensor) -> Tensor:
        """Per sample, LayerNorm over its kept channels only; the others come out zero."""
        d = x.shape[-1]
        count = keep.sum(-1, keepdim=True)                               # (N, 1, 1)
        mean = (x * keep).sum(-1, keepdim=True) / count
        var = (((x - mean) * keep) ** 2).sum(-1, keepdim=True) / count
        return ((x - mean) * torch.rsqrt(var + self.eps) * self.weight[:d] + self.bias[:d]) * keep

    @torch.no_grad()
    def to_static(self, width: int) -> nn.LayerNorm:
        norm = nn.LayerNorm(width, eps=self.eps, device=self.weight.device, dtype=self.weight.dtype)
        norm.weight.copy_(self.weight[:width])
        norm.bias.copy_(self.bias[:width])
        return norm


class SlimQKVLinear(KeptSlices, nn.Linear):
    """The fused q/k/v projection ``[3D, D]`` (rows [q; k; v]), sliced head-aware.

    At width d the active rows are ``[0:d]``, ``[D:D+d]`` and ``[2D:2D+d]`` (q, k and v of the first
    d // head_dim heads), not the first 3d rows; the active columns are ``[:d]``.
    """

    def __init__(self, dim: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(dim, 3 * dim, bias=bias, device=device, dtype=dtype)
        self.dim = dim

    def sliced(self, width: int) -> tuple[Tensor, Tensor | None]:
        """(weight [3 * width, width], bias [3 * width]) of the first ``width`` channels of q, k and v."""
        if width == self.dim:
            return self.weight, self.bias
        return self.kept(width, lambda: self._gather(width))

    def _gather(self, width: int) -> tuple[Tensor, Tensor | None]:
        weight = self.weight.view(3, self.dim, self.dim)[:, :width, :width].reshape(3 * width, width)
        bias = None if self.bias is None else self.bias.view(3, self.dim)[:, :width].reshape(3 * width)
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        weight, bias = self.sliced(x.shape[-1])
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def to_static(self, width: int) -> nn.Linear:
        weight, bias = self.sliced(width)
        lin = nn.Linear(width, 3 * width, bias=bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
        return lin


class SlimAttention(nn.Module):
    """Multi-head self-attention whose head count follows the input width: h = d / head_dim.

    Uses ``F.scaled_dot_product_attention`` (counted by dsctl's fvcore handle, see :mod:`dsctl.flops`).
    """

    def __init__(self, dim: int, head_dim: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"embedding width {dim} is not a multiple of head_dim {head_dim}")
        self.head_dim = head_dim
        self.qkv = SlimQKVLinear(dim, bias=qkv_bias)
        self.proj = SlimLinear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        assert d % self.head_dim == 0, f"width {d} is not a whole number of {self.head_dim}-channel heads"
        heads = d // self.head_dim
        qkv = self.qkv(x).reshape(n, t, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, h, T, hd)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])                     # (N, h, T, hd)
        return self.proj(out.transpose(1, 2).reshape(n, t, d), d)

    def forward_masked(self, x: Tensor, keep: Tensor) -> Tensor:
        """``x`` zero beyond each sample's kept channels; heads beyond them are dropped before ``proj``
        (a head's channels are contiguous, so the channel mask is a head mask)."""
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, d // self.head_dim, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, t, d) * keep, d) * keep

    def to_static(self, width: int) -> Attention:
        return Attention(self.qkv.to_static(width), self.proj.to_static(width, width), self.head_dim)


class SlimMlp(nn.Module):
    """fc1 (d -> ratio * d) -> GELU -> fc2 (-> d): the hidden width follows the input width, unless the
    caller routes it apart (``hidden``: the first hidden units, any count up to the stored ones)."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.mlp_ratio = mlp_ratio
        self.fc1 = SlimLinear(dim, self.hidden(dim))
        self.fc2 = SlimLinear(self.hidden(dim), dim)

    def hidden(self, width: int) -> int:
        return int(width * self.mlp_ratio)

    def forward(self, x: Tensor, hidden: int | None = None) -> Tensor:
        d = x.shape[-1]
        return self.fc2(F.gelu(self.fc1(x, self.hidden(d) if hidden is None else hidden)), d)

    def forward_masked(self, x: Tensor, keep: Tensor, keep_hidden: Tensor, hidden: int | None = None) -> Tensor:
        """``keep_hidden`` (N, 1, hidden): each sample's hidden units (``hidden`` of its own width, or its own
        routed count) out of the ``hidden`` computed (None: the width's)."""
        d = x.shape[-1]
        return self.fc2(F.gelu(self.fc1(x, self.hidden(d) if hidden is None else hidden)) * keep_hidden, d) * keep

    def to_static(self, width: int, hidden: int | None = None) -> Mlp:
        hidden = self.hidden(width) if hidden is None else hidden
        return Mlp(self.fc1.to_static(width, hidden), self.fc2.to_static(hidden, width))
