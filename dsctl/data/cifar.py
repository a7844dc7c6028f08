"""CIFAR-10 / CIFAR-100 in the "python version" pickle layout, read with a restricted unpickler.

Layouts (the folders the official tarballs extract to):
    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/     train, test, meta
Each batch is a pickled dict with `b"data"` (uint8, N x 3072, channel-major 3 x 32 x 32) and `b"labels"`
(CIFAR-10) or `b"fine_labels"` (CIFAR-100).

Pickle files can run arbitrary code when loaded, so `load_pickle` refuses every global except the few
needed to rebuild numpy arrays.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsctl.data.idx import cache_dir
from dsctl.errors import DataError

__all__ = ["CIFAR_LAYOUTS", "find_cifar_dir", "load_cifar", "load_pickle"]

# (module, name) -> (module to import today, name); numpy 2 moved numpy.core to numpy._core.
_ALLOWED_GLOBALS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("numpy.core.multiarray", "_reconstruct"): (("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): (("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): (("numpy._core.multiarray", "numpy.core.multiarray"), "scalar"),
    ("numpy._core.multiarray", "scalar"): (("numpy._core.multiarray", "numpy.core.multiarray"), "scalar"),
    ("numpy.core.numeric", "_frombuffer"): (("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): (("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer"),
    ("numpy", "ndarray"): (("numpy",), "ndarray"),
    ("numpy", "dtype"): (("numpy",), "dtype"),
    ("_codecs", "encode"): (("_codecs",), "encode"),  # protocol-2 pickles written by Python 3 store bytes this way
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds builtin containers and numpy arrays."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        entry = _ALLOWED_GLOBALS.get((module, name))
        if entry is None:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise DataError(
                f"refusing to load {self._source}: it references {module}.{name}, which a CIFAR data file "
                f"never needs (allowed globals: {allowed})"
            )
        modules, attr = entry
        for mod_name in modules:
            try:
                return getattr(importlib.import_module(mod_name), attr)
            except (ImportError, AttributeError):
                continue
        raise DataError(f"{self._source}: cannot resolve {module}.{name} with this numpy version")


def load_pickle(path: str | Path) -> Any:
    """Unpickle a data file, allowing only builtin containers and numpy arrays.

    Args:
        path: The pickle file.

    Returns:
        The unpickled object (byte-string keys stay bytes, as with `encoding="bytes"`).

    Raises:
        DataError: The file cannot be read, is not a valid pickle, or references any other global.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise DataError(f"cannot read pickle file {path}: {type(exc).__name__}: {exc}") from None


#: name -> (extracted folder name, train files, test file, meta file, label key, label-names key, classes)
CIFAR_LAYOUTS: dict[str, tuple[str, tuple[str, ...], str, str, bytes, bytes, int]] = {
    "cifar10": (
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
        b"labels", b"label_names", 10,
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names", 100),
}


def _get(d: dict, key: bytes) -> Any:
    """Look a key up as bytes (Python 2 pickles) or str (Python 3 pickles)."""
    if key in d:
        return d[key]
    return d.get(key.decode())


def find_cifar_dir(name: str, root: str | Path | None) -> Path:
    """Find the extracted CIFAR folder: `root` itself, `root/<extracted name>`, or `~/.cache/dsctl/<name>`.

    Args:
        name: "cifar10" or "cifar100".
        root: User-given data folder, or None.

    Returns:
        The folder holding the batch files.

    Raises:
        DataError: `name` is unknown or no folder holds the files (the message lists where it looked).
    """
    if name not in CIFAR_LAYOUTS:
        raise DataError(f"unknown CIFAR dataset {name!r}; allowed: {', '.join(CIFAR_LAYOUTS)}")
    folder_name, train_files, test_file = CIFAR_LAYOUTS[name][:3]
    candidates = [Path(root), Path(root) / folder_name] if root is not None else []
    candidates.append(cache_dir() / folder_name)
    for folder in candidates:
        if all((folder / f).is_file() for f in (*train_files, test_file)):
            return folder
    looked = "\n  ".join(str(c) for c in candidates)
    raise DataError(
        f"{name} files ({', '.join((*train_files, test_file))}) not found; looked in:\n  {looked}\n"
        f"To fix: download the CIFAR 'python version' tarball from https://www.cs.toronto.edu/~kriz/cifar.html, "
        f"extract it, and pass the folder with --data or data.root=FOLDER."
    )


def _load_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict with data and labels, got {type(batch).__name__}")
    data, labels = _get(batch, b"data"), _get(batch, label_key)
    if data is None or labels is None:
        raise DataError(
            f"{path}: missing key {'data' if data is None else label_key.decode()!r}; "
            f"keys present: {sorted(str(k) for k in batch)}"
        )
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data must be uint8 of shape N x 3072, got {data.dtype} {data.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must be in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    # N x 3072 (channel-major) -> N x 32 x 32 x 3, the layout PIL expects.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def load_cifar(
    name: str, root: str | Path | None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], Sequence[str]]:
    """Load CIFAR-10 or CIFAR-100 into memory.

    Args:
        name: "cifar10" or "cifar100".
        root: The extracted folder or its parent (None: only `~/.cache/dsctl` is searched).

    Returns:
        `((train_images, train_labels), (val_images, val_labels), class_names)`; images are uint8
        N x 32 x 32 x 3, labels int64. Class names are empty if the meta file is absent.

    Raises:
        DataError: Files missing, corrupt, or containing anything but plain data.
    """
    folder = find_cifar_dir(name, root)
    _, train_files, test_file, meta_file, label_key, names_key, num_classes = CIFAR_LAYOUTS[name]
    parts = [_load_batch(folder / f, label_key, num_classes) for f in train_files]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    val = _load_batch(folder / test_file, label_key, num_classes)
    classes: list[str] = []
    if (folder / meta_file).is_file():
        meta = load_pickle(folder / meta_file)
        names = _get(meta, names_key) if isinstance(meta, dict) else None
        if names is not None:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return train, val, classes
