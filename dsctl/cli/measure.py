"""Measurement commands: ``eval``, ``bench``, ``report``, ``quickstart``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsctl.cli._common import Output, command_line, console, handle_errors, progress_display
from dsctl.cli.options import (CsvOpt, DataOpt, DeviceOpt, JsonOpt, QuietOpt, SetOpt, TensorBoardOpt, WidthsOpt,
                               deprecated, recipe_overrides, split_widths)

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
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Top-1, top-5 and loss on the validation data; for dynamic models also average MACs and routes."""
    from dsctl.errors import DsctlError
    from dsctl.evaluation import evaluate_checkpoint

    if width is not None and dynamic:
        raise DsctlError(f"--width {width} and --dynamic contradict each other (a static sub-network or the gate's "
                         "routing: give one)")
    with progress_display(quiet=as_json) as progress:  # --json: stdout holds the JSON alone
        result = evaluate_checkpoint(checkpoint, width=width, dynamic=dynamic,
                                     overrides=recipe_overrides(set_, data), device=device, progress=progress)
    cols = ["model", "subnet", "width", "top1", "top5", "loss", "MACs (M)"]
    row = [result.model, result.subnet, result.width, f"{result.top1:.2f}", f"{result.top5:.2f}",
           f"{result.loss:.4f}", f"{result.macs / 1e6:.3f}"]
    if result.histogram is not None:
        cols.append("routes")
        row.append(" ".join(f"k{k}:{c}" for k, c in enumerate(result.histogram) if c))
    with Output(as_json, csv) as out:
        out.show(f"eval {checkpoint} on {result.data} ({result.samples} images)", cols, [row], records=[result.to_dict()], one=True)


def _batches(text: str) -> tuple[int, ...]:
    from dsctl.errors import DsctlError

    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise DsctlError(f"--batch {text!r}: expected comma-separated positive integers, e.g. 1,32") from None
    if not values or min(values) < 1:
        raise DsctlError(f"--batch {text!r}: expected comma-separated positive integers, e.g. 1,32")
    return values


@app.command("bench")
@handle_errors
def bench_cmd(
    target: Annotated[str, typer.Argument(help="Model name, supernet/gate checkpoint or run folder, or an exported file.")],
    width: WidthsOpt = None,
    widths: Annotated[str | None, typer.Option(hidden=True, help="Deprecated: --width.")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Time gate routing on real validation images.")] = False,
    batch: Annotated[str | None, typer.Option(help="Batch sizes, comma-separated (default: the checkpoint recipe's "
                                                   "measure.batch_sizes, else 1,32).")] = None,
    device: DeviceOpt = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: measure.threads, else torch's).")] = None,
    input_size: Annotated[int | None, typer.Option(min=8, help="Input resolution (default: the run's, else the "
                                                              "model's).")] = None,
    min_run_time: Annotated[float | None, typer.Option(min=0.05, help="Seconds of timing per candidate and batch size "
                                                                       "(default: measure.min_run_time_s, else 1).")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="Time every plain-module candidate under torch.compile "
                                                          "(a model's sub-networks: compiled vs eager; --dynamic: "
                                                          "the routed model and the statics all compiled, the "
                                                          "supernet's eager routing left out). Compiling takes "
                                                          "tens of seconds per network.")] = False,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Latency (median, p90) and throughput with torch.utils.benchmark, candidates timed side by side."""
    from dataclasses import asdict

    from dsctl.bench import bench_target

    chosen = split_widths(deprecated("--widths", "--width", [widths] if widths else None, width))
    with console.status("benchmarking..."):
        rows = bench_target(target, widths=chosen, dynamic=dynamic,
                            batches=_batches(batch) if batch else None, device=device, threads=threads,
                            min_run_time_s=min_run_time, input_size=input_size, compiled=compile_)
    compiled = ", compiled where 'c'" if compile_ else ""
    with Output(as_json, csv) as out:
        out.show(f"bench {target} ({rows[0].device}, {rows[0].threads} threads, {rows[0].dtype}{compiled}; "
                 f"ratio = p50 / p50 of '{rows[0].reference}' in the same run)",
                 ["kind", "subnet", "width", "batch", "MACs (M)", "p50 ms", "p90 ms", "img/s", "ratio"], [
            [r.kind + (" c" if r.compiled else ""), r.subnet, r.width, r.batch, f"{r.macs / 1e6:.2f}",
             f"{r.latency_ms_p50:.3f}", f"{r.latency_ms_p90:.3f}", f"{r.throughput:.0f}",
             "-" if r.ratio is None else f"{r.ratio:.3f}"] for r in rows], records=[asdict(r) for r in rows])


@app.command("report")
@handle_errors
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Finished run folders: supernet, gate and baseline runs.")],
    out: Annotated[Path, typer.Option(help="Output folder for report.csv, plots and REPORT.md.")] = Path("results/report"),
    latency_batch: Annotated[int | None, typer.Option(min=1, help="The larger batch size timed (besides batch 1; "
                                                                  "default 32).")] = None,
    batch: Annotated[int | None, typer.Option(min=1, hidden=True, help="Deprecated: --latency-batch.")] = None,
    device: DeviceOpt = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: torch's).")] = None,
    min_run_time: Annotated[float, typer.Option(min=0.05, help="Seconds of timing per model and batch size.")] = 0.5,
    title: Annotated[str, typer.Option(help="Title of the plots and REPORT.md.")] = "",
    compile_: Annotated[bool, typer.Option("--compile", help="Time every model under torch.compile (all alike; tens "
                                                          "of seconds of compiling per network).")] = False,
    measure: Annotated[bool, typer.Option("--measure", help="Re-time every model even where OUT/report.csv holds "
                                                          "latencies timed the same way (same device, threads, "
                                                          "batch, compilation, commit and torch).")] = False,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Accuracy / MACs / latency of supernet sub-networks, dynamic models and static baselines: report.csv,
    targets.csv (paired 95% intervals), plots, REPORT.md and a self-contained report.html."""
    from dataclasses import asdict

    from dsctl.report import report_runs

    batch = deprecated("--batch", "--latency-batch", batch, latency_batch) or 32
    from dsctl.cli._common import setup_logging

    setup_logging()
    with console.status("loading runs, timing every model side by side (unless timed before)..."):
        rows, paths = report_runs(runs, out, batch_n=batch, device=device, threads=threads,
                                  min_run_time_s=min_run_time, title=title, command=command_line(),
                                  compiled=compile_, measure=measure)
    with Output(as_json, csv) as o:
        o.show(f"report ({rows[0].device}, {rows[0].threads} threads; MACs = fused multiply-adds)",
               ["method", "variant", "width", "MACs (M)", "params (M)", "top1", "ms b1", f"ms b{batch}"], [
            [r.method, r.variant, r.width, f"{r.macs / 1e6:.3f}", f"{r.params / 1e6:.3f}", f"{r.top1:.2f}",
             f"{r.latency_ms_b1:.3f}", f"{r.latency_ms_bN:.3f}"] for r in rows], records=[asdict(r) for r in rows])
        o.note("wrote " + ", ".join(str(p) for p in paths))


@app.command("plot")
@handle_errors
def plot_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (finished or running) with a metrics.csv.")],
    out: Annotated[Path | None, typer.Option(help="PNG file (default: <first run>/training_curves.png).")] = None,
    title: Annotated[str, typer.Option(help="Title of the plot.")] = "",
) -> None:
    """Training curves from metrics.csv: every evaluated model's validation top-1 per epoch, and the losses."""
    from dsctl.curves import plot_training_curves

    path = plot_training_curves(runs, out or runs[0] / "training_curves.png", title)
    console.print(f"wrote {path}")


