"""Measurement commands: ``eval``, ``bench``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
import typer

from dsctl.cli._common import console, handle_errors, table
from dsctl.cli.train import DataOpt, DeviceOpt, SetOpt, data_overrides

if TYPE_CHECKING:
    from dsctl.artifacts import Artifact, GateArtifact, StaticArtifact
    from dsctl.bench import BenchSettings

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
    from dsctl.errors import DsctlError
    from dsctl.evaluation import evaluate_checkpoint

    if width is not None and dynamic:
        raise DsctlError(f"--width {width} and --dynamic contradict each other (a static sub-network or the gate's "
                         "routing: give one)")
    result = evaluate_checkpoint(checkpoint, width=width, dynamic=dynamic,
                                 overrides=[*(set_ or []), *data_overrides(data, None)], device=device)
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
        return
    cols = ["model", "subnet", "width", "top1", "top5", "loss", "MACs (M)"]
    row = [result.model, result.subnet, result.width, f"{result.top1:.2f}", f"{result.top5:.2f}",
           f"{result.loss:.4f}", f"{result.macs / 1e6:.3f}"]
    if result.histogram is not None:
        cols.append("routes")
        row.append(" ".join(f"k{k}:{c}" for k, c in enumerate(result.histogram) if c))
    console.print(table(f"eval {checkpoint} on {result.data} ({result.samples} images)", cols, [row]))


def _read_target(path: Path, *, exported: bool, dynamic: bool) -> Artifact | None:
    """The run artifact a bench TARGET names (a gate's for --dynamic), or None for a model name or an
    exported file."""
    from dsctl.artifacts import Artifact, GateArtifact, read_artifact

    if exported or not (dynamic or path.exists()):
        return None
    return read_artifact(path, GateArtifact if dynamic else Artifact, why="--dynamic" if dynamic else "")


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
    widths: Annotated[str | None, typer.Option(help="Comma-separated widths (default: smallest, 0.5 if any, largest).")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Time gate routing on real validation images.")] = False,
    batch: Annotated[str | None, typer.Option(help="Batch sizes, comma-separated (default: the checkpoint recipe's "
                                                   "measure.batch_sizes, else 1,32).")] = None,
    device: DeviceOpt = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: measure.threads, else torch's).")] = None,
    input_size: Annotated[int | None, typer.Option(min=8, help="Input resolution (default: the model's).")] = None,
    min_run_time: Annotated[float | None, typer.Option(min=0.05, help="Seconds of timing per candidate and batch size "
                                                                       "(default: measure.min_run_time_s, else 1).")] = None,
    csv: Annotated[Path | None, typer.Option(help="Write the rows to this CSV file.")] = None,
) -> None:
    """Latency (median, p90) and throughput with torch.utils.benchmark, candidates timed side by side."""
    from dsctl.artifacts import ModelArtifact, StaticArtifact
    from dsctl.bench import BenchSettings, bench_exported, bench_widths
    from dsctl.config import MeasureConfig
    from dsctl.report import write_csv

    path = Path(target)
    exported = path.is_file() and Path(str(path) + ".json").is_file()  # an exported file and its sidecar
    art = _read_target(path, exported=exported, dynamic=dynamic)
    measure = art.recipe_config().measure if art is not None and art.recipe else MeasureConfig()
    settings = BenchSettings(_batches(batch) if batch else measure.batch_sizes, device, threads or measure.threads,
                             measure.warmup, min_run_time or measure.min_run_time_s, input_size)
    with console.status("benchmarking..."):
        if exported:
            rows = bench_exported(path, settings)
        elif dynamic:
            rows = _bench_gate(art, settings)
        elif isinstance(art, StaticArtifact):
            rows = _bench_static(art, settings)
        else:
            from dsctl.cli._common import resolve_model

            model = art.build_model() if isinstance(art, ModelArtifact) else resolve_model(target)[0]
            specs = _bench_specs(model, widths)
            rows = bench_widths(model, specs, settings)
    console.print(table(f"bench {target} ({rows[0].device}, {rows[0].threads} threads, {rows[0].dtype}; "
                        f"ratio = p50 / p50 of '{rows[0].reference}' in the same run)",
                        ["kind", "subnet", "width", "batch", "MACs (M)", "p50 ms", "p90 ms", "img/s", "ratio"], [
        [r.kind, r.subnet, r.width, r.batch, f"{r.macs / 1e6:.2f}", f"{r.latency_ms_p50:.3f}", f"{r.latency_ms_p90:.3f}",
         f"{r.throughput:.0f}", "-" if r.ratio is None else f"{r.ratio:.3f}"] for r in rows]))
    if csv is not None:
        write_csv(csv, rows)
        console.print(f"wrote {csv}")


def _bench_specs(model, widths: str | None):
    space = model.space
    if widths is None:
        picks = [space.smallest()]
        if 0.5 in space.ratios():
            picks.append(space.resolve(0.5))
        picks.append(space.full)
        return list(dict.fromkeys(picks))
    if widths == "all":
        return list(dict.fromkeys([*space.subnets, space.full]))
    return [space.resolve(w) for w in widths.split(",")]


def _bench_gate(gate: GateArtifact, settings: BenchSettings):
    from dsctl.bench import bench_dynamic
    from dsctl.train.data import build_run_data

    model = gate.build_model()
    data = build_run_data(gate.recipe_config().data)
    n = max(512, 16 * max(settings.batches))
    images = torch.cat([x for x, _ in _take(data.val, n)])[:n]
    return bench_dynamic(model, gate.window, images, settings, route_macs=list(gate.costs.route_macs))


def _take(loader, n: int):
    seen = 0
    for x, y in loader:
        yield x, y
        seen += x.shape[0]
        if seen >= n:
            return


@app.command("report")
@handle_errors
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Finished run folders: supernet, gate and baseline runs.")],
    out: Annotated[Path, typer.Option(help="Output folder for report.csv, plots and REPORT.md.")] = Path("results/report"),
    batch: Annotated[int, typer.Option(min=1, help="The larger batch size timed (besides batch 1).")] = 32,
    device: DeviceOpt = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: torch's).")] = None,
    min_run_time: Annotated[float, typer.Option(min=0.05, help="Seconds of timing per model and batch size.")] = 0.5,
    title: Annotated[str, typer.Option(help="Title of the plots and REPORT.md.")] = "",
) -> None:
    """Accuracy / MACs / latency of supernet sub-networks, dynamic models and static baselines."""
    import platform
    import shlex
    import sys

    from dsctl.report import build_report, write_report

    with console.status("loading runs and timing every model side by side..."):
        rows = build_report(runs, batch_n=batch, device=device, threads=threads, min_run_time_s=min_run_time)
    machine = f"{platform.machine()} {platform.processor() or ''} ({rows[0].device}, {rows[0].threads} threads), " \
              f"torch {rows[0].torch_version}"
    command = "dsctl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = write_report(rows, out, command=command, machine=machine, title=title or "")
    console.print(table(f"report ({rows[0].device}, {rows[0].threads} threads; MACs = fused multiply-adds)",
                        ["method", "variant", "width", "MACs (M)", "params (M)", "top1", "ms b1", f"ms b{batch}"], [
        [r.method, r.variant, r.width, f"{r.macs / 1e6:.3f}", f"{r.params / 1e6:.3f}", f"{r.top1:.2f}",
         f"{r.latency_ms_b1:.3f}", f"{r.latency_ms_bN:.3f}"] for r in rows]))
    console.print("wrote " + ", ".join(str(p) for p in paths))


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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log lines instead of progress bars.")] = False,
    allow_changed: Annotated[bool, typer.Option(
        "--allow-changed", help="Keep finished stages and resume interrupted ones even if their recipe, data or "
                                "code differ from now (recorded in each stage's provenance.json).")] = False,
) -> None:
    """The whole experiment: supernet, gates at two MACs targets, three static baselines, bench and report.

    Re-running the same command continues where it stopped (finished stages are skipped)."""
    import platform
    import shlex
    import sys

    from dsctl.cli.train import interrupted, make_progress
    from dsctl.config import load_recipe
    from dsctl.errors import DsctlError
    from dsctl.pipeline import run_pipeline
    from dsctl.train.run import TrainingInterrupted

    if not recipe.is_file():
        raise DsctlError(f"recipe {recipe} not found (run from the dsctl repository, or pass a pipeline recipe)")
    cfg = load_recipe(recipe, [*(set_ or []), *data_overrides(data, None)])
    machine = f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    progress = make_progress(quiet)
    try:
        rows = run_pipeline(cfg, out, device=device, progress=progress, report_dir=report, allow_changed=allow_changed,
                            command="dsctl " + " ".join(shlex.quote(a) for a in sys.argv[1:]), machine=machine)
    except TrainingInterrupted as err:
        raise interrupted(err) from None
    finally:
        progress.close()
    console.print(table(f"quickstart report ({report or out / 'report'})",
                        ["method", "variant", "width", "MACs (M)", "top1", "ms b1", f"ms b{rows[0].batch_n}"], [
        [r.method, r.variant, r.width, f"{r.macs / 1e6:.3f}", f"{r.top1:.2f}", f"{r.latency_ms_b1:.3f}",
         f"{r.latency_ms_bN:.3f}"] for r in rows]))


def _bench_static(art: StaticArtifact, settings: BenchSettings):
    """A baseline network (uniform / pruned) from its run folder or checkpoint."""
    from dsctl.bench import bench_module

    meta = art.meta
    size = settings.input_size or art.input_size
    return bench_module(f"{art.model_name}:{meta.method}", art.build_network(),
                        art.data_info.in_chans if art.data_info else 3, size, settings, kind=meta.method,
                        subnet=meta.variant or "-", width=meta.width_label)
