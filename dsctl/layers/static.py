"""Plain ``torch.nn`` building blocks of exported static sub-networks.

These hold no widths and no dsctl logic; exported files are TorchScript / ``torch.export`` archives of
them, so they load without dsctl installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pointwise", "linear_of", "take_rows", "SqueezeExcite", "Bottleneck", "ClassifierHead", "StaticGate",
           "StaticFront", "RoutedNet"]


def pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution (``weight``: (O, C, 1, 1)) of vectors ``x`` (N, C, 1, 1), computed as the matrix
    product it is; returns (N, O, 1, 1), views of the product.

    ``F.conv2d`` would give the same numbers through oneDNN's convolution, which on these shapes (a
    squeeze-excitation's reduce and expand, the gate's encoder) took 3-8x as long as ``F.linear`` on 2 CPU
    threads (N 6-64, C 96-928): a per-call cost that a routed model pays once per group.
    """
    return F.linear(x.flatten(1), weight.flatten(1), bias)[:, :, None, None]


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along the batch dimension, in ``x``'s memory format (channels_last stays channels_last).

    Each sample's activation is one contiguous run of memory in either layout, so the gather is a row copy of
    a 2-D view: ``index_select`` on (N, everything else). Indexing a 4-D channels_last tensor (``x[index]``)
    goes through the general strided kernel instead and took 10x as long (32 x 32 x 28 x 28 floats, 2
    threads: 708 vs 68 us); ``x.index_select(0, index)`` on the 4-D tensor returns NCHW rows, and every
    layer after it would run in the slower layout.
    """
    n = index.shape[0]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        c, h, w = x.shape[1], x.shape[2], x.shape[3]
        rows = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1).index_select(0, index)
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)
    if x.is_contiguous():
        return x.reshape(x.shape[0], -1).index_select(0, index).view([n] + list(x.shape[1:]))
    return x[index]


def linear_of(conv: nn.Conv2d | nn.Linear) -> nn.Linear:
    """The ``nn.Linear`` that a 1x1 ``conv`` is on (N, C) vectors (a copy of its weights); a Linear as is."""
    if isinstance(conv, nn.Linear):
        return conv
    linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device=conv.weight.device,
                       dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


class SqueezeExcite(nn.Module):
    """x * sigmoid(expand(relu(reduce(mean(x))))), reduce and expand ``nn.Linear`` on the pooled (N, C) vector.

    Given as 1x1 convs (what the supernet holds), they are converted (:func:`linear_of`): on a pooled vector a
    1x1 conv is a matrix product, and oneDNN's convolution took 3-8x as long as ``F.linear`` on these shapes
    (see :func:`pointwise`). Linear modules, not a functional call on conv weights, so that module-level tools
    (Torch-Pruning's dependency graph, fvcore) see the layers as what they are.
    """

    def __init__(self, reduce: nn.Conv2d | nn.Linear, expand: nn.Conv2d | nn.Linear) -> None:
        super().__init__()
        self.reduce = linear_of(reduce)
        self.expand = linear_of(expand)

    def forward(self, x: Tensor) -> Tensor:
        e = torch.relu(self.reduce(x.mean((2, 3))))
        return x * torch.sigmoid(self.expand(e))[:, :, None, None]


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 -> 3x3 (stride) -> 1x1, plus identity or projection shortcut, then ReLU."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)  # ends with BN: a fresh tensor, so the sum and ReLU run in place (torchvision's way)
        out += self.shortcut(x)
        return torch.relu_(out)


class ClassifierHead(nn.Module):
    """Global average pool -> (dropout) -> linear."""

    def __init__(self, fc: nn.Linear, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(x.mean((2, 3))))


class StaticGate(nn.Module):
    """Shared encoder, optional attention head, slimming head over a window; returns (features, routes).

    ``pool_first``: encoder = ReLU(reduce(mean(x))) (1x1 on the pooled vector); otherwise
    mean(ReLU(reduce(x))) (a conv on the map). Routes = argmax(head(e) + route_bias), within the window.
    ``tokens``: x is a token sequence (N, T, C); the encoder reads the first ``reduce.in_channels``
    channels of the class token, and the attention head scales those channels of every token (the
    remaining channels pass unchanged).
    """

    # a constant for TorchScript, which then compiles only the branch taken (``expand`` may be an Identity)
    __constants__ = ["attention"]

    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d | None, head: nn.Linear, route_bias: Tensor,
                 pool_first: bool = True, tokens: bool = False) -> None:
        super().__init__()
        self.reduce = reduce
        self.expand = expand if expand is not None else nn.Identity()
        self.attention = expand is not None
        self.pool_first = pool_first
        self.tokens = tokens
        self.width = reduce.in_channels
        self.head = head
        self.register_buffer("route_bias", route_bias.detach().clone().float())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.tokens:
            active = x.narrow(-1, 0, self.width)
            e = torch.relu(pointwise(active[:, 0].unsqueeze(-1).unsqueeze(-1), self.reduce.weight, self.reduce.bias))
            if self.attention:
                g = pointwise(e, self.expand.weight, self.expand.bias)
                active = active * torch.sigmoid(g).flatten(1).unsqueeze(1)
                x = torch.cat([active, x.narrow(-1, self.width, x.shape[-1] - self.width)], -1)
            return x, (self.head(e.flatten(1)) + self.route_bias).argmax(1)
        if self.pool_first:
            e = torch.relu(pointwise(x.mean((2, 3), keepdim=True), self.reduce.weight, self.reduce.bias))
        else:
            e = torch.relu(self.reduce(x)).mean((2, 3), keepdim=True)
        if self.attention:
            x = x * torch.sigmoid(pointwise(e, self.expand.weight, self.expand.bias))
        return x, (self.head(e.flatten(1)) + self.route_bias).argmax(1)


class StaticFront(nn.Module):
    """The shared part of a routed network: ``pre`` then the static gate; returns (features, routes)."""

    def __init__(self, pre: nn.Module, gate: StaticGate) -> None:
        super().__init__()
        self.pre = pre
        self.gate = gate

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.gate(self.pre(x))


class RoutedNet(nn.Module):
    """Deployable dynamic network: a front (shared stem and gate, returning features and window-relative
    routes) and one static sub-network tail per route.

    Samples are grouped by the gate's choice and each group runs its own (narrower, dense) tail;
    outputs come back in input order. ``first_route`` is the supernet index of ``tails[0]``. A plain
    ``nn.Module`` over any front and tails: :class:`StaticFront` and static tails, or the programs of a
    ``torch.export`` dynamic export (see dsctl.export.load_dynamic); TorchScript can script it too.
    """

    def __init__(self, front: nn.Module, tails: list[nn.Module], num_classes: int, first_route: int) -> None:
        super().__init__()
        self.front = front
        self.tails = nn.ModuleList(tails)
        self.num_classes = num_classes
        self.first_route = first_route

    def forward(self, x: Tensor) -> Tensor:
        h, routes = self.front(x)
        counts: list[int] = torch.bincount(routes, minlength=len(self.tails)).tolist()  # the one host sync
        i = 0
        for tail in self.tails:
            if counts[i] == x.shape[0]:  # the whole batch takes this route: no gather, no scatter
                return tail(h)
            i += 1
        # samples grouped by route (a stable sort keeps input order within a group), gathered once; each
        # group is then a slice of the gathered features, a view in their layout (no copy per route)
        order = torch.argsort(routes, stable=True)
        grouped = take_rows(h, order)
        outs: list[Tensor] = []
        start = 0
        i = 0
        for tail in self.tails:
            c = counts[i]
            if c > 0:
                outs.append(tail(grouped.narrow(0, start, c)))
            start += c
            i += 1
        logits = torch.cat(outs)
        return torch.empty_like(logits).index_copy_(0, order, logits)  # back in input order
