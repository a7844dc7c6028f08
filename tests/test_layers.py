"""Slim layers at width w equal plain torch layers built from the sliced weights; no width state leaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsctl.layers import SlimBatchNorm2d, SlimConv2d, SlimLinear
from dsctl.layers.slim_vit import SlimLayerNorm, SlimQKVLinear


def test_conv_slices_input_and_output() -> None:
    conv = SlimConv2d(16, 32, 3, stride=2, padding=1, bias=True)
    x = torch.randn(2, 8, 9, 9)
    ref = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True)
    with torch.no_grad():
        ref.weight.copy_(conv.weight[:12, :8])
        ref.bias.copy_(conv.bias[:12])
    torch.testing.assert_close(conv(x, 12), ref(x))
    torch.testing.assert_close(conv.to_static(8, 12)(x), ref(x))


def test_depthwise_conv_follows_input_width() -> None:
    conv = SlimConv2d(16, 16, 3, padding=1, groups=16, bias=False)
    x = torch.randn(2, 6, 5, 5)
    expected = F.conv2d(x, conv.weight[:6].detach(), None, 1, 1, 1, 6)
    out = conv(x)
    assert out.shape[1] == 6
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(conv.to_static(6)(x), expected)


def _expected_conv(conv: SlimConv2d, x: torch.Tensor, out_c: int) -> torch.Tensor:
    return F.conv2d(x, conv.weight[:out_c, : x.shape[1]].detach(), conv.bias[:out_c].detach(), padding=1)


def test_conv_inference_copies_follow_every_weight_change() -> None:
    """The eval-mode contiguous copy of a sliced weight is never stale: optimizer step (the gate trains
    convs of an eval-mode supernet), load_state_dict, new storage, dtype change."""
    conv = SlimConv2d(8, 8, 3, padding=1, bias=True).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conv(x, 5), _expected_conv(conv, x, 5))
        torch.testing.assert_close(conv(x, 8), _expected_conv(conv, x, 8))  # every output: the whole bias
        kept = conv.sliced_weight(5, 4)
        assert kept.is_contiguous() and kept is conv.sliced_weight(5, 4)  # one copy, reused

    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv(x, 5).square().sum().backward()  # eval mode, grad enabled: the slice is a view autograd sees
    assert conv.weight.grad[:5, :4].abs().sum() > 0 and conv.weight.grad[5:].abs().sum() == 0
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(conv(x, 5), _expected_conv(conv, x, 5))

    conv.load_state_dict({k: torch.randn_like(v) for k, v in conv.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(conv(x, 5), _expected_conv(conv, x, 5))

    conv.weight.data = torch.randn_like(conv.weight)  # new storage, version counter not bumped
    with torch.no_grad():
        torch.testing.assert_close(conv(x, 5), _expected_conv(conv, x, 5))

    conv.double()
    with torch.no_grad():
        torch.testing.assert_close(conv(x.double(), 5), _expected_conv(conv, x.double(), 5))


def test_conv_keeps_no_copies_while_training() -> None:
    conv = SlimConv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    conv.eval()
    with torch.no_grad():
        conv(x, 5)
    assert conv._slices
    conv.eval()  # evaluation loops call eval() per batch: the copies stay
    assert conv._slices
    conv.train()
    assert not conv._slices
    with torch.no_grad():
        conv(x, 5)
        assert not conv._slices and not conv.sliced_weight(5, 4).is_contiguous()


def _reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``layer`` computes on ``x`` at x's width, from freshly sliced weights (nothing kept)."""
    d = x.shape[-1] if not isinstance(layer, SlimBatchNorm2d) else x.shape[1]
    w = layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, SlimQKVLinear):
        wq, bq = w.view(3, layer.dim, layer.dim)[:, :d, :d].reshape(3 * d, d), b.view(3, layer.dim)[:, :d].reshape(-1)
        return F.linear(x, wq, bq)
    if isinstance(layer, SlimLinear):
        return F.linear(x, w[:3, :d], b[:3])
    if isinstance(layer, SlimLayerNorm):
        return F.layer_norm(x, (d,), w[:d], b[:d], layer.eps)
    mean, var, _ = layer.stats(d)
    return F.batch_norm(x, mean, var, w[:d], b[:d], False, 0.0, layer.eps)


def _call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x, 3) if type(layer) is SlimLinear else layer(x)


