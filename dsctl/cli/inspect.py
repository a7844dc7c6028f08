"""Commands that look at models without training: ``models``, ``flops``, ``export``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from dsctl.cli._common import Output, console, handle_errors
from dsctl.cli.options import CsvOpt, InitOpt, JsonOpt, WidthsOpt, split_widths
from dsctl.spec import width_label

app = typer.Typer()


@app.command("models")
@handle_errors
def models_cmd(
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """List registered supernets: sub-networks, slimming ratios, routed stages, gate position."""
    from dsctl.registry import describe_models

    rows = describe_models()
    with Output(as_json, csv) as out:
        out.show("dsctl models", ["model", "subnets", "ratios", "routed stages", "gate after", "input", "params (M)"], [
            [r["model"], r["subnets"], _ratio_range(r), ", ".join(r["routed_stages"]),
             r["gate_after"], r["input_size"], r["params_m"]] for r in rows], records=rows)


def _ratio_range(row: dict) -> str:
    """``0.375 .. 1``, and the kernel sizes or MLP ratios every width runs at (``x kernel 3/5/7``)."""
    text = f"{row['ratios'][0]:g} .. {row['ratios'][-1]:g}"
    routed = [s for s in row["space"]["stages"] if s["routed"]]
    if routed and routed[0].get("kernels"):
        text += " x kernel " + "/".join(f"{k:g}" for k in routed[0]["kernels"])
    if routed and routed[0].get("mlp_ratios"):
        text += " x mlp " + "/".join(f"{r:g}" for r in routed[0]["mlp_ratios"])
    return text


@app.command("flops")
@handle_errors
def flops_cmd(
    target: Annotated[str, typer.Argument(help="Registered model name, checkpoint file or run folder.")],
    width: WidthsOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Every indexed sub-network and the full-width network (default).")] = False,
    input_size: Annotated[int | None, typer.Option(min=8, help="Input resolution (default: the run's, else the "
                                                              "model's).")] = None,
    num_classes: Annotated[int | None, typer.Option(min=1, help="Classes of the head (model names only).")] = None,
    in_chans: Annotated[int | None, typer.Option(min=1, help="Input channels (model names only).")] = None,
    init_from: InitOpt = None,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """MACs and parameters per sub-network, counted with fvcore on the exported static network."""
    from dsctl.errors import DsctlError
    from dsctl.flops import MACS_CONVENTION, count_target

    if width and all_:
        raise DsctlError("--width and --all contradict each other (give one: --all counts every sub-network)")
    with console.status("counting MACs with fvcore..."):
        reports = count_target(target, widths=split_widths(width), input_size=input_size, num_classes=num_classes,
                               in_chans=in_chans, init_from=init_from)
    with Output(as_json, csv) as out:
        out.show(f"{reports[0].model} @ {reports[0].input_size}px", ["subnet", "width", "MACs (M)", "params (M)"], [
            [r.subnet, width_label(r.width), f"{r.macs_m:.2f}", f"{r.params_m:.3f}"] for r in reports],
            records=[r.to_row() for r in reports])
        out.note(MACS_CONVENTION)


@app.command("export")
@handle_errors
def export_cmd(
    checkpoint: Annotated[str | None, typer.Argument(help="Checkpoint file or run folder (or use --model).")] = None,
    model_name: Annotated[str | None, typer.Option("--model", help="Registered model with random weights.")] = None,
    width: Annotated[str | None, typer.Option("--width", "-w", help="Slimming ratio of the sub-network, or 'largest' "
                                                                 "(default: the checkpoint recipe's export.width, "
                                                                 "else largest).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output file (default: <model>_w<width>.<format>).")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="pt2 (torch.export), aoti (its AOTInductor package, "
                                                             "compiled ahead of time: needs a C++ compiler; load "
                                                             "with aoti_load_package from torch._inductor), "
                                                             "torchscript, onnx, or safetensors (the weights alone: "
                                                             "the full network under timm/torchvision names). "
                                                             "Default: the checkpoint recipe's export.format, else "
                                                             "pt2.")] = None,
    input_size: Annotated[int | None, typer.Option(min=8, help="Input size of the check (default: the run's, else "
                                                              "the model's).")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Export supernet + gate (a train-gate checkpoint) with "
                                                            "grouped routing: a folder of torch.export programs "
                                                            "(--format pt2, default) or one TorchScript file.")] = False,
    init_from: InitOpt = None,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Write a fixed-width static sub-network (or, with --dynamic, the routed model) as plain PyTorch,
    verified against the supernet."""
    from dsctl.errors import DsctlError
    from dsctl.export import export_gate_run, export_target

    if (checkpoint is None) == (model_name is None):
        raise DsctlError("give either a CHECKPOINT or --model NAME")
    if dynamic:
        if checkpoint is None:
            raise DsctlError("--dynamic needs a gate CHECKPOINT (a train-gate run folder or final.pt)")
        with console.status("exporting dynamic model..."):
            d = export_gate_run(checkpoint, out=out, input_size=input_size, fmt=fmt or "pt2")
        lo, hi = d.window
        how = "dsctl.export.load_dynamic, or README 'Export'" if d.format != "torchscript" else "torch.jit.load"
        with Output(as_json, csv) as o:
            o.show(f"exported {d.path} (load with {how})", ["model", "window", "max |diff|"],
                   [[d.model, f"{lo}:{hi}", f"{d.max_abs_diff:.2e}"]], records=[asdict(d)], one=True)
            o.note(f"sidecar: {d.sidecar}")
        return
    with console.status(f"exporting {checkpoint or model_name}..."):
        r = export_target(checkpoint or model_name or "", width=width, out=out, fmt=fmt, input_size=input_size,
                          init_from=init_from)
    with Output(as_json, csv) as o:
        o.show(f"exported {r.path}", ["model", "subnet", "width", "MACs (M)", "params (M)", "max |diff|"], [
            [r.model, r.subnet, width_label(r.width), f"{r.macs / 1e6:.2f}", f"{r.params / 1e6:.3f}",
             f"{r.max_abs_diff:.2e}"]], records=[asdict(r)], one=True)
        if r.names:
            o.note(f"parameter names: {r.names}")
        o.note(f"sidecar: {r.sidecar}")
