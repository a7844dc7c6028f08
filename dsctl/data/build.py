"""Build train/val datasets and loaders from a `DataConfig`, plus the `DataInfo` a model builder needs."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset, Subset

from dsctl.config import DataConfig
from dsctl.data.cifar import load_cifar
from dsctl.data.datasets import ArrayImageDataset, SyntheticDataset, build_image_folders
from dsctl.data.idx import load_idx_dataset
from dsctl.data.transforms import build_eval_transform, build_train_transform
from dsctl.errors import DataError

__all__ = ["DATASET_STATS", "DataInfo", "build_datasets", "split_holdout"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: source -> (mean, std, native image size or None, num_classes or None)
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...], int | None, int | None]] = {
    "fashion_mnist": ((0.2860,), (0.3530,), 28, 10),
    "mnist": ((0.1307,), (0.3081,), 28, 10),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, 10),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, 100),
    "folder": (IMAGENET_MEAN, IMAGENET_STD, None, None),
}

_SYNTHETIC_SEED = 0  # synthetic data is fixed; the run seed only changes shuffling


@dataclass(frozen=True)
class DataInfo:
    """What the rest of the pipeline needs to know about a dataset.

    Attributes:
        num_classes: Number of classes.
        in_chans: Image channels (1 for MNIST / Fashion-MNIST).
        mean: Normalization mean per channel.
        std: Normalization std per channel.
        name: The data source, e.g. "fashion_mnist".
        train_size: Samples in the training set (after `train_subset`).
        val_size: Samples in the validation set (after `val_subset`).
        classes: Class names by label (may be empty).
    """

    num_classes: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    train_size: int
    val_size: int
    classes: tuple[str, ...] = ()


def check_fits(info: DataInfo, *, in_chans: int | None, num_classes: int | None, what: str) -> None:
    """DataError (one line) when data of ``info`` cannot feed a model reading ``in_chans``-channel images
    into ``num_classes`` outputs; ``None`` means unknown (not checked). ``what`` names the model's origin.

    A model with more outputs than the data has classes is allowed (a 1000-class model evaluated on a
    10-class subset, say); fewer outputs than labels is not.
    """
    problems = []
    if in_chans is not None and info.in_chans != in_chans:
        problems.append(f"{info.in_chans}-channel images where the model reads {in_chans} "
                        f"(for folder data set data.channels={in_chans})")
    if num_classes is not None and info.num_classes > num_classes:
        problems.append(f"{info.num_classes} classes where the model has {num_classes} outputs")
    if problems:
        raise DataError(f"{what}: data {info.name!r} does not fit its model: {'; '.join(problems)}")


def _take_first(ds: Dataset, n: int | None, what: str, *, clamp: bool) -> Dataset:
    """The first `n` samples of `ds` (deterministic, not stratified)."""
    size = len(ds)  # type: ignore[arg-type]
    if n is None or (clamp and n >= size):
        return ds
    if n > size:
        raise DataError(f"data.{what}={n} is larger than the dataset ({size} samples); allowed: 1..{size}")
    return Subset(ds, range(n))


def build_datasets(cfg: DataConfig, *, augment_train: bool = True) -> tuple[Dataset, Dataset, DataInfo]:
    """Build the training set (with augmentation) and the validation set (eval transform).

    ``augment_train=False`` gives the training set with the evaluation transform (for held-out
    calibration and analysis on training images).

    Sources: `fashion_mnist` and `mnist` (IDX files), `cifar10` / `cifar100` (python pickles),
    `folder` (`root/train/<class>/...`, `root/val/<class>/...`) and `synthetic` (generated tensors,
    already normalized, no augmentation). See `dsctl.data.idx.find_idx_dir` for where IDX files are
    looked for. Samples are `(C x H x W float tensor, int label)`.

    Args:
        cfg: The data section of a recipe.

    Returns:
        `(train_dataset, val_dataset, info)`.

    Raises:
        DataError: Data not found or corrupt, `root` missing for `folder`, bad augmentation settings,
            or `val_subset` larger than the validation set. A `train_subset` at least as large as the
            training set uses all of it.

    Example:
        >>> from dsctl.config import DataConfig
        >>> train, val, info = build_datasets(DataConfig(source="synthetic", input_size=32))
        >>> info.num_classes, info.in_chans, tuple(train[0][0].shape)
        (10, 3, (3, 32, 32))
    """
    source = cfg.source
    train: Dataset
    val: Dataset
    if source == "synthetic":
        common = dict(
            num_classes=cfg.synthetic_classes, channels=cfg.synthetic_channels,
            image_size=cfg.input_size, seed=_SYNTHETIC_SEED,
        )
        train = SyntheticDataset(cfg.synthetic_train_size, split="train", **common)  # type: ignore[arg-type]
        val = SyntheticDataset(cfg.synthetic_val_size, split="val", **common)  # type: ignore[arg-type]
        num_classes, in_chans = cfg.synthetic_classes, cfg.synthetic_channels
        mean, std = (0.0,) * in_chans, (1.0,) * in_chans
        classes: tuple[str, ...] = tuple(train.classes)
    else:
        if source not in DATASET_STATS:
            allowed = ", ".join([*DATASET_STATS, "synthetic"])
            raise DataError(f"unknown data source {source!r}; allowed: {allowed}")
        mean, std, native, known_classes = DATASET_STATS[source]
        if cfg.norm_from:
            mean, std = pretrained_normalization(cfg.norm_from)
            if source != "folder" and len(DATASET_STATS[source][0]) == 1:  # one-channel data: averaged
                mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        eval_tf = build_eval_transform(cfg.input_size, mean, std, native_size=native, crop_pct=cfg.augment.crop_pct)
        train_tf = (build_train_transform(cfg.augment, cfg.input_size, mean, std, native_size=native)
                    if augment_train else eval_tf)
        if source == "folder":
            if cfg.root is None:
                raise DataError("data.source='folder' needs data.root (a folder with train/ and val/ inside)")
            if cfg.channels == 1:  # grayscale: the mean and std of ImageNet's three channels, averaged
                mean, std = (sum(mean) / 3,), (sum(std) / 3,)
                eval_tf = build_eval_transform(cfg.input_size, mean, std, native_size=native,
                                               crop_pct=cfg.augment.crop_pct)
                train_tf = (build_train_transform(cfg.augment, cfg.input_size, mean, std, native_size=native)
                            if augment_train else eval_tf)
            train, val, names = build_image_folders(cfg.root, train_tf, eval_tf, cfg.channels)
            num_classes, in_chans = len(names), cfg.channels
        else:
            if source in ("fashion_mnist", "mnist"):
                (tr_x, tr_y), (va_x, va_y), names = load_idx_dataset(source, cfg.root)
            else:
                (tr_x, tr_y), (va_x, va_y), names = load_cifar(source, cfg.root)
            train = ArrayImageDataset(tr_x, tr_y, train_tf, names)
            val = ArrayImageDataset(va_x, va_y, eval_tf, names)
            assert known_classes is not None
            num_classes, in_chans = known_classes, len(mean)
        classes = tuple(names)

    train = _take_first(train, cfg.train_subset, "train_subset", clamp=True)
    val = _take_first(val, cfg.val_subset, "val_subset", clamp=False)
    info = DataInfo(
        num_classes=num_classes, in_chans=in_chans, mean=tuple(mean), std=tuple(std), name=source,
        train_size=len(train), val_size=len(val), classes=classes,  # type: ignore[arg-type]
    )
    return train, val, info


def pretrained_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of timm model ``name``'s pretrained configuration.

    Raises:
        DataError: timm has no pretrained configuration of that name.
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    if cfg is None or not getattr(cfg, "mean", None):
        raise DataError(f"data.norm_from={name!r}: timm has no pretrained configuration of that name (a timm model "
                        "name such as resnet50 or deit_small_patch16_224)")
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def split_holdout(cfg: DataConfig, fraction: float) -> tuple[Dataset, Dataset]:
    """The training set split in two: (augmented training part, held-out part with the eval transform).

    The held-out part is the last ``round(fraction * N)`` samples of the (``train_subset``-limited)
    training set, so it is the same for every seed; it never overlaps the validation/test split.

    Raises:
        DataError: ``fraction`` outside (0, 0.5] or a held-out part / remaining part that would be empty.
    """
    if not 0.0 < fraction <= 0.5:
        raise DataError(f"held-out fraction {fraction} is not allowed (allowed: 0 < fraction <= 0.5)")
    train, _, _ = build_datasets(cfg)
    plain, _, _ = build_datasets(cfg, augment_train=False)
    n = len(train)  # type: ignore[arg-type]
    h = round(fraction * n)
    if h < 1 or h >= n:
        raise DataError(f"held-out fraction {fraction} of {n} training samples leaves an empty part "
                        f"(allowed: a fraction giving 1..{n - 1} samples)")
    return Subset(train, range(n - h)), Subset(plain, range(n - h, n))
