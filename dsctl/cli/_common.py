"""Shared CLI plumbing: the console, one-line errors, resolving MODEL|CHECKPOINT arguments."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from dsctl.errors import DsctlError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    from rich.markup import escape

    # escaped: messages quote values such as "[0, 3]" that rich would otherwise take for markup and drop
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def _os_error_line(err: OSError) -> str:
    import errno

    where = err.filename if err.filename is not None else "a file"
    text = f"{where}: {err.strerror or err}"
    if err.errno == errno.ENOSPC:
        text += " (the disk is full: free space, then run the same command again; finished work is kept)"
    elif err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        text += " (choose a writable place)"
    elif err.errno in (errno.EISDIR, errno.EEXIST, errno.ENOTDIR):
        text += " (a file and a folder are confused: check --out/--csv)"
    return text


def handle_errors(fn: F) -> F:
    """Turn DsctlError (and recipe validation errors) into one red line on stderr and exit code 1;
    Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DsctlError as err:
            raise fail(str(err)) from None
        except OSError as err:  # a path that is a folder, missing, read-only; a full disk
            raise fail(_os_error_line(err)) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/] (a resumable checkpoint is kept where one was written)",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(quiet: bool = False) -> None:
    """dsctl's INFO lines go to stderr (with --quiet they replace the progress bars)."""
    fmt = "%(asctime)s %(message)s" if quiet else "%(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("dsctl").setLevel(logging.INFO)


def resolve_model(target: str, *, num_classes: int | None = None, in_chans: int | None = None,
                  init_from: Path | None = None):
    """A registered model name (random weights, or ``init_from`` a full-width state dict) or a checkpoint
    file / run folder. Returns (model, source): the checkpoint path, the init file, or "random init".
    """
    from dsctl.artifacts import ModelArtifact, read_artifact
    from dsctl.checkpoint import load_pretrained
    from dsctl.registry import build_model, list_models

    if target in list_models():
        kwargs: dict[str, Any] = {}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        model = build_model(target, **kwargs)
        if init_from is not None:
            load_pretrained(model, init_from)
            return model, str(init_from)
        return model, "random init"
    if init_from is not None:
        raise DsctlError("--init-from applies to a model name, not to a checkpoint")
    if Path(target).exists():
        art = read_artifact(target, ModelArtifact)
        return art.build_model(), art.path
    raise DsctlError(f"{target!r} is neither a registered model ({', '.join(list_models())}) nor an existing file")


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    names = ("model", "subnet", "method", "variant")  # identifiers: never cut (two names may share a prefix)
    for c in columns:
        left = c in (*names, "stages", "routed stages", "gate after")
        t.add_column(c, justify="left" if left else "right", no_wrap=c in names, min_width=None,
                     overflow="fold" if c in names else "ellipsis")
    for r in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    return t
