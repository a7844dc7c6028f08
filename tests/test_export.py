"""Export writes a plain-torch model that loads without dsctl and matches the supernet."""

from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from torch import nn

import dsctl
from dsctl.errors import SpecError
from dsctl.export import export_to_file, load_subnet
from dsctl.spec import SliceSpec

LOAD_WITHOUT_DSCTL = """
import sys, json, torch
sys.modules["dsctl"] = None  # any import of dsctl now fails
path, fmt = sys.argv[1], sys.argv[2]
m = torch.export.load(path).module() if fmt == "pt2" else torch.jit.load(path)
x = torch.load(sys.argv[3], weights_only=True)
torch.save(m(x).detach(), sys.argv[4])
"""


@pytest.mark.slow  # a fresh interpreter per case (about 10 s); the default run reloads pt2 exports in-process
@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
@pytest.mark.parametrize("name", ["tiny_ds_resnet", "tiny_ds_mobilenetv1"])
def test_export_loads_without_dsctl_and_matches(tmp_path, name: str, fmt: str) -> None:
    model = dsctl.build_model(name).eval()
    spec = model.space.resolve("0.5")
    out = tmp_path / f"sub.{fmt}"
    report = export_to_file(model, spec, out, fmt)
    sidecar = json.loads((tmp_path / f"sub.{fmt}.json").read_text())
    assert sidecar["width"] == 0.5 and sidecar["spec"] == list(spec.widths)
    assert sidecar["source"] == "random init" and sidecar["max_abs_diff"] < 1e-4
    assert sidecar["macs"] == report.macs > 0 and sidecar["channels"]["stem"] == spec.widths[0]
    x = torch.randn(3, model.in_chans, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DSCTL, str(out), fmt, str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, cwd=tmp_path)
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(y, model(x, spec), atol=1e-5, rtol=1e-4)
    assert load_subnet(out)(x).shape == (3, model.num_classes)


def test_export_rejects_width_outside_space(tmp_path) -> None:
    """A spec built by hand (not through ``space.resolve``) is checked by the export itself."""
    model = dsctl.build_model("tiny_ds_resnet")
    bad = SliceSpec(tuple(w + 1 for w in model.space.smallest().widths))
    with pytest.raises(SpecError, match="allowed"):
        export_to_file(model, bad, tmp_path / "x.pt2")
    assert not (tmp_path / "x.pt2").exists()


@pytest.mark.parametrize("fmt", ["pt2", pytest.param("torchscript", marks=pytest.mark.slow)])
def test_dynamic_export_applies_route_bias(tmp_path, fmt: str) -> None:
    from dsctl.dynamic import dynamic_forward
    from dsctl.export import export_dynamic_to_file, load_dynamic
    from tests.test_gate_options import graded_conv_gate_model

    model, x = graded_conv_gate_model()
    window = (1, 5)
    plain_logits, plain_routes = dynamic_forward(model, x, window)
    with torch.no_grad():
        model.gate.route_bias.copy_(torch.tensor([0.0, 0.0, 0.05, -5.0, 0.0, -0.03, 50.0]))
    logits, routes = dynamic_forward(model, x, window)
    assert not torch.equal(routes, plain_routes)
    report = export_dynamic_to_file(model, window, tmp_path / "dyn", source="test", fmt=fmt)
    assert report.format == fmt and Path(report.sidecar).is_file()
    loaded = load_dynamic(tmp_path / "dyn")
    with torch.no_grad():
        got = loaded(x)
        _, exported_routes = loaded.front(x)
    assert torch.equal(exported_routes + 1, routes)
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, plain_logits, atol=1e-4)


