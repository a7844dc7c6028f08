"""DS-ViT through the pipeline: stage I with multi-view consistency, no BN to calibrate, gates, export, bench
with an exact masked reference, the width-multiplier and L1 (heads, MLP units) baselines, slimming refused."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import dsctl
from dsctl.baselines import launch_baseline, prune_to_macs
from dsctl.artifacts import StaticArtifact, SupernetArtifact, read_artifact
from dsctl.cli import app
from dsctl.config import SupernetConfig, load_recipe
from dsctl.dynamic import dynamic_forward, masked_forward
from dsctl.errors import DsctlError, RecipeError
from dsctl.flops import count_macs
from dsctl.layers.static_vit import Attention, IdleSliced
from dsctl.models.slim_vit import SlimViTBlock
from dsctl.pipeline import run_pipeline
from dsctl.report import build_report
from dsctl.train.launch import launch_gate, launch_supernet
from dsctl.train.supernet import sandwich_step

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes/smoke/pipeline_synthetic_vit.yaml"
runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result.output


def _block_macs(tokens: int, d: int, heads_d: int | None = None, hidden: int | None = None) -> int:
    """One pre-norm block on T tokens at embedding width d, attention over ``heads_d`` channels of heads
    (default d) and an MLP of ``hidden`` units (default 4d): qkv, q k^T and attn v, proj, fc1, fc2."""
    a, h = heads_d or d, hidden or 4 * d
    return tokens * d * 3 * a + 2 * tokens * tokens * a + tokens * a * d + 2 * tokens * d * h


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path | str]:
    """A tiny DS-ViT supernet (trained through the CLI) and a gate over it, on generated 16 px images."""
    out = tmp_path_factory.mktemp("vit")
    log = _ok(["train-supernet", SMOKE, "--out", out / "sup", "--device", "cpu", "--quiet"])
    recipe = load_recipe(SMOKE, ["gate.window=[0,2]"])
    launch_gate(recipe, out / "sup", out / "gate", device="cpu")
    return {"dir": out, "sup": out / "sup", "gate": out / "gate", "log": log}


# -- stage I ---------------------------------------------------------------------------------------------------
def test_supernet_says_there_is_no_batchnorm_to_recalibrate(runs) -> None:
    log = str(runs["log"])
    assert "no BatchNorm: nothing to recalibrate" in log and "BN recalibrated on 0" not in log
    final = read_artifact(runs["sup"] / "final.pt", SupernetArtifact)
    assert final.calibrated and final.calib_batches == 0 and len(final.subnets) == 4


def test_calibrate_bn_has_nothing_to_calibrate(runs) -> None:
    path = runs["sup"] / "final.pt"
    before = path.read_bytes()
    out = " ".join(_ok(["calibrate-bn", path, "--device", "cpu", "--quiet"]).split())  # rich wraps long lines
    assert out == f"{path}: nothing to calibrate (no BatchNorm)"
    assert path.read_bytes() == before


def test_mvco_students_see_view_a_and_the_teacher_view_b() -> None:
    model = dsctl.build_model("tiny_ds_vit", img_size=16).train()
    teacher = dsctl.build_model("tiny_ds_vit", img_size=16).eval()
    xa, xb = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    y = torch.randint(0, 10, (4,))
    seen: dict[str, list[torch.Tensor]] = {"model": [], "teacher": []}
    for name, net in (("model", model), ("teacher", teacher)):
        net.patch_embed.register_forward_hook(lambda _m, inp, _out, name=name: seen[name].append(inp[0]))
    space = model.space
    specs = [space.largest(), space.subnets[1], space.smallest()]
    cfg = SupernetConfig(target="mvco", label_smoothing=0.0)
    losses = sandwich_step(model, teacher, (xa, xb), y, specs, cfg, device=torch.device("cpu"), amp=False)
    assert len(seen["model"]) == 3 and all(torch.equal(x, xa) for x in seen["model"])
    assert len(seen["teacher"]) == 1 and torch.equal(seen["teacher"][0], xb)
    with torch.no_grad():
        target = F.softmax(teacher(xb, space.largest()), -1)
        expected = -(target * F.log_softmax(model(xa, space.smallest()), -1)).sum(-1).mean()
    assert losses["smallest"] == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(ValueError, match="two views"):
        sandwich_step(model, teacher, xa, y, specs, cfg, device=torch.device("cpu"), amp=False)


def test_mvco_options_are_checked() -> None:
    assert SupernetConfig(target="mvco").two_views and SupernetConfig(mvco=True).two_views
    assert not SupernetConfig().two_views
    with pytest.raises(RecipeError, match="supernet: mvco: true .* target 'id' has no teacher"):
        load_recipe(SMOKE, ["supernet.target=id", "supernet.mvco=true"])
    with pytest.raises(RecipeError, match="needs ema_decay > 0"):
        load_recipe(SMOKE, ["supernet.ema_decay=0"])


def _idx_data(folder: Path, n_train: int = 16, n_val: int = 8) -> None:
    """Fashion-MNIST-format files of random images (real augmentation applies to them)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        for kind, magic, array in (("images-idx3", 2051, rng.integers(0, 256, (n, 28, 28))),
                                   ("labels-idx1", 2049, np.arange(n) % 10)):
            header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.astype(np.uint8).tobytes())


