"""Options shared by several commands, and the recipe overrides they stand for.

Every command module takes its shared options from here (one help text per option); options of one
command stay in that command's module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["AllowChangedOpt", "DataOpt", "DeviceOpt", "InitEmaOpt", "InitOpt", "QuietOpt", "RecipeArg", "SetOpt",
           "recipe_overrides"]

RecipeArg = Annotated[Path | None, typer.Argument(help="Recipe YAML (optional with --resume).")]
DataOpt = Annotated[str | None, typer.Option("--data", help="SOURCE[:ROOT], e.g. fashion_mnist, cifar10:/data, "
                                                            "folder:/imagenet.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: --set optim.lr=0.1 "
                                                                "(repeatable).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
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
