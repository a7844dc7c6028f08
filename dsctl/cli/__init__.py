"""The ``dsctl`` command line: one Typer app; each command reads its inputs, calls one library function,
and prints a summary. Exit codes: 0 done, 1 bad input or a failed step (one red line), 2 a command line
that does not parse (one red line naming the bad option or value), 130 interrupted."""

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

__all__ = ["app", "main"]


def _usage_error_types() -> tuple[type[Exception], ...]:
    """Click's UsageError: vendored as ``typer._click`` by recent Typer, the ``click`` package before."""
    types: list[type[Exception]] = []
    try:
        from typer._click.exceptions import UsageError as vendored

        types.append(vendored)
    except ImportError:
        pass
    try:
        import click

        types.append(click.UsageError)
    except ImportError:
        pass
    return tuple(types)


def main(argv: list[str] | None = None) -> None:
    """The ``dsctl`` entry point: the app, with parse errors as one line (exit 2) and Ctrl-C as exit 130."""
    import sys

    try:
        code = app(args=argv, prog_name="dsctl", standalone_mode=False)
    except _usage_error_types() as err:  # unknown option, missing argument, bad value of a typed option
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:  # bare `dsctl` / `dsctl GROUP`
            typer.echo(ctx.get_help())
            sys.exit(0)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        typer.secho(f"error: {err.format_message()}{hint}", fg="red", err=True)  # type: ignore[attr-defined]
        sys.exit(2)
    except typer.Abort:  # Ctrl-C outside a command's own handling
        typer.secho("interrupted", fg="yellow", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