def test_mvco_run_loads_two_differently_augmented_views(tmp_path, monkeypatch) -> None:
    import dsctl.train.supernet as supernet_module

    _idx_data(tmp_path / "fm")
    seen = []

    def spy(model, teacher, x, *args, **kwargs):
        seen.append((x, teacher))
        return sandwich_step(model, teacher, x, *args, **kwargs)

    monkeypatch.setattr(supernet_module, "sandwich_step", spy)
    recipe = load_recipe(SMOKE, ["model.kwargs.img_size=28", "data.source=fashion_mnist", f"data.root={tmp_path / 'fm'}",
                                 "data.input_size=28", "data.batch_size=8", "data.augment.simple=true"])
    launch_supernet(recipe, tmp_path / "run", device="cpu")
    assert len(seen) == 2
    for (xa, xb), teacher in seen:
        assert xa.shape == xb.shape == (8, 1, 28, 28) and not torch.equal(xa, xb) and teacher is not None


# -- dynamic inference and its masked reference ---------------------------------------------------------------
def test_masked_block_equals_the_block_at_each_samples_width() -> None:
    block = SlimViTBlock(48, 16, 4.0).eval()
    x = torch.randn(3, 5, 48)
    widths = torch.tensor([16, 48, 32])
    with torch.no_grad():
        masked = block.forward_masked(x, 48, widths)
        for i, w in enumerate(widths.tolist()):
            torch.testing.assert_close(masked[i : i + 1], block(x[i : i + 1], w), atol=1e-5, rtol=1e-5)
        # run at 32 for all: sample 1 is masked down to 32 like the others
        torch.testing.assert_close(block.forward_masked(x, 32, torch.tensor([16, 32, 32]))[1:2], block(x[1:2], 32))


def test_masked_reference_gives_the_routed_outputs() -> None:
    model = dsctl.build_model("tiny_ds_vit").eval()
    x = torch.randn(24, 1, 28, 28)
    with torch.no_grad():  # a gate whose decision depends on the input: centre each route's logits
        model.gate.head.weight.normal_()
        logits = model.gate.route_logits(model.forward_pre(x, model.space.smallest(), encode=True).encoding)
        model.gate.route_bias.copy_(-logits.median(0).values)
    out, routes = dynamic_forward(model, x, (0, 2))
    assert len(set(routes.tolist())) == 3
    torch.testing.assert_close(masked_forward(model, x, (0, 2)), out, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # four CLI commands on the trained runs: about 6 s
def test_export_eval_flops_and_bench_with_the_masked_row(runs, tmp_path) -> None:
    sup, gate = runs["sup"], runs["gate"]  # (test_vit.py exports every width as pt2)
    _ok(["export", sup, "--width", "0.75", "--format", "torchscript", "--out", tmp_path / "w.ts.pt"])
    assert json.loads((tmp_path / "w.ts.pt.json").read_text())["max_abs_diff"] < 1e-4
    _ok(["export", gate, "--dynamic", "--out", tmp_path / "dyn"])
    assert json.loads((tmp_path / "dyn" / "dynamic.json").read_text())["max_abs_diff"] < 1e-4
    assert json.loads(_ok(["eval", gate, "--json"]))["width"] == "dynamic"
    _ok(["flops", sup, "--all", "--csv", tmp_path / "f.csv"])
    _ok(["bench", gate, "--dynamic", "--threads", "1", "--csv", tmp_path / "b.csv"])  # the recipe's measure section
    kinds = (tmp_path / "b.csv").read_text()
    assert "masked" in kinds and "exported_dynamic" in kinds


# -- baselines -------------------------------------------------------------------------------------------------
def test_uniform_baseline_is_a_deit_of_that_width() -> None:
    model = dsctl.build_model("tiny_ds_vit")
    for ratio, d in (("0.5", 32), ("0.75", 48), ("1.0", 64)):
        net = model.to_uniform(model.space.resolve(ratio))
        assert all(m.width == m.channels for m in net.modules() if isinstance(m, IdleSliced))
        assert {a.num_heads for a in net.modules() if isinstance(a, Attention)} == {d // 16}
        assert net[0].proj.out_channels == net[-1].head.in_features == d
        assert count_macs(net, 28, 1) == 49 * 16 * d + 4 * _block_macs(50, d) + d * 10
    full = model.eval().to_uniform(model.space.resolve("1.0"))  # at full width: the full network itself
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x, model.space.full))


