"""Latency headroom and latency budgets (dsctl/headroom.py) on hand-made tables and a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

import dsctl
from dsctl.errors import DsctlError
from dsctl.headroom import (LatencyTable, latency_budget, load_latency_table, measure_latency_table, span_verdict,
                            time_oracle_routing)


def _table() -> LatencyTable:
    # batch 1 and 8; sub-network 2's tail timed (noise) below sub-network 1's at batch 8
    return LatencyTable("m", "cpu", 2, 28, (1, 8), (100, 200, 300, 400), (1.0, 4.0),
                        ((1.0, 1.2, 1.4, 1.5), (4.0, 8.0, 7.0, 16.0)))


def test_table_spans_shares_and_verdicts() -> None:
    t = _table()
    assert t.subnet_ms(8) == [8.0, 12.0, 11.0, 20.0] and t.front_share(8) == 0.5 and t.span(8) == 2.5
    assert t.route_ms(8, (1, 2)) == [1.5, 1.375]
    assert "too small a span" in span_verdict(t, 1) and "k3 costs 1.2x k0's time for 4.0x its MACs" in span_verdict(t, 1)
    assert span_verdict(t, 8).endswith("routing can pay in time")
    with pytest.raises(ValueError, match="batch 4 was not measured"):
        t.subnet_ms(4)


def test_latency_budget_costs_window_and_equivalent_macs() -> None:
    b = latency_budget(_table(), 13.0, 8)
    # per-sample costs made non-decreasing: sub-network 2 cannot cost less than sub-network 1
    assert b.route_ms == (1.0, 1.5, 1.5, 2.5) and b.per_sample_ms == 13.0 / 8
    assert b.equivalent_macs() == pytest.approx(300 + (13 / 8 - 1.5) / 1.0 * 100)
    assert b.predicted_ms([2, 0, 0, 2]) == pytest.approx(8 * (1.0 + 2.5) / 2)
    for target, batch, needle in ((7.0, 8, "outside what routing can spend"), (30.0, 8, "allowed 8..20 ms"),
                                  (5.0, 4, "--latency-batch 4 was not timed")):
        with pytest.raises(DsctlError, match=needle):
            latency_budget(_table(), target, batch)


def test_measured_table_round_trips_through_the_files_analyze_writes(tmp_path) -> None:
    from dsctl.report import write_csv

    model = dsctl.build_model("tiny_ds_resnet", base_width=4).eval()
    t = measure_latency_table(model, 16, batches=(1, 2), threads=1, min_run_time_s=0.01, rounds=1,
                              macs=[1000 * (k + 1) for k in range(7)])
    assert t.batches == (1, 2) and len(t.macs) == len(t.tail_ms[0]) == model.space.num_subnets
    assert all(v > 0 for v in (*t.front_ms, *t.tail_ms[0], *t.tail_ms[1]))
    write_csv(tmp_path / "latency.csv", t.rows())
    back = load_latency_table(tmp_path)
    assert back.macs == t.macs and back.subnet_ms(2) == pytest.approx(t.subnet_ms(2), abs=1e-3)
    (tmp_path / "analysis.json").write_text(json.dumps({"latency": {"table": t.to_dict()}}))
    assert load_latency_table(tmp_path / "analysis.json") == t
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DsctlError, match="not a latency table"):
        load_latency_table(tmp_path / "bad.csv")


def test_oracle_routing_is_timed_through_the_routed_model_with_the_given_routes() -> None:
    """The routes given are the ones run (each image's output is its route's static sub-network's), and the
    timing covers every routing and every static sub-network."""
    from dsctl.export import export_subnet
    from dsctl.headroom import _GivenRoutes
    from dsctl.layers.static import RoutedNet

    model = dsctl.build_model("tiny_ds_resnet", base_width=4).eval()
    x, routes = torch.randn(8, 1, 16, 16), torch.tensor([0, 6, 3, 3, 0, 6, 1, 2])
    routed = model.to_static_routed((0, 6))
    net = RoutedNet(_GivenRoutes(routed.front, [routes]), list(routed.tails), model.num_classes, 0).eval()
    with torch.no_grad():
        got = net(x)
        for i, k in enumerate(routes.tolist()):
            torch.testing.assert_close(got[i : i + 1], export_subnet(model, model.space.subnets[k])(x[i : i + 1]),
                                       atol=1e-5, rtol=1e-4)
    routed_ms, static_ms = time_oracle_routing(model, x, {"narrow": torch.zeros(8, dtype=torch.int64), "mixed": routes},
                                               4, threads=1, min_run_time_s=0.01, rounds=1)
    assert set(routed_ms) == {"narrow", "mixed"} and set(static_ms) == {f"k{k}" for k in range(7)}
    assert all(v > 0 for v in (*routed_ms.values(), *static_ms.values()))
