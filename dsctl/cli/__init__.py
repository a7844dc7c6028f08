"""The ``dsctl`` command line: one Typer app; each command reads its inputs, calls one library function,
and prints a summary. Library errors become one red line and exit code 1."""

from __future__ import annotations

import warnings

import typer

# torch 2.14 deprecates torch.jit, which fvcore's tracer and TorchScript export still use.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)

from dsctl.cli import analyze, inspect, measure, train  # noqa: E402

app = typer.Typer(
    name="dsctl",
    help="Dynamic weight slicing (DS-Net / DS-Net++): train supernets and gates, export, measure, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for sub in (inspect.app, train.app, measure.app, analyze.app):
    for cmd in sub.registered_commands:
        app.registered_commands.append(cmd)

__all__ = ["app"]
