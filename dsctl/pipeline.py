"""The whole experiment in one call (``dsctl quickstart``): supernet -> headroom analysis (oracle router,
``dsctl analyze``) -> gates at several MACs targets -> static baselines -> side-by-side report. Every stage is its own run folder; a finished stage is skipped
and an interrupted one resumed, so re-running the same command continues where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dsctl.config import Recipe
from dsctl.provenance import Provenance, check_provenance
from dsctl.train.progress import Progress
from dsctl.train.run import StopFlag

__all__ = ["run_pipeline", "stage_runs"]

logger = logging.getLogger(__name__)


def _stage(run_dir: Path, name: str, launch, now: Provenance, allow_changed: bool) -> None:
    """Skip a finished stage made from the same inputs as now, else resume or start it.

    Raises:
        ProvenanceError: the finished (or interrupted) stage was made from another recipe, data or code,
            so this report would not describe it (``allow_changed`` keeps it and records that).
    """
    if (run_dir / "final.pt").is_file():
        check_provenance(run_dir, now, allow_changed=allow_changed, what=f"quickstart stage {name}:")
        logger.info("%s: done already (%s)", name, run_dir)
        return
    resume = any(run_dir.rglob("last.pt"))  # pruning baselines keep theirs in dense/ and finetune/
    logger.info("%s: %s %s", name, "resuming" if resume else "starting", run_dir)
    launch(resume)


def stage_runs(recipe: Recipe, out: Path) -> dict[str, Path]:
    """The run folder of every stage, in order."""
    p = recipe.pipeline
    runs = {"supernet": out / "supernet"}
    for f in p.gate_targets:
        runs[f"gate@{f:g}"] = out / f"gate-{f:g}"
    for method in p.baseline_methods:
        runs[f"{method}@{p.baseline_width}"] = out / f"{method}-w{p.baseline_width}"
    for w in p.uniform_widths:
        if "uniform" not in p.baseline_methods or w != p.baseline_width:
            runs[f"uniform@{w}"] = out / f"uniform-w{w}"
    return runs


def run_pipeline(recipe: Recipe, out: str | Path, *, device: str = "auto", progress: Progress | None = None,
                 stop: StopFlag | None = None, report_dir: str | Path | None = None, command: str = "",
                 machine: str = "", allow_changed: bool = False, tensorboard: bool = False) -> list[Any]:
    """Run (or continue) every stage, then write the report to ``report_dir`` (default ``out/report``),
    naming ``command`` and ``machine`` (default: :func:`dsctl.report.describe_machine`).

    Each stage's inputs are compared with its run folder's provenance record before it is skipped or
    resumed (see :mod:`dsctl.provenance`)."""
    from dsctl.artifacts import SupernetArtifact, read_artifact
    from dsctl.baselines import check_baseline_methods, launch_baseline
    from dsctl.report import build_entries, describe_machine, per_image_correctness, write_report
    from dsctl.train.data import build_run_data
    from dsctl.train.launch import current_provenance, launch_gate, launch_supernet

    from dsctl.registry import build_model

    out = Path(out)
    p = recipe.pipeline
    # a baseline the family cannot have, or a width its space does not have, fails now, not after the
    # supernet and gates have trained
    model = build_model(recipe.model.name, **recipe.model.kwargs)
    check_baseline_methods(model, p.baseline_methods)
    for w in (p.baseline_width, *p.uniform_widths):
        model.space.resolve(w)
    runs = stage_runs(recipe, out)
    data = build_run_data(recipe.data)  # the data identity every stage's record is compared with
    common = {"device": device, "progress": progress, "stop": stop, "allow_changed": allow_changed,
              "tensorboard": tensorboard}
    _stage(runs["supernet"], "supernet", lambda resume: launch_supernet(recipe, runs["supernet"], resume=resume, **common),
           current_provenance(recipe, data), allow_changed)
    if not (runs["supernet"] / "analysis" / "analysis.json").is_file():
        from dsctl.analyze import analyze_checkpoint

        logger.info("analysis: oracle router and gate-position probes on the validation split")
        analyze_checkpoint(runs["supernet"] / "final.pt", device=device, latency_batch=p.report_batch,
                           min_run_time_s=p.report_min_run_time_s, progress=progress)
    subnets = read_artifact(runs["supernet"] / "final.pt", SupernetArtifact).subnets
    full_macs = max(r.macs for r in subnets)  # the full network (its rows say "largest")
    for f in p.gate_targets:
        target_m = f * full_macs / 1e6
        gate_recipe = recipe.model_copy(update={"optim": p.gate_optim, "gate": recipe.gate.model_copy(update={
            "window": p.gate_window, "complexity": "target", "target_macs_m": target_m,
            "complexity_weight": p.gate_complexity_weight})})
        key = f"gate@{f:g}"
        _stage(runs[key], key, lambda resume, r=gate_recipe, k=key: launch_gate(
            r, runs["supernet"], runs[k], resume=resume, **common), current_provenance(gate_recipe, data), allow_changed)
    for key, run_dir in runs.items():
        if key == "supernet" or key.startswith("gate@"):
            continue
        method, width = key.split("@", 1)  # a kernel space's width has its own @ (0.5@3)
        b_recipe = recipe.model_copy(update={"baseline": recipe.baseline.model_copy(update={
            "method": method, "width": width, "target_macs_m": None})})
        _stage(run_dir, key, lambda resume, r=b_recipe, d=run_dir: launch_baseline(r, d, resume=resume, **common),
               current_provenance(b_recipe, data), allow_changed)
    report = Path(report_dir or out / "report")
    dev = "cpu" if device == "auto" else device
    entries = build_entries(list(runs.values()), batch_n=p.report_batch, device=dev,
                            min_run_time_s=p.report_min_run_time_s, reuse=report / "report.csv")
    rows = [e.row for e in entries]
    write_report(rows, report, command=command or "dsctl quickstart",
                 machine=machine or describe_machine(rows[0].device, rows[0].threads),
                 title=f"{recipe.model.name} on {rows[0].data.split(':')[0]}",
                 correct=per_image_correctness(entries, list(runs.values()), report, device=dev))
    return rows
