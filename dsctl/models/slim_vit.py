"""DS-ViT: DeiT with dynamic idle slicing of the embedding width (DESIGN.md section 3, "DS-ViT").

Layout: patch embedding (conv, stride = patch) + class token + absolute position embedding, ``depth``
pre-norm blocks (attention, MLP ratio 4), final LayerNorm, linear head on the class token. Only the
blocks are sliced. A block at width d reads the first d channels of the (N, T, D) token stream,
normalises over those d channels (affine sliced ``[:d]``), runs d / head_dim heads (head_dim fixed) and
an MLP of hidden width 4d, and adds its result to those d channels; channels d..D are *idle* and pass
through unchanged, bit for bit. Patch embedding, position embedding, class token, final norm and head
always use all D channels.

Search space (three stages): ``embed`` (D, fixed); the ``gate_after`` blocks before the gate (the
smallest width in every indexed sub-network, D in the full network); the blocks after it, routed over
widths ``min_heads * head_dim, ..., D`` in steps of one head. The gate reads the class token after the
blocks before it (:class:`~dsctl.layers.gate.SlimGate` in token mode). By default it has no attention
head, so the full network is exactly timm's DeiT: same parameter names and shapes
(``timm.create_model("deit_small_patch16_224")``), and ``dsctl.weights.load_full_width`` / ``--init-from`` loads its
state dict. The family has no BatchNorm, so it needs no BN recalibration.

The input size is fixed when the model is built (``img_size``): the position embedding has one entry per
patch, and another size raises ValueError rather than silently resampling it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsctl.errors import DsctlError
from dsctl.layers.gate import SlimGate
from dsctl.layers.slim_vit import SlimAttention, SlimLayerNorm, SlimMlp
from dsctl.layers.static_vit import IdleSliced, TokenEmbed, TokenHead, TransformerBlock
from dsctl.models.base import GatePoint, Supernet
from dsctl.models.common import StageConfig, build_space
from dsctl.registry import register_model
from dsctl.spec import SliceSpec

__all__ = ["ViTConfig", "DSViT", "SlimViTBlock", "ds_deit_tiny", "ds_deit_small", "tiny_ds_vit"]

LN_EPS = 1e-6  # timm's ViT LayerNorm


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a DS-ViT: D = ``embed_dim`` channels, ``embed_dim // head_dim`` heads at full width.

    ``min_heads``: heads of the narrowest width (the blocks before the gate in every indexed
    sub-network, and the first routed choice). ``gate_after``: blocks before the gate (1 .. depth - 1).
    ``mlp_ratios``: MLP hidden-width ratios the routed blocks can run at apart from their heads (every
    head count at every ratio, ordered by MACs; the largest must be ``mlp_ratio``); empty: the MLP follows
    the width (``mlp_ratio`` x d), one coupled width as in DS-Net++.
    """

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    head_dim: int
    min_heads: int
    gate_after: int
    mlp_ratio: float = 4.0
    mlp_ratios: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_ratios", tuple(sorted(set(float(r) for r in self.mlp_ratios))))
        if self.mlp_ratios and (self.mlp_ratios[-1] != self.mlp_ratio or self.mlp_ratios[0] <= 0):
            raise ValueError(f"mlp_ratios {list(self.mlp_ratios)} must be positive and end at mlp_ratio "
                             f"{self.mlp_ratio:g} (the full network's MLP)")
        if self.embed_dim % self.head_dim:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of head_dim {self.head_dim}")
        if not 1 <= self.min_heads <= self.num_heads:
            raise ValueError(f"min_heads={self.min_heads} is not a head count (allowed: 1..{self.num_heads})")
        if not 1 <= self.gate_after < self.depth:
            raise ValueError(f"gate_after={self.gate_after} is not a gate position "
                             f"(allowed: 1..{self.depth - 1}: the number of blocks before the gate)")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_heads(self) -> int:
        return self.embed_dim // self.head_dim

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def widths(self) -> tuple[int, ...]:
        """Routed width choices: ``min_heads`` heads up to all of them, one head per step."""
        return tuple(h * self.head_dim for h in range(self.min_heads, self.num_heads + 1))

    def stages(self) -> tuple[StageConfig, ...]:
        d_min, full, g = self.widths[0], self.embed_dim, self.gate_after
        return (
            StageConfig("embed", 1, self.patch_size, (full,)),
            StageConfig(_blocks_name(0, g), g, 1, tuple(sorted({d_min, full}))),
            StageConfig(_blocks_name(g, self.depth), self.depth - g, 1, self.widths, routed=True,
                        mlp_ratios=self.mlp_ratios),
        )

    def routed_macs(self, spec: SliceSpec) -> int:
        """MACs of the routed blocks (per image, as fvcore counts them: q/k/v, the two attention matmuls,
        proj, fc1, fc2 at the active width and hidden units): what orders a space whose MLP is routed apart."""
        d = spec.widths[2]
        hidden = spec.mlp_hidden(2) or int(d * self.mlp_ratio)
        tokens = self.grid_size**2 + 1
        return (self.depth - self.gate_after) * tokens * (4 * d * d + 2 * tokens * d + 2 * d * hidden)


