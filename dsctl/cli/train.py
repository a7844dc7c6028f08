"""Training commands: ``train-supernet``, ``calibrate-bn``, ``train-gate``, ``baseline``."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dsctl.cli._common import Output, handle_errors, progress_display
from dsctl.cli.options import (AllowChangedOpt, CsvOpt, DataOpt, DeviceOpt, InitEmaOpt, InitOpt, JsonOpt, QuietOpt,
                               RecipeArg, SetOpt, TensorBoardOpt, recipe_overrides)
from dsctl.spec import width_label

if TYPE_CHECKING:
    from dsctl.artifacts import SubnetRow
    from dsctl.train.timing import RunTime

app = typer.Typer()


def print_subnets(out: Output, title: str, rows: list[SubnetRow]) -> None:
    out.show(title, ["subnet", "width", "MACs (M)", "params (M)", "top1", "top5", "loss"], [
        [r.label, width_label(r.width), f"{r.macs / 1e6:.2f}", f"{r.params / 1e6:.3f}",
         f"{r.top1:.2f}", f"{r.top5:.2f}", f"{r.loss:.4f}"] for r in rows], records=[r.to_row() for r in rows])


@app.command("train-supernet")
@handle_errors
def train_supernet_cmd(
    recipe: RecipeArg = None,
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<recipe name>).")] = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder where it stopped.")] = None,
    device: DeviceOpt = "auto",
    seed: Annotated[int | None, typer.Option(help="Override the recipe's seed.")] = None,
    init_from: InitOpt = None,
    init_ema: InitEmaOpt = True,
    quiet: QuietOpt = False,
    allow_changed: AllowChangedOpt = False,
    tensorboard: TensorBoardOpt = False,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Stage I: train a supernet with the sandwich rule and in-place bootstrapping; ends with BN recalibration."""
    from dsctl.train.launch import launch_supernet, resolve_recipe

    extra = _init_overrides(init_from, init_ema)
    cfg = resolve_recipe(recipe, [*recipe_overrides(set_, data, seed), *extra], resume)
    run_dir = resume or out or Path("runs") / (recipe.stem if recipe else "supernet")
    with progress_display(quiet or as_json) as progress:
        result = launch_supernet(cfg, run_dir, device=device, resume=resume is not None, progress=progress,
                                 allow_changed=allow_changed, tensorboard=tensorboard)
    when = "after BN recalibration" if result.bn_recalibrated else "(no BatchNorm: nothing to recalibrate)"
    with Output(as_json, csv) as out:
        print_subnets(out, f"{cfg.model.name}: sub-networks {when} ({result.run_dir})", result.subnets)
        _print_time(out, result.time)


@app.command("calibrate-bn")
@handle_errors
def calibrate_bn_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Supernet checkpoint or run folder.")],
    data: DataOpt = None,
    batches: Annotated[int | None, typer.Option(min=1, help="Batches per sub-network (default: the recipe's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write here (default: overwrite the checkpoint).")] = None,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Recalibrate BatchNorm statistics of every sub-network, then evaluate each one (a family without
    BatchNorm, such as DS-ViT, has nothing to calibrate: one line, exit 0)."""
    from dsctl.train.calibrate import recalibrate_checkpoint

    with progress_display(quiet or as_json) as progress:
        path, rows = recalibrate_checkpoint(checkpoint, overrides=recipe_overrides(set_, data), batches=batches,
                                            out=out, device=device, progress=progress)
    with Output(as_json, csv) as o:
        if rows is None:
            o.note(f"{path}: nothing to calibrate (no BatchNorm)")
            return
        print_subnets(o, f"recalibrated {path}", rows)


def _init_overrides(init_from: Path | None, init_ema: bool) -> list[str]:
    out = [f"model.init_from={json.dumps(str(init_from))}"] if init_from is not None else []
    return out if init_ema else [*out, "model.init_ema=false"]


class Criterion(str, Enum):
    auto = "auto"
    l1 = "l1"
    l2 = "l2"
    bn_scale = "bn_scale"
    taylor = "taylor"
    none = "none"


@app.command("convert")
@handle_errors
def convert_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML: the model to build, the data to recalibrate BN and "
                                                "evaluate on (the one train-supernet fine-tunes with).")],
    init_from: InitOpt = None,
    init_ema: InitEmaOpt = True,
    criterion: Annotated[Criterion, typer.Option(help="Channel importance (Torch-Pruning's group criteria): l1 or "
                                                      "l2 weight magnitude, bn_scale (|gamma|), taylor (|w * grad| on "
                                                      "training batches), none (keep the order as trained); auto: "
                                                      "bn_scale where there is BatchNorm, else l2 (the best two "
                                                      "measured on Fashion-MNIST, see README).")] = Criterion.auto,
    compare: Annotated[bool, typer.Option(help="Also evaluate every sub-network with the weights as they came "
                                               "(first k channels, same BN recalibration).")] = True,
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<recipe name>-converted).")] = None,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    allow_changed: AllowChangedOpt = False,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Turn a pretrained static network into a supernet: order every sliceable dimension by importance (the
    full network unchanged), recalibrate BN, evaluate every sub-network. Fine-tune the result with
    train-supernet --init-from OUT."""
    from dsctl.convert import launch_convert
    from dsctl.errors import DsctlError
    from dsctl.train.launch import resolve_recipe

    if init_from is None:
        raise DsctlError("give --init-from WEIGHTS: the pretrained network to convert")
    cfg = resolve_recipe(recipe, [*recipe_overrides(set_, data), *_init_overrides(init_from, init_ema)], None)
    run_dir = out or Path("runs") / f"{recipe.stem}-converted"
    with progress_display(quiet or as_json) as progress:
        r = launch_convert(cfg, init_from, run_dir, criterion=criterion.value, compare=compare, device=device,
                           progress=progress, allow_changed=allow_changed)
    columns = ["subnet", "width", "MACs (M)", "top1 ordered"] + (["top1 as trained", "gain"] if "gain" in r.rows[0] else [])
    with Output(as_json, csv) as out:
        out.note(f"loaded {r.loaded}")
        out.show(f"converted ({r.criterion}) into {r.run_dir}; full network unchanged "
                        f"(max |logit diff| {r.full_width_max_abs_diff:.1e})", columns, [
        [row["subnet"], str(row["width"]),
         f"{row['macs'] / 1e6:.2f}", f"{row['top1_ordered']:.2f}",
         *([f"{row['top1_unordered']:.2f}", f"{row['gain']:+.2f}"] if "gain" in row else [])] for row in r.rows],
            records=r.rows)