def test_export_refuses_a_pt2_under_another_name_and_never_leaves_a_broken_file(tmp_path, monkeypatch) -> None:
    import dsctl.export as export_mod
    from dsctl.errors import DsctlError

    model = dsctl.build_model("tiny_ds_resnet")
    spec = model.space.resolve(0.5)
    with pytest.raises(DsctlError, match=r"must end in \.pt2"):
        export_to_file(model, spec, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
    good = export_to_file(model, spec, tmp_path / "m.pt2")
    before = (tmp_path / "m.pt2").read_bytes()
    monkeypatch.setattr(export_mod, "MAX_ABS_DIFF", -1.0)  # every verification now fails
    with pytest.raises(DsctlError, match="export check failed"):
        export_to_file(model, model.space.resolve(0.25), tmp_path / "m.pt2")
    assert (tmp_path / "m.pt2").read_bytes() == before  # the older export is untouched ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2", "m.pt2.json"]  # ... and no temporary is left
    assert good.max_abs_diff < 1e-4
    (tmp_path / "file").write_text("x")
    with pytest.raises(DsctlError, match="cannot create its folder"):
        export_to_file(model, spec, tmp_path / "file" / "m.pt2")


@pytest.mark.slow  # an export and a fresh interpreter: about 12 s
def test_pt2_dynamic_export_runs_without_dsctl_by_the_readme_recipe(tmp_path) -> None:
    """The folder's programs composed by the README's plain-PyTorch lines, in a process that cannot import
    dsctl, equal the supernet's grouped inference; batch sizes 1 and odd included."""
    import subprocess
    import sys

    from dsctl.dynamic import dynamic_forward
    from dsctl.export import export_dynamic_to_file
    from tests.test_gate_options import graded_conv_gate_model

    model, x = graded_conv_gate_model()
    window = (1, 5)
    export_dynamic_to_file(model, window, tmp_path / "dyn", source="test")
    for n in (1, 7, x.shape[0]):
        torch.save(x[:n].clone(), tmp_path / f"x{n}.pt")
    script = """
import json, sys
sys.modules["dsctl"] = None  # dsctl cannot be imported here
import torch
folder = sys.argv[1]
front = torch.export.load(f"{folder}/front.pt2").module()
lo, hi = json.load(open(f"{folder}/dynamic.json"))["window"]
routes = [torch.export.load(f"{folder}/route{i}.pt2").module() for i in range(hi - lo + 1)]
for n in sys.argv[2:]:
    x = torch.load(f"{folder}/../x{n}.pt", weights_only=True)
    features, route = front(x)
    logits = [None] * len(x)
    for i, tail in enumerate(routes):
        idx = (route == i).nonzero().flatten()
        if len(idx):
            for j, row in zip(idx.tolist(), tail(features[idx])):
                logits[j] = row
    torch.save(torch.stack(logits).detach(), f"{folder}/../y{n}.pt")
"""
    sizes = ["1", "7", str(x.shape[0])]
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dyn"), *sizes], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for n in (1, 7, x.shape[0]):
        expected, _ = dynamic_forward(model, x[:n], window)
        torch.testing.assert_close(torch.load(tmp_path / f"y{n}.pt"), expected, atol=1e-5, rtol=1e-4)



def test_compile_module_keeps_every_network_compiled_past_dynamos_default_limit() -> None:
    """All nn.Sequential networks share one forward, so Dynamo's default limit of 8 graphs per code let the
    ninth network of a report run eager, unnoticed. Twelve networks of different shapes, each at batch 1
    and 3: every call compiles (a frame counted by Dynamo) and none falls back."""
    from torch._dynamo.utils import counters

    from dsctl.compiled import compile_module

    torch._dynamo.reset()
    counters.clear()
    nets = [compile_module(nn.Sequential(nn.Linear(c, c + 1), nn.ReLU()).eval(), backend="eager") for c in range(2, 14)]
    with torch.no_grad():
        for c, net in zip(range(2, 14), nets):
            for n in (1, 3):
                assert net(torch.randn(n, c)).shape == (n, c + 1)
    assert counters["frames"]["ok"] >= 2 * len(nets)
    torch._dynamo.reset()


@pytest.mark.slow  # compiles a front and three tails
def test_compiled_routed_model_equals_eager_and_bench_compiles_both_sides() -> None:
    """compile_module keeps a routed model's grouping and compiles its parts; its outputs equal the eager
    model's. bench --compile times every candidate compiled (the supernet's eager routing left out)."""
    from torch._dynamo.eval_frame import OptimizedModule

    from dsctl.bench import BenchSettings, bench_dynamic
    from dsctl.compiled import compile_module
    from dsctl.export import export_routed

    model = dsctl.build_model("tiny_ds_resnet", base_width=4).eval()
    routed = export_routed(model, (0, 2))
    compiled = compile_module(routed)
    assert isinstance(compiled.front, OptimizedModule) and all(isinstance(t, OptimizedModule) for t in compiled.tails)
    x = torch.randn(12, 1, 16, 16) * torch.linspace(0.0, 4.0, 12)[:, None, None, None]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), routed(x), atol=1e-5, rtol=1e-4)
    rows = bench_dynamic(model, (0, 1), torch.randn(16, 1, 16, 16),
                         BenchSettings(batches=(4,), min_run_time_s=0.05, rounds=1, compiled=True, threads=1))
    assert all(r.compiled for r in rows) and not {"dynamic", "masked"} & {r.candidate for r in rows}


@pytest.mark.slow  # AOTInductor compiles three programs (C++ builds)
def test_aoti_dynamic_export_loads_without_dsctl_and_equals_the_supernet(tmp_path) -> None:
    """--format aoti: the dynamic model's front and tails as AOTInductor packages; load_dynamic composes them
    (by the sidecar's format), and each package loads with torch alone."""
    from dsctl.export import export_dynamic_to_file, load_dynamic

    model = dsctl.build_model("tiny_ds_resnet", base_width=4).eval()
    report = export_dynamic_to_file(model, (0, 1), tmp_path / "dyn", source="random init", input_size=16, fmt="aoti")
    assert report.format == "aoti" and report.max_abs_diff < 1e-4
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_dynamic(tmp_path / "dyn")(x), dsctl.dynamic.DynamicNet(model, (0, 1))(x),
                                   atol=1e-4, rtol=1e-4)
    code = ("import torch, sys; f = torch._inductor.aoti_load_package(sys.argv[1]); "
            "h, r = f(torch.randn(3, 1, 16, 16)); print(tuple(h.shape), tuple(r.shape))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dyn" / "front.pt2")], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().endswith("(3,)")
