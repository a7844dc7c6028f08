"""Training loaders whose order and augmentation are a pure function of (seed, epoch, position).

A run interrupted mid-epoch resumes with exactly the batches and augmentations it would have seen:
the sampler regenerates the epoch's permutation from ``(seed, epoch)`` and starts at the saved batch,
and each sample's augmentation RNGs are seeded from ``(seed, epoch, index)``, independent of worker
count or scheduling. Sharding across ``world`` ranks splits the same permutation (every rank the same
number of batches).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochSampler", "SeededAugment", "TwoViews", "epoch_loader", "steps_per_epoch"]

_MASK = (1 << 63) - 1


def _mix(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & _MASK)) * 1099511628211) & _MASK
    return h


def steps_per_epoch(num_samples: int, batch_size: int, world: int = 1) -> int:
    return (num_samples // world) // batch_size


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` keys for one rank's share of one epoch, from batch ``start_batch`` on."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 start_batch: int = 0) -> None:
        self.num_samples, self.batch_size, self.seed, self.epoch = num_samples, batch_size, seed, epoch
        self.rank, self.world, self.start_batch = rank, world, start_batch
        self.steps = steps_per_epoch(num_samples, batch_size, world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        perm = torch.randperm(self.num_samples, generator=gen)
        per_rank = self.steps * self.batch_size
        mine = perm[self.rank : self.world * per_rank : self.world]
        for i in mine[self.start_batch * self.batch_size :].tolist():
            yield self.epoch, i

    def __len__(self) -> int:
        return (self.steps - self.start_batch) * self.batch_size


class SeededAugment(Dataset):
    """Wraps a dataset so ``ds[(epoch, i)]`` seeds python, numpy and torch RNGs from (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        s = _mix(self.seed, epoch, index)
        # Restore the caller's RNG streams afterwards: with workers=0 this runs in the training process.
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            # the CPU generator only (what transforms draw from): torch.manual_seed also queues seeds for
            # CUDA, XPU and MTIA, recording a stack trace for each, ~1 ms per call (half the loading time)
            torch.default_generator.manual_seed(s)
            item = self.dataset[index]
        random.setstate(py_state)
        np.random.set_state(np_state)
        return item


class TwoViews(Dataset):
    """Two independently augmented views of each sample: ``((view_a, view_b), label)`` (multi-view training)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        a, label = self.dataset[index]
        b, _ = self.dataset[index]
        return (a, b), label


def epoch_loader(dataset: Dataset, batch_size: int, *, workers: int, seed: int, epoch: int, start_batch: int = 0,
                 rank: int = 0, world: int = 1, pin_memory: bool = False) -> DataLoader:
    """The training loader of one epoch (full batches only), starting at ``start_batch``."""
    sampler = EpochSampler(len(dataset), batch_size, seed=seed, epoch=epoch, rank=rank, world=world,  # type: ignore[arg-type]
                           start_batch=start_batch)
    # An own generator: creating the loader must not draw from the global RNG (Gumbel noise, dropout),
    # or a resumed run would see a shifted random stream.
    gen = torch.Generator().manual_seed(_mix(seed, epoch, 0x5EED))
    return DataLoader(SeededAugment(dataset, seed), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=True, pin_memory=pin_memory, persistent_workers=False, generator=gen)