def _window_override(window: str | None) -> list[str]:
    from dsctl.errors import DsctlError

    if window is None:
        return []
    import re

    match = re.fullmatch(r" *([0-9]+) *: *([0-9]+) *", window)
    if match is None:
        raise DsctlError(f"--window {window!r}: expected A:B, two sub-network indices (e.g. 0:3)")
    a, b = match.groups()
    if int(a) >= int(b):
        raise DsctlError(f"--window {window}: the first index must be smaller than the second (allowed: A:B with "
                         "0 <= A < B <= K-1, K the model's number of sub-networks: see dsctl models)")
    return [f"gate.window=[{int(a)},{int(b)}]"]


@app.command("train-gate")
@handle_errors
def train_gate_cmd(
    recipe: RecipeArg = None,
    supernet: Annotated[Path | None, typer.Option(help="Supernet run folder or checkpoint (required unless --resume).")] = None,
    window: Annotated[str | None, typer.Option(help="Routing window A:B of sub-network indices (default: the recipe's gate.window_size sub-networks around --target-macs, all without a target).")] = None,
    target_macs: Annotated[float | None, typer.Option(help="Average MACs in millions the routed model spends (gate included): chooses the window, and the decision is calibrated on held-out training data to meet it (gate.complexity=target adds a two-sided loss toward it).")] = None,
    target_latency: Annotated[float | None, typer.Option(min=0.0, help="Instead of --target-macs: a latency budget in "
                                                                        "ms per batch of --latency-batch images on the "
                                                                        "deployment device; chooses the window by time "
                                                                        "and calibrates the decision on time.")] = None,
    latency_batch: Annotated[int | None, typer.Option(min=1, help="Deployment batch size of --target-latency "
                                                                  "(default: gate.latency_batch, 32).")] = None,
    latency_table: Annotated[Path | None, typer.Option(exists=True, help="Latencies timed on the deployment device: "
                                                                         "the latency.csv or analysis.json of dsctl "
                                                                         "analyze run there (default: timed now on "
                                                                         "--device).")] = None,
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<recipe name>).")] = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the gate run in this folder.")] = None,
    device: DeviceOpt = "auto",
    seed: Annotated[int | None, typer.Option(help="Override the recipe's seed.")] = None,
    quiet: QuietOpt = False,
    allow_changed: AllowChangedOpt = False,
    tensorboard: TensorBoardOpt = False,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Stage II: train the gate's slimming head with the supernet frozen (SGS targets + complexity loss)."""
    from dsctl.artifacts import GateArtifact, read_artifact
    from dsctl.errors import DsctlError
    from dsctl.train.launch import launch_gate, resolve_recipe

    overrides = [*recipe_overrides(set_, data, seed), *_window_override(window)]
    if target_macs is not None and target_latency is not None:
        raise DsctlError(f"--target-macs {target_macs:g} and --target-latency {target_latency:g} are two budgets "
                         "for one gate (give one)")
    if target_macs is not None:
        overrides += ["gate.complexity=target", f"gate.target_macs_m={target_macs}"]
    if target_latency is not None:
        overrides += ["gate.complexity=target", f"gate.target_latency_ms={target_latency}"]
    if latency_batch is not None:
        overrides.append(f"gate.latency_batch={latency_batch}")
    if latency_table is not None:
        overrides.append(f"gate.latency_table={json.dumps(str(latency_table))}")
    cfg = resolve_recipe(recipe, overrides, resume)
    if supernet is None:
        if resume is None:
            raise DsctlError("give --supernet RUN_DIR|CHECKPOINT")
        supernet = Path(read_artifact(resume / "last.pt", GateArtifact, why="--resume").supernet)
    run_dir = resume or out or Path("runs") / (recipe.stem if recipe else "gate")
    with progress_display(quiet or as_json) as progress:
        result = launch_gate(cfg, supernet, run_dir, device=device, resume=resume is not None, progress=progress,
                             allow_changed=allow_changed, tensorboard=tensorboard)
    f = result.final
    lo, hi = f.window
    cal = f.calibration
    lat = f.latency_budget
    if lat is not None:
        b = lat["batch"]
        target, target_h = f"{lat['target_ms']:.4g}", f"target (ms, batch {b})"
        held = f"{cal.achieved * b:.4g} ({100 * cal.error:+.1f}%)" if cal else "argmax"
        held_h, extra = "held-out predicted ms", [f"{lat['predicted_ms']:.4g}"]
        extra_h = ["val predicted ms"]
    else:
        target, target_h = (f"{f.target_macs_m:.3f}" if f.target_macs_m else "-"), "target (M)"
        held = f"{cal.achieved / 1e6 + f.gate_macs / 1e6:.3f} ({100 * cal.error:+.1f}%)" if cal else "argmax"
        held_h, extra, extra_h = "held-out MACs (M)", [], []
    with Output(as_json, csv) as out:
        out.show(f"dynamic model {result.run_dir}", ["window", "top1", "top5", "avg MACs (M)", target_h, held_h,
                                                     *extra_h, "gate target acc", "routes"], [
            [f"{lo}:{hi}", f"{f.top1:.2f}", f"{f.top5:.2f}", f"{f.avg_macs / 1e6:.3f}", target, held, *extra,
             f"{f.gate_sgs_acc:.1f}", " ".join(str(c) for c in f.histogram[lo: hi + 1])]], records=[f.to_dict()], one=True)
        _print_time(out, result.time)


