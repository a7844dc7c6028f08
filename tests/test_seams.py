"""The seams docs/architecture.md names, checked on the source: the gate owns its interface, and checkpoint
dicts are read only by the artifact and checkpoint modules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dsctl.models.base import Supernet
from dsctl.registry import build_model

PACKAGE = Path(__file__).resolve().parents[1] / "dsctl"


def _sources(*allowed: str) -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))
            if p.relative_to(PACKAGE).as_posix() not in allowed]


def test_no_module_but_the_gate_reads_gate_internals() -> None:
    internals = re.compile(r"\bgate\.(reduce|expand|head|conv|tokens|route_bias)\b")
    hits = [f"{p.relative_to(PACKAGE)}: {m.group(0)}" for p, text in _sources("layers/gate.py")
            for m in internals.finditer(text)]
    assert hits == []


def test_no_module_but_artifacts_and_checkpoint_indexes_a_checkpoint_dict() -> None:
    raw = re.compile(r"\bckpt(\[|\.get\()")
    hits = [str(p.relative_to(PACKAGE)) for p, text in _sources("artifacts.py", "checkpoint.py") if raw.search(text)]
    assert hits == []


@pytest.mark.parametrize("name", ["tiny_ds_mobilenetv1", "tiny_ds_vit", "tiny_ds_resnet"])
def test_to_static_routed_equals_the_supernet_per_route(name: str) -> None:
    """The routed static module takes the gate's decision and the static tail of each route; with the
    gate's attention head applied exactly once (a pre that kept it would apply it twice)."""
    torch.manual_seed(0)
    model: Supernet = build_model(name).eval()
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised slimming head would route everything to k0
            p.add_(torch.randn_like(p) * 0.02)
    size = model.default_input_size
    x = torch.randn(12, model.in_chans, size, size)
    k = model.space.num_subnets
    window = (max(0, k - 3), k - 1)
    routed = model.to_static_routed(window)
    with torch.no_grad():
        point = model.forward_pre(x, model.space.subnets[window[0]], encode=True)
        routes = model.gate.decide(point.encoding, window)
        expected = torch.stack([model(x[i : i + 1], model.space.subnets[int(r)])[0] for i, r in enumerate(routes)])
        features, static_routes = routed.front(x)
        got = routed(x)
    torch.testing.assert_close(features, point.features, atol=1e-6, rtol=1e-5)
    assert torch.equal(static_routes + window[0], routes)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
