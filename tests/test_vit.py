"""DS-ViT: idle slicing, head-aware qkv slicing, static export, timm DeiT compatibility, MACs, token gate."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import dsctl
from dsctl.weights import load_full_width as load_pretrained
from dsctl.errors import CheckpointError
from dsctl.export import export_dynamic_to_file, export_subnet, export_to_file
from dsctl.flops import count_macs, count_subnet, gate_macs
from dsctl.layers.gate import SlimGate
from dsctl.layers.slim_vit import SlimQKVLinear
from dsctl.models.slim_vit import SlimViTBlock


def _block_macs(tokens: int, d: int, mlp_ratio: int = 4) -> int:
    """One pre-norm block at width d on T tokens, written out layer by layer (LayerNorm, GELU, the
    softmax and the residual sums are not multiply-adds of a weight layer and are not counted)."""
    qkv = tokens * d * 3 * d
    attention = 2 * tokens * tokens * d  # q @ k^T and attn @ v: heads x T x T x head_dim each
    proj = tokens * d * d
    mlp = tokens * d * mlp_ratio * d * 2
    return qkv + attention + proj + mlp


def vit_macs(size: int, patch: int, in_chans: int, dim: int, widths: list[int], classes: int) -> int:
    """Patch embedding at full width D, one block per entry of ``widths``, head on the class token."""
    grid = size // patch
    tokens = grid * grid + 1
    embed = grid * grid * dim * in_chans * patch * patch
    return embed + sum(_block_macs(tokens, d) for d in widths) + dim * classes


def _timm_deit(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs).eval()


# -- slicing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [16, 32])
def test_idle_channels_pass_through_bit_identical(width: int) -> None:
    block = SlimViTBlock(48, 16, 4.0).eval()
    x = torch.randn(2, 5, 48)
    out = block(x, width)
    assert torch.equal(out[..., width:], x[..., width:])
    assert not torch.allclose(out[..., :width], x[..., :width])
    # the active channels do not read the idle ones
    y = x.clone()
    y[..., width:] = torch.randn(2, 5, 48 - width)
    torch.testing.assert_close(block(y, width)[..., :width], out[..., :width], rtol=0, atol=0)
    # and equal a plain width-d block built from the sliced weights
    torch.testing.assert_close(block.to_static(width)(x[..., :width].contiguous()), out[..., :width])


def test_qkv_slice_is_q_k_v_of_the_first_heads() -> None:
    dim, head_dim, width = 48, 8, 24
    qkv = SlimQKVLinear(dim)
    x = torch.randn(3, width)
    padded = torch.cat([x, torch.zeros(3, dim - width)], -1)  # columns beyond d see zeros
    full = qkv(padded).view(3, 3, dim // head_dim, head_dim)       # (N, q/k/v, heads, head_dim)
    sliced = qkv(x).view(3, 3, width // head_dim, head_dim)
    torch.testing.assert_close(sliced, full[:, :, : width // head_dim])
    torch.testing.assert_close(qkv.to_static(width)(x), qkv(x))


def test_layernorm_normalises_over_the_active_width() -> None:
    block = SlimViTBlock(32, 8, 4.0)
    with torch.no_grad():
        block.norm1.weight.uniform_(0.5, 1.5)
        block.norm1.bias.normal_()
    x = torch.randn(2, 3, 32)
    ref = torch.nn.functional.layer_norm(x[..., :16], (16,), block.norm1.weight[:16], block.norm1.bias[:16], 1e-6)
    torch.testing.assert_close(block.norm1(x[..., :16]), ref)


# -- model, space, export -------------------------------------------------------------------------------------
def test_space_steps_one_head_and_the_gate_follows_the_smallest_width() -> None:
    small = dsctl.build_model("ds_deit_small")
    assert small.space.stages[2].choices == (192, 256, 320, 384)
    assert [s.widths for s in small.space.subnets] == [(384, 192, w) for w in (192, 256, 320, 384)]
    assert small.space.full.widths == (384, 384, 384) and small.space.gate_after == "blocks.3"
    assert dsctl.build_model("ds_deit_tiny").space.stages[2].choices == (64, 128, 192)
    tiny = dsctl.build_model("tiny_ds_vit")
    assert tiny.gate_in_channels == 32 and tiny.gate.reduce.in_channels == 32 and tiny.gate.tokens
    assert not tiny.needs_bn_calibration


@pytest.mark.parametrize("gate_attention", [False, True])
def test_static_export_equals_supernet_at_every_width(gate_attention: bool) -> None:
    model = dsctl.build_model("tiny_ds_vit", gate_attention=gate_attention, depth=3, gate_after=1).eval()
    x = torch.randn(3, 1, 28, 28)
    for spec in (*model.space.subnets, model.space.full):
        static = export_subnet(model, spec)
        dsctl_only = ("dsctl.layers.slim", "dsctl.layers.gate")
        assert not any(type(m).__module__.startswith(dsctl_only) for m in static.modules())
        with torch.no_grad():
            torch.testing.assert_close(static(x), model(x, spec), atol=1e-5, rtol=1e-4)


def test_widths_change_the_output_and_pre_gate_blocks_run_at_the_smallest_width() -> None:
    model = dsctl.build_model("tiny_ds_vit").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        outs = [model(x, s) for s in (*model.space.subnets, model.space.full)]
        pre = model.forward_pre(x, model.space.smallest()).features
    assert all(not torch.allclose(a, b) for a, b in itertools.pairwise(outs))
    # after the pre-gate block at width 32, channels 32..64 are still the embedding's
    with torch.no_grad():
        assert torch.equal(pre[..., 32:], model._embed(x)[..., 32:])


def test_full_width_equals_timm_deit_with_the_same_weights() -> None:
    ref = _timm_deit("deit_tiny_patch16_224")
    model = dsctl.build_model("ds_deit_tiny").eval()
    model.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        assert (model(x, model.space.full) - expected).abs().max() <= 1e-5
        assert (export_subnet(model, model.space.full)(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("ours", "timm_name"), [("ds_deit_tiny", "deit_tiny_patch16_224"),
                                                 ("ds_deit_small", "deit_small_patch16_224")])
def test_timm_state_dict_loads_strictly(tmp_path, ours: str, timm_name: str) -> None:
    ref = _timm_deit(timm_name)
    model = dsctl.build_model(ours)
    own = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("gate.")}
    assert own == {k: v.shape for k, v in ref.state_dict().items()}
    path = tmp_path / "deit.pth"
    torch.save(ref.state_dict(), path)
    load_pretrained(model, path)
    assert torch.equal(model.blocks[11].attn.qkv.weight, ref.blocks[11].attn.qkv.weight)
    torch.save({k: v for k, v in ref.state_dict().items() if k != "blocks.3.norm2.bias"}, path)
    with pytest.raises(CheckpointError, match="missing: blocks.3.norm2.bias"):
        load_pretrained(model, path)


def test_input_size_is_fixed_at_build() -> None:
    model = dsctl.build_model("tiny_ds_vit")
    with pytest.raises(ValueError, match="takes 28x28 inputs, got 32x32"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(dsctl.DsctlError, match="build the model with img_size=32"):  # before any tracing
        count_subnet(model, model.space.full, 32)
    with pytest.raises(ValueError, match="takes 28 px inputs"):  # the exported network checks too
        export_subnet(model, model.space.full)(torch.randn(1, 1, 32, 32))
    assert dsctl.build_model("tiny_ds_vit", img_size=32)(torch.randn(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.2])
def test_train_mode_forward_backward_at_smallest_and_largest(drop_path_rate: float) -> None:
    model = dsctl.build_model("tiny_ds_vit", drop_path_rate=drop_path_rate).train()
    x = torch.randn(4, 1, 28, 28)
    for spec in (model.space.smallest(), model.space.largest()):
        model.zero_grad()
        model(x, spec).logsumexp(1).sum().backward()
        qkv = model.blocks[-1].attn.qkv.weight.grad.view(3, 64, 64)
        active = spec.widths[2]
        assert torch.isfinite(qkv).all() and qkv[:, :active, :active].abs().sum() > 0
        assert qkv[:, active:].abs().sum() == 0 and qkv[:, :, active:].abs().sum() == 0


@pytest.mark.slow  # two exports with reload checks
def test_export_files_and_the_routed_dynamic_export(tmp_path) -> None:
    model = dsctl.build_model("tiny_ds_vit", gate_attention=True).eval()
    report = export_to_file(model, model.space.resolve("0.75"), tmp_path / "sub.pt2")
    assert report.max_abs_diff < 1e-5 and report.channels == {"embed": 64, "blocks.0": 32, "blocks.1-3": 48}
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # the export check's input
    with torch.no_grad():  # a gate whose decision depends on the input: centre each route's logits
        model.gate.head.weight.normal_()
        logits = model.gate.route_logits(model.forward_pre(x, model.space.smallest(), encode=True).encoding)
        model.gate.route_bias.copy_(-logits.median(0).values)
    for fmt in ("pt2", "torchscript"):
        dyn = export_dynamic_to_file(model, (0, 2), tmp_path / f"dyn-{fmt}", source="test", seed=0, fmt=fmt)
        assert dyn.max_abs_diff < 1e-5 and sum(c > 0 for c in dyn.check_routes) > 1


# -- MACs ---------------------------------------------------------------------------------------------------
class _Tokens(nn.Module):
    """(1, C, H, W) image -> (1, H * W, C) tokens -> ``inner`` (count_macs feeds images)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("width", [16, 32])
