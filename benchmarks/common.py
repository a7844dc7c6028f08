"""What every benchmark section shares: run settings, the CSV row, and ratio helpers.

Every figure is a ratio of two medians measured in one interleaved run (``dsctl.latency``); the CSV also
keeps both medians, so absolute times (and P5's tool seconds) can be read off the same row.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from dsctl.latency import LatencyReport

__all__ = ["Settings", "FigureRow", "Env", "figure", "median_ms", "median_s"]


@dataclass(frozen=True)
class Settings:
    """Sizes and repeats of one runner invocation (``--quick`` picks small ones)."""

    device: torch.device
    dtype: torch.dtype
    threads: int
    quick: bool
    memory_format: torch.memory_format
    models: tuple[str, ...]
    min_run_time_s: float
    rounds: int
    warmup: int
    # P1/P2 at batch > 1: at least this many interleaved rounds. A batch-32 forward takes longer than a
    # round's share of ``min_run_time_s``, so each round gives one sample per candidate: with 7 rounds the
    # identical largest computation read 0.91-1.22 sliced / static; with 25 rounds the A/A row reads 0.97-1.01.
    large_batch_rounds: int = 3
    batches: tuple[int, ...] = (1, 32)
    # input size per batch size; None: the model's native size. CPU reduces it at batch 32 (stated in rows)
    batch_input_size: dict[int, int | None] = field(default_factory=dict)
    dynamic_batch: int = 64
    train_batch: int = 32
    train_input_size: int | None = None
    tool_model: str = "ds_resnet50"
    tool_repeats: int = 3

    def input_size(self, model, batch: int) -> int:
        """The resolution ``model`` runs at for ``batch``: the reduced one if set and the model takes it,
        else its native size (a DS-ViT's position embedding fixes its size: always native)."""
        return self._size(model, self.batch_input_size.get(batch))

    def train_size(self, model) -> int:
        return self._size(model, self.train_input_size)

    @staticmethod
    def _size(model, reduced: int | None) -> int:
        from dsctl.errors import DsctlError

        native = model.default_input_size
        if reduced is None or reduced >= native:
            return native
        try:
            return model.check_input_size(reduced)
        except DsctlError:
            return native

    def images(self, batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
        """Random inputs on the device, in the run's dtype and memory format (the layout every op keeps)."""
        x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
        return x.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)


@dataclass(frozen=True)
class Env:
    device: str
    threads: int
    dtype: str
    memory_format: str
    allocator: str
    torch_version: str
    commit: str
    quick: bool


@dataclass(frozen=True)
class FigureRow:
    """One figure: ``value = numerator / denominator`` (medians, same interleaved run), with provenance.

    ``parts_unit`` is the unit of the numerator and denominator values (ms, MB or s). For P2 ``value`` is
    the latency ratio divided by the MACs ratio (``macs_ratio``).
    """

    section: str
    figure: str
    model: str
    subnet: str
    batch: int
    input_size: int
    value: float
    target: str
    meets: str
    numerator: str
    numerator_value: float
    denominator: str
    denominator_value: float
    parts_unit: str
    macs_ratio: float | None
    samples: int
    note: str
    device: str
    threads: int
    dtype: str
    memory_format: str
    allocator: str
    torch_version: str
    commit: str
    quick: bool


def _meets(value: float, target: str) -> str:
    if not target:
        return ""
    op, bound = target[:2], float(target[2:])
    ok = value <= bound if op == "<=" else value >= bound
    return "yes" if ok else "no"


def figure(env: Env, section: str, name: str, model: str, subnet: str, batch: int, input_size: int, value: float, *,
           numerator: tuple[str, float], denominator: tuple[str, float], parts_unit: str = "ms", target: str = "",
           macs_ratio: float | None = None, samples: int = 0, note: str = "") -> FigureRow:
    """A row; ``numerator`` and ``denominator`` are (label, median in ``parts_unit``)."""
    return FigureRow(section, name, model, subnet, batch, input_size, round(value, 4), target,
                     _meets(value, target), numerator[0], round(numerator[1], 4), denominator[0],
                     round(denominator[1], 4), parts_unit, None if macs_ratio is None else round(macs_ratio, 4),
                     samples, note,
                     env.device, env.threads, env.dtype, env.memory_format, env.allocator, env.torch_version,
                     env.commit, env.quick)


def median_ms(reports: list[LatencyReport], name: str) -> float:
    return next(r.latency_ms_p50 for r in reports if r.name == name)


def median_s(times: list[float]) -> float:
    return statistics.median(times)
