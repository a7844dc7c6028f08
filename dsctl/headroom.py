"""Latency headroom: on the device it runs on, can routing over a supernet pay in time?

Fewer MACs are a means; the end is less time. Before a gate is trained, :func:`measure_latency_table`
times the deployable parts of the supernet on this device: the front (stem, stages before the gate, the
gate) and every indexed sub-network's static tail, each alone, at batch 1 and at a deployment batch N.
A sub-network's latency is front + its tail. :func:`span_verdict` says in one line how far time follows
MACs over the routed sub-networks, and when the span is too small for routing to pay.
:func:`time_oracle_routing` times the best a perfect router could reach: the oracle's routes at each
MACs budget (``dsctl analyze``'s correctness matrix) through the deployable routed model, grouping,
gathering and scattering included, side by side with the static sub-networks.

The table is also what a latency budget is calibrated against (``dsctl train-gate --target-latency``).

Example:
    >>> import dsctl
    >>> model = dsctl.build_model("tiny_ds_resnet").eval()
    >>> table = measure_latency_table(model, 28, batches=(1, 8), min_run_time_s=0.1)  # doctest: +SKIP
    >>> print(span_verdict(table, 8))  # doctest: +SKIP
    k6 costs 1.6x k0's time for 3.5x its MACs at batch 8 (cpu, 2 threads); ...
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dsctl.errors import DsctlError
from dsctl.models.base import Supernet

__all__ = ["PAYING_SPAN", "LatencyTable", "LatencyBudget", "measure_latency_table", "load_latency_table",
           "latency_budget", "span_verdict", "time_oracle_routing"]

# below this ratio of the widest routed sub-network's latency to the narrowest's, sending every sample
# narrow saves less than a third of the time: routing cannot buy back what it costs in accuracy and glue
PAYING_SPAN = 1.5


@dataclass(frozen=True)
class LatencyTable:
    """Median latencies (ms per batch) of a supernet's deployable parts on one device, timed in one
    interleaved run per batch size: ``front_ms[b]`` the front (stem, pre-gate stages, gate) on a batch of
    ``batches[b]``, ``tail_ms[b][k]`` sub-network k's tail on the front's features of that batch."""

    model: str
    device: str
    threads: int
    input_size: int
    batches: tuple[int, ...]
    macs: tuple[int, ...]  # per indexed sub-network (fvcore, exported static network)
    front_ms: tuple[float, ...]
    tail_ms: tuple[tuple[float, ...], ...]

    def _b(self, batch: int) -> int:
        if batch not in self.batches:
            raise ValueError(f"batch {batch} was not measured (measured: {', '.join(map(str, self.batches))})")
        return self.batches.index(batch)

    def subnet_ms(self, batch: int) -> list[float]:
        """Latency of every indexed sub-network at ``batch``: front + its tail."""
        b = self._b(batch)
        return [self.front_ms[b] + t for t in self.tail_ms[b]]

    def front_share(self, batch: int, k: int = 0) -> float:
        """The front's share of sub-network ``k``'s latency (default: the smallest's)."""
        return self.front_ms[self._b(batch)] / self.subnet_ms(batch)[k]

    def span(self, batch: int, lo: int = 0, hi: int | None = None) -> float:
        """Latency of sub-network ``hi`` (default: the widest) over sub-network ``lo``'s."""
        ms = self.subnet_ms(batch)
        return ms[len(ms) - 1 if hi is None else hi] / ms[lo]

    def route_ms(self, batch: int, window: tuple[int, int]) -> list[float]:
        """Per-sample latency of each route of ``window`` at ``batch``: the front shared by the batch, the
        tail by the samples it routes (what routing spends per sample, glue aside)."""
        b = self._b(batch)
        lo, hi = window
        return [(self.front_ms[b] + self.tail_ms[b][k]) / batch for k in range(lo, hi + 1)]

    def rows(self) -> list[dict[str, Any]]:
        """One row per (batch, sub-network), for latency.csv."""
        out = []
        for b, batch in enumerate(self.batches):
            for k, (m, t) in enumerate(zip(self.macs, self.tail_ms[b])):
                out.append({"batch": batch, "subnet": f"k{k}", "macs": m, "front_ms": round(self.front_ms[b], 4),
                            "tail_ms": round(t, 4), "subnet_ms": round(self.front_ms[b] + t, 4),
                            "device": self.device, "threads": self.threads, "input_size": self.input_size})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()} | {
            "tail_ms": [list(t) for t in self.tail_ms]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        return cls(d["model"], d["device"], int(d["threads"]), int(d["input_size"]), tuple(d["batches"]),
                   tuple(int(m) for m in d["macs"]), tuple(float(f) for f in d["front_ms"]),
                   tuple(tuple(float(t) for t in row) for row in d["tail_ms"]))


@torch.no_grad()
def measure_latency_table(model: Supernet, input_size: int, *, batches: Sequence[int] = (1, 32), device: str = "cpu",
                          threads: int | None = None, min_run_time_s: float = 0.5, rounds: int = 5,
                          macs: Sequence[int] | None = None) -> LatencyTable:
    """Time the front and every indexed sub-network's static tail (plain torch, as ``dsctl export
    --dynamic`` deploys them), interleaved, at each batch size, on random channels_last input.

    Args:
        model: The supernet (its weights do not change the time of a dense network).
        input_size: Image side in pixels.
        batches: Batch sizes, each its own interleaved run.
        device, threads: Where and with how many intra-op threads to time (None: torch's current setting).
        min_run_time_s, rounds: Timing budget per candidate and interleaved rounds.
        macs: Per-sub-network MACs if already counted (default: fvcore on the exported sub-networks).
    """
    from dsctl.flops import macs_table
    from dsctl.latency import measure_latency
    from dsctl.train.common import resolve_device

    dev = resolve_device(device)
    model = model.eval()
    k = model.space.num_subnets
    routed = model.to_static_routed((0, k - 1)).to(dev)
    macs = tuple(int(m) for m in (macs if macs is not None else macs_table(model, input_size)))
    fronts, tails = [], []
    used = threads or torch.get_num_threads()
    for b in batches:
        x = torch.randn(b, model.in_chans, input_size, input_size, device=dev)
        x = x.contiguous(memory_format=torch.channels_last)
        h = routed.front(x)[0]
        cands: dict[str, Any] = {"front": lambda _x: routed.front(_x)}
        cands.update({f"k{i}": (lambda _x, t=t: t(h)) for i, t in enumerate(routed.tails)})
        reports = {r.name: r.latency_ms_p50 for r in measure_latency(
            cands, x, warmup=3, min_run_time_s=min_run_time_s, rounds=rounds, threads=used)}
        fronts.append(reports["front"])
        tails.append(tuple(reports[f"k{i}"] for i in range(k)))
    return LatencyTable(model.model_name, str(dev), used, input_size, tuple(int(b) for b in batches), macs,
                        tuple(fronts), tuple(tails))


def load_latency_table(path: str | Path) -> LatencyTable:
    """A table ``dsctl analyze`` wrote: its ``latency.csv``, its ``analysis.json``, or their folder.

    Raises:
        DsctlError: no such file, or it holds no latency table.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "latency.csv"
    if not p.is_file():
        raise DsctlError(f"{path}: no such latency table (give the latency.csv or analysis.json that dsctl analyze "
                         "wrote, or their folder)")
    try:
        if p.suffix == ".json":
            return LatencyTable.from_dict(json.loads(p.read_text())["latency"]["table"])
        rows = list(csv.DictReader(p.open()))
        batches = tuple(dict.fromkeys(int(r["batch"]) for r in rows))
        by = {b: [r for r in rows if int(r["batch"]) == b] for b in batches}
        first = by[batches[0]]
        return LatencyTable(
            model="", device=first[0]["device"], threads=int(first[0]["threads"]),
            input_size=int(first[0]["input_size"]), batches=batches, macs=tuple(int(r["macs"]) for r in first),
            front_ms=tuple(float(by[b][0]["front_ms"]) for b in batches),
            tail_ms=tuple(tuple(float(r["tail_ms"]) for r in by[b]) for b in batches))
    except (KeyError, ValueError, IndexError, TypeError, json.JSONDecodeError) as err:
        raise DsctlError(f"{p}: not a latency table written by dsctl analyze ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class LatencyBudget:
    """A latency budget: ``target_ms`` per batch of ``batch`` images on the device ``table`` was timed on.

    ``route_ms`` is the per-sample cost of routing a sample through each indexed sub-network at that batch
    size: (front + its tail) / batch, the front (and the gate in it) shared by the batch. Timing noise
    cannot make a wider sub-network cheaper, so the costs are made non-decreasing (running maximum). A
    routed batch then costs about ``batch * sum_k share_k * route_ms[k]``: exact when each tail's time is
    proportional to its group's size, an underestimate where small groups pay per-call overhead, which
    ``dsctl report`` and ``dsctl bench --dynamic`` measure.
    """

    target_ms: float
    batch: int
    route_ms: tuple[float, ...]
    table: LatencyTable

    @property
    def per_sample_ms(self) -> float:
        return self.target_ms / self.batch

    def predicted_ms(self, histogram: Sequence[int]) -> float:
        """Predicted latency per batch of ``batch`` for a route histogram (counts per indexed sub-network)."""
        total = sum(histogram)
        return self.batch * sum(c * t for c, t in zip(histogram, self.route_ms)) / max(total, 1)

    def equivalent_macs(self) -> float:
        """The MACs at the budget's per-sample cost, linear between the sub-networks that bracket it (what
        the gate's complexity loss pulls toward while it trains; the decision is calibrated on time)."""
        t, m = self.route_ms, self.table.macs
        target = self.per_sample_ms
        for k in range(len(t) - 1):
            if t[k] <= target <= t[k + 1]:
                w = 0.0 if t[k + 1] == t[k] else (target - t[k]) / (t[k + 1] - t[k])
                return m[k] + w * (m[k + 1] - m[k])
        return float(m[0] if target < t[0] else m[-1])

    def to_dict(self) -> dict[str, Any]:
        return {"target_ms": self.target_ms, "batch": self.batch, "route_ms": list(self.route_ms),
                "table": self.table.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyBudget:
        return cls(float(d["target_ms"]), int(d["batch"]), tuple(float(t) for t in d["route_ms"]),
                   LatencyTable.from_dict(d["table"]))


def latency_budget(table: LatencyTable, target_ms: float, batch: int) -> LatencyBudget:
    """The budget ``target_ms`` per batch of ``batch`` against ``table``.

    Raises:
        DsctlError: ``batch`` was not timed in the table, or no routing can spend ``target_ms``.
    """
    if batch not in table.batches:
        raise DsctlError(f"--latency-batch {batch} was not timed in the latency table "
                         f"(timed: {', '.join(map(str, table.batches))})")
    costs = torch.tensor(table.subnet_ms(batch), dtype=torch.float64).cummax(0).values / batch
    lo, hi = float(costs[0]) * batch, float(costs[-1]) * batch
    if not lo <= target_ms <= hi:
        raise DsctlError(f"latency target {target_ms:g} ms at batch {batch} is outside what routing can spend on "
                         f"{table.device} ({table.threads} threads): allowed {lo:.4g}..{hi:.4g} ms, the "
                         "narrowest and the widest sub-network")
    return LatencyBudget(float(target_ms), int(batch), tuple(float(c) for c in costs), table)


def span_verdict(table: LatencyTable, batch: int, window: tuple[int, int] | None = None) -> str:
    """One line: how far time follows MACs from the narrowest to the widest sub-network of ``window``
    (default: all) at ``batch`` on the table's device, the front's share, and whether routing can pay."""
    lo, hi = window if window is not None else (0, len(table.macs) - 1)
    span = table.span(batch, lo, hi)
    macs_span = table.macs[hi] / table.macs[lo]
    where = f"at batch {batch} ({table.device}, {table.threads} threads)"
    line = (f"k{hi} costs {span:.1f}x k{lo}'s time for {macs_span:.1f}x its MACs {where}; the front is "
            f"{table.front_share(batch, lo):.0%} of k{lo}'s time")
    if span < PAYING_SPAN:
        return line + f": too small a span for routing to pay (under {PAYING_SPAN}x)"
    return line + ": routing can pay in time"


class _GivenRoutes(nn.Module):
    """A routed model's front whose routes are given (a cycle of per-batch route tensors, window-relative)
    instead of its gate's: the gate still runs, so its cost is in the time."""

    def __init__(self, front: nn.Module, routes: list[Tensor]) -> None:
        super().__init__()
        self.front = front
        self.routes = itertools.cycle(routes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.front(x)[0], next(self.routes)


@torch.no_grad()
def time_oracle_routing(model: Supernet, images: Tensor, routes: dict[str, Tensor], batch: int, *, device: str = "cpu",
                        threads: int | None = None, min_run_time_s: float = 0.5,
                        rounds: int = 5) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per batch of the deployable routed model over every indexed sub-network when each image
    takes the route given for it (``routes[name]``: (len(images),) sub-network indices, e.g. the oracle's
    at a budget), and of every static sub-network on the same batches, in one interleaved run.

    Returns:
        (routed ms by name, static ms by ``k<i>``).
    """
    from dsctl.bench import _Cycle
    from dsctl.export import export_subnet
    from dsctl.latency import measure_latency
    from dsctl.layers.static import RoutedNet
    from dsctl.train.common import resolve_device

    dev = resolve_device(device)
    model = model.eval()
    k = model.space.num_subnets
    routed = model.to_static_routed((0, k - 1)).to(dev)
    n = max(1, min(16, images.shape[0] // batch))
    batches = [images[i * batch : (i + 1) * batch].to(dev).contiguous(memory_format=torch.channels_last)
               for i in range(n)]
    cands: dict[str, Any] = {}
    for name, r in routes.items():
        given = [r[i * batch : (i + 1) * batch].to(dev) for i in range(n)]
        net = RoutedNet(_GivenRoutes(routed.front, given), list(routed.tails), model.num_classes, 0).eval()
        cands[f"routed:{name}"] = _Cycle(net, batches)
    for i, spec in enumerate(model.space.subnets):
        cands[f"k{i}"] = _Cycle(export_subnet(model, spec).to(dev), batches)
    reports = {r.name: r.latency_ms_p50 for r in measure_latency(
        cands, batches[0], warmup=3, min_run_time_s=min_run_time_s, rounds=rounds, threads=threads)}
    return ({name: reports[f"routed:{name}"] for name in routes}, {f"k{i}": reports[f"k{i}"] for i in range(k)})
