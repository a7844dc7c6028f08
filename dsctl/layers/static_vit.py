"""Plain ``torch.nn`` modules of exported static DS-ViT sub-networks (no widths, no dsctl logic).

Idle slicing in static form: consecutive blocks that run at one width d are wrapped in
:class:`IdleSliced`, which runs them as an ordinary width-d transformer on the first d channels of the
token stream and concatenates the untouched channels d..D back once after the run. At full width it is
just the blocks. This computes exactly what the supernet computes block by block (each block there
passes the idle channels through unchanged), with one concatenation per run instead of one per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.layers.static import linear_of

__all__ = ["Attention", "Mlp", "TransformerBlock", "IdleSliced", "TokenEmbed", "TokenHead", "TokenExcite"]


class Attention(nn.Module):
    """timm-layout multi-head self-attention: fused ``qkv`` ([q; k; v]), SDPA, ``proj``.

    The head count follows the weights: ``qkv.out_features // (3 * head_dim)`` heads, so a network whose
    heads were pruned (fewer ``qkv`` rows and ``proj`` columns than the embedding width) rebuilds from its
    state dict alone.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, head_dim: int) -> None:
        super().__init__()
        self.qkv = qkv
        self.proj = proj
        self.head_dim = head_dim

    @property
    def num_heads(self) -> int:
        return self.qkv.out_features // (3 * self.head_dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        inner = self.qkv.out_features // 3  # heads x head_dim; the embedding width unless heads were pruned
        qkv = self.qkv(x).reshape(n, t, 3, inner // self.head_dim, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, inner))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        super().__init__()
        self.fc1 = fc1
        self.act = nn.GELU()
        self.fc2 = fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x)) (timm ``Block`` without drop path)."""

    def __init__(self, norm1: nn.LayerNorm, attn: Attention, norm2: nn.LayerNorm, mlp: Mlp) -> None:
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class IdleSliced(nn.Module):
    """Runs ``blocks`` on the first ``width`` of ``channels`` token channels; the rest pass unchanged."""

    def __init__(self, blocks: nn.Sequential, width: int, channels: int) -> None:
        super().__init__()
        self.blocks = blocks
        self.width = width
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        if self.width == self.channels:
            return self.blocks(x)
        active = self.blocks(x.narrow(-1, 0, self.width))
        return torch.cat([active, x.narrow(-1, self.width, self.channels - self.width)], -1)


class TokenEmbed(nn.Module):
    """Patch embedding (conv, stride = patch), class token prepended, absolute position embedding added."""

    def __init__(self, proj: nn.Conv2d, cls_token: Tensor, pos_embed: Tensor, img_size: int) -> None:
        super().__init__()
        self.proj = proj
        self.cls_token = nn.Parameter(cls_token.detach().clone())
        self.pos_embed = nn.Parameter(pos_embed.detach().clone())
        self.img_size = img_size

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] != self.img_size or x.shape[-1] != self.img_size:
            raise ValueError("this network takes " + str(self.img_size) + " px inputs (its position embedding "
                             "fixes the input size), got " + str(int(x.shape[-2])) + "x" + str(int(x.shape[-1])))
        x = self.proj(x).flatten(2).transpose(1, 2)                        # (N, T - 1, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)  # (N, T, D)
        return x + self.pos_embed


class TokenHead(nn.Module):
    """Final LayerNorm on the class token, then the linear classifier."""

    def __init__(self, norm: nn.LayerNorm, head: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x[:, 0]))


class TokenExcite(nn.Module):
    """The gate's attention head on tokens: the first ``width`` channels of every token are scaled by
    sigmoid(expand(relu(reduce(class token)))); the rest pass unchanged."""

    def __init__(self, reduce: nn.Conv2d | nn.Linear, expand: nn.Conv2d | nn.Linear, width: int) -> None:
        super().__init__()
        # on the class token's (N, C) vector the supernet's 1x1 convs are Linear layers, as in SqueezeExcite
        self.reduce = linear_of(reduce)
        self.expand = linear_of(expand)
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        active = x.narrow(-1, 0, self.width)
        e = torch.relu(self.reduce(active[:, 0]))  # (N, r)
        active = active * torch.sigmoid(self.expand(e)).unsqueeze(1)  # (N, T, width)
        idle = x.shape[-1] - self.width
        if idle == 0:
            return active
        return torch.cat([active, x.narrow(-1, self.width, idle)], -1)
