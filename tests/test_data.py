"""Tests for datasets and loaders (dsctl.data), on tiny files written in the real on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsctl.config import AugmentConfig, DataConfig
from dsctl.data import (
    FASHION_MNIST_SYSTEM_DIRS,
    DataInfo,
    build_datasets,
    load_cifar,
    load_idx_dataset,
    load_pickle,
    read_idx,
)
from dsctl.errors import DataError
from dsctl.train.data import build_run_data


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No torchvision downloads, and an empty ~/.cache/dsctl."""
    monkeypatch.setenv("DSCTL_NO_DOWNLOAD", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _make_idx_dataset(folder: Path, n_train: int = 20, n_val: int = 10, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, 2049)


def _cifar_batch(n: int, num_classes: int, label_key: bytes, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(i % num_classes) for i in range(n)],
    }


def _dump(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _make_cifar10(folder: Path, per_batch: int = 4, n_test: int = 6) -> None:
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _dump(folder / f"data_batch_{i}", _cifar_batch(per_batch, 10, b"labels", i))
    _dump(folder / "test_batch", _cifar_batch(n_test, 10, b"labels", 0))
    _dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072})


# ---------------------------------------------------------------- IDX


def test_idx_gz_loads_from_root(tmp_path: Path) -> None:
    _make_idx_dataset(tmp_path / "data", gz=True)
    cfg = DataConfig(source="fashion_mnist", root=str(tmp_path / "data"), input_size=28, workers=0)
    train, val, info = build_datasets(cfg)
    assert (info.train_size, info.val_size, info.in_chans, info.num_classes) == (20, 10, 1, 10)
    assert info.mean == (0.2860,) and info.classes[0] == "T-shirt/top"
    x, y = val[3]
    assert tuple(x.shape) == (1, 28, 28) and y == 3
    assert tuple(train[0][0].shape) == (1, 28, 28)


def test_idx_plain_files_in_subfolder(tmp_path: Path) -> None:
    _make_idx_dataset(tmp_path / "fashion-mnist", gz=False)
    (tr_x, tr_y), (va_x, va_y), _ = load_idx_dataset("fashion_mnist", tmp_path, download=False)
    assert tr_x.shape == (20, 28, 28) and tr_x.dtype == np.uint8
    assert tr_y.tolist() == [i % 10 for i in range(20)]
    assert va_x.shape == (10, 28, 28)


def test_mnist_in_torchvision_layout(tmp_path: Path) -> None:
    _make_idx_dataset(tmp_path / "MNIST" / "raw")
    _, _, info = build_datasets(DataConfig(source="mnist", root=str(tmp_path), input_size=28, workers=0))
    assert (info.name, info.train_size, info.mean) == ("mnist", 20, (0.1307,))


def test_idx_bad_magic_names_file(tmp_path: Path) -> None:
    _make_idx_dataset(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    _write_idx(bad, np.zeros((20, 28, 28)), 2049)  # label magic on an image file
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*magic number 2049, expected 2051"):
        build_datasets(DataConfig(source="fashion_mnist", root=str(tmp_path), input_size=28, workers=0))


def test_idx_truncated_and_bad_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    _write_idx(path, np.zeros((4, 28, 28)), 2051)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="x-idx3-ubyte.*header says shape"):
        read_idx(path, 2051)
    gz = tmp_path / "y-idx1-ubyte.gz"
    gz.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="y-idx1-ubyte.gz"):
        read_idx(gz, 2049)


def test_idx_missing_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dsctl.data.idx as idx

    monkeypatch.setattr(idx, "FASHION_MNIST_SYSTEM_DIRS", ())
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(source="fashion_mnist", root=str(tmp_path / "empty"), input_size=28))
    msg = str(info.value)
    assert str(tmp_path / "empty") in msg and "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg


def test_grayscale_with_randaugment_and_jitter_stays_one_channel(tmp_path: Path) -> None:
    _make_idx_dataset(tmp_path)
    aug = AugmentConfig(auto_augment="rand-m9-mstd0.5", color_jitter=0.4, re_prob=0.5, scale=(0.5, 1.0))
    train, _, _ = build_datasets(DataConfig(source="fashion_mnist", root=str(tmp_path), input_size=24, augment=aug))
    torch.manual_seed(0)
    for i in range(len(train)):
        assert tuple(train[i][0].shape) == (1, 24, 24)


