"""Export a fixed-width sub-network as plain PyTorch, with a verified JSON sidecar.

``export_subnet(model, spec)`` gives the static ``nn.Module``; ``export_to_file`` writes it as a
``torch.export`` archive (``pt2``, default), TorchScript or ONNX, reloads what it wrote, compares it
with the supernet at that width, and records the difference in ``<file>.json``. The written model needs
no dsctl: ``torch.export.load(path).module()`` or ``torch.jit.load(path)``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from dsctl.checkpoint import atomic_write_bytes
from dsctl.errors import CheckpointError, DsctlError
from dsctl.flops import count_macs, count_params
from dsctl.models.base import Supernet
from dsctl.spec import SliceSpec

__all__ = ["ExportReport", "DynamicExportReport", "export_subnet", "export_to_file", "export_target",
           "export_dynamic_to_file", "export_gate_run", "load_subnet", "load_dynamic", "is_exported", "EXPORT_FORMATS", "MAX_ABS_DIFF"]

EXPORT_FORMATS = ("pt2", "torchscript", "onnx", "aoti", "safetensors")
_SUFFIXES = {"pt2": "pt2", "torchscript": "ts.pt", "onnx": "onnx", "aoti": "pt2", "safetensors": "safetensors"}
# safetensors: the weights alone; the full network under the library's names (dsctl.weights), a narrower
# sub-network under its static network's names
# aoti: AOTInductor packages of the torch.export programs (compiled; loaded with torch._inductor.aoti_load_package)
DYNAMIC_FORMATS = ("pt2", "torchscript", "aoti")
DYNAMIC_SIDECAR = "dynamic.json"  # inside a pt2 dynamic export folder
MAX_ABS_DIFF = 1e-4


@dataclass(frozen=True)
class ExportReport:
    """What ``export_to_file`` wrote and measured; also the content of the JSON sidecar."""

    path: str
    format: str
    model: str
    model_kwargs: dict
    subnet: str
    width: float | None
    spec: list[int] | dict[str, list[int]]  # SliceSpec.to_json: the widths, with kernels in a kernel space
    channels: dict[str, int]
    source: str
    input_size: int
    in_chans: int
    num_classes: int
    macs: int
    params: int
    max_abs_diff: float
    torch_version: str
    created: str
    names: str | None = None  # safetensors: whose parameter names the file uses

    @property
    def sidecar(self) -> str:
        return self.path + ".json"


@dataclass(frozen=True)
class DynamicExportReport:
    """What ``export_dynamic_to_file`` wrote and measured; also the content of the JSON sidecar. ``routes``
    maps ``k<index>`` to each window member's width and channels; ``route_macs`` are the window's."""

    path: str
    format: str
    model: str
    model_kwargs: dict
    kind: str
    window: tuple[int, int]
    routes: dict[str, dict]
    source: str
    input_size: int
    in_chans: int
    num_classes: int
    route_macs: list[int] | None
    gate_macs: int | None
    max_abs_diff: float
    check_routes: list[int]
    torch_version: str
    created: str
    # the gate's latency budget, if it was calibrated to one: target ms per batch, the deployment batch size,
    # the per-sample route costs and the latency table (device, threads) they were timed with
    latency_budget: dict | None = None

    @property
    def sidecar(self) -> str:
        return str(Path(self.path) / DYNAMIC_SIDECAR) if self.format == "pt2" else self.path + ".json"


def export_subnet(model: Supernet, spec: SliceSpec) -> nn.Module:
    """The sub-network ``spec`` as a plain-torch module in eval mode (weights and BN statistics copied)."""
    return model.to_static(model.space.check(spec)).eval()


def _save(static: nn.Module, example: torch.Tensor, path: Path, fmt: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt in ("pt2", "aoti"):
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.export.export(static, (example,), dynamic_shapes=({0: batch},))
            if fmt == "aoti":
                from dsctl.compiled import package_program

                package_program(program, path)
            else:
                torch.export.save(program, str(path))
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(static, example), str(path))
        elif fmt == "onnx":
            try:
                torch.onnx.export(static, (example,), str(path), input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
            except Exception as err:
                if "onnx" in str(err).lower() and "not installed" in str(err).lower():
                    raise DsctlError("ONNX export needs the onnx package: pip install onnx") from None
                raise
        else:
            raise DsctlError(f"unknown export format {fmt!r} (allowed: {', '.join(EXPORT_FORMATS)})")


def library_twin(model: Supernet) -> str | None:
    """The timm model whose state dict the full network's is, key for key (None where there is none)."""
    name = model.model_name
    if name == "ds_resnet50":
        return "resnet50"
    cfg = getattr(model, "cfg", None)
    if name in ("ds_deit_small", "ds_deit_tiny") and cfg is not None and not model.gate.attention and (
            cfg.img_size, cfg.patch_size) == (224, 16):
        return f"deit_{name.removeprefix('ds_deit_')}_patch16_224"
    return None


