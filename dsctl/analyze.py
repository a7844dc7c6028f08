"""Headroom before training a gate (DESIGN.md section 6): what routing over a supernet could gain.

``analyze_checkpoint`` records, on a data split, which indexed sub-networks classify each sample
correctly (a boolean matrix, N samples x K sub-networks) and how well the features at each candidate
gate position predict that the smallest sub-network is wrong, then writes them to an output folder.
The math over the matrix is pure and separate:

- :func:`oracle_route`: each sample to the cheapest sub-network that gets it right (the cheapest one
  when none does): the accuracy and average MACs of a perfect router.
- :func:`oracle_curve` / :func:`route_at_budget`: the best routing under an average-MACs budget.
- :func:`roc_auc`, :func:`probe_auc`: a linear probe's ROC AUC for "the smallest sub-network is wrong".
- :func:`route_by_score`: the top-scored fraction of samples sent wide, sized to a budget.

MACs are fused multiply-adds (fvcore), counted per sub-network on its exported static network; the
oracle's MACs do not include the gate (its cost is recorded beside them).

Example:
    >>> import torch
    >>> correct = torch.tensor([[True, True], [False, True], [False, False]])
    >>> r = oracle_route(correct, [10, 30])
    >>> round(r.top1, 2), round(r.avg_macs, 2), round(r.none_right, 3)
    (66.67, 16.67, 0.333)
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dsctl.config import DataConfig
from dsctl.errors import DsctlError
from dsctl.models.base import Supernet
from dsctl.train.progress import Progress

__all__ = ["SPLITS", "OracleResult", "BudgetPoint", "ProbeResult", "ScoreRouting", "Analysis", "oracle_route",
           "route_at_budget", "oracle_routes_at_budget", "oracle_curve", "roc_auc", "probe_auc", "route_by_score", "collect_correctness",
           "analyze_checkpoint"]

logger = logging.getLogger(__name__)

SPLITS = ("val", "holdout")
FORMAT_VERSION = 1


# -- oracle routing over a correctness matrix ---------------------------------------------------------------
@dataclass(frozen=True)
class OracleResult:
    """Each sample routed to its cheapest correct sub-network (the cheapest one when none is correct)."""

    routes: Tensor  # (N,) int64 sub-network index per sample
    top1: float  # percent of samples some sub-network gets right
    avg_macs: float
    none_right: float  # fraction of samples no sub-network gets right
    histogram: list[int]  # samples per sub-network


@dataclass(frozen=True)
class BudgetPoint:
    """The best routing whose average MACs stay within ``budget_macs``."""

    budget_macs: float
    avg_macs: float
    top1: float  # percent
    correct: int
    samples: int


def _check_matrix(correct: Tensor, macs: Sequence[float]) -> tuple[Tensor, Tensor]:
    if correct.dtype != torch.bool or correct.dim() != 2 or correct.shape[0] == 0:
        raise ValueError(f"correct must be a non-empty (N, K) bool tensor, got {correct.dtype} {tuple(correct.shape)}")
    m = torch.as_tensor(list(macs), dtype=torch.float64)
    if m.dim() != 1 or m.numel() != correct.shape[1]:
        raise ValueError(f"macs has {m.numel()} entries but correct has {correct.shape[1]} sub-networks (columns)")
    return correct.cpu(), m


def _cheapest_correct(correct: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(any_right (N,), cheapest correct route (N,), its MACs (N,), inf where none is right)."""
    costs = torch.where(correct, m.expand_as(correct), torch.full_like(m, math.inf).expand_as(correct))
    best_cost, best_k = costs.min(1)  # ties: the first (lowest index) minimum
    return correct.any(1), best_k, best_cost