DEFAULT_QUICKSTART = Path("recipes/quickstart/fashion_mnist_ds_resnet.yaml")


@app.command("quickstart")
@handle_errors
def quickstart_cmd(
    recipe: Annotated[Path, typer.Argument(help="Pipeline recipe.")] = DEFAULT_QUICKSTART,
    data: DataOpt = None,
    out: Annotated[Path, typer.Option(help="Folder of the stage runs; the report goes to OUT/report.")] = Path("runs/quickstart"),
    report: Annotated[Path | None, typer.Option(help="Report folder (default: OUT/report).")] = None,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    allow_changed: Annotated[bool, typer.Option(
        "--allow-changed", help="Keep finished stages and resume interrupted ones even if their recipe, data or "
                                "code differ from now (recorded in each stage's provenance.json).")] = False,
    tensorboard: TensorBoardOpt = False,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """The whole experiment: supernet, gates at two MACs targets, three static baselines, bench and report.

    Re-running the same command continues where it stopped (finished stages are skipped)."""
    from dsctl.config import load_recipe
    from dsctl.errors import DsctlError
    from dsctl.pipeline import run_pipeline

    if not recipe.is_file():
        raise DsctlError(f"recipe {recipe} not found (run from the dsctl repository, or pass a pipeline recipe)")
    cfg = load_recipe(recipe, recipe_overrides(set_, data))
    with progress_display(quiet or as_json) as progress:
        rows = run_pipeline(cfg, out, device=device, progress=progress, report_dir=report, allow_changed=allow_changed,
                            command=command_line(), tensorboard=tensorboard)
    from dataclasses import asdict

    with Output(as_json, csv) as o:
        o.show(f"quickstart report ({report or out / 'report'})",
               ["method", "variant", "width", "MACs (M)", "top1", "ms b1", f"ms b{rows[0].batch_n}"], [
            [r.method, r.variant, r.width, f"{r.macs / 1e6:.3f}", f"{r.top1:.2f}", f"{r.latency_ms_b1:.3f}",
             f"{r.latency_ms_bN:.3f}"] for r in rows], records=[asdict(r) for r in rows])