def _blocks_name(start: int, stop: int) -> str:
    return f"blocks.{start}" if stop - start == 1 else f"blocks.{start}-{stop - 1}"


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop a residual branch per sample with probability ``p`` (training only)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def _with_idle(active: Tensor, x: Tensor) -> Tensor:
    """``active`` (the first d channels, processed) followed by ``x``'s untouched channels d..D."""
    d = active.shape[-1]
    return active if d == x.shape[-1] else torch.cat([active, x[..., d:]], -1)


def _run_blocks(blocks, x: Tensor, width: int, hidden: int | None = None) -> Tensor:
    """``blocks`` in turn at one ``width`` (and MLP ``hidden`` units, None: the width's): the idle channels are
    split off once and joined once, not per block (the same values as calling each block, without a slice
    and a concatenation per block)."""
    h = x[..., :width]
    for block in blocks:
        h = block.forward_active(h, hidden)
    return _with_idle(h, x)


class SlimViTBlock(nn.Module):
    """Pre-norm transformer block with dynamic idle slicing (timm ``Block`` names: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = SlimLayerNorm(dim, eps=LN_EPS)
        self.attn = SlimAttention(dim, head_dim)
        self.norm2 = SlimLayerNorm(dim, eps=LN_EPS)
        self.mlp = SlimMlp(dim, mlp_ratio)
        self.drop_path = drop_path

    def forward(self, x: Tensor, width: int, hidden: int | None = None) -> Tensor:
        """x: (N, T, D) -> (N, T, D); only channels [:width] change."""
        return _run_blocks((self,), x, width, hidden)

    def forward_active(self, h: Tensor, hidden: int | None = None) -> Tensor:
        """The block on its active channels alone: h (N, T, d) -> (N, T, d), d = the block's width; the MLP
        at ``hidden`` units (None: ``mlp_ratio`` x d)."""
        h = h + _drop_path(self.attn(self.norm1(h)), self.drop_path, self.training)
        return h + _drop_path(self.mlp(self.norm2(h), hidden), self.drop_path, self.training)

    def forward_masked(self, x: Tensor, width: int, widths: Tensor, hidden: int | None = None,
                       hiddens: Tensor | None = None) -> Tensor:
        """The block at ``width`` (MLP at ``hidden`` units) for the whole batch, sample i masked to its own width
        ``widths[i]`` <= width (and MLP units ``hiddens[i]``, default its width's): equal to
        ``forward(x[i:i+1], widths[i], hiddens[i])`` at the cost of ``width`` (evaluation only: no drop path)."""
        h = x[..., :width]
        keep = (torch.arange(width, device=x.device) < widths[:, None]).to(x.dtype)[:, None, :]  # (N, 1, width)
        units = torch.arange(self.mlp.hidden(width) if hidden is None else hidden, device=x.device)
        if hiddens is None:
            hiddens = (widths.to(torch.float64) * self.mlp.mlp_ratio).long()
        keep_hidden = (units < hiddens[:, None]).to(x.dtype)[:, None, :]
        h = h + self.attn.forward_masked(self.norm1.forward_masked(h, keep), keep)
        h = h + self.mlp.forward_masked(self.norm2.forward_masked(h, keep), keep, keep_hidden, hidden)
        return _with_idle(h, x)

    def to_static(self, width: int, hidden: int | None = None) -> TransformerBlock:
        """The block as an ordinary width-``width`` transformer block (idle channels: see IdleSliced)."""
        return TransformerBlock(self.norm1.to_static(width), self.attn.to_static(width),
                                self.norm2.to_static(width), self.mlp.to_static(width, hidden))


class _PatchEmbed(nn.Module):
    """Non-overlapping patches -> D channels per token (timm name ``patch_embed.proj``)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, grid * grid, D)


