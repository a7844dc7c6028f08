"""CUDA cases (marker ``gpu``; deselected by default, run by ``make gpu-check`` on a CUDA machine)."""

from __future__ import annotations

import pytest
import torch

import dsctl
from dsctl.dynamic import DynamicNet
from dsctl.export import export_routed, export_subnet

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.mark.parametrize("name", ["tiny_ds_resnet", "tiny_ds_mobilenetv1", "tiny_ds_vit"])
def test_sliced_exported_and_routed_agree_on_cuda(name: str) -> None:
    model = dsctl.build_model(name).cuda().eval()
    size = model.default_input_size
    x = torch.randn(16, model.in_chans, size, size, device="cuda") * torch.linspace(0, 4, 16, device="cuda")[:, None, None, None]
    with torch.no_grad():
        for spec in (model.space.smallest(), model.space.full):
            torch.testing.assert_close(export_subnet(model, spec).cuda()(x), model(x, spec), atol=1e-4, rtol=1e-3)
        window = (0, model.space.num_subnets - 1)
        torch.testing.assert_close(export_routed(model, window).cuda()(x), DynamicNet(model, window)(x),
                                   atol=1e-4, rtol=1e-3)


def test_bf16_autocast_sandwich_step_has_finite_gradients() -> None:
    model = dsctl.build_model("tiny_ds_resnet").cuda().train()
    x, y = torch.randn(8, 1, 28, 28, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    for spec in (model.space.full, model.space.smallest()):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x, spec), y)
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_latency_table_times_on_cuda() -> None:
    from dsctl.headroom import measure_latency_table

    table = measure_latency_table(dsctl.build_model("tiny_ds_resnet").cuda(), 28, batches=(1, 8), device="cuda",
                                  min_run_time_s=0.05, rounds=1)
    assert table.device.startswith("cuda") and all(t > 0 for t in table.tail_ms[1])