def oracle_route(correct: Tensor, macs: Sequence[float]) -> OracleResult:
    """The oracle router over ``correct`` ((N, K) bool: sample i right at sub-network k) and per-route ``macs``.

    Raises:
        ValueError: ``correct`` is not a non-empty 2-D bool tensor, or ``macs`` does not have K entries.
    """
    correct, m = _check_matrix(correct, macs)
    any_right, best_k, _ = _cheapest_correct(correct, m)
    routes = torch.where(any_right, best_k, torch.argmin(m))
    n = correct.shape[0]
    return OracleResult(routes, 100.0 * float(any_right.sum()) / n, float(m[routes].mean()),
                        float((~any_right).sum()) / n, torch.bincount(routes, minlength=m.numel()).tolist())


def oracle_curve(correct: Tensor, macs: Sequence[float], budgets: Iterable[float] | None = None, *,
                 points: int = 50) -> list[BudgetPoint]:
    """The most accurate routing at each average-MACs budget (default: ``points`` budgets evenly spaced
    from the cheapest to the most expensive sub-network, plus each sub-network's MACs and the oracle's).

    The greedy below is exact. Let m* be the cheapest route's MACs and, for a sample some route gets right,
    c_i the MACs of its cheapest correct route and d_i = c_i - m* >= 0. In any assignment, moving a sample
    that is right to its cheapest correct route, and one that is wrong to the cheapest route, keeps the
    number of correct samples and does not raise the cost. So some optimal assignment uses only those two
    options: pay d_i extra to be right, or nothing to be wrong. Then the problem is to pick as many samples
    as possible with sum of d_i <= N * (budget - m*), every pick worth one: a knapsack with unit values.
    Among sets of s samples the s smallest d_i cost least, so if any set of s samples fits, those do;
    taking samples in ascending d_i while they fit is optimal. (With unequal gains the multiple-choice
    knapsack would not be solved by a greedy; unit gains are what make it exact.)

    Raises:
        ValueError: a budget below the cheapest sub-network's MACs (no routing can meet it), and as
            :func:`oracle_route`.
    """
    correct, m = _check_matrix(correct, macs)
    n, m_min, m_max = correct.shape[0], float(m.min()), float(m.max())
    if budgets is None:
        grid = torch.linspace(m_min, m_max, max(points, 2), dtype=torch.float64).tolist()
        budgets = sorted({*grid, *m.tolist(), oracle_route(correct, macs).avg_macs})
    any_right, _, best_cost = _cheapest_correct(correct, m)
    extra_sorted = (best_cost[any_right] - m_min).sort().values
    spent = torch.cat([torch.zeros(1, dtype=torch.float64), extra_sorted.cumsum(0)])  # spent[s]: s cheapest picks
    tol = 1e-12 * n * max(abs(m_max), 1.0)  # budgets such as the oracle's average are N * MACs / N in floats
    out = []
    for b in budgets:
        if b < m_min - tol / n:
            raise ValueError(f"budget {b:g} MACs is below the cheapest sub-network's {m_min:g} MACs: no routing "
                             f"meets it (allowed: budgets >= {m_min:g})")
        picks = int(torch.searchsorted(spent, torch.tensor([n * (b - m_min) + tol], dtype=torch.float64),
                                       right=True)) - 1
        out.append(BudgetPoint(float(b), m_min + float(spent[picks]) / n, 100.0 * picks / n, picks, n))
    return out


def oracle_routes_at_budget(correct: Tensor, macs: Sequence[float], budget: float) -> Tensor:
    """The routes (N,) of the routing :func:`oracle_curve` finds at ``budget``: the samples whose cheapest
    correct route costs least extra go to it while the average stays within the budget (ties: the lower
    sample index first), every other sample to the cheapest route."""
    correct, m = _check_matrix(correct, macs)
    n, m_min = correct.shape[0], float(m.min())
    point = route_at_budget(correct, macs, budget)
    any_right, best_k, best_cost = _cheapest_correct(correct, m)
    extra = torch.where(any_right, best_cost - m_min, torch.full_like(best_cost, math.inf))
    picked = torch.sort(extra, stable=True).indices[: point.correct]
    routes = torch.full((n,), int(torch.argmin(m)), dtype=torch.int64)
    routes[picked] = best_k[picked]
    return routes


