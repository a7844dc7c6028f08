"""Comparison reports: supernet sub-networks, dynamic models and static baselines in one table and two plots.

``build_report(run_dirs, ...)`` reads finished run folders (the ``final.pt`` of each), refuses runs that
were not trained and evaluated on the same data at the same input size, times every model side by side
(exported static sub-networks, the deployable routed model of each gate: shared stem, gate and static
tails, samples grouped by route, on real validation images; baseline networks), and returns :class:`ReportRow` rows; ``write_report`` writes ``report.csv``, the PNG plots, REPORT.md and a
self-contained report.html saying how the numbers were produced. ``report_runs`` (``dsctl report``) reuses
the latencies of the report it replaces when every model was timed the same way there (same device,
threads, batch, compilation, commit and torch), so a redraw takes seconds; ``--measure`` re-times. Each
model's per-image correctness is kept in ``correctness.pt`` for the paired intervals of the targets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from dsctl.checkpoint import atomic_write_bytes
from dsctl.errors import DsctlError

__all__ = ["OracleSeries", "ReportRow", "build_entries", "build_report", "check_targets", "describe_machine",
           "oracle_series", "per_image_correctness", "plot_report", "report_frame", "report_runs", "row_key",
           "stored_latencies", "write_csv", "write_report"]

logger = logging.getLogger(__name__)

METHODS = ("supernet", "dynamic", "uniform", "l1", "slimming")
STATIC_BASELINES = ("uniform", "l1", "slimming")


def write_csv(path: str | Path, rows: Sequence[Any] | pd.DataFrame) -> None:
    """Write a data frame, or dataclass instances / dicts (columns: every key, first-seen order), as CSV."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(
        [asdict(r) if is_dataclass(r) else dict(r) for r in rows])
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(p, index=False)


@dataclass
class ReportRow:
    """One model in a comparison. MACs: fused multiply-adds (fvcore; average pooling at its input size,
    BatchNorm/max pooling/element-wise not counted);
    for dynamic models the average over the validation set (route histogram x route MACs + gate)."""

    method: str
    model: str
    variant: str
    width: str
    macs: int
    params: int
    top1: float
    top5: float
    latency_ms_b1: float = float("nan")
    latency_ms_bN: float = float("nan")
    batch_n: int = 0
    throughput: float = float("nan")  # images/s at batch_n
    device: str = ""
    threads: int = 0
    data: str = ""
    input_size: int = 0
    run: str = ""
    commit: str = ""
    torch_version: str = ""
    target_macs: float = float("nan")  # dynamic models: the average MACs their gate was calibrated to spend
    target_latency_ms: float = float("nan")  # dynamic models with a latency budget: ms per batch of latency_batch
    latency_batch: int = 0
    ratio: float = float("nan")  # slimming ratio of a fixed-width model (supernet sub-network, uniform); NaN otherwise
    compiled: bool = False  # timed under torch.compile (every model of a report alike)


def report_frame(rows: Sequence[ReportRow]) -> pd.DataFrame:
    """The report as a data frame, one row per model, columns as :class:`ReportRow` (what report.csv holds)."""
    return pd.DataFrame([asdict(r) for r in rows], columns=[f.name for f in fields(ReportRow)])


@dataclass
class _Entry:
    row: ReportRow
    module: Any  # callable on a batch of images


