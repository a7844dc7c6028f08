"""Weights in and out (issue 23): every file format users hold, library names out, timm's registry."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

import dsctl
from dsctl.errors import CheckpointError
from dsctl.weights import (library_state_dict, load_full_width, read_state_dict, save_safetensors,
                           _static_to_supernet_names)


def _library(name: str = "tiny_ds_resnet", **kw) -> dict[str, torch.Tensor]:
    """A full-width state dict under the library names, from a model with weights of its own."""
    torch.manual_seed(1)
    return library_state_dict(dsctl.build_model(name, **kw))


def test_every_format_reads_the_same_tensors(tmp_path) -> None:
    state = _library()
    torch.save(state, tmp_path / "flat.pth")
    save_safetensors(state, tmp_path / "w.safetensors")
    (tmp_path / "w.st").write_bytes((tmp_path / "w.safetensors").read_bytes())  # safetensors bytes, another name
    hub = tmp_path / "hub"
    hub.mkdir()
    save_safetensors(state, hub / "model.safetensors")
    bin_hub = tmp_path / "bin_hub"
    bin_hub.mkdir()
    torch.save({f"module.{k}": v for k, v in state.items()}, bin_hub / "pytorch_model.bin")  # DDP prefix
    for p in ("flat.pth", "w.safetensors", "w.st", "hub", "bin_hub"):
        got = read_state_dict(tmp_path / p)
        assert got.tensor_set == ""
        assert got.state.keys() == state.keys(), p
        assert all(torch.equal(got.state[k], state[k]) for k in state), p


def test_a_timm_training_checkpoint_gives_its_ema_weights_unless_asked(tmp_path) -> None:
    trained, ema = _library(), {k: v + 1 if v.is_floating_point() else v for k, v in _library().items()}
    path = tmp_path / "checkpoint-9.pth.tar"
    torch.save({"epoch": 9, "arch": "resnet50", "state_dict": trained, "state_dict_ema": ema, "version": 2,
                "args": argparse.Namespace(model="resnet50", lr=0.1)}, path)  # what timm's train.py writes
    got = read_state_dict(path)
    assert got.tensor_set == "state_dict_ema" and "EMA" in got.describe()
    assert torch.equal(got.state["fc.weight"], ema["fc.weight"])
    plain = read_state_dict(path, ema=False)
    assert plain.tensor_set == "state_dict" and torch.equal(plain.state["fc.weight"], trained["fc.weight"])
    model = dsctl.build_model("tiny_ds_resnet")
    assert "state_dict_ema" in load_full_width(model, path)
    assert torch.equal(model.fc.weight, ema["fc.weight"])


def test_bad_weights_give_one_line_naming_what_is_wrong(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="looked for model.safetensors, pytorch_model.bin"):
        read_state_dict(tmp_path / "empty")
    torch.save({"epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="no state dict in this checkpoint.*it has: epoch, optimizer"):
        read_state_dict(tmp_path / "odd.pth")
    state = _library()
    del state["layer2.0.bn1.running_var"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match="missing: layer2.0.bn1.running_var"):
        load_full_width(dsctl.build_model("tiny_ds_resnet"), tmp_path / "short.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")


def test_library_weights_load_at_full_width_and_start_the_narrow_statistics_from_them(tmp_path) -> None:
    source = dsctl.build_model("tiny_ds_resnet")
    with torch.no_grad():
        for name, buf in source.named_buffers():
            if "running_mean" in name:
                buf.normal_()
    save_safetensors(library_state_dict(source), tmp_path / "w.safetensors")
    model = dsctl.build_model("tiny_ds_resnet").eval()
    load_full_width(model, tmp_path / "w.safetensors")
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(model(x), source.eval()(x))
    bn = model.layer2[0].bn1
    c = bn.choices[0]
    assert torch.equal(bn.stats(c)[0], bn.running_mean[:c])  # not zeros: the full width's first channels


@pytest.mark.parametrize(("name", "kw"), [("tiny_ds_resnet", {"base_width": 16, "layers": (1, 2, 2, 1), "front_ratio": 0.25}),
                                         ("tiny_ds_vit", {}), ("tiny_ds_mobilenetv1", {})])
def test_a_full_width_uniform_network_maps_back_to_the_supernet_names(name: str, kw: dict) -> None:
    model = dsctl.build_model(name, **kw).eval()
    static = model.to_uniform(model.space.full).eval()  # what a full-width uniform baseline trains
    names = _static_to_supernet_names(model, model.space.full)
    assert set(names) == set(static.state_dict())
    fresh = dsctl.build_model(name, **kw).eval()
    own = fresh.state_dict()
    fresh.load_state_dict({names[k]: v.reshape(own[names[k]].shape) for k, v in static.state_dict().items()}, strict=False)
    x = torch.randn(2, model.in_chans, model.default_input_size, model.default_input_size)
    torch.testing.assert_close(fresh(x), static(x))


def test_full_resnet50_export_loads_strictly_into_timm_and_torchvision(tmp_path) -> None:
    import timm
    import torchvision
    from safetensors.torch import load_file

    from dsctl.export import export_to_file

    model = dsctl.build_model("ds_resnet50", num_classes=10, gate_after=2)
    r = export_to_file(model, model.space.full, tmp_path / "r50.safetensors", "safetensors", input_size=64)
    assert r.max_abs_diff < 1e-4 and "timm resnet50" in r.names
    state = load_file(tmp_path / "r50.safetensors")
    theirs = timm.create_model("resnet50", num_classes=10).eval()
    theirs.load_state_dict(state, strict=True)
    torchvision.models.resnet50(num_classes=10).load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(theirs(x), model.eval()(x), atol=1e-4, rtol=1e-4)


def test_a_narrow_export_keeps_dsctl_names_and_says_so(tmp_path) -> None:
    from safetensors.torch import load_file

    from dsctl.export import export_subnet, export_to_file

    model = dsctl.build_model("tiny_ds_resnet").eval()
    spec = model.space.resolve("0.5")
    r = export_to_file(model, spec, tmp_path / "half.safetensors", "safetensors")
    assert "no library model" in r.names
    net = export_subnet(dsctl.build_model("tiny_ds_resnet"), spec)
    net.load_state_dict(load_file(tmp_path / "half.safetensors"), strict=True)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(net(x), model(x, spec))


@pytest.mark.parametrize("order", ["import dsctl, timm", "import timm, dsctl"])
def test_timm_create_model_builds_the_supernet_whichever_is_imported_first(order: str) -> None:
    code = (f"{order}\nm = timm.create_model('ds_resnet50', num_classes=7)\n"
            "assert type(m).__name__ == 'DSResNet' and m.num_classes == 7 and m.model_name == 'ds_resnet50'\n"
            "assert timm.is_model('tiny_ds_vit') and 'ds_resnet50' in dsctl.list_models()\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_timm_pretrained_loads_a_file_through_dsctl(tmp_path) -> None:
    import timm

    import dsctl.timm_models  # noqa: F401  (registers, timm being imported)

    source = dsctl.build_model("tiny_ds_resnet")
    save_safetensors(library_state_dict(source), tmp_path / "w.safetensors")
    m = timm.create_model("tiny_ds_resnet", pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "w.safetensors")})
    assert torch.equal(m.fc.weight, source.fc.weight)
    with pytest.raises(dsctl.DsctlError, match="hosts no pretrained weights"):
        timm.create_model("tiny_ds_resnet", pretrained=True)
