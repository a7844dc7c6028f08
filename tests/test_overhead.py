"""The sliced supernet in eval mode runs the same operators as its exported static sub-network.

A deterministic stand-in for the batch-1 slicing overhead (benchmarks/ P1, issue 11): timing belongs to the
benchmark runner, but every extra operator per call (a weight copy, a slice, a concatenation of idle
channels) is visible as a count, whatever the machine's load.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsctl.export import export_subnet
from dsctl.models.base import bind
from dsctl.registry import build_model


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _ops(fn, x: torch.Tensor) -> Counter[str]:
    with torch.no_grad():
        fn(x)  # first call: kept slices are made here
        with _CountOps() as mode:
            fn(x)
    return mode.ops


# operators that only rename a view (no data touched): the static modules use unbind/narrow where the
# sliced ones index, which is the same work; the sliced SE reshapes (N, C, 1, 1) vectors and 1x1 conv
# weights for its matrix products (view, unsqueeze) where the static one holds Linear layers
_VIEWS = {"aten.unbind", "aten.narrow", "aten.select", "aten.alias", "aten.dropout", "aten.view", "aten.unsqueeze"}


@pytest.mark.parametrize("name", ["tiny_ds_mobilenetv1", "tiny_ds_resnet", "tiny_ds_vit"])
def test_sliced_subnetwork_runs_no_more_operators_than_its_export(name: str) -> None:
    model = build_model(name).eval()
    x = torch.randn(1, model.in_chans, 28, 28)
    for spec in (model.space.smallest(), model.space.subnets[model.space.num_subnets // 2], model.space.full):
        sliced = _ops(bind(model, spec), x)
        static = _ops(export_subnet(model, spec), x)
        extra = {op: n - static[op] for op, n in sliced.items() if n > static[op] and op not in _VIEWS}
        assert not extra, f"{name} {spec}: the sliced forward runs extra operators {extra}"


class _ConvInputs(TorchDispatchMode):
    """The spatial size of every convolution's input."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.mkldnn_convolution):
            self.sizes.append(tuple(args[0].shape[2:]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("routed", [False, True])
def test_squeeze_excitation_and_gate_run_matrix_products_not_convolutions(routed: bool) -> None:
    """A 1x1 conv on pooled (N, C, 1, 1) vectors (every SE block, the gate's encoder and attention head) runs
    as a matrix product (``dsctl.layers.static.pointwise``): oneDNN's convolution took 3-8x as long on those
    shapes, per call. Sliced, exported and routed networks alike; the results are the convolution's."""
    from dsctl.export import export_routed

    model = build_model("tiny_ds_mobilenetv1").eval()
    x = torch.randn(4, 1, 28, 28)
    spec = model.space.subnets[model.space.num_subnets // 2]
    nets = [export_routed(model, (1, 3))] if routed else [bind(model, spec), export_subnet(model, spec)]
    for net in nets:
        with torch.no_grad(), _ConvInputs() as seen:
            net(x)
        assert seen.sizes and (1, 1) not in seen.sizes, f"{type(net).__name__}: convolutions on 1x1 maps"


def test_pointwise_is_the_convolution() -> None:
    from dsctl.layers.static import pointwise

    x, w, b = torch.randn(5, 96, 1, 1), torch.randn(66, 96, 1, 1), torch.randn(66)
    torch.testing.assert_close(pointwise(x, w, b), torch.nn.functional.conv2d(x, w, b), rtol=1e-5, atol=1e-5)
    # a sliced weight (a strided view) too
    torch.testing.assert_close(pointwise(x[:, :48], w[:30, :48], b[:30]),
                               torch.nn.functional.conv2d(x[:, :48], w[:30, :48], b[:30]), rtol=1e-5, atol=1e-5)
