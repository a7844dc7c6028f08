"""From a recipe to a running trainer: process group, data, model, run folder (shared by the commands).

``prepare_run`` resolves everything a trainer needs into a :class:`~dsctl.train.trainer.RunContext`;
``launch_supernet`` is the five-line Python equivalent of ``dsctl train-supernet``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dsctl.config import Recipe, load_recipe, recipe_to_dict, save_recipe
from dsctl.data.build import check_fits
from dsctl.errors import DsctlError
from dsctl.models.base import Supernet
from dsctl.provenance import Provenance, check_provenance, data_identity, record_provenance, release_lock, run_lock
from dsctl.registry import build_model
from dsctl.train.common import setup_dist
from dsctl.train.data import TrainData, build_run_data
from dsctl.train.progress import LogProgress, Progress
from dsctl.train.run import RunDir, StopFlag
from dsctl.train.trainer import RunContext

__all__ = ["prepare_run", "current_provenance", "resolve_recipe", "build_supernet_for", "launch_supernet", "launch_gate",
           "default_window"]

logger = logging.getLogger(__name__)


def resolve_recipe(recipe_path: str | Path | None, overrides: list[str], resume_dir: str | Path | None) -> Recipe:
    """The recipe file with overrides, or (when resuming without a recipe) the run folder's saved recipe."""
    if resume_dir is not None:
        saved = Path(resume_dir) / "recipe.yaml"
        if not saved.is_file():
            raise DsctlError(f"--resume {resume_dir}: no recipe.yaml there (not a dsctl run folder)")
        if recipe_path is None:
            return load_recipe(saved, overrides)
    if recipe_path is None:
        raise DsctlError("give a RECIPE file (or --resume RUN_DIR)")
    return load_recipe(recipe_path, overrides)


def _model_kwargs(recipe: Recipe, data: TrainData) -> dict:
    kwargs = dict(recipe.model.kwargs)
    kwargs.setdefault("num_classes", recipe.model.num_classes or data.info.num_classes)
    kwargs.setdefault("in_chans", data.info.in_chans)
    return kwargs


def check_recipe_model_fits(recipe: Recipe, data: TrainData) -> None:
    """DataError (one line) when the recipe's model, as :func:`build_supernet_for` builds it, cannot read ``data``."""
    kwargs = _model_kwargs(recipe, data)
    check_fits(data.info, in_chans=kwargs["in_chans"], num_classes=kwargs["num_classes"],
               what=f"recipe model {recipe.model.name}")


def build_supernet_for(recipe: Recipe, data: TrainData) -> Supernet:
    """The recipe's model, with classes and input channels taken from the data unless the recipe sets them."""
    check_recipe_model_fits(recipe, data)
    model = build_model(recipe.model.name, **_model_kwargs(recipe, data))
    if recipe.model.init_from:
        from dsctl.weights import load_full_width

        logger.info("init from %s", load_full_width(model, recipe.model.init_from, ema=recipe.model.init_ema))
    return model


def current_provenance(recipe: Recipe, data: TrainData) -> Provenance:
    """What a run of ``recipe`` on ``data`` is made from now (compared with a run folder's record)."""
    from dsctl.train.run import git_commit

    return Provenance(recipe_to_dict(recipe), data_identity(recipe.data, data.info.train_size, data.info.val_size),
                      commit=git_commit())


def prepare_run(recipe: Recipe, out: str | Path, *, device: str = "auto", resume: bool = False,
                allow_changed: bool = False, progress: Progress | None = None,
                stop: StopFlag | None = None, check: Callable[[TrainData], None] | None = None,
                tensorboard: bool = False) -> RunContext:
    """Join torchrun's process group if any, build the data, lock and create (or reopen) the run folder.

    ``check`` runs on the built data before anything is recorded (a DataError there leaves no new folder).

    ``progress`` defaults to a log line per epoch; ``stop`` (set by SIGINT/SIGTERM) to a fresh flag.

    Raises:
        RunLockedError: another live process writes ``out``.
        ProvenanceError: resuming a folder made from another recipe, data or code (unless ``allow_changed``).
        DsctlError: ``out`` holds a run and ``resume`` is False.
    """
    dist, dev = setup_dist(device)
    path = Path(out)
    created = dist.main and not path.exists()
    try:
        if dist.main:
            run_lock(path)
        run = RunDir(path, main=dist.main)
        if not resume and any(run.path.rglob("last.pt")):
            raise DsctlError(f"{out} already holds a run (last.pt); use --resume {out} or another --out")
        torch.manual_seed(recipe.seed)
        data = build_run_data(recipe.data, dist)
        if check is not None:
            check(data)
        if dist.main:
            now = current_provenance(recipe, data)
            if resume:
                check_provenance(path, now, allow_changed=allow_changed)
            record_provenance(path, now)
            save_recipe(recipe, run / "recipe.yaml")
    except BaseException:
        if created:  # a run that failed before it began leaves no folder behind
            release_lock(path)
            if all(p.name == ".lock" for p in path.iterdir()):
                shutil.rmtree(path, ignore_errors=True)
        raise
    return RunContext(run, data, device=dev, dist=dist, seed=recipe.seed, recipe=recipe_to_dict(recipe), resume=resume,
                      progress=progress if progress is not None else LogProgress(),
                      stop=stop if stop is not None else StopFlag(), tensorboard=tensorboard)