def _load_run(run_dir: Path) -> list[_Entry]:
    from dsctl.artifacts import GateArtifact, StaticArtifact, SupernetArtifact, read_artifact
    from dsctl.export import export_routed, export_subnet
    from dsctl.flops import count_params, count_subnet

    final = run_dir / "final.pt"
    if not run_dir.is_dir():
        raise DsctlError(f"{run_dir}: no such run folder")
    if not final.is_file():
        raise DsctlError(f"{run_dir}: no final.pt (the run has not finished; resume it first)")
    art = read_artifact(final)
    info = art.data_info
    size = art.input_size or 0
    base = dict(data=f"{info.name}:{info.train_size}/{info.val_size}" if info else "unknown", input_size=size,
                run=str(run_dir))
    entries: list[_Entry] = []
    if isinstance(art, SupernetArtifact):
        model = art.build_model().eval()
        for r in art.subnets:
            entries.append(_Entry(ReportRow("supernet", model.model_name, r.label, r.width_label, r.macs,
                                            r.params, r.top1, r.top5, **base, ratio=_nan_if_none(r.width)),
                                  export_subnet(model, r.spec)))
    elif isinstance(art, GateArtifact):
        model = art.build_model()
        f = art.final
        if f is None:
            raise DsctlError(f"{final}: holds no final evaluation (the gate run has not finished)")
        lo, hi = f.window
        variant = f"[{lo}:{hi}]" + (f" target {f.target_macs_m:g}M" if f.target_macs_m else "")
        # the widest route of the window plus what only routing uses (what a deployment must hold)
        params = count_subnet(model, model.space.subnets[hi], size).params + sum(
            p.numel() for p in model.gate.routing_parameters())
        target = f.target_macs_m * 1e6 if f.target_macs_m else float("nan")
        if f.target_latency_ms is not None:
            variant = f"[{lo}:{hi}] target {f.target_latency_ms:g} ms at batch {f.latency_batch}"
        latency = dict(target_latency_ms=f.target_latency_ms, latency_batch=f.latency_batch) if f.latency_budget else {}
        entries.append(_Entry(ReportRow("dynamic", model.model_name, variant, "dynamic", int(f.avg_macs), params,
                                        f.top1, f.top5, target_macs=target, **latency, **base),
                              export_routed(model.eval(), (lo, hi))))  # what `dsctl export --dynamic` deploys
    elif isinstance(art, StaticArtifact):
        from dsctl.flops import count_macs

        if art.final is None:
            raise DsctlError(f"{final}: holds no final evaluation (the baseline run has not finished)")
        net = art.build_network()
        chans = info.in_chans if info else 3
        entries.append(_Entry(ReportRow(art.meta.method, art.model_name, art.meta.variant, art.meta.width_label,
                                        count_macs(net, size, chans), count_params(net), art.final.top1,
                                        art.final.top5, **base, ratio=_nan_if_none(art.meta.width)), net))
    return entries


def _nan_if_none(width: float | None) -> float:
    return float("nan") if width is None else float(width)


def _images(run_dir: Path, n: int) -> torch.Tensor:
    from dsctl.artifacts import read_artifact
    from dsctl.bench import validation_images

    return validation_images(read_artifact(run_dir / "final.pt"), n)


LATENCY_KEY = ("device", "threads", "batch_n", "compiled", "commit", "torch_version")
"""What stored latencies must share with this run to be reused: timed on the same device with the same
threads, batch size and compilation, by the same code and torch."""


def stored_latencies(rows: Sequence[ReportRow], previous: str | Path) -> bool:
    """Fill ``rows``' latencies from an earlier ``report.csv`` where every row has one timed under the same
    :data:`LATENCY_KEY` (matched on run, method and variant); False, and nothing filled, otherwise."""
    path = Path(previous)
    if not path.is_file():
        return False
    try:
        old = pd.read_csv(path, dtype={"commit": str})
    except (OSError, ValueError, pd.errors.ParserError):
        return False
    if old.empty or not {"run", "method", "variant", "latency_ms_b1", "latency_ms_bN", *LATENCY_KEY} <= set(old.columns):
        return False
    index = {(str(r.run), str(r.method), str(r.variant)): r for r in old.itertuples(index=False)}
    found = []
    for row in rows:
        r = index.get((row.run, row.method, row.variant))
        if r is None or any(str(getattr(r, k)) != str(getattr(row, k)) for k in LATENCY_KEY) or pd.isna(r.latency_ms_b1):
            return False
        found.append(r)
    for row, r in zip(rows, found):
        row.latency_ms_b1, row.latency_ms_bN, row.throughput = float(r.latency_ms_b1), float(r.latency_ms_bN), float(r.throughput)
    return True


def build_report(run_dirs: Sequence[str | Path], **kwargs: Any) -> list[ReportRow]:
    """The rows of :func:`build_entries` (same arguments)."""
    return [e.row for e in build_entries(run_dirs, **kwargs)]


