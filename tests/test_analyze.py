"""dsctl analyze: oracle router, budget curve, probe AUC on hand-made inputs; the command on a tiny run."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dsctl
from dsctl.analyze import oracle_curve, oracle_route, probe_auc, roc_auc, route_at_budget, route_by_score
from dsctl.cli import app

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes/smoke/synthetic_tiny_ds_resnet.yaml"
T, F_ = True, False

# 6 samples x 3 sub-networks costing 10, 20, 40 MACs; cheapest correct route per sample: k0, k1, k2, k1, none, k0
CORRECT = torch.tensor([[T, T, T], [F_, T, T], [F_, F_, T], [F_, T, F_], [F_, F_, F_], [T, F_, F_]])
MACS = [10, 20, 40]


def test_oracle_on_hand_made_matrix() -> None:
    r = oracle_route(CORRECT, MACS)
    assert r.routes.tolist() == [0, 1, 2, 1, 0, 0]  # the sample nobody gets right goes to the cheapest
    assert r.top1 == pytest.approx(100 * 5 / 6)
    assert r.avg_macs == pytest.approx((10 + 20 + 40 + 20 + 10 + 10) / 6)
    assert r.none_right == pytest.approx(1 / 6)
    assert r.histogram == [3, 2, 1]


def test_oracle_uses_the_cheapest_route_when_macs_are_not_ascending() -> None:
    r = oracle_route(torch.tensor([[F_, F_], [T, T]]), [50, 30])
    assert r.routes.tolist() == [1, 1] and r.avg_macs == 30


def test_budget_curve_on_hand_made_matrix() -> None:
    # extra MACs over the cheapest route to be right: 0, 10, 30, 10, -, 0 -> sorted 0, 0, 10, 10, 30
    expected = {10: (2, 10.0), 12: (3, 10 + 10 / 6), 13.5: (4, 10 + 20 / 6), 40: (5, 10 + 50 / 6)}
    points = oracle_curve(CORRECT, MACS, list(expected))
    for p, (budget, (right, avg)) in zip(points, expected.items()):
        assert p.budget_macs == budget and p.correct == right and p.avg_macs == pytest.approx(avg)
        assert p.top1 == pytest.approx(100 * right / 6) and p.avg_macs <= budget
    oracle = oracle_route(CORRECT, MACS)
    at_oracle = route_at_budget(CORRECT, MACS, oracle.avg_macs)  # budget = the oracle's own average
    assert at_oracle.top1 == pytest.approx(oracle.top1) and at_oracle.avg_macs == pytest.approx(oracle.avg_macs)
    above = route_at_budget(CORRECT, MACS, 1e9)  # beyond the oracle: nothing more to buy
    assert above.top1 == pytest.approx(oracle.top1) and above.avg_macs == pytest.approx(oracle.avg_macs)
    with pytest.raises(ValueError, match="below the cheapest"):
        route_at_budget(CORRECT, MACS, 9.9)


def test_default_curve_spans_smallest_to_largest_and_is_monotone() -> None:
    points = oracle_curve(CORRECT, MACS, points=11)
    budgets = [p.budget_macs for p in points]
    assert budgets[0] == 10 and budgets[-1] == 40 and budgets == sorted(budgets)
    assert {10, 13, 16, 37} <= set(budgets)  # 11 evenly spaced budgets
    assert oracle_route(CORRECT, MACS).avg_macs in budgets and {10, 20, 40} <= set(budgets)
    tops = [p.top1 for p in points]
    assert tops == sorted(tops) and tops[-1] == pytest.approx(100 * 5 / 6)


@pytest.mark.parametrize("seed", range(8))
def test_budget_greedy_matches_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, k = 5, 3
    correct = torch.rand(n, k, generator=g) < 0.4
    macs = torch.randint(1, 20, (k,), generator=g).tolist()  # any order, ties allowed
    assign = [torch.tensor(a) for a in itertools.product(range(k), repeat=n)]
    cost = [float(torch.tensor(macs, dtype=torch.float64)[a].mean()) for a in assign]
    right = [int(correct[torch.arange(n), a].sum()) for a in assign]
    for budget in sorted({min(macs), *cost[:: 7], max(macs)}):
        best = max(r for r, c in zip(right, cost) if c <= budget + 1e-9)
        assert route_at_budget(correct, macs, budget).correct == best, (budget, correct, macs)


def test_roc_auc_hand_made() -> None:
    labels = torch.tensor([F_, F_, T, T])
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), labels) == pytest.approx(0.75)
    assert roc_auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert roc_auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5  # ties count one half
    assert roc_auc(torch.tensor([0.2, 0.5, 0.5, 0.9]), torch.tensor([F_, T, F_, T])) == pytest.approx(0.875)
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([T, T])))


def test_probe_auc_separates_signal_from_noise_deterministically() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.arange(200) % 4 == 0
    signal = torch.randn(200, 6, generator=g)
    signal[:, 2] += 3.0 * target
    noise = torch.randn(200, 6, generator=g)
    good, bad = probe_auc(signal, target), probe_auc(noise, target)
    assert good.auc > 0.9 and 0.3 < bad.auc < 0.7
    assert probe_auc(signal, target).scores.equal(good.scores)  # same inputs and seed, same numbers
    assert math.isnan(probe_auc(signal, torch.arange(200) == 0).auc)  # one positive: undefined


def test_route_by_score_hand_made() -> None:
    scores = torch.tensor([0.1, 0.7, 0.9, 0.2, 0.8, 0.0])  # samples 2, 4, 1 go wide at q = 0.5
    r = route_by_score(CORRECT, MACS, scores, budget=25)
    assert r.fraction_wide == 0.5 and r.avg_macs == 25
    assert r.top1 == pytest.approx(100 * 4 / 6)  # right: 0 (k0), 1 (k2), 2 (k2), 5 (k0)
    assert r.random_top1 == pytest.approx(100 * (3 * 3 / 6 + 3 * 2 / 6) / 6)


def test_mobilenet_probe_points_shapes_and_gate_input() -> None:
    model = dsctl.build_model("tiny_ds_mobilenetv1").eval()
    x = torch.randn(3, 1, 28, 28)
    spec = model.space.smallest()
    with torch.no_grad():
        points = model.probe_points(x, spec)
        gate_in = model.gate_block.forward_dw(
            model.stages[2][-1](model.stages[2][0](model.stages[1][0](model.stages[0][0](
                torch.nn.functional.silu(model.stem_bn(model.stem(x, 8))), 16), 24), 32), 32))
    assert list(points) == ["stem", "s1", "s2", "s3", model.space.gate_after]
    assert [tuple(v.shape) for v in points.values()] == [(3, 8), (3, 16), (3, 24), (3, 32), (3, 32)]
    torch.testing.assert_close(points[model.space.gate_after], gate_in.mean((2, 3)), rtol=1e-5, atol=0)


def test_collect_correctness_columns_are_the_indexed_subnets() -> None:
    from dsctl.analyze import collect_correctness

    model = dsctl.build_model("tiny_ds_mobilenetv1").eval()
    x = torch.randn(12, 1, 28, 28)
    with torch.no_grad():
        y = model(x, model.space.subnets[1]).argmax(1)  # labels that sub-network 1 gets all right
        expected = torch.stack([model(x, s).argmax(1) == y for s in model.space.subnets], 1)
    correct, labels, feats = collect_correctness(model, [(x[:5], y[:5]), (x[5:], y[5:])], torch.device("cpu"))
    assert correct.equal(expected) and correct[:, 1].all() and labels.equal(y)
    assert {k: tuple(v.shape) for k, v in feats.items()}["s3"] == (12, 32)


# -- the command on a tiny supernet run -------------------------------------------------------------------
@pytest.fixture(scope="module")
def supernet_run(tmp_path_factory) -> Path:
    """A supernet run folder whose final.pt holds an untrained tiny DS-MobileNetV1 (what analyze reads of a
    trained one: weights, recipe, kind), written directly so the tests take seconds."""
    from dsctl.artifacts import SupernetArtifact
    from dsctl.config import load_recipe, recipe_to_dict

    run = tmp_path_factory.mktemp("analyze") / "sup"
    recipe = load_recipe(SMOKE, ["model.name=tiny_ds_mobilenetv1", "data.synthetic_train_size=64",
                                 "data.synthetic_val_size=48"])
    model = dsctl.build_model("tiny_ds_mobilenetv1", num_classes=10, in_chans=1)
    SupernetArtifact.from_model(model, recipe=recipe_to_dict(recipe), calibrated=True).save(run / "final.pt")
    return run


def test_analyze_command_writes_matrix_curve_and_probes(supernet_run: Path) -> None:
    result = CliRunner().invoke(app, ["analyze", str(supernet_run), "--device", "cpu", "--quiet", "--latency-batch",
                                      "4", "--min-run-time", "0.02"])
    assert result.exit_code == 0, result.output
    out = supernet_run / "analysis"
    saved = torch.load(out / "correctness.pt", weights_only=True)
    correct, macs = saved["correct"], saved["macs"].tolist()
    assert correct.dtype == torch.bool and correct.shape == (48, 6) and saved["labels"].shape == (48,)
    summary = json.loads((out / "analysis.json").read_text())
    oracle = oracle_route(correct, macs)
    assert summary["oracle"]["top1"] == pytest.approx(oracle.top1, abs=1e-3)
    assert summary["oracle"]["none_right"] == pytest.approx(oracle.none_right, abs=1e-5)
    assert [r["top1"] for r in summary["subnets"]] == pytest.approx(
        [100 * c for c in correct.double().mean(0).tolist()], abs=1e-3)
    assert summary["data"] == {"source": "synthetic", "split": "val", "val_size": 48, "root": None,
                               "input_size": 16, "samples": 48, "max_batches": None}
    assert summary["checkpoint"].endswith("final.pt") and summary["commit"]
    rows = list(csv.DictReader((out / "oracle.csv").open()))
    assert {"budget_macs", "avg_macs", "top1"} <= set(rows[0])
    assert float(rows[0]["budget_macs"]) == min(macs) and float(rows[-1]["budget_macs"]) == max(macs)
    probes = {p["position"]: p for p in summary["probes"]}
    assert list(probes) == ["stem", "s1", "s2", "s3", "s4.b0.dw"] and probes["s4.b0.dw"]["gate"]
    assert all(p["auc"] is None or 0 <= p["auc"] <= 1 for p in probes.values())
    assert "oracle router" in result.output
    # the latency headroom: every sub-network timed at batch 1 and 4, the oracle's routes per budget
    lat = summary["latency"]
    assert lat["batches"] == [1, 4] and len(lat["verdicts"]) == 2 and "costs" in result.output
    table = list(csv.DictReader((out / "latency.csv").open()))
    assert [(r["batch"], r["subnet"]) for r in table] == [(str(b), f"k{k}") for b in (1, 4) for k in range(6)]
    assert all(float(r["subnet_ms"]) == pytest.approx(float(r["front_ms"]) + float(r["tail_ms"]), abs=2e-4)
               for r in table)
    oracle_rows = list(csv.DictReader((out / "oracle_latency.csv").open()))
    assert float(oracle_rows[-1]["top1"]) == pytest.approx(oracle.top1, abs=1e-3)  # the widest budget: the oracle's
    assert [int(r["budget_macs"]) for r in oracle_rows[:-1]] == [m for m in sorted(macs) if m < oracle.avg_macs]
    assert all(float(r["ms_b4"]) > 0 for r in oracle_rows)


def test_analyze_holdout_split_and_batches(supernet_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["analyze", str(supernet_run / "final.pt"), "--split", "holdout",
                                      "--holdout-fraction", "0.5", "--batches", "2", "--set", "data.eval_batch_size=8",
                                      "--out", str(tmp_path), "--device", "cpu", "--quiet", "--no-latency"])
    assert result.exit_code == 0, result.output
    saved = torch.load(tmp_path / "correctness.pt", weights_only=True)
    assert saved["indices"].tolist() == list(range(32, 48))  # the last half of 64 training samples, 2 batches of 8
    assert json.loads((tmp_path / "analysis.json").read_text())["data"]["split"] == "holdout"


def test_analyze_bad_input_is_one_red_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for args, needle in ((["analyze", str(bad)], "not a readable checkpoint"),
                         (["analyze", str(tmp_path / "none")], "no such file or folder")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and result.output.strip().startswith("error:") and needle in result.output


def test_report_plots_the_oracle_of_an_analysed_run(supernet_run: Path, tmp_path: Path) -> None:
    from dsctl.report import ReportRow, oracle_series, write_report

    if not (supernet_run / "analysis" / "oracle.csv").is_file():
        CliRunner().invoke(app, ["analyze", str(supernet_run), "--device", "cpu", "--quiet", "--no-latency"])
    rows = [ReportRow("supernet", "tiny_ds_mobilenetv1", f"k{k}", "0.5", 1000 * (k + 1), 10, 50.0 + k, 90.0,
                      data="synthetic:64/48", run=str(supernet_run)) for k in range(2)]
    series = oracle_series(rows)
    assert len(series) == 1 and series[0].split == "val" and series[0].samples == 48 and len(series[0].points) > 1
    write_report(rows, tmp_path, command="dsctl report ...", machine="test")
    text = (tmp_path / "REPORT.md").read_text()
    assert "oracle router" in text and str(supernet_run / "analysis" / "oracle.csv") in text
    assert list(csv.DictReader((tmp_path / "report.csv").open()))[0]["method"] == "supernet"  # rows unchanged
    assert oracle_series([ReportRow(**{**rows[0].__dict__, "data": "cifar10:1/1"})]) == []  # other data: not drawn
