"""IDX files (the MNIST / Fashion-MNIST format): a strict parser and the folder lookup for both datasets.

An IDX file is a big-endian header - two zero bytes, a type byte (0x08 = unsigned byte), the number of
dimensions - then one uint32 per dimension and the raw data. Image files have magic number 2051 (3 dims),
label files 2049 (1 dim). Files may be gzipped (`.gz`).
"""

from __future__ import annotations

import gzip
import logging
import os
import socket
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dsctl.errors import DataError

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_SYSTEM_DIRS", "IDX_FILES", "MNIST_CLASSES", "find_idx_dir",
    "load_idx_dataset", "load_idx_split", "read_idx",
]

log = logging.getLogger(__name__)

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

#: Base file names of the four IDX files; each may also exist with a `.gz` suffix.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Where the Debian package `dataset-fashion-mnist` installs the gzipped IDX files.
FASHION_MNIST_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))

# Per dataset: sub-folders of `root` to try, and the torchvision class used for the download fallback.
_LAYOUTS: dict[str, tuple[tuple[str, ...], str]] = {
    "fashion_mnist": (("", "fashion-mnist", "FashionMNIST/raw"), "FashionMNIST"),
    "mnist": (("", "mnist", "MNIST/raw"), "MNIST"),
}

#: Set this environment variable to 1 to forbid the torchvision download fallback (tests, offline CI).
NO_DOWNLOAD_ENV = "DSCTL_NO_DOWNLOAD"
_DOWNLOAD_TIMEOUT_S = 30.0


