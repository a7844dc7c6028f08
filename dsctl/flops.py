"""MAC counting with fvcore on exported static sub-networks.

One fused multiply-add = one MAC (fvcore calls it a "flop"). Counted: convolutions, linear layers,
matrix products and scaled dot-product attention. Not counted, as in the DS-Net papers: BatchNorm,
LayerNorm, pooling and element-wise ops (activations, SE multiplies, residual sums).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsctl.models.base import Supernet
from dsctl.spec import SliceSpec

__all__ = ["MacsReport", "count_macs", "count_params", "count_subnet", "macs_table", "gate_macs", "MACS_CONVENTION"]

logger = logging.getLogger(__name__)

MACS_CONVENTION = (
    "MACs: one fused multiply-add = 1 MAC (fvcore 'flop'); conv, linear, matmul and attention counted; "
    "BatchNorm, LayerNorm, pooling and element-wise ops not counted (DS-Net papers' convention)."
)

# fvcore's defaults that are not multiply-adds of a weight layer: switch them off.
_NOT_COUNTED = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
    "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d", "aten::grid_sampler",
)


def _sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """scaled_dot_product_attention: Q K^T and A V, each B*H*Lq*Lk*d MACs."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    v = get_shape(inputs[2])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * q[-1] + batch * q[-2] * k[-2] * v[-1]


@dataclass(frozen=True)
class MacsReport:
    """MACs and parameters of one sub-network at one input size."""

    model: str
    subnet: str
    width: float | None
    macs: int
    params: int
    input_size: int

    @property
    def macs_m(self) -> float:
        return self.macs / 1e6

    @property
    def params_m(self) -> float:
        return self.params / 1e6


def count_macs(module: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """MACs of ``module`` on one ``in_chans x input_size x input_size`` image (batch 1).

    Example:
        >>> count_macs(torch.nn.Conv2d(3, 8, 3, padding=1), 8)   # 8*8 pixels * 8 out * 27
        13824
    """
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS

    module = module.eval()
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros(1, in_chans, input_size, input_size, device=device, dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore traces with torch.jit, which warns it is deprecated
        analysis = FlopCountAnalysis(module, x)
        # fvcore keeps a default handle even when told to ignore an op, so start from a clean handle set.
        analysis.clear_op_handles()
        analysis.set_op_handle(**{op: h for op, h in _DEFAULT_SUPPORTED_OPS.items() if op not in _NOT_COUNTED})
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analysis.total())


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_subnet(model: Supernet, spec: SliceSpec, input_size: int | None = None) -> MacsReport:
    """MACs and parameters of ``spec`` counted on its exported static network (gate excluded)."""
    input_size = input_size or model.default_input_size
    static = model.to_static(spec)
    label = model.space.label(spec)
    width = None if label == "largest" and spec not in model.space.subnets else model.space.ratio(spec)
    return MacsReport(model.model_name, label, width, count_macs(static, input_size, model.in_chans),
                      count_params(static), input_size)


def macs_table(model: Supernet, input_size: int | None = None) -> list[int]:
    """MACs of every indexed sub-network k, in order (used for routing costs)."""
    return [count_subnet(model, spec, input_size).macs for spec in model.space.subnets]


def gate_macs(model: Supernet) -> int:
    """MACs of the slimming decision itself (encoder + slimming head) on one image."""
    gate = model.gate
    head = gate.head.in_features * gate.head.out_features
    if gate.expand is not None:  # the encoder is the block's SE, already counted in every route
        return head
    return gate.reduce.in_channels * gate.reduce.out_channels + head
