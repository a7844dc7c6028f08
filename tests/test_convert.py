"""Importance-ordered conversion (issue 23): the full network unchanged, the most important units first."""

from __future__ import annotations

import pytest
import torch

import dsctl
from dsctl.convert import CRITERIA, channel_groups, group_importance, order_channels
from dsctl.layers.slim import SlimBatchNorm2d
from tests.conftest import TINY_MODELS


def _pretrained(name: str, **kw) -> dsctl.Supernet:
    """A model whose weights and BN statistics are not the init's (a stand-in for trained ones)."""
    model = dsctl.build_model(name, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, SlimBatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_ordering_keeps_the_full_network_and_changes_the_narrow_ones(name: str) -> None:
    model = _pretrained(name)
    x = torch.randn(4, model.in_chans, model.default_input_size, model.default_input_size)
    small = model.space.smallest()
    with torch.no_grad():
        full, narrow = model(x), model(x, small)
    groups = channel_groups(model)
    seen = set()
    for g in groups:  # every tensor dimension belongs to one group only
        for m in g.members:
            assert (m.key, m.dim, m.offset) not in seen, (g.name, m)
            seen.add((m.key, m.dim, m.offset))
    order_channels(model, "l1", groups=groups)
    with torch.no_grad():
        assert (model(x) - full).abs().max() < 1e-5
        assert (model(x, small) - narrow).abs().max() > 1e-3  # other channels are first now


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale"])
def test_after_ordering_every_group_scores_in_descending_order(criterion: str) -> None:
    model = _pretrained("tiny_ds_resnet", base_width=16)
    groups = channel_groups(model)
    order_channels(model, criterion, groups=groups)
    state = model.state_dict()
    for g in groups:
        score = group_importance(g, state, criterion)
        if score.any():
            assert torch.all(score[:-1] >= score[1:] - 1e-9), g.name


def test_magnitude_importance_is_the_sum_of_the_coupled_norms() -> None:
    """Torch-Pruning's group L2 criterion, by hand, for a bottleneck's first mid group: the conv that writes
    the channels, its BN scale, and the conv that reads them."""
    model = _pretrained("tiny_ds_resnet", base_width=16)
    block = model.layer3[0]
    group = next(g for g in channel_groups(model) if {m.key for m in g.members} >= {"layer3.0.conv1.weight", "layer3.0.conv2.weight"}
                 and any(m.key == "layer3.0.conv2.weight" and m.dim == 1 for m in g.members))
    expected = (block.conv1.weight.flatten(1).norm(dim=1) + block.bn1.weight.abs()
                + block.conv2.weight.transpose(0, 1).flatten(1).norm(dim=1))
    got = group_importance(group, model.state_dict(), "l2")
    torch.testing.assert_close(got.float(), expected.detach(), rtol=1e-5, atol=1e-6)


def test_vit_heads_move_whole_and_the_function_stays() -> None:
    model = _pretrained("tiny_ds_vit")
    x = torch.randn(2, model.in_chans, model.default_input_size, model.default_input_size)
    with torch.no_grad():
        full = model(x)
    block = model.blocks[-1]
    hd, dim = model.cfg.head_dim, model.cfg.embed_dim
    q_before = block.attn.qkv.weight[:dim].detach().clone()
    orders = order_channels(model, "l2")
    with torch.no_grad():
        assert (model(x) - full).abs().max() < 1e-5
    heads = orders[f"blocks.{len(model.blocks) - 1}.attn.heads"]
    tokens = torch.tensor(orders["tokens"])
    q_after = block.attn.qkv.weight[:dim].detach()
    for new, old in enumerate(heads):  # head `new` is the old head `old`, its token columns reordered
        torch.testing.assert_close(q_after[new * hd:(new + 1) * hd], q_before[old * hd:(old + 1) * hd][:, tokens])


def test_criteria_that_do_not_apply_are_refused() -> None:
    with pytest.raises(dsctl.DsctlError, match="bn_scale.*no BatchNorm.*allowed for it: l1, l2, taylor, none"):
        order_channels(dsctl.build_model("tiny_ds_vit"), "bn_scale")
    with pytest.raises(dsctl.DsctlError, match="unknown criterion 'l3'"):
        order_channels(dsctl.build_model("tiny_ds_resnet"), "l3")
    with pytest.raises(dsctl.DsctlError, match="needs gradients"):
        order_channels(dsctl.build_model("tiny_ds_resnet"), "taylor")
    assert CRITERIA[-1] == "none" and order_channels(dsctl.build_model("tiny_ds_resnet"), "none") == {}


def test_convert_needs_weights_and_says_so(tmp_path) -> None:
    from typer.testing import CliRunner

    from dsctl.cli import app
    from tests.test_commands import SMOKE

    result = CliRunner().invoke(app, ["convert", str(SMOKE), "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "give --init-from WEIGHTS" in result.output
    result = CliRunner().invoke(app, ["convert", str(SMOKE), "--init-from", str(tmp_path), "--criterion", "l3"])
    assert result.exit_code == 2 and "l3" in result.output


@pytest.mark.slow  # three short trainings: about 30 s
def test_static_network_to_converted_supernet_to_fine_tune(tmp_path) -> None:
    """The path a user takes: a trained static network, converted (the run records both orders and the
    unchanged full network), then fine-tuned with the sandwich rule from the converted run."""
    import csv
    import json

    from typer.testing import CliRunner

    from dsctl.artifacts import SupernetArtifact, read_artifact
    from dsctl.cli import app
    from tests.test_commands import SMOKE

    run = CliRunner()
    pre, conv, ft = tmp_path / "pre", tmp_path / "conv", tmp_path / "ft"
    r = run.invoke(app, ["baseline", str(SMOKE), "--method", "uniform", "--width", "largest", "--out", str(pre), "-q"])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["convert", str(SMOKE), "--init-from", str(pre), "--criterion", "taylor", "--out", str(conv), "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads((conv / "conversion.json").read_text())
    assert report["full_width_max_abs_diff"] < 1e-5 and report["criterion"] == "taylor"
    rows = list(csv.DictReader(open(conv / "conversion.csv")))
    assert [row["subnet"] for row in rows][:2] == ["k0", "k1"] and all("top1_unordered" in row for row in rows)
    sup = read_artifact(conv, SupernetArtifact)
    assert sup.calibrated and len(sup.subnets) == len(rows)
    r = run.invoke(app, ["train-supernet", str(SMOKE), "--init-from", str(conv), "--out", str(ft), "-q"])
    assert r.exit_code == 0, r.output
    assert read_artifact(ft, SupernetArtifact).completed


def test_the_default_criterion_follows_the_measurement() -> None:
    from dsctl.convert import AUTO, resolve_criterion

    assert resolve_criterion(dsctl.build_model("tiny_ds_resnet"), AUTO) == "bn_scale"
    assert resolve_criterion(dsctl.build_model("tiny_ds_vit"), AUTO) == "l2"  # no BatchNorm: the next best
    assert resolve_criterion(dsctl.build_model("tiny_ds_vit"), "taylor") == "taylor"


@pytest.mark.parametrize("name", ["ds_resnet50", "ds_mobilenetv1"])
def test_ordering_keeps_the_imagenet_size_networks(name: str) -> None:
    model = _pretrained(name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
    order_channels(model, "bn_scale")
    with torch.no_grad():
        assert (model(x) - full).abs().max() < 1e-4 * max(1.0, float(full.abs().max()))
