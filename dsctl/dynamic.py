"""Dynamic routing: the gate's choice per input, grouped sliced inference, expected and average MACs.

Routing space: an inclusive window ``(lo, hi)`` of consecutive indexed sub-networks. A batch is run once
up to the gate; the gate picks a sub-network per sample (``gate.decide`` at evaluation: argmax of the
logits plus the gate's per-route offsets ``route_bias``; straight-through Gumbel-softmax in training);
samples are grouped by choice and each group runs its **sliced** sub-network densely; outputs are
scattered back in input order. Nothing is masked at inference.

Example:
    >>> net = DynamicNet(model, window=(0, 3)).eval()
    >>> logits = net(images)            # grouped sliced inference
    >>> routes = net.routes(images)     # chosen sub-network index per image
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.errors import SpecError
from dsctl.layers.gate import gumbel_one_hot
from dsctl.layers.static import take_rows
from dsctl.models.base import Supernet

__all__ = ["check_window", "gate_logits", "RoutedOutput", "forward_routed", "dynamic_forward", "grouped_post", "DynamicNet",
           "average_macs", "masked_forward"]


def check_window(model: Supernet, window: tuple[int, int] | None) -> tuple[int, int]:
    """Validate a routing window; ``None`` means every indexed sub-network."""
    k = model.space.num_subnets
    if window is None:
        return 0, k - 1
    lo, hi = (int(v) for v in window)
    if not (0 <= lo < hi < k):
        raise SpecError(f"routing window {lo}:{hi} is not valid for {model.model_name} "
                        f"(allowed: A:B with 0 <= A < B <= {k - 1})")
    return lo, hi


def gate_logits(model: Supernet, encoding: Tensor, window: tuple[int, int]) -> Tensor:
    """Slimming-head logits restricted to the window, shape (N, hi - lo + 1)."""
    lo, hi = window
    return model.gate.route_logits(encoding)[:, lo : hi + 1]


class RoutedOutput(NamedTuple):
    """What a routed training forward returns (losses read these, nothing is read off modules)."""

    logits: Tensor          # (N, classes): the chosen sub-network's output, differentiable w.r.t. the gate
    gate_logits: Tensor     # (N, W) slimming-head logits over the window
    probs: Tensor           # (N, W) softmax of gate_logits
    routes: Tensor          # (N,) chosen index within the window (0 = the window's smallest)
    member_logits: Tensor   # (W, N, classes) every window member's output (no gradient)
    expected_macs: Tensor   # () batch-mean expected MACs under probs (differentiable)


def forward_routed(model: Supernet, x: Tensor, window: tuple[int, int], macs: Tensor, *, tau: float = 1.0,
                   sample: bool = True) -> RoutedOutput:
    """Gate-training forward with the supernet frozen.

    Every window member runs (sliced, no gradient); the output is ``sum_k g_k * out_k`` with ``g`` the
    straight-through Gumbel one-hot, so the forward value is exactly the chosen sub-network's output and
    the gate gets the exact straight-through gradient ``<dL/dlogits, out_k>`` for every k.
    ``sample=False`` uses the argmax instead of a Gumbel sample.
    """
    lo, hi = window
    specs = model.space.subnets[lo : hi + 1]
    with torch.no_grad():
        point = model.forward_pre(x, specs[0], encode=True)
        h = point.features
        members = torch.stack([model.forward_post(h, s).float() for s in specs])
    if not model.gate.attention:  # the encoder only serves routing: train it, on the features it reads
        e = model.gate.encode(h)
    else:  # the encoder is shared with the (frozen) attention head and reads the features before it
        e = point.encoding
    g_logits = gate_logits(model, e, window).float()
    probs = F.softmax(g_logits, -1)
    if sample:
        g = gumbel_one_hot(g_logits, tau)
    else:
        g = F.one_hot(g_logits.argmax(-1), g_logits.shape[-1]).to(g_logits) + probs - probs.detach()
    logits = torch.einsum("nw,wnc->nc", g, members)
    expected = (probs * macs.to(probs)).sum(-1).mean()
    return RoutedOutput(logits, g_logits, probs, g.argmax(-1), members, expected)


@torch.no_grad()
def dynamic_forward(model: Supernet, x: Tensor, window: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Grouped sliced inference: returns (logits in input order, absolute sub-network index per sample)."""
    point = model.forward_pre(x, model.space.subnets[window[0]], encode=True)
    assert point.encoding is not None
    routes = model.gate.decide(point.encoding, window)
    return grouped_post(model, point.features, routes), routes


@torch.no_grad()
def grouped_post(model: Supernet, h: Tensor, routes: Tensor) -> Tensor:
    """Run each group of gate-point features through its routed sub-network; outputs in input order.

    The same grouping as the deployable :class:`~dsctl.layers.static.RoutedNet`: one gather of the features
    in route order (:func:`~dsctl.layers.static.take_rows`, layout kept), each group a slice of it."""
    specs = model.space.subnets
    ks, counts = torch.unique(routes, return_counts=True)
    if len(ks) == 1:  # the whole batch takes one route: no gather, no scatter
        return model.forward_post(h, specs[int(ks[0])])
    order = torch.argsort(routes, stable=True)
    grouped = take_rows(h, order)
    outs = []
    start = 0
    for k, c in zip(ks.tolist(), counts.tolist()):
        outs.append(model.forward_post(grouped.narrow(0, start, c), specs[k]))
        start += c
    logits = torch.cat(outs)
    return torch.empty_like(logits).index_copy_(0, order, logits)


@torch.no_grad()
def masked_forward(model: Supernet, x: Tensor, window: tuple[int, int]) -> Tensor:
    """The cost reference "masking at full width": every sample runs the window's widest sub-network with
    its channels beyond the chosen route's masked (:meth:`Supernet.forward_post_masked`).

    This is how routing is often simulated; it costs the widest member's time whatever the gate picks,
    which is what the benchmark compares grouped slicing against. For the CNN families the outputs only
    approximate the sliced sub-networks' (BatchNorm statistics and inner widths stay at the widest
    member's); for DS-ViT the masking is inside the blocks and the outputs are the routed ones.
    """
    lo, hi = window
    specs = model.space.subnets
    point = model.forward_pre(x, specs[lo], encode=True)
    assert point.encoding is not None
    routes = model.gate.decide(point.encoding, window)
    return model.forward_post_masked(point.features, routes, specs[hi])


class DynamicNet(nn.Module):
    """A supernet plus a routing window, callable with a tensor: ``DynamicNet(model, (0, 3))(x)``."""

    def __init__(self, model: Supernet, window: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.model = model
        self.window = check_window(model, window)

    def forward(self, x: Tensor) -> Tensor:
        return dynamic_forward(self.model, x, self.window)[0]

    @torch.no_grad()
    def routes(self, x: Tensor) -> Tensor:
        point = self.model.forward_pre(x, self.model.space.subnets[self.window[0]], encode=True)
        assert point.encoding is not None
        return self.model.gate.decide(point.encoding, self.window)


def average_macs(histogram: list[int] | Tensor, route_macs: list[int], gate_macs: int) -> float:
    """Route histogram (counts per absolute index) x per-route MACs, plus the gate's own MACs."""
    counts = torch.as_tensor(histogram, dtype=torch.float64)
    total = counts.sum()
    if total == 0:
        return float("nan")
    return float((counts * torch.as_tensor(route_macs, dtype=torch.float64)).sum() / total) + gate_macs