@pytest.mark.parametrize("make, shape", [
    (lambda: SlimLinear(8, 6), (2, 5)),
    (lambda: SlimQKVLinear(8), (2, 3, 4)),
    (lambda: SlimLayerNorm(8), (2, 3, 4)),
    (lambda: SlimBatchNorm2d((4, 8)), (2, 4, 3, 3)),
], ids=["linear", "qkv", "layernorm", "batchnorm"])
def test_kept_slices_follow_every_weight_change(make, shape) -> None:
    """Every layer that keeps its eval-mode slices (KeptSlices) computes from the current weights after an
    optimizer step, load_state_dict, new storage and a dtype change, and keeps nothing while training."""
    layer = make().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-1, 1)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(_call(layer, x), _reference(layer, x))
        assert layer._slices  # kept
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    _call(layer, x).square().sum().backward()  # eval mode, grad enabled: views autograd sees
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(_call(layer, x), _reference(layer, x))
    layer.load_state_dict({k: torch.rand_like(v) + 0.5 if v.is_floating_point() else v  # variances > 0
                          for k, v in layer.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(_call(layer, x), _reference(layer, x))
    layer.weight.data = torch.randn_like(layer.weight)  # new storage, version counter not bumped
    with torch.no_grad():
        torch.testing.assert_close(_call(layer, x), _reference(layer, x))
    layer.double()
    with torch.no_grad():
        torch.testing.assert_close(_call(layer, x.double()), _reference(layer, x.double()))
    layer.train()
    assert not layer._slices


def test_parametrized_weights_are_not_kept() -> None:
    """A parametrized weight (weight norm, ...) is recomputed by its parametrization: nothing is kept, so a
    changed parametrization parameter changes the sliced output."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(()))

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * self.s

    lin = SlimLinear(20, 10).eval()
    parametrize.register_parametrization(lin, "weight", Scale())
    x = torch.randn(3, 7)
    with torch.no_grad():
        before = lin(x, 4)
        lin.parametrizations.weight[0].s.fill_(2.0)
        torch.testing.assert_close(lin(x, 4) - lin.bias[:4], 2 * (before - lin.bias[:4]))
    assert not lin._slices


def test_linear_slices() -> None:
    lin = SlimLinear(20, 10)
    x = torch.randn(3, 7)
    ref = nn.Linear(7, 4)
    with torch.no_grad():
        ref.weight.copy_(lin.weight[:4, :7])
        ref.bias.copy_(lin.bias[:4])
    torch.testing.assert_close(lin(x, 4), ref(x))
    torch.testing.assert_close(lin.to_static(7, 4)(x), ref(x))


def test_batchnorm_private_stats_shared_affine() -> None:
    bn = SlimBatchNorm2d((4, 8))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.train()
    bn(torch.randn(16, 4, 3, 3) + 5.0)
    mean4, _, n4 = bn.stats(4)
    mean8, _, n8 = bn.stats(8)
    assert int(n4) == 1 and int(n8) == 0
    assert mean4.mean() > 0.3 and torch.all(mean8 == 0)
    bn.eval()
    x = torch.randn(2, 4, 3, 3)
    ref = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        ref.weight.copy_(bn.weight[:4])
        ref.bias.copy_(bn.bias[:4])
        ref.running_mean.copy_(mean4)
        ref.running_var.copy_(bn.stats(4)[1])
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.to_static(4)(x), ref(x))


def test_batchnorm_full_width_uses_standard_buffer_names() -> None:
    keys = set(SlimBatchNorm2d((4, 8)).state_dict())
    assert {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"} <= keys
    assert {"running_mean_c4", "running_var_c4", "num_batches_tracked_c4"} <= keys


def test_batchnorm_cumulative_average_when_momentum_none() -> None:
    bn = SlimBatchNorm2d((3,), momentum=None).train()
    batches = [torch.randn(8, 3, 2, 2) * (i + 1) + i for i in range(4)]
    for b in batches:
        bn(b)
    expected = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected)


def test_batchnorm_rejects_unknown_width() -> None:
    bn = SlimBatchNorm2d((4, 8))
    try:
        bn(torch.randn(2, 5, 2, 2))
    except ValueError as err:
        assert "5" in str(err) and "[4, 8]" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_synced_batchnorm_matches_local_in_one_process(tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        plain, synced = SlimBatchNorm2d((4, 8)), SlimBatchNorm2d((4, 8))
        synced.sync = True
        x = torch.randn(6, 4, 5, 5, requires_grad=True)
        torch.testing.assert_close(synced(x), plain(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(synced.stats(4)[1], plain.stats(4)[1], atol=1e-5, rtol=1e-4)
        synced(x).square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "tokens", "strided"])
def test_take_rows_is_indexing_in_the_same_layout(layout: str) -> None:
    """The routed models' gather equals ``x[index]`` and keeps the input's memory format."""
    from dsctl.layers.static import take_rows

    x = torch.randn(7, 5, 4, 3) if layout != "tokens" else torch.randn(7, 6, 5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, :, ::2]
    index = torch.tensor([4, 0, 6, 2])
    got = take_rows(x, index)
    torch.testing.assert_close(got, x[index], rtol=0, atol=0)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    elif layout in ("contiguous", "tokens"):
        assert got.is_contiguous()