def launch_supernet(recipe: Recipe, out: str | Path, *, device: str = "auto", resume: bool = False,
                    progress: Progress | None = None, stop: StopFlag | None = None, allow_changed: bool = False,
                    tensorboard: bool = False):
    """Stage I end to end. Example: ``launch_supernet(load_recipe("recipes/quick/fashion_mnist_ds_resnet.yaml"), "runs/r")``."""
    from dsctl.train.supernet import train_supernet

    ctx = prepare_run(recipe, out, device=device, resume=resume, allow_changed=allow_changed, progress=progress,
                      stop=stop, check=lambda data: check_recipe_model_fits(recipe, data), tensorboard=tensorboard)
    return train_supernet(build_supernet_for(recipe, ctx.data), ctx, recipe.supernet, recipe.optim)


def launch_gate(recipe: Recipe, supernet: str | Path, out: str | Path, *, device: str = "auto", resume: bool = False,
                progress: Progress | None = None, stop: StopFlag | None = None, allow_changed: bool = False,
                tensorboard: bool = False):
    """Stage II end to end: load (and if needed recalibrate) the supernet, then train the gate over the window."""
    from dsctl.artifacts import SupernetArtifact, read_artifact, route_costs
    from dsctl.data import split_holdout
    from dsctl.train.calibrate import recalibrate_bn
    from dsctl.train.gate import train_gate

    sup = read_artifact(supernet, SupernetArtifact, why="train-gate --supernet")
    if sup.model_name != recipe.model.name:
        raise DsctlError(f"recipe model {recipe.model.name!r} does not match the supernet's {sup.model_name!r}")
    ctx = prepare_run(recipe, out, device=device, resume=resume, allow_changed=allow_changed, progress=progress,
                      stop=stop, check=lambda data: sup.check_data(data.info), tensorboard=tensorboard)
    model = sup.build_model()
    model.to(ctx.device)
    if not sup.calibrated and model.needs_bn_calibration:
        logger.info("%s is not BN-recalibrated: recalibrating on %d batches first", sup.path,
                    recipe.supernet.calib_batches)
        recalibrate_bn(model, ctx.data, seed=recipe.seed, device=ctx.device, num_batches=recipe.supernet.calib_batches)
    costs = route_costs(sup, model, ctx.data.input_size)  # stored by train-supernet at its input size
    budget = gate_latency_budget(model, recipe.gate, ctx.data.input_size, str(ctx.device), list(costs.route_macs))
    window = default_window(model, recipe.gate, list(costs.route_macs), costs.gate_macs, budget)
    holdout = None
    if recipe.gate.decision == "calibrated" and recipe.gate.has_budget:
        train_part, held = split_holdout(recipe.data, recipe.gate.holdout)
        ctx = dataclasses.replace(ctx, data=dataclasses.replace(ctx.data, train=train_part))
        holdout = DataLoader(held, batch_size=ctx.data.val.batch_size or 256, num_workers=0)
    # the gate's Gumbel noise depends on the seed alone, not on what was built or measured above
    # (stored route costs skip the sub-network exports whose layer inits drew from torch's generator)
    torch.manual_seed(recipe.seed)
    return train_gate(model, ctx, recipe.gate, recipe.optim, window=window, costs=costs, source=sup.path,
                      holdout=holdout, latency=budget)


def gate_latency_budget(model: Supernet, cfg, input_size: int, device: str, route_macs: list[int]):
    """The gate's latency budget (:class:`~dsctl.headroom.LatencyBudget`), or None without a latency target:
    against ``cfg.latency_table``, else a table timed now on ``device`` at batch 1 and ``cfg.latency_batch``."""
    from dsctl.headroom import latency_budget, load_latency_table, measure_latency_table

    if cfg.target_latency_ms is None:
        return None
    if cfg.latency_table is not None:
        table = load_latency_table(cfg.latency_table)
        if list(table.macs) != list(route_macs):
            raise DsctlError(f"{cfg.latency_table}: its sub-networks' MACs differ from this supernet's (a table of "
                             "another model or input size)")
    else:
        logger.info("timing every sub-network on %s at batch 1 and %d for the latency budget", device,
                    cfg.latency_batch)
        table = measure_latency_table(model, input_size, batches=tuple(sorted({1, cfg.latency_batch})),
                                      device=device, macs=route_macs)
    return latency_budget(table, cfg.target_latency_ms, cfg.latency_batch)


def default_window(model: Supernet, cfg, route_macs: list[int], gate_macs: int, budget=None) -> tuple[int, int]:
    """The recipe's window, else the ``window_size`` sub-networks around the budget (by time for a latency
    budget, by MACs for a MACs target), else all."""
    from dsctl.dynamic import check_window
    from dsctl.routing import choose_window

    if cfg.window is not None:
        return check_window(model, cfg.window)
    if budget is not None:
        return choose_window(list(budget.route_ms), budget.per_sample_ms, cfg.window_size)
    if cfg.target_macs_m is None:
        return check_window(model, None)
    return choose_window(route_macs, cfg.target_macs_m * 1e6 - gate_macs, cfg.window_size)