def cache_dir() -> Path:
    """Folder used for torchvision downloads: `~/.cache/dsctl`."""
    return Path.home() / ".cache" / "dsctl"


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if path.suffix == ".gz" or head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read one unsigned-byte IDX file into a uint8 array.

    Args:
        path: The file, plain or gzipped.
        magic: Expected magic number: 2051 for images (N x rows x cols), 2049 for labels (N).

    Returns:
        A uint8 array with the shape given by the header.

    Raises:
        DataError: The file cannot be read, has another magic number, or its size does not match its header.
    """
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise DataError(f"corrupt IDX file {path}: only {len(buf)} bytes")
    found = int.from_bytes(buf[:4], "big")
    if found != magic:
        kinds = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}
        raise DataError(
            f"corrupt IDX file {path}: magic number {found}, expected {magic} ({kinds.get(magic, '?')}); "
            f"allowed: {IMAGES_MAGIC} (images), {LABELS_MAGIC} (labels)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"corrupt IDX file {path}: header truncated ({len(buf)} bytes)")
    shape = tuple(int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(buf) != expected:
        raise DataError(
            f"corrupt IDX file {path}: header says shape {shape} ({expected} bytes) but the file has "
            f"{len(buf)} bytes"
        )
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(shape)


def _file_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_all_files(folder: Path) -> bool:
    return all(_file_in(folder, n) is not None for pair in IDX_FILES.values() for n in pair)


def load_idx_split(folder: str | Path, split: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Load one split from a folder holding the four IDX files.

    Args:
        folder: Folder with `train-images-idx3-ubyte[.gz]` and friends.
        split: "train" or "val" (the `t10k` files).
        num_classes: Labels must be below this.

    Returns:
        `(images, labels)`: uint8 array N x H x W and int64 array N.

    Raises:
        DataError: A file is missing or corrupt, image and label counts differ, or a label is out of range.
    """
    if split not in IDX_FILES:
        raise DataError(f"unknown split {split!r}; allowed: {', '.join(IDX_FILES)}")
    folder = Path(folder)
    img_name, lbl_name = IDX_FILES[split]
    img_path, lbl_path = _file_in(folder, img_name), _file_in(folder, lbl_name)
    if img_path is None or lbl_path is None:
        missing = img_name if img_path is None else lbl_name
        raise DataError(f"IDX file {missing}[.gz] not found in {folder}")
    images = read_idx(img_path, IMAGES_MAGIC)
    labels = read_idx(lbl_path, LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(f"{lbl_path}: label {int(labels.max())} out of range; allowed: 0..{num_classes - 1}")
    return images, labels


def _try_download(name: str) -> Path | None:
    """Fetch the dataset with torchvision into the cache; None if that fails or is disabled."""
    if os.environ.get(NO_DOWNLOAD_ENV, "") not in ("", "0"):
        return None
    import torchvision.datasets

    tv_class = getattr(torchvision.datasets, _LAYOUTS[name][1])
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        log.info("downloading %s with torchvision into %s", name, cache_dir())
        tv_class(root=str(cache_dir()), train=True, download=True)
        tv_class(root=str(cache_dir()), train=False, download=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError and timeouts are OSErrors
        log.warning("download of %s failed: %s", name, exc)
        return None
    finally:
        socket.setdefaulttimeout(previous)
    folder = cache_dir() / _LAYOUTS[name][1] / "raw"
    return folder if _has_all_files(folder) else None


def find_idx_dir(name: str, root: str | Path | None, *, download: bool = True) -> Path:
    """Find the folder holding the four IDX files of `name`.

    An explicit `root` is the only place looked (the files directly in it, or in its `fashion-mnist` /
    `FashionMNIST/raw` sub-folder; for MNIST `mnist` / `MNIST/raw`): a root without them is an error,
    never replaced by another copy. Without `root`: for Fashion-MNIST the Debian package
    `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`); a previous download in
    `~/.cache/dsctl`; finally a torchvision download there (skipped if `download` is False or the
    environment variable `DSCTL_NO_DOWNLOAD=1` is set).

    Args:
        name: "fashion_mnist" or "mnist".
        root: User-given data folder, or None.
        download: Allow the torchvision download fallback.

    Returns:
        The folder.

    Raises:
        DataError: `name` is unknown, or the files were found nowhere (the message lists where it looked).
    """
    if name not in _LAYOUTS:
        raise DataError(f"unknown IDX dataset {name!r}; allowed: {', '.join(_LAYOUTS)}")
    subdirs, tv_name = _LAYOUTS[name]
    if root is not None:  # an explicit root is never silently replaced by another copy
        candidates = [Path(root) / sub if sub else Path(root) for sub in subdirs]
        for folder in candidates:
            if _has_all_files(folder):
                return folder
        looked = ", ".join(str(c) for c in candidates)
        raise DataError(f"data.root={root}: no {name} IDX files there (looked in {looked}; expected "
                        f"{', '.join(n for pair in IDX_FILES.values() for n in pair)}, plain or .gz); "
                        + ("drop data.root to use the system copy (apt-get install dataset-fashion-mnist)"
                           if name == "fashion_mnist" else "drop data.root to use a downloaded copy"))
    candidates = list(FASHION_MNIST_SYSTEM_DIRS) if name == "fashion_mnist" else []
    candidates.append(cache_dir() / tv_name / "raw")
    for folder in candidates:
        if _has_all_files(folder):
            return folder
    if download:
        folder = _try_download(name)
        if folder is not None:
            return folder
    looked = "\n  ".join(str(c) for c in candidates)
    hint = "install the Debian package (apt-get install dataset-fashion-mnist), or " if name == "fashion_mnist" else ""
    raise DataError(
        f"{name} IDX files ({', '.join(n for pair in IDX_FILES.values() for n in pair)}, plain or .gz) "
        f"not found; looked in:\n  {looked}\n"
        f"and the torchvision download {'failed' if download else 'was disabled'}. To fix: {hint}"
        f"put the files in a folder and pass it with --data or data.root=FOLDER."
    )


def load_idx_dataset(
    name: str, root: str | Path | None, *, download: bool = True
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], Sequence[str]]:
    """Find and load both splits of an IDX dataset.

    Args:
        name: "fashion_mnist" or "mnist".
        root: User-given data folder, or None.
        download: Allow the torchvision download fallback.

    Returns:
        `((train_images, train_labels), (val_images, val_labels), class_names)`.

    Raises:
        DataError: The files are missing or corrupt.
    """
    folder = find_idx_dir(name, root, download=download)
    classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else MNIST_CLASSES
    return load_idx_split(folder, "train"), load_idx_split(folder, "val"), classes
