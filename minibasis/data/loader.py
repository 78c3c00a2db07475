"""In-memory datasets and a reproducible mini-batch loader (host-side NumPy, yielding Tensors).

Reproducibility contract: the sample order of an epoch is a pure function of (seed, epoch)
(``epoch_permutation``), and the generator handed to the transform of a batch is a pure function
of (seed, epoch, batch index). A training run resumed at epoch ``e`` (``set_epoch(e)`` or
``load_state_dict``) therefore sees exactly the batches, bit for bit, that the uninterrupted run
saw. All seed derivation lives in ``_derived_generator``; ``epoch_permutation`` and
``augmentation_generator`` are its public faces, so that a sharded (distributed) loader draws
exactly the single-process loader's orders and augmentations.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from minibasis.autograd import Tensor
from minibasis.checks import non_negative_int, positive_int

__all__ = ["ArrayDataset", "DataLoader", "epoch_permutation", "augmentation_generator"]

# Independent random streams derived from one seed; the numbers only need to differ.
_PERMUTATION_STREAM = 0
_AUGMENTATION_STREAM = 1


def _non_negative_int(name: str, value) -> int:
    """:func:`minibasis.checks.non_negative_int`, also admitting a 0-d integer array: the form a
    loader state can take after a round trip through an .npz checkpoint."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        value = value.item()
    return non_negative_int(name, value)


def _derived_generator(seed: int, stream: int, *key: int) -> np.random.Generator:
    """A generator that depends only on (seed, stream, *key): the single place where loader
    randomness is derived. SeedSequence spawn keys give statistically independent streams for
    different keys, unlike ``seed + epoch`` style arithmetic, whose streams overlap."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(stream, *key)))


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of one epoch: an int64 permutation of ``range(num_samples)``
    that depends only on (num_samples, seed, epoch)."""
    num_samples = _non_negative_int("num_samples", num_samples)
    seed = _non_negative_int("seed", seed)
    epoch = _non_negative_int("epoch", epoch)
    return _derived_generator(seed, _PERMUTATION_STREAM, epoch).permutation(num_samples).astype(np.int64)


def augmentation_generator(seed: int, epoch: int, batch_index: int, *shard: int) -> np.random.Generator:
    """The generator a ``DataLoader`` hands to its transform for batch ``batch_index`` of ``epoch``.

    It depends only on (seed, epoch, batch_index, *shard). Without ``shard`` it is exactly the
    single-process loader's; a sharded loader that augments only its own part of a batch passes
    its rank as ``shard``, which gives every rank a stream of its own.
    """
    key = [_non_negative_int(name, value) for name, value in
           (("seed", seed), ("epoch", epoch), ("batch_index", batch_index), *(("shard", s) for s in shard))]
    return _derived_generator(key[0], _AUGMENTATION_STREAM, *key[1:])