def _save_weights(model: Supernet, spec: SliceSpec, static: nn.Module, path: Path) -> str:
    """Write ``spec``'s weights as safetensors; returns whose names they carry."""
    from dsctl.weights import library_state_dict, save_safetensors

    if spec == model.space.full:
        twin = library_twin(model)
        save_safetensors(library_state_dict(model), path, metadata={"format": "pt", "dsctl_model": model.model_name})
        return f"timm {twin} (and torchvision's where it has the model)" if twin else \
            f"the supernet's full-width names ({model.model_name}; no timm/torchvision twin)"
    save_safetensors(static.state_dict(), path, metadata={"format": "pt", "dsctl_model": model.model_name})
    return "dsctl's static sub-network (no library model has these shapes)"


@torch.no_grad()
def _weights_output(model: Supernet, spec: SliceSpec, path: Path, x: torch.Tensor) -> torch.Tensor:
    """What the written weights compute, loaded the way a user loads them: the full network into a fresh
    supernet (strict) and, where there is one, into timm's twin (``strict=True``; its output must agree);
    a sub-network into a freshly cut static network (strict). Returns the output farther from the supernet's."""
    from dsctl import registry
    from dsctl.weights import load_full_width, load_safetensors

    fresh = registry.build_model(model.model_name, **model.model_kwargs).eval()
    if spec != model.space.full:
        static = export_subnet(fresh, spec)
        static.load_state_dict(load_safetensors(path), strict=True)
        return static(x)
    load_full_width(fresh, path)
    outputs = [fresh(x, spec)]
    twin = library_twin(model)
    if twin is not None:
        import timm

        ref = timm.create_model(twin, pretrained=False, num_classes=model.num_classes, in_chans=model.in_chans).eval()
        ref.load_state_dict(load_safetensors(path), strict=True)
        outputs.append(ref(x))
    expected = model(x, spec)
    return max(outputs, key=lambda o: float((o - expected).abs().max()))  # the worse of the two loads