def build_entries(run_dirs: Sequence[str | Path], *, batch_n: int = 32, device: str = "cpu", threads: int | None = None,
                  min_run_time_s: float = 0.5, measure: bool = True, compiled: bool = False,
                  reuse: str | Path | None = None) -> list[_Entry]:
    """Rows (and the modules they time) for every model in ``run_dirs``, latencies measured side by side at batch 1 and ``batch_n``
    (``compiled``: every model under ``torch.compile``, :func:`dsctl.compiled.compile_module`), unless
    ``reuse`` (an earlier report.csv) holds all of them timed the same way (:func:`stored_latencies`)."""
    from dsctl.bench import _Cycle
    from dsctl.latency import measure_latency
    from dsctl.train.common import resolve_device
    from dsctl.train.run import git_commit

    if not run_dirs:
        raise DsctlError("give at least one run folder")
    entries: list[_Entry] = []
    for d in run_dirs:
        entries += _load_run(Path(d))
    keys = {(e.row.data, e.row.input_size) for e in entries}
    if len(keys) > 1:
        listing = "; ".join(f"{e.row.run}: {e.row.data} @ {e.row.input_size}px" for e in entries if e.row.method != "supernet"
                            or e.row.variant == "k0")
        raise DsctlError(f"runs were trained on different data or input sizes and cannot be compared ({listing})")
    dev = resolve_device(device)
    threads = threads or torch.get_num_threads()  # measure_latency sets it while timing, then restores
    commit = git_commit()
    for e in entries:
        e.row.device, e.row.threads, e.row.commit, e.row.torch_version = str(dev), threads, commit, torch.__version__
        e.row.batch_n = batch_n
        e.row.compiled = compiled
    if measure and reuse is not None and stored_latencies([e.row for e in entries], reuse):
        logger.info("latencies reused from %s (timed there on %s, %d threads, commit %s); --measure re-times",
                    reuse, dev, threads, commit)
        measure = False
    if measure:
        images = _images(Path(run_dirs[0]), max(16 * batch_n, 256)).to(dev)
        for e in entries:
            if hasattr(e.module, "to"):
                e.module.to(dev)
            if compiled:
                from dsctl.compiled import compile_module

                e.module = compile_module(e.module)
        for b, attr in ((1, "latency_ms_b1"), (batch_n, "latency_ms_bN")):
            n = max(1, min(16, images.shape[0] // b))
            batches = [images[i * b : (i + 1) * b] for i in range(n)]
            cands = {f"{i}": _Cycle(e.module, batches) for i, e in enumerate(entries)}
            for r in measure_latency(cands, batches[0], warmup=5, min_run_time_s=min_run_time_s, threads=threads):
                row = entries[int(r.name)].row
                setattr(row, attr, round(r.latency_ms_p50, 4))
                if b == batch_n:
                    row.throughput = round(r.throughput, 1)
    return entries


def row_key(row: ReportRow) -> str:
    """A model of a report: its run, method and variant, and when the run's final.pt was written (a re-trained
    run is a new model)."""
    final = Path(row.run) / "final.pt"
    stamp = final.stat().st_mtime_ns if final.is_file() else 0
    return f"{row.run}|{row.method}|{row.variant}|{stamp}"


@torch.no_grad()
def per_image_correctness(entries: Sequence[_Entry], run_dirs: Sequence[str | Path], out_dir: str | Path, *,
                          device: str = "cpu") -> dict[str, torch.Tensor]:
    """Each model of ``entries`` right or wrong on every validation image of the first run's recipe (bool),
    stored in ``out_dir/correctness.pt`` by row (:func:`row_key`) and reused from there: the paired
    intervals of :func:`check_targets`."""
    from dsctl.artifacts import read_artifact
    from dsctl.train.common import resolve_device
    from dsctl.train.data import build_run_data

    path = Path(out_dir) / "correctness.pt"
    stored: dict[str, torch.Tensor] = {}
    if path.is_file():
        try:
            stored = dict(torch.load(path, weights_only=True).get("correct", {}))
        except Exception:  # an unreadable cache is re-made
            stored = {}
    todo = [e for e in entries if row_key(e.row) not in stored]
    if todo:
        dev = resolve_device(device)
        data = build_run_data(read_artifact(Path(run_dirs[0]) / "final.pt").recipe_config().data)
        for e in todo:
            if hasattr(e.module, "to"):
                e.module.to(dev)
            if hasattr(e.module, "eval"):
                e.module.eval()
        right: dict[str, list[torch.Tensor]] = {row_key(e.row): [] for e in todo}
        for x, y in data.val:
            x, y = x.to(dev), y.to(dev)
            for e in todo:
                right[row_key(e.row)].append((e.module(x).argmax(1) == y).cpu())
        stored.update({k: torch.cat(v) for k, v in right.items()})
        from dsctl.checkpoint import save_checkpoint

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"correct": stored})
    return {row_key(e.row): stored[row_key(e.row)] for e in entries}