def test_bad_auto_augment_string(tmp_path: Path) -> None:
    _make_idx_dataset(tmp_path)
    cfg = DataConfig(source="fashion_mnist", root=str(tmp_path), augment=AugmentConfig(auto_augment="bogus-m9"))
    with pytest.raises(DataError, match="bogus-m9"):
        build_datasets(cfg)


def test_simple_augment_resizes_and_eval_resizes(tmp_path: Path) -> None:
    _make_idx_dataset(tmp_path)
    cfg = DataConfig(source="mnist", root=str(tmp_path), input_size=32, augment=AugmentConfig(simple=True))
    train, val, _ = build_datasets(cfg)
    assert tuple(train[0][0].shape) == (1, 32, 32)
    assert tuple(val[0][0].shape) == (1, 32, 32)


def test_debian_fashion_mnist_package() -> None:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    found = any(all((d / f"{n}.gz").is_file() or (d / n).is_file() for n in names) for d in FASHION_MNIST_SYSTEM_DIRS)
    if not found:
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    (tr_x, tr_y), (va_x, va_y), classes = load_idx_dataset("fashion_mnist", None, download=False)
    assert tr_x.shape == (60000, 28, 28) and va_x.shape == (10000, 28, 28)
    assert len(tr_y) == 60000 and len(va_y) == 10000 and len(classes) == 10
    assert sorted(np.unique(tr_y).tolist()) == list(range(10))


# ---------------------------------------------------------------- CIFAR


def test_cifar10_from_parent_folder(tmp_path: Path) -> None:
    _make_cifar10(tmp_path / "cifar-10-batches-py")
    cfg = DataConfig(source="cifar10", root=str(tmp_path), input_size=32, workers=0)
    train, val, info = build_datasets(cfg)
    assert (info.train_size, info.val_size, info.in_chans, info.num_classes) == (20, 6, 3, 10)
    assert info.classes[:2] == ("c0", "c1")
    x, y = val[2]
    assert tuple(x.shape) == (3, 32, 32) and y == 2
    assert tuple(train[0][0].shape) == (3, 32, 32)


def test_cifar10_pixel_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _make_cifar10(folder)
    (tr_x, tr_y), _, _ = load_cifar("cifar10", folder)
    raw = load_pickle(folder / "data_batch_1")[b"data"]
    # channel-major row: first 1024 bytes are the red plane
    assert tr_x.shape == (20, 32, 32, 3)
    assert tr_x[0, 0, 1, 0] == raw[0, 1] and tr_x[0, 0, 0, 1] == raw[0, 1024] and tr_x[0, 1, 0, 2] == raw[0, 2048 + 32]
    assert tr_y[:5].tolist() == [0, 1, 2, 3, 0]


def test_cifar100_from_extracted_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _dump(folder / "train", _cifar_batch(12, 100, b"fine_labels", 1) | {b"coarse_labels": [0] * 12})
    _dump(folder / "test", _cifar_batch(5, 100, b"fine_labels", 2) | {b"coarse_labels": [0] * 5})
    _dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    train, val, info = build_datasets(DataConfig(source="cifar100", root=str(folder), input_size=32))
    assert (info.train_size, info.val_size, info.num_classes, info.classes[99]) == (12, 5, 100, "f99")
    assert val[4][1] == 4


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_forbidden_global_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _make_cifar10(folder)
    marker = tmp_path / "pwned"
    _dump(folder / "data_batch_3", {b"data": _Evil(marker), b"labels": []})
    with pytest.raises(DataError, match=r"refusing to load .*data_batch_3.*system"):
        load_cifar("cifar10", folder)
    assert not marker.exists()