def test_l1_prunes_whole_heads_and_mlp_units_to_the_macs_target() -> None:
    model = dsctl.build_model("tiny_ds_vit")
    dense = model.to_static(model.space.full)
    with torch.no_grad():  # trained-like weights: heads and units of different norms
        for p in dense.parameters():
            p.mul_(torch.rand_like(p) * 2)
    target = count_macs(model.to_static(model.space.resolve("0.75")), 28, 1)
    pruned, ratio = prune_to_macs(dense, target, 28, 1, "l1")
    macs = count_macs(pruned, 28, 1)
    assert 0.9 * target < macs <= target and 0 < ratio < 1
    attns = [a for a in pruned.modules() if isinstance(a, Attention)]
    hand = 49 * 16 * 64 + 64 * 10
    for block in (m for m in pruned.modules() if type(m).__name__ == "TransformerBlock"):
        a, mlp = block.attn, block.mlp
        assert a.qkv.in_features == a.proj.out_features == 64 and a.qkv.out_features % 48 == 0  # whole heads
        assert 1 <= a.num_heads < 4 and mlp.fc1.out_features < 256
        hand += _block_macs(50, 64, 16 * a.num_heads, mlp.fc1.out_features)
    assert macs == hand and len(attns) == 4  # attention matmuls of the remaining heads included
    # removing a head or unit is zeroing its contribution: the pruned network computes the dense one with
    # the removed heads' proj columns and units' fc2 columns zeroed
    masked = dense.eval()
    with torch.no_grad():
        for db, pb in zip((m for m in masked.modules() if type(m).__name__ == "TransformerBlock"),
                          (m for m in pruned.modules() if type(m).__name__ == "TransformerBlock")):
            kept_q = [i for i in range(64) if (pb.attn.qkv.weight == db.attn.qkv.weight[i]).all(1).any()]
            db.attn.proj.weight[:, [i for i in range(64) if i not in kept_q]] = 0
            kept = [i for i in range(256) if (pb.mlp.fc1.weight == db.mlp.fc1.weight[i]).all(1).any()]
            db.mlp.fc2.weight[:, [i for i in range(256) if i not in kept]] = 0
            assert len(kept_q) == 16 * pb.attn.num_heads and len(kept) == pb.mlp.fc1.out_features
        x = torch.randn(3, 1, 28, 28)
        torch.testing.assert_close(pruned.eval()(x), masked(x), atol=1e-5, rtol=1e-4)


def test_baselines_run_rebuild_and_slimming_is_refused(runs) -> None:
    out = Path(runs["dir"])
    uniform = launch_baseline(load_recipe(SMOKE, ["baseline.method=uniform", "baseline.width='0.5'"]), out / "uni",
                              device="cpu")
    l1 = launch_baseline(load_recipe(SMOKE, ["baseline.method=l1", "baseline.width='0.5'"]), out / "l1", device="cpu")
    k0 = read_artifact(runs["sup"] / "final.pt", SupernetArtifact).subnets[0].macs
    for summary, name in ((uniform, "uni"), (l1, "l1")):
        net = read_artifact(out / name / "final.pt", StaticArtifact).build_network()
        assert summary["macs"] == count_macs(net, 16, 1) and summary["macs"] <= k0
    rows = build_report([runs["sup"], runs["gate"], out / "uni", out / "l1"], measure=False)
    assert [r.method for r in rows].count("supernet") == 4 and {"dynamic", "uniform", "l1"} <= {r.method for r in rows}
    with pytest.raises(DsctlError, match="'slimming' prunes by BatchNorm scales, and tiny_ds_vit has no BatchNorm "
                                         r"\(allowed for it: uniform, l1\)"):
        launch_baseline(load_recipe(SMOKE, ["baseline.method=slimming", "baseline.width='0.5'"]), out / "slim")
    assert not (out / "slim").exists()
    with pytest.raises(DsctlError, match="'slimming'"):  # before the supernet trains
        run_pipeline(load_recipe(SMOKE, ["pipeline.baseline_methods=[uniform,slimming]"]), out / "qs", device="cpu")
    assert not (out / "qs").exists()


@pytest.mark.parametrize("path", [SMOKE, ROOT / "recipes/results/fashion_mnist_ds_vit.yaml"])
def test_vit_recipes_fit_the_model(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.model.kwargs.get("img_size", 28) == recipe.data.input_size  # the position embedding's size
    assert recipe.supernet.two_views and set(recipe.pipeline.baseline_methods) == {"uniform", "l1"}
