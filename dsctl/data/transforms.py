"""Train and eval transforms for PIL images, built with timm (or torchvision for the CIFAR-style pipeline).

Grayscale images stay single-channel: timm's RandAugment/AutoAugment/AugMix and ColorJitter accept PIL
"L" images, and Normalize uses the dataset's one-channel mean/std.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image
from torchvision import transforms as T

from dsctl.config import AugmentConfig
from dsctl.errors import DataError

__all__ = ["build_eval_transform", "build_train_transform"]

Transform = Callable[[Image.Image], Any]


def build_train_transform(
    aug: AugmentConfig,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    native_size: int | None = None,
) -> Transform:
    """Training transform: timm's RandomResizedCrop pipeline, or pad-and-crop when `aug.simple` is set.

    Args:
        aug: Augmentation settings.
        input_size: Output height and width.
        mean: Per-channel normalization mean (length = channels).
        std: Per-channel normalization std.
        native_size: Size of the stored images if they are all the same (28 for MNIST, 32 for CIFAR);
            the simple pipeline resizes to `input_size` first when it differs.

    Returns:
        A callable taking a PIL image and returning a normalized C x H x W tensor.

    Raises:
        DataError: timm rejects the augmentation settings (e.g. an unknown `auto_augment` string).
    """
    if aug.simple:
        steps: list[Any] = []
        if native_size is not None and native_size != input_size:
            steps.append(T.Resize((input_size, input_size), interpolation=T.InterpolationMode.BILINEAR))
        steps.append(T.RandomCrop(input_size, padding=input_size // 8))
        if aug.hflip > 0:
            steps.append(T.RandomHorizontalFlip(aug.hflip))
        steps += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
        return T.Compose(steps)

    from timm.data import create_transform

    try:
        return create_transform(
            input_size,
            is_training=True,
            scale=tuple(aug.scale),
            ratio=tuple(aug.ratio),
            hflip=aug.hflip,
            auto_augment=aug.auto_augment,
            re_prob=aug.re_prob,
            re_mode=aug.re_mode,
            color_jitter=aug.color_jitter,
            mean=tuple(mean),
            std=tuple(std),
            crop_pct=aug.crop_pct,
            interpolation=aug.interpolation,
        )
    except (AssertionError, KeyError, ValueError) as exc:
        raise DataError(
            f"invalid augmentation settings (auto_augment={aug.auto_augment!r}, "
            f"color_jitter={aug.color_jitter!r}): {exc or type(exc).__name__}; auto_augment must be a timm "
            f"policy string such as 'rand-m9-mstd0.5', 'augmix-m5-w4-d2', 'v0' or 'original'"
        ) from None


def build_eval_transform(
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    native_size: int | None = None,
    crop_pct: float | None = None,
) -> Transform:
    """Eval transform.

    Small fixed-size images (`native_size` given) are only resized when needed, never center-cropped;
    other images use timm's resize + center crop with `crop_pct`.

    Args:
        input_size: Output height and width.
        mean: Per-channel normalization mean.
        std: Per-channel normalization std.
        native_size: Size of the stored images if fixed, else None.
        crop_pct: Center-crop fraction for variable-size images (None: timm's default 0.875).

    Returns:
        A callable taking a PIL image and returning a normalized C x H x W tensor.
    """
    if native_size is not None:
        steps: list[Any] = []
        if native_size != input_size:
            steps.append(T.Resize((input_size, input_size), interpolation=T.InterpolationMode.BILINEAR))
        steps += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
        return T.Compose(steps)

    from timm.data import create_transform

    return create_transform(
        input_size,
        is_training=False,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=crop_pct,
        interpolation="bilinear",
    )