def test_cifar_missing_lists_places(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_datasets(DataConfig(source="cifar10", root=str(tmp_path)))


def test_cifar_bad_shape(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    _make_cifar10(folder)
    _dump(folder / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match="test_batch.*N x 3072"):
        load_cifar("cifar10", folder)


# ---------------------------------------------------------------- image folders


def _make_folder(root: Path, train_classes: list[str], val_classes: list[str]) -> None:
    rng = np.random.default_rng(0)
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_image_folder(tmp_path: Path) -> None:
    _make_folder(tmp_path, ["cat", "dog"], ["cat", "dog"])
    train, val, info = build_datasets(DataConfig(source="folder", root=str(tmp_path), input_size=16))
    assert (info.num_classes, info.in_chans, info.train_size, info.val_size) == (2, 3, 6, 6)
    assert info.classes == ("cat", "dog")
    assert tuple(train[0][0].shape) == (3, 16, 16) and tuple(val[5][0].shape) == (3, 16, 16)
    assert val[5][1] == 1


def test_image_folder_grayscale_for_one_channel_models(tmp_path: Path) -> None:
    _make_folder(tmp_path, ["cat", "dog"], ["cat", "dog"])
    train, val, info = build_datasets(DataConfig(source="folder", root=str(tmp_path), input_size=16, channels=1))
    assert info.in_chans == 1 and len(info.mean) == 1
    assert tuple(train[0][0].shape) == (1, 16, 16) and tuple(val[5][0].shape) == (1, 16, 16)


def test_image_folder_corrupt_image_names_the_file(tmp_path: Path) -> None:
    _make_folder(tmp_path, ["cat", "dog"], ["cat", "dog"])
    bad = tmp_path / "val" / "dog" / "2.png"
    bad.write_bytes(b"not a png at all")
    _, val, _ = build_datasets(DataConfig(source="folder", root=str(tmp_path), input_size=16))
    with pytest.raises(DataError, match=r"2\.png: not a readable image"):
        val[5]


def test_explicit_idx_root_is_never_replaced_by_the_system_copy(tmp_path: Path) -> None:
    """An empty root errors even where /usr/share/datasets/fashion-mnist exists (no silent fallback)."""
    with pytest.raises(DataError, match=r"data.root=.*no fashion_mnist IDX files there"):
        build_datasets(DataConfig(source="fashion_mnist", root=str(tmp_path), input_size=28))


def test_image_folder_class_mismatch(tmp_path: Path) -> None:
    _make_folder(tmp_path, ["cat", "dog"], ["bird", "cat"])
    with pytest.raises(DataError, match=r"only in train: \['dog'\]; only in val: \['bird'\]"):
        build_datasets(DataConfig(source="folder", root=str(tmp_path), input_size=16))


def test_image_folder_needs_root_and_val(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.root"):
        build_datasets(DataConfig(source="folder"))
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="val"):
        build_datasets(DataConfig(source="folder", root=str(tmp_path)))


# ---------------------------------------------------------------- synthetic and loaders


def test_synthetic_shapes_and_determinism() -> None:
    cfg = DataConfig(source="synthetic", input_size=12, synthetic_classes=4, synthetic_channels=2,
                     synthetic_train_size=40, synthetic_val_size=8)
    train, val, info = build_datasets(cfg)
    classes = ("class_0", "class_1", "class_2", "class_3")
    assert info == DataInfo(4, 2, (0.0, 0.0), (1.0, 1.0), "synthetic", 40, 8, classes)
    x, y = train[5]
    assert tuple(x.shape) == (2, 12, 12) and 0 <= y < 4
    train2, _, _ = build_datasets(cfg)
    assert torch.equal(train2[5][0], x) and train2[5][1] == y
    assert not torch.equal(val[0][0], train[0][0])


def test_synthetic_signal_is_learnable() -> None:
    cfg = DataConfig(source="synthetic", input_size=16, synthetic_train_size=200, synthetic_val_size=50)
    train, val, _ = build_datasets(cfg)
    xs = torch.stack([train[i][0] for i in range(len(train))]).flatten(1)
    ys = torch.tensor([train[i][1] for i in range(len(train))])
    centroids = torch.stack([xs[ys == c].mean(0) for c in range(10)])
    vx = torch.stack([val[i][0] for i in range(len(val))]).flatten(1)
    vy = torch.tensor([val[i][1] for i in range(len(val))])
    acc = (torch.cdist(vx, centroids).argmin(1) == vy).float().mean().item()
    assert acc > 0.8  # nearest-centroid classifier, chance is 0.1


def test_train_data_batches_and_reproducible_shuffle() -> None:
    """The trainers' loader: full batches only, a shuffle fixed by (seed, epoch), eval batches in order."""
    cfg = DataConfig(source="synthetic", input_size=8, batch_size=16, eval_batch_size=32, workers=0,
                     synthetic_train_size=70, synthetic_val_size=40)
    data = build_run_data(cfg)
    train = data.loader(seed=1, epoch=0)
    assert len(train) == data.steps_per_epoch() == 70 // 16  # drop_last
    images, labels = next(iter(train))
    assert tuple(images.shape) == (16, 3, 8, 8) and tuple(labels.shape) == (16,)
    assert [tuple(b[0].shape) for b in data.val] == [(32, 3, 8, 8), (8, 3, 8, 8)]
    assert torch.equal(next(iter(build_run_data(cfg).loader(seed=1, epoch=0)))[1], labels)
    assert not torch.equal(next(iter(data.loader(seed=2, epoch=0)))[1], labels)
    assert not torch.equal(next(iter(data.loader(seed=1, epoch=1)))[1], labels)
    assert data.info.train_size == 70


def test_train_data_with_worker(tmp_path: Path) -> None:
    _make_idx_dataset(tmp_path)
    cfg = DataConfig(source="fashion_mnist", root=str(tmp_path), input_size=28, batch_size=4, workers=1,
                     augment=AugmentConfig(simple=True))
    data = build_run_data(cfg)
    train = data.loader(seed=0, epoch=0)
    assert train.num_workers == 1
    assert sum(len(y) for _, y in train) == 20
    assert tuple(next(iter(data.val))[0].shape) == (8, 1, 28, 28)


def test_batch_larger_than_train_set() -> None:
    cfg = DataConfig(source="synthetic", input_size=8, batch_size=64, synthetic_train_size=32, workers=0)
    with pytest.raises(DataError, match="batch_size=64.*32"):
        build_run_data(cfg)


def test_subsets(tmp_path: Path) -> None:
    _make_idx_dataset(tmp_path)
    base = dict(source="fashion_mnist", root=str(tmp_path), input_size=28, workers=0)
    train, val, info = build_datasets(DataConfig(**base, train_subset=7, val_subset=3))
    assert (len(train), len(val), info.train_size, info.val_size) == (7, 3, 7, 3)
    assert [train[i][1] for i in range(7)] == list(range(7))  # the first N samples
    train, _, info = build_datasets(DataConfig(**base, train_subset=1000))
    assert len(train) == 20 and info.train_size == 20
    with pytest.raises(DataError, match="val_subset=11.*10 samples"):
        build_datasets(DataConfig(**base, val_subset=11))


def test_train_data_shards_across_ranks() -> None:
    """Each rank validates on its own disjoint share; together they cover the set exactly once."""
    from dsctl.train.common import Dist

    cfg = DataConfig(source="synthetic", input_size=8, batch_size=4, workers=0,
                     synthetic_train_size=18, synthetic_val_size=7)
    seen = []
    for rank in range(2):
        data = build_run_data(cfg, Dist(rank=rank, world=2, local_rank=rank))
        assert data.steps_per_epoch() == 18 // 2 // 4
        seen += [y for _, ys in data.val for y in ys.tolist()]
    full = [y for _, ys in build_run_data(cfg).val for y in ys.tolist()]
    assert sorted(seen) == sorted(full) and len(seen) == 7


def test_normalisation_can_come_from_a_timm_models_pretrained_config(tmp_path: Path) -> None:
    """Issue 24: weights trained with another normalisation (CLIP's, say) are fine-tuned with it."""
    from dsctl.data.build import pretrained_normalization

    _make_idx_dataset(tmp_path / "MNIST" / "raw", gz=False)
    clip_mean, clip_std = pretrained_normalization("vit_base_patch16_clip_224.openai")
    _, _, info = build_datasets(DataConfig(source="mnist", root=str(tmp_path), input_size=28, workers=0,
                                           norm_from="vit_base_patch16_clip_224.openai"))
    assert info.mean == pytest.approx((sum(clip_mean) / 3,)) and info.std == pytest.approx((sum(clip_std) / 3,))
    with pytest.raises(DataError, match="norm_from='resnet9000'"):
        build_datasets(DataConfig(source="mnist", root=str(tmp_path), input_size=28, norm_from="resnet9000"))
