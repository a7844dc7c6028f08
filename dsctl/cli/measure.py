"""Measurement commands: ``eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dsctl.cli._common import console, handle_errors, table
from dsctl.cli.train import DataOpt, DeviceOpt, SetOpt, data_overrides

app = typer.Typer()


@app.command("eval")
@handle_errors
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Supernet or gate checkpoint, or a run folder.")],
    data: DataOpt = None,
    width: Annotated[str | None, typer.Option("--width", "-w", help="Evaluate the static sub-network at this width.")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Evaluate gate routing (default for gate checkpoints).")] = False,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Top-1, top-5 and loss on the validation data; for dynamic models also average MACs and routes."""
    from dsctl.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, width=width, dynamic=dynamic,
                                 overrides=[*(set_ or []), *data_overrides(data, None)], device=device)
    if as_json:
        console.print_json(json.dumps(result))
        return
    cols = ["model", "subnet", "width", "top1", "top5", "loss", "MACs (M)"]
    row = [result["model"], result["subnet"], result["width"], f"{result['top1']:.2f}", f"{result['top5']:.2f}",
           f"{result['loss']:.4f}", f"{result['macs'] / 1e6:.3f}"]
    if "histogram" in result:
        cols.append("routes")
        row.append(" ".join(f"k{k}:{c}" for k, c in enumerate(result["histogram"]) if c))
    console.print(table(f"eval {checkpoint} on {result['data']} ({result['samples']} images)", cols, [row]))