@dataclass(frozen=True)
class OracleSeries:
    """An oracle-router curve that ``dsctl analyze`` wrote into a supernet run (plotted, never a row)."""

    run: str
    path: Path
    split: str
    samples: int
    points: list[tuple[float, float]]  # (average MACs, top1), ascending MACs


def oracle_series(rows: Sequence[ReportRow]) -> list[OracleSeries]:
    """The ``analysis/oracle.csv`` of every supernet run in ``rows`` that has one (and was analysed on the
    same data source as the run's rows)."""
    out = []
    for run in dict.fromkeys(r.run for r in rows if r.method == "supernet"):
        path = Path(run) / "analysis" / "oracle.csv"
        if not path.is_file():
            continue
        meta_path = path.parent / "analysis.json"
        data = json.loads(meta_path.read_text()).get("data", {}) if meta_path.is_file() else {}
        source = next(r.data for r in rows if r.run == run).split(":")[0]
        if data.get("source", source) != source:
            logger.warning("%s: analysed on %s, the run on %s; not plotted", path, data.get("source"), source)
            continue
        curve = pd.read_csv(path)
        points = sorted(set(zip(curve.avg_macs.astype(float), curve.top1.astype(float), strict=True)))
        out.append(OracleSeries(run, path, str(data.get("split", "?")), int(data.get("samples", 0)), points))
    return out


