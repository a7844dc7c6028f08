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
# sliced ones index, which is the same work
_VIEWS = {"aten.unbind", "aten.narrow", "aten.select", "aten.alias", "aten.dropout"}


@pytest.mark.parametrize("name", ["tiny_ds_mobilenetv1", "tiny_ds_resnet", "tiny_ds_vit"])
def test_sliced_subnetwork_runs_no_more_operators_than_its_export(name: str) -> None:
    model = build_model(name).eval()
    x = torch.randn(1, model.in_chans, 28, 28)
    for spec in (model.space.smallest(), model.space.subnets[model.space.num_subnets // 2], model.space.full):
        sliced = _ops(bind(model, spec), x)
        static = _ops(export_subnet(model, spec), x)
        extra = {op: n - static[op] for op, n in sliced.items() if n > static[op] and op not in _VIEWS}
        assert not extra, f"{name} {spec}: the sliced forward runs extra operators {extra}"