def test_block_macs_match_the_hand_count(width: int) -> None:
    block = SlimViTBlock(32, 8, 4.0).to_static(width)  # width / 8 heads, 25 tokens
    assert count_macs(_Tokens(block), 5, in_chans=width) == _block_macs(25, width)
    # the attention matmuls alone: 2 x heads x T^2 x head_dim
    attn_only = count_macs(_Tokens(block.attn), 5, in_chans=width) - count_macs(_Tokens(block.attn.qkv), 5, width)
    assert attn_only == 2 * (width // 8) * 25 * 25 * 8 + 25 * width * width  # + proj


@pytest.mark.parametrize("k", [0, 1, 2, "full"])
def test_tiny_ds_vit_matches_the_layout_count(k: int | str) -> None:
    model = dsctl.build_model("tiny_ds_vit")
    spec = model.space.full if k == "full" else model.space.subnets[k]
    _, pre, post = spec.widths
    assert count_subnet(model, spec).macs == vit_macs(28, 4, 1, 64, [pre] + [post] * 3, 10)


def test_deit_full_width_macs_are_the_published_ones() -> None:
    # DeiT-Ti: 1.3 GMACs (published), 12 blocks at D = 192 on 197 tokens
    model = dsctl.build_model("ds_deit_tiny")
    macs = count_subnet(model, model.space.full).macs
    assert macs == vit_macs(224, 16, 3, 192, [192] * 12, 1000) == 1_253_683_200


def test_token_gate_macs() -> None:
    # no attention head: encoder on the 32-channel class token (no pooling), reduce 16, head 16 -> 3 routes
    assert gate_macs(dsctl.build_model("tiny_ds_vit")) == 32 * 16 + 16 * 3
    # with one, the encoder is part of every route's static network: the head only
    assert gate_macs(dsctl.build_model("tiny_ds_vit", gate_attention=True)) == 16 * 3


# -- the gate on tokens ----------------------------------------------------------------------------------------
def test_gate_token_mode_reads_the_class_token_and_scales_every_token() -> None:
    gate = SlimGate(24, 8, 3, attention=True, tokens=True)
    with torch.no_grad():
        gate.head.weight.normal_()
    x = torch.randn(4, 6, 16)  # 16 active channels of a gate sized 24
    e = gate.encode(x)
    expected = torch.relu(x[:, 0] @ gate.reduce.weight[:, :16, 0, 0].T + gate.reduce.bias)
    torch.testing.assert_close(e.flatten(1), expected)
    y = x.clone()
    y[:, 1:] = torch.randn(4, 5, 16)  # the other tokens do not move the encoder
    torch.testing.assert_close(gate.encode(y), e, rtol=0, atol=0)
    scale = torch.sigmoid(e.flatten(1) @ gate.expand.weight[:16, :, 0, 0].T + gate.expand.bias[:16])
    torch.testing.assert_close(gate.attend(x, e), x * scale[:, None, :])
    assert gate.macs(16, 7, 7) == 8 * 3 and gate.route_logits(e).shape == (4, 3)
    # static: reads (and scales) the first 16 channels of a wider stream, the rest pass unchanged
    stream = torch.cat([x, torch.randn(4, 6, 8)], -1)
    static = gate.to_static(16, window=(1, 2))
    feats, routes = static(stream)
    torch.testing.assert_close(feats[..., :16], gate.attend(x, e))
    assert torch.equal(feats[..., 16:], stream[..., 16:])
    assert torch.equal(routes + 1, gate.decide(e, (1, 2)))


def test_gate_without_attention_reads_its_own_width_of_the_class_token() -> None:
    gate = SlimGate(8, 4, 2, attention=False, tokens=True)
    x = torch.randn(2, 3, 20)
    torch.testing.assert_close(gate.encode(x), gate.encode(x[..., :8]), rtol=0, atol=0)
    assert gate.macs(8, 1, 1) == 8 * 4 + 4 * 2
    with pytest.raises(ValueError, match="tokens=False"):
        SlimGate(8, 4, 2, attention=False, conv=True, tokens=True)


def test_probe_points_are_class_tokens_after_each_block() -> None:
    model = dsctl.build_model("tiny_ds_vit")
    points = model.probe_points(torch.randn(3, 1, 28, 28), model.space.smallest())
    assert list(points) == ["blocks.0", "blocks.1", "blocks.2"] and model.space.gate_after in points
    assert all(p.shape == (3, 32) for p in points.values())
