"""The ``Supernet`` contract every model family implements.

A supernet runs in two halves around its gate: ``forward_pre`` (stem up to the gate, returns the
features and the gate's shared encoding) and ``forward_post`` (the routed stages and the head). Both
take the active :class:`~dsctl.spec.SliceSpec`; nothing about the width is stored on modules.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from dsctl.layers.gate import SlimGate
from dsctl.spec import SearchSpace, SliceSpec

__all__ = ["Supernet", "GatePoint", "BoundSubnet", "bind"]


class GatePoint(NamedTuple):
    """Features at the gate position (after the attention head) and the gate's shared encoding.

    ``encoding`` is None when it was not asked for and the attention head did not need it.
    """

    features: Tensor
    encoding: Tensor | None


class Supernet(nn.Module):
    """Base class: subclasses set ``self.space`` and ``self.gate`` and implement the three methods."""

    space: SearchSpace
    gate: SlimGate
    model_name: str = ""
    model_kwargs: dict
    num_classes: int
    in_chans: int
    default_input_size: int
    needs_bn_calibration: bool = True
    """False for families without BatchNorm (DS-ViT): BN recalibration has nothing to estimate for them."""

    def forward(self, x: Tensor, spec: SliceSpec | None = None) -> Tensor:
        """Logits of the sub-network ``spec`` (default: the full-width network)."""
        spec = self.space.full if spec is None else spec
        return self.forward_post(self.forward_pre(x, spec).features, spec)

    def forward_pre(self, x: Tensor, spec: SliceSpec, encode: bool = False) -> GatePoint:
        """Stem up to the gate position; ``encode`` asks for the gate encoding (for routing)."""
        raise NotImplementedError

    def forward_post(self, h: Tensor, spec: SliceSpec) -> Tensor:
        raise NotImplementedError

    def to_static(self, spec: SliceSpec) -> nn.Module:
        """A plain-torch module computing ``self(x, spec)`` in eval mode (weights copied)."""
        pre, post = self.to_static_parts(spec)
        return nn.Sequential(*pre, *post).eval()

    def to_uniform(self, spec: SliceSpec) -> nn.Module:
        """The width-multiplier baseline at ``spec``: a plain network of that width, to be trained alone.

        Default: the static sub-network (:meth:`to_static`). DS-ViT narrows every layer to the routed width
        instead (a DeiT of that width, no idle channels).
        """
        return self.to_static(spec)

    def to_static_parts(self, spec: SliceSpec, *, attention: bool = True) -> tuple[nn.Sequential, nn.Sequential]:
        """Plain-torch halves around the gate: ``pre`` ends with the gate's attention head (if any; built by
        :meth:`SlimGate.static_attention`), or stops before it with ``attention=False``."""
        raise NotImplementedError

    @torch.no_grad()
    def to_static_routed(self, window: tuple[int, int]) -> nn.Module:
        """The supernet and its gate over the inclusive ``window`` as one plain-torch module: the shared
        ``pre`` (at the window's sub-networks' common width), the static gate (which applies the attention
        head, if any, and decides as :meth:`SlimGate.decide` does, ``route_bias`` included), and one static
        tail per route. See :class:`~dsctl.layers.static.RoutedNet`."""
        from dsctl.layers.static import RoutedNet, StaticFront

        lo, hi = window
        specs = self.space.subnets[lo : hi + 1]
        pre, _ = self.to_static_parts(specs[0], attention=False)
        gate = self.gate.to_static(self.gate_in_channels, window)
        tails = [self.to_static_parts(s)[1] for s in specs]
        return RoutedNet(StaticFront(pre, gate), tails, self.num_classes, lo).eval()

    def routing_parameters(self) -> list[nn.Parameter]:
        """Gate parameters that only routing uses (stage II trains these; stage I freezes them).

        The slimming head always; the shared encoder too when there is no attention head to share it.
        """
        return self.gate.routing_parameters()

    @property
    def gate_in_channels(self) -> int:
        """Channels of the features the gate reads in the indexed sub-networks.

        Default: the width, fixed across the indexed sub-networks, of the stage just before the first
        routed stage (the gate sits between them).
        """
        space = self.space
        return space.subnets[0].widths[space.ratio_stage - 1]

    def check_input_size(self, input_size: int) -> int:
        """Return ``input_size`` if this model runs square images of that size; DsctlError otherwise.

        Default: any size. Families whose input size is fixed when built (DS-ViT) override it.
        """
        return input_size

    def gate_in_size(self, input_size: int) -> int:
        """Height (= width) of the features the gate reads, for a square ``input_size`` image.

        Generic fallback: one forward of a zeros image up to the gate; families override it analytically.
        """
        param = next(self.parameters())
        x = param.new_zeros(1, self.in_chans, input_size, input_size)
        was_training = self.training
        try:
            with torch.no_grad():
                return int(self.eval().forward_pre(x, self.space.smallest()).features.shape[-1])
        finally:
            self.train(was_training)

    def probe_points(self, x: Tensor, spec: SliceSpec) -> dict[str, Tensor]:
        """Globally average-pooled features, shape (N, C), at each candidate gate position, by name.

        Runs the network at ``spec``'s widths without gradient, up to the last candidate position (no
        hooks). ``dsctl analyze`` fits linear probes on these to choose the gate position.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement probe_points "
                                  "(candidate gate positions for dsctl analyze)")

    def routed_blocks(self) -> list[tuple[int, nn.Module]]:
        """(stage index, block) for every block after the gate whose output width the gate sets."""
        raise NotImplementedError

    @torch.no_grad()
    def forward_post_masked(self, h: Tensor, routes: Tensor, spec: SliceSpec) -> Tensor:
        """Routing simulated by masking: every sample runs ``spec`` (the window's widest sub-network) and
        each routed block's output keeps only the channels of the sample's route (absolute index in
        ``routes``, shape (N,)). Costs the widest member's time whatever the routes.

        Default (CNN families): the output of every block of :meth:`routed_blocks` is multiplied by a
        per-sample channel mask, so BatchNorm statistics and inner widths stay the widest member's and
        the outputs only approximate the routed sub-networks'. Families override it where an exact masked
        execution exists (DS-ViT).
        """
        specs = self.space.subnets
        handles = []
        for stage, block in self.routed_blocks():
            widths = torch.tensor([s.widths[stage] for s in specs], device=h.device)[routes]  # (N,)

            def hook(_m, _inp, out, widths=widths):
                keep = torch.arange(out.shape[1], device=out.device)[None] < widths[:, None]
                return out * keep[:, :, None, None].to(out.dtype)

            handles.append(block.register_forward_hook(hook))
        try:
            return self.forward_post(h, spec)
        finally:
            for handle in handles:
                handle.remove()

    def static_channels(self, spec: SliceSpec) -> dict[str, int]:
        """Per-stage output channels of ``spec`` (for export sidecars)."""
        return self.space.stage_widths(spec)


class BoundSubnet(nn.Module):
    """``model`` with its spec fixed at build time, so tracers and timers can call it with a tensor."""

    def __init__(self, model: Supernet, spec: SliceSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = model.space.check(spec)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, self.spec)


def bind(model: Supernet, spec: SliceSpec) -> BoundSubnet:
    return BoundSubnet(model, spec)
