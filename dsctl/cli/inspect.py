"""Commands that look at models without training: ``models``, ``flops``, ``export``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dsctl.cli._common import console, handle_errors, resolve_model, table

app = typer.Typer()

InitOpt = Annotated[Path | None, typer.Option("--init-from", help="Full-width state dict to load into the model "
                                                                    "(e.g. a torchvision/timm ResNet-50 .pth).")]


@app.command("models")
@handle_errors
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List registered supernets: sub-networks, slimming ratios, routed stages, gate position."""
    from dsctl.registry import build_model, list_models

    rows = []
    for name in list_models():
        m = build_model(name)
        rows.append({
            "model": name, "subnets": m.space.num_subnets, "ratios": list(m.space.ratios()),
            "routed_stages": list(m.space.routed_stages), "gate_after": m.space.gate_after,
            "input_size": m.default_input_size, "in_chans": m.in_chans, "num_classes": m.num_classes,
            "params_m": round(sum(p.numel() for p in m.parameters()) / 1e6, 3), "space": m.space.to_dict(),
        })
    if as_json:
        console.print_json(json.dumps(rows))
        return
    console.print(table("dsctl models", ["model", "subnets", "ratios", "routed stages", "gate after", "input", "params (M)"], [
        [r["model"], r["subnets"], f"{r['ratios'][0]:g} .. {r['ratios'][-1]:g}", ", ".join(r["routed_stages"]),
         r["gate_after"], r["input_size"], r["params_m"]] for r in rows]))


@app.command("flops")
@handle_errors
def flops_cmd(
    target: Annotated[str, typer.Argument(help="Registered model name, checkpoint file or run folder.")],
    width: Annotated[list[str] | None, typer.Option("--width", "-w", help="Slimming ratio (repeatable) or 'largest'.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every indexed sub-network and the full-width network (default).")] = False,
    input_size: Annotated[int | None, typer.Option(min=8, help="Input resolution (default: the model's).")] = None,
    num_classes: Annotated[int | None, typer.Option(min=1, help="Classes of the head (model names only).")] = None,
    in_chans: Annotated[int | None, typer.Option(min=1, help="Input channels (model names only).")] = None,
    csv: Annotated[Path | None, typer.Option(help="Also write the rows to this CSV file.")] = None,
    init_from: InitOpt = None,
) -> None:
    """MACs and parameters per sub-network, counted with fvcore on the exported static network."""
    from dsctl.errors import DsctlError
    from dsctl.flops import MACS_CONVENTION, count_subnet
    from dsctl.report import write_csv

    if width and all_:
        raise DsctlError("--width and --all contradict each other (give one: --all counts every sub-network)")
    model, _ = resolve_model(target, num_classes=num_classes, in_chans=in_chans, init_from=init_from)
    space = model.space
    if width:
        specs = [space.resolve(w) for w in width]
    else:
        specs = list(space.subnets) + ([space.full] if space.full not in space.subnets else [])
    with console.status("counting MACs with fvcore..."):
        reports = [count_subnet(model, s, input_size) for s in specs]
    console.print(table(f"{model.model_name} @ {reports[0].input_size}px", ["subnet", "width", "MACs (M)", "params (M)"], [
        [r.subnet, "-" if r.width is None else f"{r.width:g}", f"{r.macs_m:.2f}", f"{r.params_m:.3f}"] for r in reports]))
    console.print(f"[dim]{MACS_CONVENTION}[/]")
    if csv is not None:
        write_csv(csv, [{"model": r.model, "subnet": r.subnet, "width": r.width, "macs": r.macs,
                         "macs_m": round(r.macs_m, 3), "params": r.params, "params_m": round(r.params_m, 4),
                         "input_size": r.input_size} for r in reports])
        console.print(f"wrote {csv}")


@app.command("export")
@handle_errors
def export_cmd(
    checkpoint: Annotated[str | None, typer.Argument(help="Checkpoint file or run folder (or use --model).")] = None,
    model_name: Annotated[str | None, typer.Option("--model", help="Registered model with random weights.")] = None,
    width: Annotated[str | None, typer.Option("--width", "-w", help="Slimming ratio of the sub-network, or 'largest' "
                                                                 "(default: the checkpoint recipe's export.width, "
                                                                 "else largest).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output file (default: <model>_w<width>.<format>).")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="pt2 (torch.export), torchscript or onnx (default: the "
                                                             "checkpoint recipe's export.format, else pt2).")] = None,
    input_size: Annotated[int | None, typer.Option(min=8, help="Input size of the check (default: the model's).")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Export supernet + gate (a train-gate checkpoint) as one "
                                                            "TorchScript model with grouped routing.")] = False,
    init_from: InitOpt = None,
) -> None:
    """Write a fixed-width static sub-network (or, with --dynamic, the routed model) as plain PyTorch,
    verified against the supernet."""
    from dsctl.errors import DsctlError
    from dsctl.export import EXPORT_FORMATS, export_to_file

    if (checkpoint is None) == (model_name is None):
        raise DsctlError("give either a CHECKPOINT or --model NAME")
    if dynamic:
        _export_dynamic(checkpoint, out, input_size)
        return
    if fmt is not None and fmt not in EXPORT_FORMATS:
        raise DsctlError(f"unknown --format {fmt!r} (allowed: {', '.join(EXPORT_FORMATS)})")
    model, source = resolve_model(checkpoint or model_name, init_from=init_from)  # type: ignore[arg-type]
    if checkpoint is not None and (width is None or fmt is None):
        from dsctl.artifacts import read_artifact

        art = read_artifact(checkpoint)
        if art.recipe:
            cfg = art.recipe_config().export
            width, fmt = width or cfg.width, fmt or cfg.format
    width, fmt = width or "largest", fmt or "pt2"
    spec = model.space.resolve(width)
    suffix = {"pt2": "pt2", "torchscript": "ts.pt", "onnx": "onnx"}[fmt]
    out = out or Path(f"{model.model_name}_{model.space.label(spec)}.{suffix}")
    with console.status(f"exporting {model.model_name} at width {width}..."):
        r = export_to_file(model, spec, out, fmt, source=source, input_size=input_size)
    console.print(table(f"exported {r.path}", ["model", "subnet", "width", "MACs (M)", "params (M)", "max |diff|"], [
        [r.model, r.subnet, "-" if r.width is None else f"{r.width:g}", f"{r.macs / 1e6:.2f}", f"{r.params / 1e6:.3f}",
         f"{r.max_abs_diff:.2e}"]]))
    console.print(f"sidecar: {r.sidecar}")


def _export_dynamic(checkpoint: str | None, out: Path | None, input_size: int | None) -> None:
    from dsctl.artifacts import GateArtifact, read_artifact
    from dsctl.errors import DsctlError
    from dsctl.export import export_dynamic_to_file

    if checkpoint is None:
        raise DsctlError("--dynamic needs a gate CHECKPOINT (a train-gate run folder or final.pt)")
    gate = read_artifact(checkpoint, GateArtifact, why="--dynamic")
    model = gate.build_model()
    lo, hi = gate.window
    out = out or Path(f"{model.model_name}_dynamic_{lo}-{hi}.ts.pt")
    with console.status("exporting dynamic model..."):
        r = export_dynamic_to_file(model, gate.window, out, source=gate.path, input_size=input_size,
                                   route_macs=list(gate.costs.route_macs), gate_macs=gate.costs.gate_macs)
    console.print(table(f"exported {r.path} (load with torch.jit.load)", ["model", "window", "max |diff|"],
                        [[r.model, f"{lo}:{hi}", f"{r.max_abs_diff:.2e}"]]))