def _print_time(out: Output, timing: RunTime | None) -> None:
    if timing is not None:
        out.note(f"time: {timing.describe()} (summary.json \"time_s\")")


class BaselineMethod(str, Enum):
    uniform = "uniform"
    l1 = "l1"
    slimming = "slimming"


@app.command("baseline")
@handle_errors
def baseline_cmd(
    recipe: RecipeArg = None,
    method: Annotated[BaselineMethod | None, typer.Option(help="uniform (width multiplier), l1 (L1 filter pruning) or "
                                                               "slimming (network slimming).")] = None,
    width: Annotated[str | None, typer.Option(help="Width of the uniform network, or the sub-network whose MACs "
                                                   "l1/slimming prune to.")] = None,
    target_macs: Annotated[float | None, typer.Option(help="MACs target in millions (l1/slimming).")] = None,
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<recipe>-<method>).")] = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the baseline run in this folder.")] = None,
    device: DeviceOpt = "auto",
    seed: Annotated[int | None, typer.Option(help="Override the recipe's seed.")] = None,
    quiet: QuietOpt = False,
    allow_changed: AllowChangedOpt = False,
    tensorboard: TensorBoardOpt = False,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Train a static baseline with the same recipe: uniform width, L1-pruned, or network-slimmed."""
    from dsctl.baselines import launch_baseline
    from dsctl.errors import DsctlError
    from dsctl.train.launch import resolve_recipe

    overrides = recipe_overrides(set_, data, seed)
    if method is not None:
        overrides.append(f"baseline.method={method.value}")
    if width is not None and target_macs is not None:
        raise DsctlError(f"--width {width} and --target-macs {target_macs:g} contradict each other (give one)")
    if width is not None:
        overrides.append(f"baseline.width='{width}'")
    if target_macs is not None:
        overrides.append(f"baseline.target_macs_m={target_macs}")
    cfg = resolve_recipe(recipe, overrides, resume)
    run_dir = resume or out or Path("runs") / f"{recipe.stem if recipe else 'baseline'}-{cfg.baseline.method}"
    with progress_display(quiet or as_json) as progress:
        s = launch_baseline(cfg, run_dir, device=device, resume=resume is not None, progress=progress,
                            allow_changed=allow_changed, tensorboard=tensorboard)
    with Output(as_json, csv) as out:
        out.show(f"baseline {run_dir}", ["method", "variant", "MACs (M)", "params (M)", "top1", "top5"], [
            [s["method"], s["variant"], f"{s['macs'] / 1e6:.3f}", f"{s['params'] / 1e6:.3f}", f"{s['top1']:.2f}",
             f"{s['top5']:.2f}"]], records=[{k: v for k, v in s.items() if not isinstance(v, dict)}], one=True)