def plot_report(rows: Sequence[ReportRow], out_dir: str | Path, title: str = "") -> list[Path]:
    """accuracy_vs_macs.png and accuracy_vs_latency.png (batch 1 and batch N panels), one series per method.

    The MACs plot also draws the oracle router of each supernet run analysed by ``dsctl analyze``.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend switch

    out = Path(out_dir)
    styles = {"supernet": ("tab:blue", "o-"), "dynamic": ("tab:red", "*"), "uniform": ("tab:green", "s--"),
              "l1": ("tab:orange", "^--"), "slimming": ("tab:purple", "v--")}

    def series(ax, x_of, xlabel):
        for method in METHODS:
            # lines join a method's models in order of MACs (width), whatever the x axis
            pts = sorted((r.macs, x_of(r), r.top1) for r in rows if r.method == method and x_of(r) == x_of(r))
            if not pts:
                continue
            color, style = styles[method]
            xs, ys = [p[1] for p in pts], [p[2] for p in pts]
            if method == "dynamic":
                ax.plot(xs, ys, style, color=color, markersize=14, linestyle="none", label=method)
            else:
                ax.plot(xs, ys, style, color=color, label=method, markersize=6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()

    paths = []
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for o in oracle_series(rows):
        ax.plot([p[0] / 1e6 for p in o.points], [p[1] for p in o.points], ":", color="black",
                label=f"oracle router ({o.split}, {o.samples} samples)")
    series(ax, lambda r: r.macs / 1e6, "MACs (millions; fused multiply-adds, fvcore)")
    ax.set_title(f"{title}: accuracy vs MACs" if title else "accuracy vs MACs")
    fig.tight_layout()
    paths.append(out / "accuracy_vs_macs.png")
    fig.savefig(paths[-1], dpi=130)
    fig = Figure(figsize=(12, 5))
    axes = fig.subplots(1, 2)
    dev = rows[0].device if rows else ""
    for ax, x_of in ((axes[0], lambda r: r.latency_ms_b1), (axes[1], lambda r: r.latency_ms_bN)):
        _static_frontier(ax, rows, x_of)
    series(axes[0], lambda r: r.latency_ms_b1, f"latency, batch 1 (ms, median, {dev})")
    series(axes[1], lambda r: r.latency_ms_bN, f"latency, batch {rows[0].batch_n if rows else 'N'} (ms, median, {dev})")
    fig.suptitle(f"{title}: accuracy vs latency" if title else "accuracy vs latency")
    fig.tight_layout()
    paths.append(out / "accuracy_vs_latency.png")
    fig.savefig(paths[-1], dpi=130)
    return paths


def _static_frontier(ax, rows: Sequence[ReportRow], x_of) -> None:
    """The best accuracy any static model reaches at each latency or less (a step line): a dynamic model
    pays in time where it sits on or above it."""
    pts = sorted((x_of(r), -r.top1) for r in rows if r.method != "dynamic" and x_of(r) == x_of(r))
    xs: list[float] = []
    ys: list[float] = []
    for x, neg_top1 in pts:
        if not ys or -neg_top1 > ys[-1]:
            xs.append(x)
            ys.append(-neg_top1)
    if xs:
        ax.step(xs + [max(x for x, _ in pts)], ys + ys[-1:], where="post", color="0.6", linewidth=3, alpha=0.5,
                label="static frontier", zorder=0)


def check_targets(rows: Sequence[ReportRow], correct: dict[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """The comparison targets, computed from the rows (never by hand):

    1. every supernet sub-network within 1 point (top-1) of the same-width network trained alone;
    2. no static baseline (uniform, L1, slimming) that costs as much as a dynamic model or less is more
       accurate than it (MACs within 2% count as equal: pruning cannot hit a MACs target exactly);
    3. the same against the supernet's own static sub-networks;
    4. some dynamic model within 0.3 points of the largest sub-network at <= 60% of its MACs;
    5. every dynamic model with a MACs target spends it within 2% on the evaluation set, and one with a
       latency budget takes at most 5% more than it, timed here at its batch size (when the report times it);
    6. at batch 1 and at batch N: no static model (baseline or supernet sub-network) whose measured latency
       is lower or equal (within 2%: timing noise counts against the dynamic model) is more accurate than a
       dynamic model: the accuracy-vs-latency frontier. Rows give the margin in points (``value``) and in
       milliseconds (``latency_margin_ms``: the static model's latency minus the dynamic one's).

    Each target is a join or a filter over :func:`report_frame`; the result is one dict per comparison.
    With ``correct`` (per-image correctness by :func:`row_key`, :func:`per_image_correctness`) every accuracy
    comparison carries its paired 95% interval (``ci95_low``, ``ci95_high``, :mod:`dsctl.stats`) and its
    ``verdict``: "met" when the whole interval clears the threshold, "missed" when none of it does, "within
    noise" otherwise; the other targets' verdict is "met" or "missed".
    """
    df = report_frame(rows)
    df["key"] = [row_key(r) for r in rows]
    sup, dyn = df[df.method == "supernet"], df[df.method == "dynamic"]
    out: list[pd.DataFrame] = []
    # 1. same ratio: uniform baselines joined with supernet sub-networks on the slimming ratio
    pairs = df[df.method == "uniform"].dropna(subset=["ratio"]).merge(sup.dropna(subset=["ratio"]), on="ratio",
                                                                       suffixes=("_u", "_s"))
    if len(pairs):
        out.append(pd.DataFrame({
            "target": "supernet sub-network within 1 point of the same width trained alone",
            "subject": "supernet " + pairs.variant_s + " (w" + pairs.width_u + ")",
            "versus": "uniform w" + pairs.width_u, "value": (pairs.top1_s - pairs.top1_u).round(3),
            "threshold": -1.0, "met": pairs.top1_s - pairs.top1_u >= -1.0, "key_a": pairs.key_s, "key_b": pairs.key_u}))
    # 2-3. every dynamic model against every static model of equal (within 2%) or fewer MACs
    for what, statics in (("static baselines", df[df.method.isin(STATIC_BASELINES)]),
                          ("the supernet's own sub-networks", sup)):
        pairs = dyn.merge(statics, how="cross", suffixes=("_d", "_b"))
        pairs = pairs[pairs.macs_b <= 1.02 * pairs.macs_d]
        if not len(pairs):
            continue
        gap = (pairs.top1_d - pairs.top1_b).round(3)
        out.append(pd.DataFrame({
            "target": f"dynamic at least as accurate as {what} of equal or fewer MACs",
            "subject": "dynamic " + pairs.variant_d, "versus": pairs.method_b + " " + pairs.variant_b,
            "value": gap, "threshold": 0.0, "met": gap >= 0.0, "key_a": pairs.key_d, "key_b": pairs.key_b}))
    # 4. the best dynamic model against the largest sub-network (met ones first, then the smallest gap)
    if len(sup) and len(dyn):
        largest = sup.loc[sup.macs.idxmax()]
        near = pd.DataFrame({
            "target": "a dynamic model within 0.3 points of the largest at <= 60% of its MACs",
            "subject": "dynamic " + dyn.variant, "versus": f"supernet {largest.variant}",
            "value": (dyn.top1 - largest.top1).round(3), "threshold": -0.3,
            "macs_fraction": (dyn.macs / largest.macs).round(3),
            "met": (dyn.top1 >= largest.top1 - 0.3) & (dyn.macs <= 0.6 * largest.macs),
            "key_a": dyn.key, "key_b": largest.key, "macs_ok": dyn.macs <= 0.6 * largest.macs})
        out.append(near.sort_values(["met", "value"], ascending=False, kind="stable").head(1))
    # 5. budgets
    budget = dyn[dyn.target_macs > 0]
    err = budget.macs / budget.target_macs - 1.0
    if len(budget):
        out.append(pd.DataFrame({
            "target": "dynamic model spends its MACs target within 2% on the evaluation set",
            "subject": "dynamic " + budget.variant,
            "versus": "target " + (budget.target_macs / 1e6).map("{:.4g}M".format),
            "value": (100 * err).round(3), "threshold": 2.0, "met": err.abs() <= 0.02}))
    # 5b. latency budgets, where the report timed the budget's batch size
    for col, timed_batch in (("latency_ms_b1", 1), ("latency_ms_bN", dyn.batch_n)):
        lat = dyn[(dyn.target_latency_ms > 0) & (dyn.latency_batch == timed_batch)].dropna(subset=[col])
        if len(lat):
            err = lat[col] / lat.target_latency_ms - 1.0
            out.append(pd.DataFrame({
                "target": "dynamic model meets its latency budget within 5% (timed here)",
                "subject": "dynamic " + lat.variant, "versus": "target " + lat.target_latency_ms.map("{:.4g} ms".format),
                "value": (100 * err).round(3), "threshold": 5.0, "met": err <= 0.05}))
    # 6. the latency frontier, per measured batch size (both sides timed in one interleaved run)
    statics = df[df.method.isin(["supernet", *STATIC_BASELINES])]
    for col, label in (("latency_ms_b1", "batch 1"), ("latency_ms_bN", None)):
        pairs = dyn.merge(statics, how="cross", suffixes=("_d", "_b")).dropna(subset=[f"{col}_d", f"{col}_b"])
        pairs = pairs[pairs[f"{col}_b"] <= 1.02 * pairs[f"{col}_d"]]
        if not len(pairs):
            continue
        label = label or f"batch {int(pairs.batch_n_d.iloc[0])}"
        gap = (pairs.top1_d - pairs.top1_b).round(3)
        out.append(pd.DataFrame({
            "target": f"dynamic at least as accurate as every static model of equal or lower latency at {label}",
            "subject": "dynamic " + pairs.variant_d, "versus": pairs.method_b + " " + pairs.variant_b,
            "value": gap, "threshold": 0.0,
            "latency_margin_ms": (pairs[f"{col}_b"] - pairs[f"{col}_d"]).round(4), "met": gap >= 0.0,
            "key_a": pairs.key_d, "key_b": pairs.key_b}))
    frames = [f for f in out if len(f)]
    if not frames:
        return []
    records = pd.concat(frames, ignore_index=True).to_dict("records")
    return [_with_interval(r, correct) for r in records]


def _with_interval(record: dict[str, Any], correct: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """One target row: NaNs dropped, ``met`` a bool, and its ``verdict`` (with the paired interval of the two
    models' per-image correctness where both are known)."""
    from dsctl.stats import paired_diff, verdict

    r = {k: v for k, v in record.items() if not (isinstance(v, float) and pd.isna(v))}
    a, b, macs_ok = r.pop("key_a", None), r.pop("key_b", None), r.pop("macs_ok", True)
    r["met"] = bool(r["met"])
    r["verdict"] = "met" if r["met"] else "missed"
    if correct is not None and a in correct and b in correct and len(correct[a]) == len(correct[b]):
        d = paired_diff(correct[a], correct[b])
        r["ci95_low"], r["ci95_high"] = round(d.low, 3), round(d.high, 3)
        r["verdict"] = verdict(d, float(r["threshold"])) if bool(macs_ok) else "missed"
    return r


def _provenance_lines(frame: pd.DataFrame) -> list[str]:
    """One line per run folder: when, at which commit and dsctl version, on which data it was made."""
    lines = []
    for run in dict.fromkeys(frame.run):
        path = Path(run) / "provenance.json"
        if not path.is_file():
            lines.append(f"- `{run}`: no provenance record (made by a dsctl before records existed)")
            continue
        rec = json.loads(path.read_text())
        data = rec.get("data", {})
        changed = f"; {len(rec['changes'])} accepted change(s) recorded" if rec.get("changes") else ""
        lines.append(f"- `{run}`: created {rec.get('created')} at commit `{rec.get('commit')}` (dsctl "
                     f"{rec.get('dsctl_version')}), data {data.get('source')} hash {data.get('hash')}{changed}")
    return lines


def _markdown(frame: pd.DataFrame) -> list[str]:
    """A Markdown table (floats to 4 significant digits)."""
    cells = frame.map(lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
    return ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns),
            *("| " + " | ".join(r) + " |" for r in cells.itertuples(index=False))]