@contextmanager
def _quiet_loading():
    """torch.export.load logs a warning with a traceback before it refuses a file that is not an archive;
    dsctl turns the refusal into one line, so the log is muted (Python warnings too) while loading."""
    log = logging.getLogger("torch.export")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` is an export: a file with a JSON sidecar ``<path>.json`` beside it (static exports,
    TorchScript dynamic exports) or a ``pt2`` dynamic export folder (holding ``dynamic.json``)."""
    p = Path(path)
    if p.is_dir():
        return (p / DYNAMIC_SIDECAR).is_file()
    return p.is_file() and Path(str(p) + ".json").is_file()


def _sidecar_format(p: Path) -> str | None:
    sidecar = p / DYNAMIC_SIDECAR if p.is_dir() else Path(str(p) + ".json")
    try:
        return json.loads(sidecar.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def load_subnet(path: str | Path) -> nn.Module:
    """Load an exported ``pt2``, ``aoti`` (by its sidecar) or TorchScript sub-network (plain torch; dsctl is
    not needed for this: ``torch.export.load(p).module()``, ``torch._inductor.aoti_load_package(p)``,
    ``torch.jit.load(p)``)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    with _quiet_loading():
        try:
            if p.suffix == ".pt2" and _sidecar_format(p) == "aoti":
                from dsctl.compiled import load_package

                return load_package(p)
            if p.suffix == ".pt2":
                return torch.export.load(str(p)).module()
            return torch.jit.load(str(p), map_location="cpu")
        except Exception as err:
            raise CheckpointError(f"{p}: not an exported sub-network ({type(err).__name__})") from None


def _onnx_output(path: Path, x: torch.Tensor) -> torch.Tensor | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def export_to_file(model: Supernet, spec: SliceSpec, out: str | Path, fmt: str = "pt2", *,
                   source: str = "random init", input_size: int | None = None, seed: int = 0) -> ExportReport:
    """Export ``spec`` to ``out``, verify it against the supernet, and write ``out + '.json'``.

    Raises:
        SpecError: ``spec`` not in the space.
        DsctlError: the reloaded export differs from the supernet by ``MAX_ABS_DIFF`` or more (the file is
            removed).

    Example:
        >>> m = build_model("tiny_ds_resnet")
        >>> report = export_to_file(m, m.space.resolve(0.5), "subnet.pt2")
        >>> torch.export.load("subnet.pt2").module()(torch.randn(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    if fmt not in EXPORT_FORMATS:
        raise DsctlError(f"unknown export format {fmt!r} (allowed: {', '.join(EXPORT_FORMATS)})")
    out = Path(out)
    if fmt in ("pt2", "aoti") and out.suffix != ".pt2":
        raise DsctlError(f"--out {out}: a {fmt} export must end in .pt2 (torch.export.load and aoti_load_package "
                         f"need it); use {out.with_suffix('.pt2')}, or --format torchscript for another name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DsctlError(f"--out {out}: cannot create its folder ({err.strerror})") from None
    if out.is_dir():
        raise DsctlError(f"--out {out}: is a folder; give a file name")
    input_size = model.check_input_size(input_size or model.default_input_size)
    model = model.eval().cpu()
    static = export_subnet(model, spec)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, model.in_chans, input_size, input_size, generator=gen)
    # written and verified under a temporary name, then renamed: a failure leaves neither a half-written
    # file nor a damaged older export at ``out``
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")
    try:
        names = None
        try:
            if fmt == "safetensors":
                names = _save_weights(model, spec, static, tmp)
            else:
                _save(static, x, tmp, fmt)
        except OSError as err:
            raise DsctlError(f"--out {out}: cannot write ({err.strerror})") from None
        with torch.no_grad():
            expected = model(x, spec)
            if fmt == "safetensors":
                got = _weights_output(model, spec, tmp, x)
            elif fmt == "onnx":
                got = _onnx_output(tmp, x)
            elif fmt == "aoti":  # no sidecar yet to say what the file is
                from dsctl.compiled import load_package

                got = load_package(tmp)(x)
            else:
                got = load_subnet(tmp)(x)
        if got is None:
            raise DsctlError("ONNX exports are verified with onnxruntime, which is not installed: pip install onnxruntime")
        diff = float((got - expected).abs().max())
        if not diff < MAX_ABS_DIFF:
            raise DsctlError(f"export check failed: max |exported - supernet| = {diff:.3g} >= {MAX_ABS_DIFF:g}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    report = ExportReport(
        path=str(out), format=fmt, model=model.model_name, model_kwargs=dict(model.model_kwargs),
        subnet=model.space.label(spec), width=model.space.width(spec), spec=spec.to_json(),
        channels=model.static_channels(spec), source=source, input_size=input_size, in_chans=model.in_chans,
        num_classes=model.num_classes, macs=count_macs(static, input_size, model.in_chans),
        params=count_params(static), max_abs_diff=diff, torch_version=torch.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), names=names,
    )
    atomic_write_bytes(report.sidecar, (json.dumps(asdict(report), indent=2) + "\n").encode())
    return report


def export_target(target: str, *, width: str | None = None, out: str | Path | None = None, fmt: str | None = None,
                  input_size: int | None = None, init_from: str | Path | None = None) -> ExportReport:
    """What ``dsctl export`` writes: a registered model or a supernet/gate checkpoint (see
    :func:`dsctl.targets.load_model_target`) at ``width``, as ``fmt``, verified by :func:`export_to_file`.

    Unset ``width`` and ``fmt`` come from a checkpoint's recipe (``export.width``, ``export.format``), else
    ``largest`` and ``pt2``; ``out`` defaults to ``<model>_<subnet>.<suffix>`` in the current folder; the
    check runs at ``input_size``, else the run's resolution, else the model's.

    Raises:
        DsctlError: an unknown format, or a target that is neither a model name nor a checkpoint.
        SpecError: ``width`` is not in the model's space.
    """
    from dsctl.spec import LARGEST
    from dsctl.targets import load_model_target

    if fmt is not None and fmt not in EXPORT_FORMATS:
        raise DsctlError(f"unknown --format {fmt!r} (allowed: {', '.join(EXPORT_FORMATS)})")
    t = load_model_target(target, init_from=init_from)
    if t.artifact is not None and t.artifact.recipe and (width is None or fmt is None):
        cfg = t.artifact.recipe_config().export
        width, fmt = width or cfg.width, fmt or cfg.format
    width, fmt = width or LARGEST, fmt or "pt2"
    model = t.model
    spec = model.space.resolve(width)
    out = Path(out) if out is not None else Path(f"{model.model_name}_{model.space.label(spec)}.{_SUFFIXES[fmt]}")
    return export_to_file(model, spec, out, fmt, source=t.source, input_size=input_size or t.input_size)


def _route_info(model: Supernet, k: int) -> dict:
    """What a dynamic sidecar says about route ``k``: its width, channels per stage and, in a kernel or MLP
    space, its name (``0.5@5``) and spec."""
    space, spec = model.space, model.space.subnets[k]
    info = {"width": space.ratio(spec), "channels": model.static_channels(spec)}
    if space.routes_more_than_width:
        info.update(name=space.name(spec), spec=spec.to_json())
    return info


def export_routed(model: Supernet, window: tuple[int, int]) -> nn.Module:
    """The supernet + gate over ``window`` as one plain-torch module (:meth:`Supernet.to_static_routed`)."""
    return model.to_static_routed(window)


def _export_program(module: nn.Module, example: torch.Tensor):
    """``torch.export`` of ``module`` with a dynamic batch dimension (any size, 1 included)."""
    return torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))


def _write_dynamic_programs(routed: nn.Module, example: torch.Tensor, out: Path, fmt: str = "pt2") -> None:
    """``front.pt2`` and ``route<i>.pt2`` (``torch.export`` programs, or with ``aoti`` their AOTInductor
    packages) into a new folder, then renamed to ``out`` (never half written)."""
    import shutil
    import tempfile

    from dsctl.compiled import package_program

    def save(program, path: Path) -> None:
        package_program(program, path) if fmt == "aoti" else torch.export.save(program, str(path))

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save(_export_program(routed.front, example), tmp / "front.pt2")
            with torch.no_grad():
                features, _ = routed.front(example)
            for i, tail in enumerate(routed.tails):
                save(_export_program(tail, features), tmp / f"route{i}.pt2")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _Program(nn.Module):
    """A loaded ``torch.export`` program as a submodule that ``eval()`` / ``train()`` leave alone (the
    program's module refuses ``train()``; it was exported in eval mode and stays so)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> _Program:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor):
        return self.module(x)


def _compose_programs(folder: Path, window: tuple[int, int], num_classes: int, fmt: str = "pt2") -> nn.Module:
    """The programs of a pt2 (or aoti) dynamic export folder as one :class:`~dsctl.layers.static.RoutedNet`."""
    from dsctl.compiled import load_package
    from dsctl.layers.static import RoutedNet

    def load(path: Path) -> nn.Module:
        return load_package(path) if fmt == "aoti" else _Program(torch.export.load(str(path)).module())

    lo, hi = window
    with _quiet_loading():
        try:
            front = load(folder / "front.pt2")
            tails = [load(folder / f"route{i}.pt2") for i in range(hi - lo + 1)]
        except Exception as err:
            raise CheckpointError(f"{folder}: a program of the dynamic export does not load "
                                  f"({type(err).__name__})") from None
    return RoutedNet(front, tails, num_classes, lo).eval()


def load_dynamic(path: str | Path) -> nn.Module:
    """Load what ``dsctl export --dynamic`` wrote: a ``pt2`` folder composed into a
    :class:`~dsctl.layers.static.RoutedNet` of its programs, or a TorchScript file.

    Without dsctl, the folder's programs compose in a few lines of plain PyTorch (README, "Export")."""
    p = Path(path)
    with _quiet_loading():
        if p.is_dir():
            sidecar = p / DYNAMIC_SIDECAR
            if not sidecar.is_file():
                raise CheckpointError(f"{p}: not a dynamic export folder (no {DYNAMIC_SIDECAR})")
            meta = json.loads(sidecar.read_text())
            return _compose_programs(p, tuple(meta["window"]), int(meta["num_classes"]), meta.get("format", "pt2"))
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file or folder")
        try:
            return torch.jit.load(str(p), map_location="cpu")
        except Exception as err:
            raise CheckpointError(f"{p}: not an exported dynamic model ({type(err).__name__})") from None


def export_dynamic_to_file(model: Supernet, window: tuple[int, int], out: str | Path, *, source: str,
                           input_size: int | None = None, route_macs: list[int] | None = None,
                           gate_macs: int | None = None, seed: int = 0, fmt: str = "pt2",
                           latency_budget: dict | None = None) -> DynamicExportReport:
    """Write the dynamic model (the supernet's :meth:`~Supernet.to_static_routed` over ``window``), reload it,
    and verify it against dsctl's grouped inference on random input.

    ``pt2`` (default): a folder ``out`` of ``torch.export`` programs, ``front.pt2`` (image -> features and the
    route within the window) and ``route<i>.pt2`` (features -> logits of the window's i-th sub-network), each
    with a dynamic batch size, plus the sidecar ``dynamic.json``. One program cannot hold the routing:
    grouping gives data-dependent batch sizes per tail, so the few lines that group samples are plain
    PyTorch (:func:`load_dynamic`, or the README's example without dsctl). ``torchscript``: one scripted file
    ``out`` with its sidecar ``<out>.json`` (``torch.jit`` is deprecated in torch 2.14: an option while it works).
    """
    from dsctl.dynamic import dynamic_forward

    if fmt not in DYNAMIC_FORMATS:
        raise DsctlError(f"unknown --format {fmt!r} for --dynamic (allowed: {', '.join(DYNAMIC_FORMATS)})")
    out = Path(out)
    if fmt in ("pt2", "aoti") and out.is_file():
        raise DsctlError(f"{out} is a file: a {fmt} dynamic export is a folder of programs (give a folder name)")
    out.parent.mkdir(parents=True, exist_ok=True)
    input_size = model.check_input_size(input_size or model.default_input_size)
    model = model.eval().cpu()
    routed = model.to_static_routed(window)
    x = torch.randn(16, model.in_chans, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    if fmt in ("pt2", "aoti"):
        _write_dynamic_programs(routed, x, out, fmt)
        sidecar = out / DYNAMIC_SIDECAR
        loaded = _compose_programs(out, window, model.num_classes, fmt)  # what load_dynamic gives once written
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(routed), str(out))
        sidecar = Path(str(out) + ".json")
        loaded = load_dynamic(out)
    lo, hi = window
    with torch.no_grad():
        expected, routes = dynamic_forward(model, x, window)
        got = loaded(x)
    diff = float((got - expected).abs().max())
    if not diff < MAX_ABS_DIFF:
        _remove_export(out)
        raise DsctlError(f"dynamic export check failed: max |exported - supernet| = {diff:.3g} >= {MAX_ABS_DIFF:g}")
    report = DynamicExportReport(
        path=str(out), format=fmt, model=model.model_name, model_kwargs=dict(model.model_kwargs),
        kind="dynamic", window=(lo, hi), routes={f"k{k}": _route_info(model, k) for k in range(lo, hi + 1)},
        source=source, input_size=input_size, in_chans=model.in_chans, num_classes=model.num_classes,
        route_macs=list(route_macs[lo : hi + 1]) if route_macs else None, gate_macs=gate_macs,
        max_abs_diff=diff, check_routes=torch.bincount(routes - lo, minlength=hi - lo + 1).tolist(),
        torch_version=torch.__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        latency_budget=latency_budget,
    )
    atomic_write_bytes(sidecar, (json.dumps(asdict(report), indent=2) + "\n").encode())
    return report


def _remove_export(out: Path) -> None:
    import shutil

    if out.is_dir():
        shutil.rmtree(out, ignore_errors=True)
    else:
        out.unlink(missing_ok=True)
        Path(str(out) + ".json").unlink(missing_ok=True)


def export_gate_run(checkpoint: str | Path, *, out: str | Path | None = None, input_size: int | None = None,
                    fmt: str = "pt2") -> DynamicExportReport:
    """What ``dsctl export --dynamic`` writes: a gate run's supernet and gate over its window, with the
    route costs the run stored, verified by :func:`export_dynamic_to_file`. ``out`` defaults to
    ``<model>_dynamic_<lo>-<hi>.ts.pt``; the check runs at ``input_size``, else the run's resolution.

    Raises:
        CheckpointError: ``checkpoint`` is not a gate checkpoint (a train-gate run folder or its final.pt).
    """
    from dsctl.artifacts import GateArtifact, read_artifact

    gate = read_artifact(checkpoint, GateArtifact, why="--dynamic")
    model = gate.build_model()
    lo, hi = gate.window
    default = f"{model.model_name}_dynamic_{lo}-{hi}" + (".ts.pt" if fmt == "torchscript" else "")
    out = Path(out) if out is not None else Path(default)
    return export_dynamic_to_file(model, gate.window, out, source=gate.path, input_size=input_size or gate.input_size,
                                  route_macs=list(gate.costs.route_macs), gate_macs=gate.costs.gate_macs, fmt=fmt,
                                  latency_budget=gate.final.latency_budget if gate.final is not None else None)
