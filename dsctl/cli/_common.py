"""Shared CLI plumbing: the console, one-line errors, progress display and interrupts, tables."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from dsctl.errors import DsctlError

if TYPE_CHECKING:
    from dsctl.train.progress import Progress

class _Console(Console):
    """A console that never cuts a table: on a terminal, or wherever ``COLUMNS`` sets a width, its cells
    wrap (see :func:`table`); elsewhere (a pipe, a file, CI) it is printed at the width it needs."""

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        import os

        if not self.is_terminal and not os.environ.get("COLUMNS") and kwargs.get("width") is None:
            from rich.measure import Measurement

            wide = self.options.update_width(10_000)
            widest = max((Measurement.get(self, wide, o).maximum for o in objects if isinstance(o, Table)),
                         default=0)
            if widest > self.width:  # print's own width= is capped at the console's: widen the console
                saved, self._width = self._width, widest
                try:
                    return super().print(*objects, **kwargs)
                finally:
                    self._width = saved
        super().print(*objects, **kwargs)


console = _Console()
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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (not the stream of the first command that
    configured logging: in-process callers, such as test runners, replace it between commands)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(quiet: bool = False) -> None:
    """dsctl's INFO lines go to stderr (with --quiet they replace the progress bars)."""
    fmt = "%(asctime)s %(message)s" if quiet else "%(message)s"
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("dsctl").setLevel(logging.INFO)


@contextmanager
def progress_display(quiet: bool = False) -> Iterator[Progress]:
    """The progress of a long command: a Rich bar, or with ``quiet`` INFO log lines (see :func:`setup_logging`).

    A run interrupted after saving its resume point (``TrainingInterrupted``) prints the library's line
    and exits 130; the display is closed whatever happens.
    """
    from dsctl.train.run import TrainingInterrupted

    setup_logging(quiet)
    if quiet:
        from dsctl.train.progress import LogProgress

        progress: Progress = LogProgress()
    else:
        from dsctl.cli._progress import RichProgress

        progress = RichProgress()
    try:
        yield progress
    except TrainingInterrupted as err:
        console.print(f"[yellow]{err}[/]")
        raise typer.Exit(130) from None
    finally:
        progress.close()


def command_line() -> str:
    """This process's command as typed (for reports that say how they were made)."""
    import shlex

    return "dsctl " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A Rich table whose cells wrap (``fold``) when the terminal is narrow, identifiers last: no number or
    name is ever cut to an ellipsis (issue 24). Off a terminal, :data:`console` prints it at its full width."""
    t = Table(title=title, title_justify="left")
    names = ("model", "subnet", "method", "variant")  # kept on one line while other columns can wrap
    for c in columns:
        left = c in (*names, "stages", "routed stages", "gate after")
        t.add_column(c, justify="left" if left else "right", overflow="fold", no_wrap=c in names)
    for r in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    return t


class Output:
    """What a command prints: its tables on the console, or with ``--json`` as JSON on stdout (one list of
    rows, one object for a command whose result is one row, or an object of them by table name when there
    are several), and with ``--csv FILE`` its rows in
    a CSV file too (a ``table`` column when there are several). Notes (``wrote ...``) go to stderr under
    ``--json`` so that stdout holds the JSON alone. Use as a context manager: it emits on exit."""

    def __init__(self, as_json: bool = False, csv: Any = None) -> None:
        self.as_json, self.csv = as_json, csv
        self.tables: list[tuple[str, list[dict[str, Any]]]] = []
        self.one = False

    def show(self, title: str, columns: list[str], rows: list[list[Any]], records: list[dict[str, Any]] | None = None,
             name: str | None = None, one: bool = False) -> None:
        """One table: ``rows`` as shown; ``records`` the same rows with their raw values (default: the shown
        cells under the column names); ``one``: the command's result is this one row (JSON: an object)."""
        self.tables.append((name or title, records if records is not None else [dict(zip(columns, r)) for r in rows]))
        self.one = one and len(self.tables) == 1 and len(self.tables[0][1]) == 1
        if not self.as_json:
            console.print(table(title, columns, rows))

    def note(self, text: str) -> None:
        (err_console if self.as_json else console).print(text, highlight=False, soft_wrap=True)

    def __enter__(self) -> Output:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            return
        if self.as_json:
            import json

            body: Any = self.tables[0][1] if len(self.tables) == 1 else {n: r for n, r in self.tables}
            if self.one:
                body = body[0]
            typer.echo(json.dumps(body, indent=2, default=str))
        if self.csv is not None and self.tables:
            import csv as csv_module

            many = len(self.tables) > 1
            rows = [({"table": n} if many else {}) | r for n, recs in self.tables for r in recs]
            fields = list(dict.fromkeys(k for r in rows for k in r))
            with open(self.csv, "w", newline="") as f:
                w = csv_module.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
            self.note(f"wrote {self.csv}")
