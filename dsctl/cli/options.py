"""Options shared by several commands, and the recipe overrides they stand for.

Every command module takes its shared options from here (one help text per option); options of one
command stay in that command's module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["AllowChangedOpt", "CsvOpt", "DataOpt", "DeviceOpt", "InitEmaOpt", "InitOpt", "JsonOpt", "QuietOpt",
           "RecipeArg", "SetOpt", "TensorBoardOpt", "WidthsOpt", "deprecated", "recipe_overrides", "split_widths"]

RecipeArg = Annotated[Path | None, typer.Argument(help="Recipe YAML (optional with --resume).")]
DataOpt = Annotated[str | None, typer.Option("--data", help="SOURCE[:ROOT], e.g. fashion_mnist, cifar10:/data, "
                                                            "folder:/imagenet.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: --set optim.lr=0.1 "
                                                                "(repeatable).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the table(s) as JSON on stdout instead (logs and "
                                                       "progress go to stderr).")]
CsvOpt = Annotated[Path | None, typer.Option("--csv", help="Also write the table's rows to this CSV file.")]
WidthsOpt = Annotated[list[str] | None, typer.Option("--width", "-w", help="A width: slimming ratio, 'largest' or "
                                                                           "k=N; repeatable, or comma-separated.")]
TensorBoardOpt = Annotated[bool, typer.Option("--tensorboard", help="Also write live scalars (losses, lr, each "
                                                                   "evaluated model's accuracy) to <run>/tensorboard "
                                                                   "(needs the tensorboard package).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Log lines instead of progress bars.")]
AllowChangedOpt = Annotated[bool, typer.Option(
    "--allow-changed", help="Resume even if the recipe, data or code differ from the run's record "
                            "(the differences are appended to its provenance.json).")]
InitOpt = Annotated[Path | None, typer.Option("--init-from", help="Weights to start from: a full-width state dict "
                                                                    "(timm/torchvision names; .pth, .bin or "
                                                                    ".safetensors), a Hub folder holding "
                                                                    "model.safetensors or pytorch_model.bin, or a "
                                                                    "dsctl run (e.g. one dsctl convert wrote).")]
InitEmaOpt = Annotated[bool, typer.Option("--init-ema/--no-init-ema", help="From a training checkpoint (timm "
                                                                          "train.py), take its EMA weights where it "
                                                                          "holds them, else the trained ones.")]


def recipe_overrides(set_: list[str] | None, data: str | None = None, seed: int | None = None) -> list[str]:
    """The dotted recipe overrides of ``--set``, ``--data SOURCE[:ROOT]`` and ``--seed``, in that order."""
    from dsctl.train.data import parse_data_spec

    out = list(set_ or [])
    if data is not None:
        d = parse_data_spec(data)
        out.append(f"data.source={d['source']}")
        if d["root"] is not None:
            out.append(f"data.root={d['root']}")
    if seed is not None:
        out.append(f"seed={seed}")
    return out


def deprecated(old: str, new: str, old_value, new_value):
    """The value of an option renamed for one consistent command line (issue 24): the old spelling still
    works for one release, with a one-line notice on stderr; both given is an error."""
    if old_value is None:
        return new_value
    from dsctl.cli._common import err_console
    from dsctl.errors import DsctlError

    if new_value is not None:
        raise DsctlError(f"{old} is the old name of {new}: give {new} only")
    err_console.print(f"[yellow]warning:[/] {old} is deprecated and goes in the next release; use {new}",
                      highlight=False, soft_wrap=True)
    return old_value


def split_widths(values: list[str] | None) -> list[str] | None:
    """``--width 0.25 --width 0.5,largest`` -> ``["0.25", "0.5", "largest"]`` (None when not given)."""
    if not values:
        return None
    return [w.strip() for v in values for w in v.split(",") if w.strip()]
