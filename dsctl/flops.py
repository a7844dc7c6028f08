"""MAC counting with fvcore on exported static sub-networks.

One fused multiply-add = one MAC (fvcore calls it a "flop"). Counted: convolutions, linear layers,
matrix products and scaled dot-product attention, plus average pooling at its input size (C*H*W per
image), as the DS-Net authors' MAdds count every SE squeeze and the final global pool. Average pooling is
``aten::adaptive_avg_pool2d``, ``aten::avg_pool2d`` or ``aten::mean`` over exactly dims (2, 3) of a 4-D
tensor (how dsctl's models pool); a mean over any other dims is not pooling and is not counted. Not
counted, as in the papers: max pooling, BatchNorm, LayerNorm and element-wise ops (activations, SE
multiplies, residual sums).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsctl.models.base import Supernet
from dsctl.spec import SliceSpec

__all__ = ["MacsReport", "count_macs", "count_params", "count_subnet", "count_target", "macs_table", "gate_macs",
           "MACS_CONVENTION"]

logger = logging.getLogger(__name__)

MACS_CONVENTION = (
    "MACs: one fused multiply-add = 1 MAC (fvcore 'flop'); conv, linear, matmul and attention counted; "
    "average pooling (SE squeezes, final global pool) counted at its input size C*H*W; max pooling, "
    "BatchNorm, LayerNorm and element-wise ops not counted (DS-Net papers' convention)."
)

# fvcore's defaults that are not multiply-adds of a weight layer: switch them off. Average pooling gets
# dsctl's own handles below.
_NOT_COUNTED = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
    "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d", "aten::grid_sampler",
)


def _int_list(val: Any) -> list[int] | None:
    """The constant int list a traced argument holds (``dim=(2, 3)`` traces to a ListConstruct)."""
    node = val.node()
    if node.kind() == "prim::ListConstruct":
        items = [v.toIValue() for v in node.inputs()]
        return items if all(isinstance(i, int) for i in items) else None
    item = val.toIValue()
    return [item] if isinstance(item, int) else None


def _avg_pool_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """adaptive_avg_pool2d / avg_pool2d: every input element is summed once, N*C*H*W."""
    from fvcore.nn.jit_handles import get_shape

    return math.prod(get_shape(inputs[0]))


def _spatial_mean_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """aten::mean over dims (2, 3) of an (N, C, H, W) map is global average pooling: N*C*H*W.

    ``aten::mean(self, dtype)`` (a full mean, e.g. in a loss) and means over other dims count 0.
    """
    from fvcore.nn.jit_handles import get_shape

    shape = get_shape(inputs[0])
    dims = _int_list(inputs[1]) if len(inputs) >= 3 else None
    if shape is None or len(shape) != 4 or dims is None or sorted(d % 4 for d in dims) != [2, 3]:
        return 0
    return math.prod(shape)


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

    def to_row(self) -> dict[str, Any]:
        """The row of ``dsctl flops --csv``."""
        return {"model": self.model, "subnet": self.subnet, "width": self.width, "macs": self.macs,
                "macs_m": round(self.macs_m, 3), "params": self.params, "params_m": round(self.params_m, 4),
                "input_size": self.input_size}


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
        analysis.set_op_handle("aten::mean", _spatial_mean_handle)
        analysis.set_op_handle("aten::adaptive_avg_pool2d", _avg_pool_handle, "aten::avg_pool2d", _avg_pool_handle)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analysis.total())


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_subnet(model: Supernet, spec: SliceSpec, input_size: int | None = None) -> MacsReport:
    """MACs and parameters of ``spec`` counted on its exported static network (gate excluded)."""
    input_size = model.check_input_size(input_size or model.default_input_size)
    static = model.to_static(spec)
    return MacsReport(model.model_name, model.space.label(spec), model.space.width(spec),
                      count_macs(static, input_size, model.in_chans), count_params(static), input_size)


def count_target(target: str, *, widths: Sequence[str] | None = None, input_size: int | None = None,
                 num_classes: int | None = None, in_chans: int | None = None,
                 init_from: str | Path | None = None) -> list[MacsReport]:
    """What ``dsctl flops`` counts: the sub-networks at ``widths`` (default: every indexed one and the full
    network) of a registered model or a supernet/gate checkpoint (see :func:`dsctl.targets.load_model_target`),
    at ``input_size`` (default: the run's, else the model's).

    Example:
        >>> [r.subnet for r in count_target("tiny_ds_resnet", widths=["0.5", "largest"])]
        ['k2', 'k6']
    """
    from dsctl.targets import load_model_target

    t = load_model_target(target, num_classes=num_classes, in_chans=in_chans, init_from=init_from)
    space = t.model.space
    specs = [space.resolve(w) for w in widths] if widths else space.all_specs()
    return [count_subnet(t.model, s, input_size or t.input_size) for s in specs]


def macs_table(model: Supernet, input_size: int | None = None) -> list[int]:
    """MACs of every indexed sub-network k, in order (used for routing costs)."""
    return [count_subnet(model, spec, input_size).macs for spec in model.space.subnets]


def gate_macs(model: Supernet, input_size: int | None = None) -> int:
    """MACs of the slimming decision itself (encoder + slimming head) on one image.

    The gate's own average pooling counts its input size; with an attention head the encoder is the
    block's SE, already counted in every route, so only the head is added (see ``SlimGate.macs``).
    """
    size = model.gate_in_size(input_size or model.default_input_size)
    return model.gate.macs(model.gate_in_channels, size, size)