class DSViT(Supernet):
    """DS-ViT supernet over ``cfg``; ``gate_attention`` adds the gate's attention head (then the full
    network is DeiT plus that head, no longer exactly DeiT)."""

    needs_bn_calibration = False

    def __init__(self, cfg: ViTConfig, num_classes: int = 1000, in_chans: int = 3, *, gate_attention: bool = False,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes, self.in_chans, self.default_input_size = num_classes, in_chans, cfg.img_size
        self.space = build_space(cfg.stages(), gate_after=f"blocks.{cfg.gate_after - 1}", cost=cfg.routed_macs)
        dim = cfg.embed_dim
        self.patch_embed = _PatchEmbed(in_chans, dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2 + 1, dim))
        rates = torch.linspace(0, drop_path_rate, cfg.depth).tolist()  # timm's linear stochastic-depth rule
        self.blocks = nn.ModuleList(SlimViTBlock(dim, cfg.head_dim, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()
        # without attention the gate runs only in indexed sub-networks, whose class token it reads at the
        # smallest width; with it, the gate is part of every sub-network, the full one included
        gate_in = dim if gate_attention else self.gate_in_channels
        self.gate = SlimGate(gate_in, max(16, dim // 4), self.space.num_subnets, attention=gate_attention, tokens=True)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def gate_in_size(self, input_size: int) -> int:
        """Side of the patch grid (the token gate's MACs do not depend on it)."""
        return input_size // self.cfg.patch_size

    def _size_error(self, height: int, width: int) -> str:
        size = self.cfg.img_size
        return (f"{self.model_name or type(self).__name__} takes {size}x{size} inputs, got {height}x{width} (its "
                f"position embedding fixes the size: build the model with img_size={height} for that size)")

    def check_input_size(self, input_size: int) -> int:
        if input_size != self.cfg.img_size:
            raise DsctlError(self._size_error(input_size, input_size))
        return input_size

    def _embed(self, x: Tensor) -> Tensor:
        size = self.cfg.img_size
        if x.shape[-2:] != (size, size):
            raise ValueError(self._size_error(x.shape[-2], x.shape[-1]))
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        return x + self.pos_embed  # (N, T, D), T = grid * grid + 1

    def _blocks(self, routed: bool) -> tuple[SlimViTBlock, ...]:
        g = self.cfg.gate_after
        blocks = tuple(self.blocks)  # slicing the ModuleList would build a new ModuleList per call
        return blocks[g:] if routed else blocks[:g]

    def forward_pre(self, x: Tensor, spec: SliceSpec, encode: bool = False) -> GatePoint:
        width = spec.widths[1]
        x = _run_blocks(self._blocks(routed=False), self._embed(x), width)
        if not (encode or self.gate.attention):
            return GatePoint(x, None)
        active = x[..., :width]
        e = self.gate.encode(active)
        return GatePoint(_with_idle(self.gate.attend(active, e), x), e)

    def forward_post(self, h: Tensor, spec: SliceSpec) -> Tensor:
        h = _run_blocks(self._blocks(routed=True), h, spec.widths[2], spec.mlp_hidden(2))
        return self.head(self.norm(h[:, 0]))  # LayerNorm is per token: norm(h)[:, 0] == norm(h[:, 0])

    @torch.no_grad()
    def probe_points(self, x: Tensor, spec: SliceSpec) -> dict[str, Tensor]:
        """The class token's active channels, (N, d), after every block but the last (``blocks.i``)."""
        w = self.space.check(spec).widths
        x = self._embed(x)
        points: dict[str, Tensor] = {}
        for i, block in enumerate(self.blocks[:-1]):
            width = w[1] if i < self.cfg.gate_after else w[2]
            x = block(x, width, None if i < self.cfg.gate_after else spec.mlp_hidden(2))
            points[f"blocks.{i}"] = x[:, 0, :width]
        return points

    def channel_groups(self):
        """Units that move together when :mod:`dsctl.convert` orders a pretrained DeiT: the token channels
        (every layer reads or writes them), and per block its heads (``head_dim`` rows of each of q, k and v
        and as many columns of ``proj``) and its MLP hidden units (fc1 rows, fc2 columns)."""
        from dsctl.convert import ChannelGroup, Member

        dim, hd = self.cfg.embed_dim, self.cfg.head_dim
        token = [Member("patch_embed.proj.weight", 0), Member("patch_embed.proj.bias", 0, "other"),
                 Member("cls_token", 2, "other"), Member("pos_embed", 2, "other"),
                 Member("norm.weight", 0, "other"), Member("norm.bias", 0, "other"), Member("head.weight", 1)]
        groups = []
        for i, block in enumerate(self.blocks):
            b = f"blocks.{i}"
            token += [Member(f"{b}.norm1.weight", 0, "other"), Member(f"{b}.norm1.bias", 0, "other"),
                      Member(f"{b}.attn.qkv.weight", 1), Member(f"{b}.attn.proj.weight", 0),
                      Member(f"{b}.attn.proj.bias", 0, "other"), Member(f"{b}.norm2.weight", 0, "other"),
                      Member(f"{b}.norm2.bias", 0, "other"), Member(f"{b}.mlp.fc1.weight", 1),
                      Member(f"{b}.mlp.fc2.weight", 0), Member(f"{b}.mlp.fc2.bias", 0, "other")]
            heads = [Member(f"{b}.attn.qkv.weight", 0, offset=j * dim, block=hd) for j in range(3)]
            heads += [Member(f"{b}.attn.qkv.bias", 0, "other", offset=j * dim, block=hd) for j in range(3)
                      if block.attn.qkv.bias is not None]
            heads.append(Member(f"{b}.attn.proj.weight", 1, block=hd))
            groups.append(ChannelGroup(f"{b}.attn.heads", dim // hd, tuple(heads)))
            hidden = block.mlp.fc1.out_features
            groups.append(ChannelGroup(f"{b}.mlp.hidden", hidden, (
                Member(f"{b}.mlp.fc1.weight", 0), Member(f"{b}.mlp.fc1.bias", 0, "other"),
                Member(f"{b}.mlp.fc2.weight", 1))))
        if self.gate.attention:  # the gate's head reads and writes all token channels in the full network
            raise DsctlError("ordering the channels of a DS-ViT with a gate attention head is not supported "
                             "(build it with gate_attention=False, as timm's DeiT is)")
        return [ChannelGroup("tokens", dim, tuple(token)), *groups]

    def routed_blocks(self) -> list[tuple[int, nn.Module]]:
        raise NotImplementedError("DS-ViT has no output-masking simulation: a narrower block leaves the other "
                                  "channels idle, so zeroing a block's output is not the narrower network "
                                  "(forward_post_masked masks inside the blocks instead)")

    @torch.no_grad()
    def forward_post_masked(self, h: Tensor, routes: Tensor, spec: SliceSpec) -> Tensor:
        """Every routed block at ``spec``'s width, each sample masked inside the block (LayerNorm statistics,
        heads, MLP units, residual) to its route's width: exactly the routed sub-networks' outputs, at the
        widest one's cost."""
        width, hidden = spec.widths[2], spec.mlp_hidden(2)
        subnets = self.space.subnets
        widths = torch.tensor([s.widths[2] for s in subnets], device=h.device)[routes]  # (N,)
        hiddens = None
        if self.space.routes_mlp:  # ordered by MACs, a window's last member need not have the most heads or units
            hiddens = torch.tensor([s.mlp_hidden(2) for s in subnets], device=h.device)[routes]
            width, hidden = max(width, int(widths.max())), max(hidden, int(hiddens.max()))
        for block in self._blocks(routed=True):
            h = block.forward_masked(h, width, widths, hidden, hiddens)
        return self.head(self.norm(h[:, 0]))

    def to_static_parts(self, spec: SliceSpec, *, attention: bool = True) -> tuple[nn.Sequential, nn.Sequential]:
        """``pre``: embedding, the blocks before the gate (and the gate's attention head, if any);
        ``post``: the routed blocks, final norm and head. Idle channels: see :class:`IdleSliced`."""
        _, pre_w, post_w = self.space.check(spec).widths
        dim = self.cfg.embed_dim
        embed = TokenEmbed(copy.deepcopy(self.patch_embed.proj), self.cls_token, self.pos_embed, self.cfg.img_size)
        pre: list[nn.Module] = [embed, IdleSliced(nn.Sequential(*(b.to_static(pre_w) for b in self._blocks(False))),
                                                  pre_w, dim)]
        if attention and self.gate.attention:
            pre.append(self.gate.static_attention(pre_w))
        hidden = spec.mlp_hidden(2)
        post = [IdleSliced(nn.Sequential(*(b.to_static(post_w, hidden) for b in self._blocks(True))), post_w, dim),
                TokenHead(copy.deepcopy(self.norm), copy.deepcopy(self.head))]
        return nn.Sequential(*pre).eval(), nn.Sequential(*post).eval()

    @torch.no_grad()
    def to_uniform(self, spec: SliceSpec) -> nn.Sequential:
        """The width-multiplier baseline: a plain DeiT whose embedding, every block, final norm and head are
        at ``spec``'s routed width d (d / head_dim heads), weights copied from the first d channels.

        Trained alone, a static sub-network's idle channels would be dead weight (the patch tokens' channels
        d..D reach nothing, the class token's are a constant), so the baseline drops them; its MACs are
        counted as built.
        """
        d = self.space.check(spec).widths[2]
        hidden = spec.mlp_hidden(2)
        src = self.patch_embed.proj
        proj = nn.Conv2d(src.in_channels, d, src.kernel_size, src.stride, device=src.weight.device, dtype=src.weight.dtype)
        proj.weight.copy_(src.weight[:d])
        proj.bias.copy_(src.bias[:d])
        embed = TokenEmbed(proj, self.cls_token[..., :d], self.pos_embed[..., :d], self.cfg.img_size)
        norm = nn.LayerNorm(d, eps=self.norm.eps, device=src.weight.device, dtype=src.weight.dtype)
        norm.weight.copy_(self.norm.weight[:d])
        norm.bias.copy_(self.norm.bias[:d])
        head = nn.Linear(d, self.num_classes, device=src.weight.device, dtype=src.weight.dtype)
        head.weight.copy_(self.head.weight[:, :d])
        head.bias.copy_(self.head.bias)
        g = self.cfg.gate_after  # the routed blocks' MLP as the spec routes it; the others at d's ratio
        blocks = nn.Sequential(*(b.to_static(d, hidden if i >= g else None) for i, b in enumerate(self.blocks)))
        return nn.Sequential(embed, blocks, TokenHead(norm, head)).eval()


def _build(cfg: ViTConfig, num_classes: int, in_chans: int, gate_attention: bool, drop_path_rate: float,
           mlp_ratios: Sequence[float] | None = None) -> DSViT:
    if mlp_ratios:
        cfg = dataclasses.replace(cfg, mlp_ratios=tuple(mlp_ratios))
    return DSViT(cfg, num_classes, in_chans, gate_attention=gate_attention, drop_path_rate=drop_path_rate)


@register_model
def ds_deit_tiny(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, gate_after: int = 4,
                 min_heads: int = 1, gate_attention: bool = False, drop_path_rate: float = 0.0,
                 mlp_ratios: Sequence[float] | None = None) -> DSViT:
    """DS-DeiT-Ti: D = 192, 3 heads of 64, 12 blocks, patch 16; routed widths 64, 128, 192 (1-3 heads).

    Args:
        gate_after: blocks before the gate (they run at the smallest width in indexed sub-networks).
        min_heads: heads of the narrowest width.
        gate_attention: give the gate an attention head on the tokens (the full network is then not DeiT).
        drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks, as timm).
        mlp_ratios: route the MLP hidden width apart from the heads, at these ratios of the width (ending
            at 4, e.g. [2, 3, 4]): every head count at every ratio, ordered by MACs (ViTConfig.mlp_ratios).
    """
    cfg = ViTConfig(img_size, 16, 192, 12, 64, min_heads, gate_after)
    return _build(cfg, num_classes, in_chans, gate_attention, drop_path_rate, mlp_ratios)


@register_model
def ds_deit_small(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, gate_after: int = 4,
                  min_heads: int = 3, gate_attention: bool = False, drop_path_rate: float = 0.0,
                  mlp_ratios: Sequence[float] | None = None) -> DSViT:
    """DS-DeiT-S: D = 384, 6 heads of 64, 12 blocks, patch 16; routed widths 192, 256, 320, 384 (3-6 heads).

    Options as in :func:`ds_deit_tiny`.
    """
    cfg = ViTConfig(img_size, 16, 384, 12, 64, min_heads, gate_after)
    return _build(cfg, num_classes, in_chans, gate_attention, drop_path_rate, mlp_ratios)


@register_model
def tiny_ds_vit(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, patch_size: int = 4,
                embed_dim: int = 64, depth: int = 4, head_dim: int = 16, min_heads: int = 2, gate_after: int = 1,
                gate_attention: bool = False, drop_path_rate: float = 0.0,
                mlp_ratios: Sequence[float] | None = None) -> DSViT:
    """CPU-sized DS-ViT for 28-32 px inputs: patch 4 (7 x 7 + 1 tokens at 28 px), D = 64, 4 heads of 16,
    4 blocks, gate after the first; routed widths 32, 48, 64 (2-4 heads). Options as in :func:`ds_deit_tiny`.
    """
    cfg = ViTConfig(img_size, patch_size, embed_dim, depth, head_dim, min_heads, gate_after)
    return _build(cfg, num_classes, in_chans, gate_attention, drop_path_rate, mlp_ratios)
