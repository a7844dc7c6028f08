"""The data of a run, for training and evaluation alike: the training set, this rank's validation loader,
and the data facts (``build_run_data``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dsctl.config import DataConfig
from dsctl.data import DataInfo, build_datasets
from dsctl.data.resumable import epoch_loader, steps_per_epoch
from dsctl.errors import DataError
from dsctl.train.common import Dist

__all__ = ["TrainData", "build_run_data", "parse_data_spec"]


class _Shard(Sampler[int]):
    """Indices rank, rank+world, ... (no padding: metrics are summed across ranks)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


@dataclass
class TrainData:
    """The augmented training set, a sharded validation loader, and what the model needs to know."""

    train: Dataset
    val: DataLoader
    info: DataInfo
    batch_size: int
    workers: int
    dist: Dist
    input_size: int

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.train), self.batch_size, self.dist.world)  # type: ignore[arg-type]

    def loader(self, *, seed: int, epoch: int, start_batch: int = 0, dataset: Dataset | None = None) -> DataLoader:
        """The training batches of ``epoch`` for this rank, from ``start_batch`` (see dsctl.data.resumable)."""
        return epoch_loader(dataset if dataset is not None else self.train, self.batch_size, workers=self.workers,
                            seed=seed, epoch=epoch, start_batch=start_batch, rank=self.dist.rank, world=self.dist.world)


def build_run_data(cfg: DataConfig, dist: Dist = Dist()) -> TrainData:
    """The recipe's data: the training set (resumable epoch loaders) and this rank's validation loader.

    Trainers use both; evaluation, calibration, analysis and benchmarks use what they need.

    Raises:
        DataError: a batch is larger than a rank's share of the training set.
    """
    train, val, info = build_datasets(cfg)
    per_rank = len(train) // dist.world  # type: ignore[arg-type]
    if cfg.batch_size > per_rank:
        raise DataError(f"data.batch_size={cfg.batch_size} is larger than the {per_rank} training samples per process "
                        f"(allowed: 1..{per_rank})")
    val_loader = DataLoader(val, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                            sampler=_Shard(len(val), dist.rank, dist.world), num_workers=cfg.workers,  # type: ignore[arg-type]
                            generator=torch.Generator().manual_seed(0))  # keeps the global RNG untouched
    return TrainData(train, val_loader, info, cfg.batch_size, cfg.workers, dist, cfg.input_size)


def parse_data_spec(spec: str) -> dict[str, str | None]:
    """``SOURCE[:ROOT]`` (e.g. ``fashion_mnist``, ``cifar10:/data/cifar``, ``folder:/data/imagenet``) or a folder.

    A bare existing folder with ``train/`` and ``val/`` inside means ``folder:PATH``.
    """
    from pathlib import Path

    sources = ("fashion_mnist", "mnist", "cifar10", "cifar100", "folder", "synthetic")
    source, _, root = spec.partition(":")
    if source in sources:
        return {"source": source, "root": root or None}
    if Path(spec).is_dir():
        return {"source": "folder", "root": spec}
    raise DataError(f"--data {spec!r}: expected SOURCE[:ROOT] with SOURCE one of {', '.join(sources)}, "
                    "or an image folder with train/ and val/")