def route_at_budget(correct: Tensor, macs: Sequence[float], budget: float) -> BudgetPoint:
    """The most accurate routing with average MACs <= ``budget`` (see :func:`oracle_curve` for why it is exact)."""
    return oracle_curve(correct, macs, [budget])[0]


# -- probes: do features at a position predict "the smallest sub-network is wrong"? -----------------------
def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC of ``scores`` for boolean ``labels`` (Mann-Whitney U, ties counted as one half); NaN when a
    class is absent."""
    scores, labels = scores.detach().double().flatten().cpu(), labels.flatten().bool().cpu()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return math.nan
    sorted_scores, order = scores.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # 1-based rank, averaged over ties
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


@dataclass(frozen=True)
class ProbeResult:
    """Two-fold linear probe: AUC averaged over both folds, each fold's AUC, out-of-fold scores (N,)."""

    auc: float
    auc_folds: tuple[float, float]
    scores: Tensor


def _fit_logistic(x: Tensor, y: Tensor, l2: float, max_iter: int):
    """L2-regularised logistic regression on standardised ``x`` (full-batch L-BFGS, float64); returns a scorer."""
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    z, target = (x - mean) / std, y.double()
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w[:-1] + w[-1], target) + 0.5 * l2 * w[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = w.detach()
    return lambda xt: ((xt - mean) / std) @ w[:-1] + w[-1]


def probe_auc(features: Tensor, target: Tensor, *, seed: int = 0, l2: float = 1e-3, max_iter: int = 100) -> ProbeResult:
    """Fit a logistic-regression probe on one half of the samples, score the other half, and swap.

    The halves are a stratified split drawn from ``seed`` (each class shuffled and dealt alternately), so
    the result depends only on the inputs and the seed. Features are standardised with the training
    half's statistics. AUC is NaN when either class has fewer than two samples.

    Args:
        features: (N, C) features, e.g. globally pooled activations at one position.
        target: (N,) bool, e.g. "the smallest sub-network is wrong".
        seed: Seed of the split.
        l2: Weight penalty 0.5 * l2 * |w|^2 added to the mean log-loss.
        max_iter: L-BFGS iterations.
    """
    x, y = features.detach().double().cpu(), target.bool().flatten().cpu()
    if x.dim() != 2 or x.shape[0] != y.numel():
        raise ValueError(f"features must be (N, C) with N = {y.numel()} targets, got {tuple(x.shape)}")
    n = y.numel()
    if min(int(y.sum()), int((~y).sum())) < 2:
        return ProbeResult(math.nan, (math.nan, math.nan), torch.full((n,), math.nan, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    fold = torch.zeros(n, dtype=torch.bool)
    for cls in (False, True):
        idx = (y == cls).nonzero().flatten()
        fold[idx[torch.randperm(idx.numel(), generator=gen)]] = torch.arange(idx.numel()) % 2 == 0
    scores = torch.empty(n, dtype=torch.float64)
    aucs = []
    for train in (fold, ~fold):
        score = _fit_logistic(x[train], y[train], l2, max_iter)
        test = ~train
        scores[test] = torch.sigmoid(score(x[test]))
        aucs.append(roc_auc(scores[test], y[test]))
    return ProbeResult(sum(aucs) / 2, (aucs[0], aucs[1]), scores)


@dataclass(frozen=True)
class ScoreRouting:
    """The ``fraction_wide`` top-scored samples to the most expensive sub-network, the rest to the cheapest."""

    budget_macs: float
    fraction_wide: float
    avg_macs: float
    top1: float  # percent
    random_top1: float  # expected top1 when the same number of samples is sent wide at random


def route_by_score(correct: Tensor, macs: Sequence[float], scores: Tensor, budget: float) -> ScoreRouting:
    """Send the highest-scored samples wide, as many as ``budget`` (average MACs) allows."""
    correct, m = _check_matrix(correct, macs)
    n = correct.shape[0]
    narrow, wide = int(m.argmin()), int(m.argmax())
    span = float(m[wide] - m[narrow])
    q = 0.0 if span == 0 else min(max((budget - float(m[narrow])) / span, 0.0), 1.0)
    count = int(math.floor(q * n + 1e-9))
    order = torch.sort(scores.detach().double().cpu(), descending=True, stable=True).indices
    sent = torch.zeros(n, dtype=torch.bool)
    sent[order[:count]] = True
    right = torch.where(sent, correct[:, wide], correct[:, narrow])
    acc_n, acc_w = correct[:, narrow].double().mean(), correct[:, wide].double().mean()
    return ScoreRouting(float(budget), count / n, float(m[narrow]) + count * span / n,
                        100.0 * float(right.double().mean()), 100.0 * float((count * acc_w + (n - count) * acc_n) / n))


# -- collecting the matrix from a model -------------------------------------------------------------------
@torch.no_grad()
def collect_correctness(model: Supernet, loader: Iterable, device: torch.device, *, max_batches: int | None = None,
                        probes: bool = True,
                        progress: Progress | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(correct (N, K) bool, labels (N,), pooled features by probe position ((N, C) each, at the smallest).

    ``probes`` is turned off (with a warning) for families that do not implement ``probe_points``.
    """
    model.eval()
    space = model.space
    smallest = space.smallest()
    rows, labels, feats = [], [], {}  # type: ignore[var-annotated]
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # indexed sub-networks share the stages before the gate, so the network reaches the gate once
        h = model.forward_pre(x, smallest).features
        rows.append(torch.stack([model.forward_post(h, spec).argmax(1) == y for spec in space.subnets], 1).cpu())
        labels.append(y.cpu())
        if probes:
            try:
                points = model.probe_points(x, smallest)
            except NotImplementedError as err:
                logger.warning("no probes: %s", err)
                probes = False
            else:
                for name, f in points.items():
                    feats.setdefault(name, []).append(f.float().cpu())
        if progress is not None:
            progress.advance(1)
    if not rows:
        raise DsctlError("analysis saw no samples (empty split?)")
    return torch.cat(rows), torch.cat(labels), {k: torch.cat(v) for k, v in feats.items()}


# -- the whole analysis of a checkpoint ---------------------------------------------------------------------
@dataclass
class Analysis:
    """What ``analyze_checkpoint`` measured: ``summary`` is the content of analysis.json."""

    correct: Tensor
    macs: list[int]
    curve: list[BudgetPoint]
    summary: dict[str, Any]
    out_dir: Path
    paths: list[Path] = field(default_factory=list)


def _split_data(cfg: DataConfig, split: str, holdout_fraction: float) -> tuple[Any, Tensor, dict[str, Any], Any]:
    """(dataset, indices into its source split, data provenance, DataInfo)."""
    from dsctl.data import build_datasets, split_holdout

    if split == "val":
        _, ds, info = build_datasets(cfg)
        return ds, torch.arange(len(ds)), {"source": info.name, "split": "val", "val_size": info.val_size}, info
    _, ds = split_holdout(cfg, holdout_fraction)
    _, _, info = build_datasets(cfg, augment_train=False)
    return ds, torch.as_tensor(list(ds.indices)), {"source": cfg.source, "split": "holdout",
                                                   "holdout_fraction": holdout_fraction}, info


def _round(v: float, digits: int) -> float | None:
    return None if math.isnan(v) else round(v, digits)  # JSON has no NaN


def _probe_rows(correct: Tensor, macs: list[int], feats: dict[str, Tensor], gate_after: str, budget: float,
                seed: int) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    target = ~correct[:, 0]  # the smallest sub-network (space.smallest(), column 0) is wrong
    oracle_top1 = route_at_budget(correct, macs, budget).top1
    rows, scores = [], {}
    for name, f in feats.items():
        p = probe_auc(f, target, seed=seed)
        scores[name] = p.scores.float()
        row: dict[str, Any] = {"position": name, "channels": f.shape[1], "gate": name == gate_after,
                               "auc": _round(p.auc, 4), "auc_a": _round(p.auc_folds[0], 4),
                               "auc_b": _round(p.auc_folds[1], 4)}
        if not math.isnan(p.auc):
            r = route_by_score(correct, macs, p.scores, budget)
            row.update(budget_macs=round(r.budget_macs), fraction_wide=round(r.fraction_wide, 4),
                       avg_macs=round(r.avg_macs), top1=round(r.top1, 3), random_top1=round(r.random_top1, 3),
                       oracle_top1=round(oracle_top1, 3))
        rows.append(row)
    return rows, scores


def analyze_checkpoint(path: str | Path, *, split: str = "val", out_dir: str | Path | None = None,
                       overrides: Sequence[str] = (), max_batches: int | None = None, device: str = "auto",
                       holdout_fraction: float = 0.1, budget_macs: float | None = None, curve_points: int = 50,
                       seed: int = 0, latency_batch: int | None = 32, threads: int | None = None,
                       min_run_time_s: float = 0.5, progress: Progress | None = None) -> Analysis:
    """Measure the routing headroom of a supernet checkpoint (or run folder) and write it to ``out_dir``.

    Args:
        path: Supernet (or gate) checkpoint, or its run folder.
        split: ``val`` (the recipe's validation/test split) or ``holdout`` (the last ``holdout_fraction``
            of the training set, evaluation transform: the part gate calibration holds out).
        out_dir: Output folder (default: ``<run>/analysis``, ``<run>/analysis-holdout`` for ``holdout``).
        overrides: Recipe overrides (``data.source=...``).
        max_batches: Use only the first batches of the split.
        budget_macs: Average-MACs budget of the probe routers (default: midway between the cheapest and the
            most expensive sub-network).
        curve_points: Evenly spaced budgets of ``oracle.csv``.
        seed: Seed of the probes' half split.
        latency_batch: Besides batch 1, the batch size at which the latency headroom is timed on ``device``
            (:mod:`dsctl.headroom`: every sub-network's latency, the front's share, the oracle's routes timed
            through the deployable routed model); None skips the timing.
        threads, min_run_time_s: Intra-op threads and seconds per candidate of that timing.

    Returns:
        The matrix, the oracle curve and the summary; files written: ``correctness.pt`` (loads with
        ``torch.load(weights_only=True)``), ``analysis.json``, ``subnets.csv``, ``oracle.csv``, ``probes.csv``,
        and with the timing ``latency.csv`` and ``oracle_latency.csv``.

    Raises:
        CheckpointError / DsctlError: unreadable or static checkpoint, no recipe, unknown split.

    Example:
        >>> a = analyze_checkpoint("runs/supernet", max_batches=20)  # doctest: +SKIP
        >>> a.summary["oracle"]["top1"], a.summary["probes"][0]["auc"]  # doctest: +SKIP
    """
    from dsctl.artifacts import ModelArtifact, SupernetArtifact, read_artifact, route_costs
    from dsctl.train.common import resolve_device
    from dsctl.train.run import git_commit

    if split not in SPLITS:
        raise DsctlError(f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    art = read_artifact(path, ModelArtifact, why="analyze")
    recipe = art.recipe_config(overrides)
    if isinstance(art, SupernetArtifact) and not art.calibrated:
        logger.warning("%s: BN statistics were not recalibrated; use the run's final.pt", art.path)
    dev = resolve_device(device)
    model = art.build_model()
    size = recipe.data.input_size
    costs = route_costs(art, model, size)
    macs, g_macs = list(costs.route_macs), costs.gate_macs
    ds, indices, data_meta, info = _split_data(recipe.data, split, holdout_fraction)
    art.check_data(info)
    batch = recipe.data.eval_batch_size or 2 * recipe.data.batch_size
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=recipe.data.workers)
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    progress = progress or Progress()
    progress.start(f"analyzing {model.space.num_subnets} sub-networks on {data_meta['source']} {split}", total)
    correct, labels, feats = collect_correctness(model.to(dev), loader, dev, max_batches=max_batches, progress=progress)
    progress.finish()
    n, space = correct.shape[0], model.space
    oracle = oracle_route(correct, macs)
    curve = oracle_curve(correct, macs, points=curve_points)
    budget = budget_macs if budget_macs is not None else (min(macs) + max(macs)) / 2
    progress.start("fitting probes", 1)
    probes, scores = _probe_rows(correct, macs, feats, space.gate_after, budget, seed)
    progress.advance(1)
    progress.finish()
    subnets = [{"subnet": space.label(s), "width": space.ratio(s), "macs": macs[k],
                "top1": round(100.0 * float(correct[:, k].double().mean()), 3), "oracle_samples": oracle.histogram[k]}
               for k, s in enumerate(space.subnets)]
    summary = {
        "format_version": FORMAT_VERSION, "checkpoint": art.path, "model": model.model_name,
        "data": {**data_meta, "root": recipe.data.root, "input_size": size, "samples": n, "max_batches": max_batches},
        "commit": git_commit(), "torch_version": torch.__version__, "device": str(dev),
        "macs_convention": "fused multiply-adds (fvcore); oracle MACs exclude the gate", "gate_macs": g_macs,
        "subnets": subnets,
        "oracle": {"top1": round(oracle.top1, 3), "avg_macs": round(oracle.avg_macs),
                   "none_right": round(oracle.none_right, 5), "histogram": oracle.histogram},
        "smallest_wrong": round(float((~correct[:, 0]).double().mean()), 5),
        "probe_budget_macs": round(budget), "probe_seed": seed, "probes": probes,
    }
    latency_rows: list[dict[str, Any]] = []
    if latency_batch is not None:
        progress.start(f"timing the sub-networks and the oracle's routes at batch 1 and {latency_batch}", 1)
        images = next(iter(torch.utils.data.DataLoader(ds, batch_size=min(len(ds), 16 * latency_batch, n))))[0]
        summary["latency"], latency_rows = _latency_headroom(model, correct, macs, images, latency_batch, str(dev),
                                                             threads, min_run_time_s, size)
        progress.advance(1)
        progress.finish()
    out = Path(out_dir) if out_dir is not None else Path(art.path).parent / (
        "analysis" if split == "val" else "analysis-holdout")
    tensors = {"format_version": FORMAT_VERSION, "correct": correct, "labels": labels, "indices": indices[:n],
               "macs": torch.tensor(macs, dtype=torch.int64), "gate_macs": g_macs,
               "subnets": [r["subnet"] for r in subnets], "probe_scores": scores}
    analysis = Analysis(correct, macs, curve, summary, out)
    analysis.paths = _write(analysis, tensors, probes, latency_rows)
    logger.info("analysis of %s (%d samples) written to %s", art.path, n, out)
    return analysis


def _latency_headroom(model: Supernet, correct: Tensor, macs: list[int], images: Tensor, batch: int, device: str,
                      threads: int | None, min_run_time_s: float, size: int) -> tuple[dict[str, Any], list[dict]]:
    """The latency table, the span verdicts and the oracle's best time per MACs budget (analysis.json's
    ``latency``, and the rows of oracle_latency.csv)."""
    from dsctl.headroom import measure_latency_table, span_verdict, time_oracle_routing

    table = measure_latency_table(model, size, batches=(1, batch), device=device, threads=threads,
                                  min_run_time_s=min_run_time_s, macs=macs)
    # every sub-network's MACs up to the oracle's own average: above it the oracle routes the same way
    best = oracle_route(correct, macs).avg_macs
    budgets = sorted({*(m for m in macs if m < best), best})
    routes = {f"{b:.0f}": oracle_routes_at_budget(correct, macs, b) for b in budgets}
    timed = images.shape[0]
    routed_ms, static_ms = time_oracle_routing(model, images, {k: r[:timed] for k, r in routes.items()}, batch,
                                               device=device, threads=threads, min_run_time_s=min_run_time_s)
    top1 = [100.0 * float(correct[:, k].double().mean()) for k in range(len(macs))]
    b1 = table.subnet_ms(1)
    rows = []
    for b, (name, r) in zip(budgets, routes.items()):
        share = torch.bincount(r, minlength=len(macs)).double() / r.numel()
        ms_n, ms_1 = routed_ms[name], sum(float(p) * t for p, t in zip(share, b1))  # shares sum to 1
        acc = 100.0 * float(correct[torch.arange(r.numel()), r].double().mean())
        # the most accurate static sub-network that is as fast as the oracle's routing (None: none is)
        fast_n = [top1[k] for k in range(len(macs)) if static_ms[f"k{k}"] <= ms_n]
        fast_1 = [top1[k] for k in range(len(macs)) if b1[k] <= ms_1]
        rows.append({"budget_macs": round(b), "avg_macs": round(float((share * torch.tensor(macs).double()).sum())),
                     "top1": round(acc, 3), "ms_b1": round(ms_1, 4), f"ms_b{batch}": round(ms_n, 4),
                     "best_static_top1_as_fast_b1": round(max(fast_1), 3) if fast_1 else None,
                     f"best_static_top1_as_fast_b{batch}": round(max(fast_n), 3) if fast_n else None,
                     "timed_images": timed})
    summary = {"batches": [1, batch], "device": table.device, "threads": table.threads,
               "verdicts": [span_verdict(table, 1), span_verdict(table, batch)],
               "front_share": {"1": round(table.front_share(1), 4), str(batch): round(table.front_share(batch), 4)},
               "span": {"1": round(table.span(1), 3), str(batch): round(table.span(batch), 3)},
               "static_ms": {f"b{batch}": {k: round(v, 4) for k, v in static_ms.items()}},
               "table": table.to_dict(), "oracle": rows,
               "oracle_ms_note": (f"ms_b{batch}: the oracle's routes for the first {timed} images timed through the "
                                  "deployable routed model (gate, grouping and scatter included), interleaved with "
                                  "the static sub-networks; ms_b1: front + each route's tail at batch 1, weighted "
                                  "by the routes' shares (latency.csv)")}
    return summary, table.rows()


def _write(a: Analysis, tensors: dict[str, Any], probes: list[dict[str, Any]],
           latency_rows: list[dict[str, Any]] | None = None) -> list[Path]:
    from dsctl.checkpoint import atomic_write_bytes
    from dsctl.report import write_csv

    out = a.out_dir
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(tensors, buf)
    atomic_write_bytes(out / "correctness.pt", buf.getvalue())
    write_csv(out / "subnets.csv", a.summary["subnets"])
    write_csv(out / "oracle.csv", [{**asdict(p), "avg_macs": round(p.avg_macs, 1), "top1": round(p.top1, 3)}
                                   for p in a.curve])
    paths = [out / "correctness.pt", out / "subnets.csv", out / "oracle.csv"]
    if probes:
        write_csv(out / "probes.csv", probes)
        paths.append(out / "probes.csv")
    if latency_rows:
        write_csv(out / "latency.csv", latency_rows)
        write_csv(out / "oracle_latency.csv", a.summary["latency"]["oracle"])
        paths += [out / "latency.csv", out / "oracle_latency.csv"]
    paths.append(out / "analysis.json")
    a.summary["files"] = [p.name for p in paths]
    atomic_write_bytes(out / "analysis.json", (json.dumps(a.summary, indent=2) + "\n").encode())
    return paths
