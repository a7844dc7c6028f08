"""Datasets and data loaders: Fashion-MNIST / MNIST (IDX), CIFAR-10/100 (pickles), image folders, synthetic.

Example:
    >>> from dsctl.config import DataConfig
    >>> from dsctl.data import build_datasets
    >>> train, val, info = build_datasets(DataConfig(source="synthetic", input_size=16))
    >>> info.num_classes
    10

Runs read batches through ``dsctl.train.data.build_run_data`` (resumable, sharded per rank).
"""

from dsctl.data.build import DATASET_STATS, DataInfo, build_datasets, check_fits, split_holdout
from dsctl.data.cifar import find_cifar_dir, load_cifar, load_pickle
from dsctl.data.datasets import ArrayImageDataset, SyntheticDataset, build_image_folders
from dsctl.data.idx import FASHION_MNIST_SYSTEM_DIRS, find_idx_dir, load_idx_dataset, load_idx_split, read_idx
from dsctl.data.transforms import build_eval_transform, build_train_transform

__all__ = [
    "check_fits",
    "DATASET_STATS", "FASHION_MNIST_SYSTEM_DIRS", "ArrayImageDataset", "DataInfo", "SyntheticDataset",
    "build_datasets", "build_eval_transform", "build_image_folders", "build_train_transform",
    "find_cifar_dir", "find_idx_dir", "load_cifar", "load_idx_dataset", "load_idx_split", "load_pickle", "read_idx",
    "split_holdout",
]
