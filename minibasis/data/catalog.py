"""Datasets by name: ``load_dataset("cifar10", root)`` and the class count of each name.

Every name but ``synthetic`` is read from the official files in ``root``
(:mod:`minibasis.data.datasets`); ``synthetic`` is generated (:func:`minibasis.data.synthetic`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from minibasis.data.datasets import DatasetError, load_cifar10, load_cifar100, load_svhn
from minibasis.data.synthetic import synthetic

__all__ = ["DATASETS", "DATASET_CLASSES", "load_dataset", "take_subset"]

#: name → loader of ``root`` (None: generated, no files).
DATASETS = {"cifar10": load_cifar10, "cifar100": load_cifar100, "svhn": load_svhn, "synthetic": None}
#: name → number of classes.
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "synthetic": 10}
#: The folder each reader looks for inside ``root``, named when the folder is missing.
_EXPECTED = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "svhn": "train_32x32.mat"}


def load_dataset(name: str, root=None, *, num_train: int | None = None, num_test: int | None = None,
                 seed: int = 0, train_subset: int | None = None):
    """``((x_train, y_train), (x_test, y_test))``: uint8 (N, C, H, W) images and int64 labels.

    ``synthetic`` is generated (``num_train``/``num_test`` images, ``seed``); the others are read
    from the folder ``root`` and cut to their first ``num_train``/``num_test`` images. Then
    ``train_subset`` keeps a random subset of that many training images (:func:`take_subset`,
    fixed by ``seed``). Raises
    :class:`DatasetError` for an unknown name or a ``root`` that is not a folder (naming what it
    should hold), ``FileNotFoundError`` when the files are missing inside it.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if DATASETS[name] is None:
        sizes = {k: v for k, v in (("num_train", num_train), ("num_test", num_test)) if v is not None}
        (x_train, y_train), test = synthetic(seed=seed, **sizes)
        return take_subset(x_train, y_train, train_subset, seed), test
    root = Path(root) if root is not None else None
    if root is None or not root.is_dir():
        what = "is a file, not a folder" if root is not None and root.exists() else "does not exist"
        raise DatasetError(f"data folder {root} {what} (it should hold the {name} files, e.g. "
                           f"{(root or Path('DIR')) / _EXPECTED[name]})")
    (x_train, y_train), (x_test, y_test) = DATASETS[name](root)
    if num_train is not None:
        x_train, y_train = x_train[:num_train], y_train[:num_train]
    if num_test is not None:
        x_test, y_test = x_test[:num_test], y_test[:num_test]
    return take_subset(x_train, y_train, train_subset, seed), (x_test, y_test)


def take_subset(images: np.ndarray, labels: np.ndarray, count: int | None, seed: int):
    """A class-mixed random subset of ``count`` samples (all when None or ≥ N), fixed by ``seed``."""
    if count is None or count >= len(labels):
        return images, labels
    index = np.sort(np.random.default_rng(seed).permutation(len(labels))[:count])
    return images[index], labels[index]