class ArrayDataset:
    """Images and labels held in memory.

    ``images``: array (N, ...) of uint8 or floating dtype, typically (N, C, H, W);
    ``labels``: integer array (N,) with values >= 0. ``dataset[index_array]`` returns the
    batch ``(images[index], labels[index])`` as new arrays (labels as int64).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if not isinstance(images, np.ndarray) or not isinstance(labels, np.ndarray):
            raise TypeError(
                "ArrayDataset: expected numpy arrays (images, labels), got "
                f"({type(images).__name__}, {type(labels).__name__})"
            )
        if images.ndim < 2:
            raise ValueError(
                f"ArrayDataset: expected images of shape (N, ...) such as (N, C, H, W), got shape {images.shape}"
            )
        if images.dtype != np.uint8 and images.dtype.kind != "f":
            raise ValueError(f"ArrayDataset: expected uint8 or floating images, got dtype {images.dtype}")
        if labels.ndim != 1:
            raise ValueError(f"ArrayDataset: expected labels of shape (N,), got shape {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise ValueError(f"ArrayDataset: expected integer labels, got dtype {labels.dtype}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"ArrayDataset: images and labels differ in count: {images.shape[0]} images "
                f"(shape {images.shape}) vs {labels.shape[0]} labels"
            )
        if labels.size and labels.min() < 0:
            raise ValueError(f"ArrayDataset: labels must be >= 0, got minimum {labels.min()}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Fancy indexing copies, so a caller that edits a batch in place cannot corrupt the data.
        return self.images[index], self.labels[index].astype(np.int64)

    def __repr__(self) -> str:
        return f"ArrayDataset(images={self.images.shape} {self.images.dtype}, labels={self.labels.shape})"


class DataLoader:
    """Iterate over a dataset in mini-batches ``(x, y)``: Tensors, as PyTorch's loader yields.

    Args:
        dataset: a tuple ``(images, labels)`` of numpy arrays (wrapped in ``ArrayDataset``), or
            any object with ``__len__`` and ``__getitem__(index_array) -> (x, y)``.
        batch_size: samples per batch (> 0). The last, smaller batch is kept unless ``drop_last``.
        shuffle: visit the samples in the order ``epoch_permutation(len, seed, epoch)``.
        seed: non-negative int. ``None`` draws one at random once, at construction; it is part
            of ``state_dict()`` so that a resumed run can still reproduce the order.
        transform: optional ``transform(x, rng)`` applied to each image batch (see
            ``minibasis.data.transforms``); ``rng`` is a ``numpy.random.Generator`` derived from
            (seed, epoch, batch index).
        as_tensors: yield ``(x, y)`` as :class:`minibasis.Tensor` (default) wrapping the host
            arrays, without a copy and without moving them to the active backend (as PyTorch
            yields CPU tensors: ``x.to("cupy")`` moves one); False yields the NumPy arrays
            themselves. Transforms always receive NumPy arrays; the trainer takes either.

    ``epoch`` counts completed passes: it selects the order and the augmentation of the next
    pass and goes up by one when a pass runs to its end (a pass abandoned early repeats).
    ``set_epoch(n)`` sets it, as for a resumed run. ``len(loader)`` is the number of batches.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
        as_tensors: bool = True,
    ):
        if isinstance(dataset, tuple):
            if len(dataset) != 2:
                raise ValueError(f"DataLoader: expected dataset (images, labels), got a tuple of {len(dataset)}")
            dataset = ArrayDataset(*dataset)
        elif not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                "DataLoader: dataset must be (images, labels) or have __len__ and __getitem__, "
                f"got {type(dataset).__name__}"
            )
        batch_size = positive_int("DataLoader: batch_size", batch_size)
        if transform is not None and not callable(transform):
            raise TypeError(f"DataLoader: transform must be callable, got {type(transform).__name__}")
        if seed is None:
            # 63 bits, so the seed fits an int64 wherever a checkpoint stores it.
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = _non_negative_int("DataLoader: seed", seed)
        self.drop_last = bool(drop_last)
        self.transform = transform
        if not isinstance(as_tensors, bool):
            raise TypeError(f"DataLoader: as_tensors must be a bool, got {as_tensors!r}")
        self.as_tensors = as_tensors
        self._epoch = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass the one with index ``epoch`` (order and augmentation)."""
        self._epoch = _non_negative_int("DataLoader: epoch", epoch)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``epoch`` and ``seed`` saved by ``state_dict()`` (the saved seed replaces
        this loader's, since reproducing the saved run needs it)."""
        if not isinstance(state, dict) or "epoch" not in state:
            raise ValueError(f"DataLoader.load_state_dict: expected a dict with key 'epoch', got {state!r}")
        if "seed" in state:
            self.seed = _non_negative_int("DataLoader: seed", state["seed"])
        self.set_epoch(state["epoch"])

    def __len__(self) -> int:
        num_samples = len(self.dataset)
        if self.drop_last:
            return num_samples // self.batch_size
        return math.ceil(num_samples / self.batch_size)

    def _batch(self, x: np.ndarray, y: np.ndarray) -> tuple:
        """What the loader yields for one batch: Tensors or the arrays (``as_tensors``)."""
        return (Tensor(x), Tensor(y)) if self.as_tensors else (x, y)

    def __iter__(self) -> Iterator[tuple]:
        epoch = self._epoch
        num_samples = len(self.dataset)
        if self.shuffle:
            order = epoch_permutation(num_samples, self.seed, epoch)
        else:
            order = np.arange(num_samples, dtype=np.int64)
        for batch_index in range(len(self)):
            index = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            x, y = self._fetch(index)
            if self.transform is not None:
                rng = augmentation_generator(self.seed, epoch, batch_index)
                x = self.transform(x, rng)
            yield self._batch(x, y)
        self._epoch = epoch + 1

    def _fetch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = self.dataset[index]
        if not (isinstance(batch, tuple) and len(batch) == 2):
            raise ValueError(
                f"DataLoader: dataset[index] must return a tuple (x, y), got {type(batch).__name__}"
            )
        x, y = batch
        if len(x) != len(index) or len(y) != len(index):
            raise ValueError(
                f"DataLoader: dataset returned {len(x)} inputs and {len(y)} labels for {len(index)} indices"
            )
        return x, y

    def __repr__(self) -> str:
        return (
            f"DataLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, drop_last={self.drop_last}, transform={self.transform!r}, "
            f"as_tensors={self.as_tensors}, epoch={self._epoch})"
        )
