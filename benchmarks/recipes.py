"""P4, end to end: the quick supernet recipes run as a new user runs them, and where their time goes.

Each recipe in ``recipes/quick`` that trains a supernet runs once as ``python -m dsctl train-supernet
RECIPE --out TMP --quiet`` in a fresh process (the run's threads; glibc's default allocator, as a user's
shell has it). The run's ``summary.json`` gives its wall time, images per second and the time of each
phase (``dsctl.train.timing``: data loading, forward + optimizer, backward, teacher forward, EMA update,
evaluation, checkpoints, the final step). Rows: the wall time over the duration the recipe states
("~N min" in its description; target: at most 1.10 of it) and each phase's share of the wall time.

Opt-in (``--only recipes``): about 25 minutes on 2 CPU cores, and it needs the recipes' data
(Fashion-MNIST: ``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Env, FigureRow, Settings, figure
from benchmarks.tools import ROOT, child_env
from dsctl.config import load_recipe

__all__ = ["bench_recipes", "stated_minutes", "QUICK_RECIPES"]

QUICK_RECIPES = ROOT / "recipes" / "quick"
_STATED = re.compile(r"~\s*(\d+(?:\.\d+)?)\s*min")


def stated_minutes(description: str) -> float | None:
    """The duration a recipe states in its description ("~14 minutes"), or None."""
    m = _STATED.search(description)
    return float(m.group(1)) if m else None


def _supernet_recipes() -> list[Path]:
    # gate recipes need a trained supernet and state their time per epoch: not timed here
    return sorted(p for p in QUICK_RECIPES.glob("*.yaml") if "gate" not in p.stem)


def bench_recipes(settings: Settings, env: Env, recipes: list[Path] | None = None) -> list[FigureRow]:
    rows: list[FigureRow] = []
    env_vars = {k: v for k, v in child_env(settings.threads).items() if not k.startswith("MALLOC_")}
    for recipe in recipes or _supernet_recipes():
        cfg = load_recipe(recipe)
        stated = stated_minutes(cfg.description or "")
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            proc = subprocess.run([sys.executable, "-m", "dsctl", "train-supernet", str(recipe), "--out", str(run),
                                   "--quiet"], cwd=ROOT, env=env_vars, capture_output=True, text=True, check=False)
            if proc.returncode != 0:  # e.g. the recipe's data is not installed: dsctl's own one-line error
                said = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise SystemExit(f"benchmarks --only recipes: {recipe.name} failed (exit {proc.returncode}): {said}")
            summary = json.loads((run / "summary.json").read_text())
        elapsed, phases = summary["elapsed_s"], summary["time_s"]
        name = f"recipes/quick/{recipe.name}"
        note = (f"{summary['images_per_s']:.0f} images/s end to end, {summary['images_trained']} images, "
                f"{summary['epochs']} epochs; glibc's default allocator")
        if stated is not None:
            rows.append(figure(env, "p4", "recipe_time_vs_stated", cfg.model.name, name, cfg.data.batch_size,
                               cfg.data.input_size or 0, elapsed / (60 * stated), target="<=1.10",
                               numerator=("wall time", elapsed), denominator=(f"stated ~{stated:g} min", 60 * stated),
                               parts_unit="s", note=note))
        for phase, seconds in phases.items():
            rows.append(figure(env, "p4", f"recipe_share_{phase}", cfg.model.name, name, cfg.data.batch_size,
                               cfg.data.input_size or 0, seconds / elapsed, numerator=(phase, seconds),
                               denominator=("wall time", elapsed), parts_unit="s", note=note))
    return rows
