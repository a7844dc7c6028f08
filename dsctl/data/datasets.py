"""Dataset classes: in-memory uint8 images, image folders, and deterministic synthetic data."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dsctl.errors import DataError

__all__ = ["ArrayImageDataset", "SyntheticDataset", "build_image_folders"]

_MASK64 = (1 << 64) - 1


class ArrayImageDataset(Dataset):
    """Images held as one uint8 array (N x H x W, or N x H x W x 3), turned into PIL images per item.

    Keeping the raw array instead of PIL objects makes the dataset small, fast to fork into loader
    workers, and lets the same array back both a train and an eval view.

    Args:
        images: uint8 array N x H x W (grayscale) or N x H x W x 3 (RGB).
        labels: Integer array of length N.
        transform: Callable applied to each PIL image, e.g. a torchvision pipeline.
        classes: Class names, indexed by label.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] = (),
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise DataError(f"images must be uint8 N x H x W or N x H x W x 3, got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.targets = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])  # mode "L" for 2-D, "RGB" for H x W x 3
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


class SyntheticDataset(Dataset):
    """Deterministic random images with a learnable, class-dependent signal, already normalized.

    Each class has a fixed smooth pattern (random values on a 4 x 4 grid, upsampled bilinearly); a sample
    is its class pattern plus Gaussian noise. Patterns depend only on `seed`, so train and val splits
    built with the same seed share them; the noise and labels depend on `seed` and `split`. Items are
    generated on access, so memory does not grow with the dataset size.

    Args:
        size: Number of samples.
        num_classes: Number of classes (labels are balanced: each class gets size // num_classes or one more).
        channels: Image channels.
        image_size: Height and width.
        seed: Seed for patterns, labels and noise.
        split: Distinguishes splits that share patterns, e.g. "train" or "val".
        noise: Standard deviation of the per-sample noise (patterns have unit scale).
    """

    def __init__(
        self,
        size: int,
        num_classes: int,
        channels: int,
        image_size: int,
        seed: int = 0,
        split: str = "train",
        noise: float = 1.0,
    ) -> None:
        if size <= 0 or num_classes <= 0 or channels <= 0 or image_size <= 0:
            raise DataError(
                f"synthetic data needs positive sizes, got size={size}, num_classes={num_classes}, "
                f"channels={channels}, image_size={image_size}"
            )
        self.size, self.num_classes, self.channels, self.image_size = size, num_classes, channels, image_size
        self.noise = noise
        gen = torch.Generator().manual_seed(seed)
        coarse = torch.randn(num_classes, channels, 4, 4, generator=gen)
        # num_classes x C x S x S, fixed per seed
        self.patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self._split_seed = (seed * 1_000_003 + zlib.crc32(split.encode())) & _MASK64
        split_gen = torch.Generator().manual_seed(self._split_seed)
        labels = torch.arange(size) % num_classes
        self.targets = labels[torch.randperm(size, generator=split_gen)].numpy()
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        label = int(self.targets[index])
        gen = torch.Generator().manual_seed((self._split_seed * 65_537 + index) & _MASK64)
        noise = torch.randn(self.channels, self.image_size, self.image_size, generator=gen)
        return self.patterns[label] + self.noise * noise, label


class _ImageLoader:
    """Opens one image file as PIL in ``mode`` ("RGB" or "L"); an unreadable file is a DataError naming it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, path: str) -> Image.Image:
        try:
            with Image.open(path) as img:
                return img.convert(self.mode)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def build_image_folders(
    root: str | Path,
    train_transform: Callable[[Image.Image], Any] | None,
    val_transform: Callable[[Image.Image], Any] | None,
    channels: int = 3,
) -> tuple[Dataset, Dataset, list[str]]:
    """ImageNet-style folders `root/train/<class>/*.jpg` and `root/val/<class>/*.jpg`.

    Args:
        root: Folder holding `train` and `val`.
        train_transform: Transform for training images (PIL in, RGB or grayscale by `channels`).
        val_transform: Transform for validation images.
        channels: 3 (images converted to RGB) or 1 (converted to grayscale, for 1-channel models).

    Returns:
        `(train_dataset, val_dataset, class_names)`.

    Raises:
        DataError: A folder is missing or empty, the class folders of train and val differ, or `channels`
            is not 1 or 3. Reading an unreadable image later raises DataError naming the file.
    """
    if channels not in (1, 3):
        raise DataError(f"image folders: channels={channels} is not allowed (allowed: 1, 3)")
    loader = _ImageLoader("L" if channels == 1 else "RGB")
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(root)
    splits: dict[str, Path] = {"train": root / "train", "val": root / "val"}
    for split, folder in splits.items():
        if not folder.is_dir():
            raise DataError(
                f"image folder dataset: {folder} not found; expected {root}/train/<class>/ and {root}/val/<class>/"
            )
    try:
        train = ImageFolder(str(splits["train"]), transform=train_transform, loader=loader)
        val = ImageFolder(str(splits["val"]), transform=val_transform, loader=loader)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(
            f"image folder dataset under {root}: {exc} (allowed extensions: {', '.join(IMG_EXTENSIONS)})"
        ) from None
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"image folder dataset under {root}: train and val class folders differ "
            f"(only in train: {only_train or 'none'}; only in val: {only_val or 'none'})"
        )
    return train, val, list(train.classes)