def _shown(frame: pd.DataFrame) -> pd.DataFrame:
    """The report table as REPORT.md and report.html show it: every column, MACs and parameters in millions
    (the unit in the header), empty columns left out."""
    shown = frame.copy()
    for col in ("macs", "params", "target_macs"):
        shown[col] = shown[col] / 1e6
    shown = shown.rename(columns={"macs": "MACs (M)", "params": "params (M)", "target_macs": "target MACs (M)"})
    return shown.dropna(axis=1, how="all")


def write_report(rows: Sequence[ReportRow], out_dir: str | Path, *, command: str, machine: str,
                 title: str = "", correct: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """report.csv, targets.csv, plots, REPORT.md (the plots embedded) and report.html (self-contained: the
    tables, the plots inlined, the targets), naming the command, commit and machine that produced them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = report_frame(rows)
    write_csv(out / "report.csv", frame)
    plots = plot_report(rows, out, title)
    runs = list(dict.fromkeys(r.run for r in rows if r.run))
    from dsctl.curves import metrics_files, plot_training_curves

    if any(metrics_files(r) for r in runs):
        plots.append(plot_training_curves(runs, out / "training_curves.png", title))
    paths = [out / "report.csv", *plots]
    lines = _markdown(_shown(frame))
    commit = rows[0].commit if rows else "unknown"
    targets = check_targets(rows, correct)
    if targets:
        write_csv(out / "targets.csv", targets)
        paths.append(out / "targets.csv")
    else:  # never leave an older report's targets beside these rows
        (out / "targets.csv").unlink(missing_ok=True)
    olines = [f"- The dotted `oracle router` series of accuracy_vs_macs.png is `{o.path}`, written by `dsctl analyze` "
              f"({o.split} split, {o.samples} samples): each sample routed to the cheapest sub-network that "
              "classifies it correctly, and the most accurate such routing under each average-MACs budget (gate "
              "cost excluded). It bounds what any router over these sub-networks can reach; it is not a model."
              for o in oracle_series(rows)]
    tlines = [_target_line(t) for t in targets]
    (out / "REPORT.md").write_text(
        f"# {title or 'dsctl report'}\n\nProduced by `{command}` at commit `{commit}` on {machine}.\n"
        f"Do not edit by hand: re-run the command above.\n\n"
        "MACs are fused multiply-adds counted by fvcore on the exported static networks (average pooling "
        "counted at its input size, as the DS-Net authors' MAdds; BatchNorm, max pooling and element-wise ops "
        "not counted); dynamic MACs are the validation-set average including the gate. "
        + ("Every model was timed under torch.compile (dsctl report --compile). " if rows and rows[0].compiled
           else "Every model was timed eager (no torch.compile). ")
        + "Latencies are medians of interleaved torch.utils.benchmark measurements taken in one run; a dynamic "
        "model is timed as `dsctl export --dynamic` deploys it (shared stem and gate once per batch, then each "
        "group of samples through its own static sub-network).\n\n"
        + "\n".join(lines) + "\n"
        + ("\n" + "\n".join(olines) + "\n" if olines else "")
        + "\n## Runs (each folder's provenance.json: what made it)\n\n" + "\n".join(_provenance_lines(frame)) + "\n"
        + ("\n## Targets (computed from the rows above by `dsctl.report.check_targets`)\n\n" + _INTERVALS + "\n\n"
           + "\n".join(tlines) + "\n" if tlines else "")
        + "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n")
    paths.append(out / "REPORT.md")
    paths.append(_write_html(out / "report.html", title or "dsctl report", command, commit, machine,
                             _shown(frame), targets, plots))
    return paths


_INTERVALS = ("An accuracy comparison carries the paired 95% interval of its difference over the evaluation "
              "images (both models' per-image correctness, `correctness.pt`; `dsctl.stats.paired_diff`): MET when "
              "the whole interval clears the threshold, MISSED when none of it does, WITHIN NOISE otherwise.")


def _target_line(t: dict[str, Any]) -> str:
    ci = f" [95% CI {t['ci95_low']:+.2f}, {t['ci95_high']:+.2f}]" if "ci95_low" in t else ""
    unit = "%" if t["target"].startswith(("dynamic model spends", "dynamic model meets")) else "points"
    return (f"- {t['verdict'].upper()}: {t['target']}: {t['subject']} vs {t['versus']}: {t['value']:+.2f} {unit}{ci}"
            + (f" at {t['macs_fraction']:.0%} of the MACs" if "macs_fraction" in t else "")
            + (f", {t['latency_margin_ms']:+.3f} ms" if "latency_margin_ms" in t else ""))


def _write_html(path: Path, title: str, command: str, commit: str, machine: str, table: pd.DataFrame,
                targets: list[dict[str, Any]], plots: Sequence[Path]) -> Path:
    """One self-contained HTML file: the tables and the plots inlined (base64), nothing to fetch."""
    import base64
    import html

    def cell(v: Any) -> str:
        return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

    def html_table(frame: pd.DataFrame) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in frame.itertuples(index=False))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    images = "".join(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.name)}</figcaption></figure>'
                     for p in plots)
    tgt = html_table(pd.DataFrame(targets)) if targets else "<p>no targets apply to these runs</p>"
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Produced by <code>{html.escape(command)}</code> at commit <code>{html.escape(commit)}</code> on "
            f"{html.escape(machine)}. Do not edit by hand: re-run the command.</p><h2>Models</h2>{html_table(table)}"
            f"<h2>Targets</h2><p>{html.escape(_INTERVALS)}</p>{tgt}<h2>Plots</h2>{images}</body></html>")
    atomic_write_bytes(path, page.encode())
    return path


def describe_machine(device: str, threads: int) -> str:
    """The machine a report was timed on, as REPORT.md names it."""
    import platform

    return f"{platform.machine()} {platform.processor() or ''} ({device}, {threads} threads), torch {torch.__version__}"


def report_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, *, batch_n: int = 32, device: str = "cpu",
                threads: int | None = None, min_run_time_s: float = 0.5, title: str = "",
                command: str = "dsctl report", compiled: bool = False,
                measure: bool = False) -> tuple[list[ReportRow], list[Path]]:
    """What ``dsctl report`` does: :func:`build_entries` over ``run_dirs`` (latencies reused from
    ``out_dir/report.csv`` when all were timed the same way there, unless ``measure``), per-image correctness
    (reused from ``out_dir/correctness.pt``), then :func:`write_report` to ``out_dir`` naming ``command`` and
    the machine. Returns the rows and the files written."""
    entries = build_entries(run_dirs, batch_n=batch_n, device=device, threads=threads, min_run_time_s=min_run_time_s,
                            compiled=compiled, reuse=None if measure else Path(out_dir) / "report.csv")
    rows = [e.row for e in entries]
    correct = per_image_correctness(entries, run_dirs, out_dir, device=device)
    paths = write_report(rows, out_dir, command=command, machine=describe_machine(rows[0].device, rows[0].threads),
                         title=title, correct=correct)
    return rows, paths
