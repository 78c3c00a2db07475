"""Sharding each epoch over ranks with the seed logic of ``minibasis.data.DataLoader``.

Layout: the epoch's order is ``epoch_permutation(N, seed, epoch)`` (or ``arange(N)`` without
shuffling), exactly the order one process's ``DataLoader`` visits. It is cut into global
batches of ``batch_size`` samples, and rank ``r`` of ``W`` takes the ``r``-th of the ``W``
equal, contiguous slices of every global batch. The union over ranks of their ``k``-th local
batches is therefore the ``k``-th batch of the single-process loader, which is what makes a
data-parallel run take the same steps as one process with the global batch.

Uneven sizes are never handled silently. A global batch must split into ``W`` equal slices,
so ``batch_size`` must be a multiple of ``W`` (ValueError otherwise), and the epoch's length
must be a multiple of ``W``. When ``N`` is not, ``uneven`` decides, and a warning (on rank 0)
says what was done:

* ``"pad"`` (default, as PyTorch's DistributedSampler): the first ``W - N mod W`` samples of
  the epoch's order are appended again, so they are seen twice in that epoch;
* ``"drop"``: the last ``N mod W`` samples of the epoch's order are left out of that epoch
  (with shuffling, different ones each epoch);
* ``"error"``: raise ValueError.

With ``drop_last=True`` the incomplete last global batch is dropped, as by ``DataLoader``;
the remaining batches always split evenly, so ``uneven`` is not consulted.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterator

import numpy as np

from minibasis.checks import is_int, non_negative_int, positive_int

from minibasis.data.loader import DataLoader, augmentation_generator, epoch_permutation
from minibasis.distributed.comm import get_world

__all__ = ["UNEVEN_POLICIES", "even_order", "shard_batches", "ShardedSampler", "ShardedDataLoader"]

UNEVEN_POLICIES = ("pad", "drop", "error")


def _rank_and_size(rank, world_size) -> tuple[int, int]:
    world = get_world()
    size = world.size if world_size is None else positive_int("world_size", world_size)
    rank = (world.rank if world_size is None else 0) if rank is None else rank
    if not is_int(rank) or not 0 <= rank < size:
        raise ValueError(f"rank must be an int in [0, {size}), got {rank!r}")
    return int(rank), size


def even_order(order: np.ndarray, world_size: int, uneven: str = "pad") -> tuple[np.ndarray, int, int]:
    """``order`` made a multiple of ``world_size`` long: returns (order, num_padded, num_dropped).

    "pad" appends the first samples of ``order`` again (cycling when the data set is smaller
    than the world), "drop" cuts the tail, "error" raises ValueError.
    """
    if uneven not in UNEVEN_POLICIES:
        raise ValueError(f"uneven must be one of {UNEVEN_POLICIES}, got {uneven!r}")
    remainder = len(order) % world_size
    if remainder == 0:
        return order, 0, 0
    if uneven == "error":
        raise ValueError(f"{len(order)} samples do not split evenly over {world_size} ranks "
                         f"(remainder {remainder}); choose uneven='pad' or 'drop', or drop_last=True")
    if uneven == "drop":
        return order[:len(order) - remainder], 0, remainder
    if len(order) == 0:
        raise ValueError("cannot pad an empty data set to split over ranks")
    missing = world_size - remainder
    return np.concatenate([order, np.resize(order, missing)]), missing, 0


def shard_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int,
                  drop_last: bool = False) -> list[np.ndarray]:
    """This rank's batches: its contiguous 1/W slice of every global batch of ``order``.

    ``batch_size`` (global) must be a multiple of ``world_size``; ``len(order)`` must be too,
    unless ``drop_last`` removes the incomplete last global batch.
    """
    batch_size = positive_int("batch_size", batch_size)
    world_size = positive_int("world_size", world_size)
    if batch_size % world_size:
        raise ValueError(f"the global batch size {batch_size} must be a multiple of the world size "
                         f"{world_size} (each rank takes batch_size / world_size samples)")
    num_batches = len(order) // batch_size if drop_last else math.ceil(len(order) / batch_size)
    if not drop_last and len(order) % world_size:
        raise ValueError(f"an order of {len(order)} samples does not split over {world_size} ranks; "
                         "make it even first (even_order) or use drop_last")
    batches = []
    for k in range(num_batches):
        batch = order[k * batch_size:(k + 1) * batch_size]
        share = len(batch) // world_size
        batches.append(batch[rank * share:(rank + 1) * share])
    return batches


class ShardedSampler:
    """Each rank's sample indices, epoch by epoch (see the module docstring for the layout).

    Args:
        num_samples: size of the data set.
        batch_size: the *global* batch size B (a multiple of the world size); each rank gets
            B / W samples per step.
        shuffle, seed: as ``DataLoader``: the epoch's order is ``epoch_permutation(N, seed, epoch)``.
        drop_last: drop the incomplete last global batch.
        uneven: "pad", "drop" or "error" when N is not a multiple of W (module docstring).
        rank, world_size: default to the initialized process group.

    ``num_padded`` / ``num_dropped`` say how many samples each epoch repeats / leaves out.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, uneven: str = "pad", rank: int | None = None,
                 world_size: int | None = None):
        self.num_samples = non_negative_int("num_samples", num_samples)
        self.batch_size = positive_int("batch_size", batch_size)
        self.rank, self.world_size = _rank_and_size(rank, world_size)
        if self.batch_size % self.world_size:
            raise ValueError(f"the global batch size {self.batch_size} must be a multiple of the world size "
                             f"{self.world_size} (each rank takes batch_size / world_size samples)")
        if uneven not in UNEVEN_POLICIES:
            raise ValueError(f"uneven must be one of {UNEVEN_POLICIES}, got {uneven!r}")
        self.shuffle, self.seed, self.drop_last, self.uneven = bool(shuffle), int(seed), bool(drop_last), uneven
        kept = (self.num_samples // self.batch_size) * self.batch_size if drop_last else self.num_samples
        _, self.num_padded, self.num_dropped = even_order(np.arange(kept), self.world_size, uneven)
        if (self.num_padded or self.num_dropped) and self.rank == 0:
            what = (f"{self.num_padded} sample(s) of each epoch are repeated (uneven='pad')" if self.num_padded
                    else f"{self.num_dropped} sample(s) of each epoch are left out (uneven='drop')")
            warnings.warn(f"ShardedSampler: {self.num_samples} samples do not split evenly over "
                          f"{self.world_size} ranks: {what}", stacklevel=2)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of ``epoch`` (same on every rank), after padding or dropping."""
        if self.shuffle:
            order = epoch_permutation(self.num_samples, self.seed, epoch)
        else:
            order = np.arange(self.num_samples, dtype=np.int64)
        if self.drop_last:
            order = order[:(len(order) // self.batch_size) * self.batch_size]
        return even_order(order, self.world_size, self.uneven)[0]

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches of ``epoch``: what one process with batch size B would visit."""
        order = self.epoch_order(epoch)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's index batches for ``epoch``."""
        return shard_batches(self.epoch_order(epoch), self.batch_size, self.rank, self.world_size)

    def __len__(self) -> int:
        """Batches (steps) per epoch, the same on every rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil((self.num_samples + self.num_padded - self.num_dropped) / self.batch_size)

    def __repr__(self) -> str:
        return (f"ShardedSampler(num_samples={self.num_samples}, batch_size={self.batch_size}, rank={self.rank}, "
                f"world_size={self.world_size}, shuffle={self.shuffle}, seed={self.seed}, uneven={self.uneven!r}, "
                f"num_padded={self.num_padded}, num_dropped={self.num_dropped})")


class ShardedDataLoader(DataLoader):
    """``DataLoader`` for one rank of a data-parallel run: yields this rank's ``(x, y)`` slices.

    Takes ``DataLoader``'s arguments (``batch_size`` is the *global* batch size) plus ``uneven``
    (see :class:`ShardedSampler`), ``rank`` and ``world_size`` (default: the process group) and
    ``exact_augmentation``. ``epoch``, ``set_epoch``, ``state_dict`` and ``load_state_dict``
    behave as in ``DataLoader``, so a resumed run picks up the same epoch on every rank.

    A seed left as None is drawn on rank 0 and broadcast, so all ranks agree on the order.

    Augmentation: with ``exact_augmentation=True`` (default) each rank fetches and transforms the
    whole global batch with the very generator ``DataLoader`` would use for it, then keeps its
    slice: the images are bit-identical to the single-process run's, at the price of W times
    the (cheap, host-side) augmentation work. With False each rank transforms only its slice,
    with a generator derived from (seed, epoch, batch, rank): statistically equivalent,
    W times cheaper, not identical to one process.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = False, seed: int | None = None,
                 drop_last: bool = False, transform=None, as_tensors: bool = True, *, uneven: str = "pad",
                 rank: int | None = None, world_size: int | None = None, exact_augmentation: bool = True):
        super().__init__(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, transform=transform,
                         as_tensors=as_tensors)
        if seed is None and world_size is None:
            self.seed = get_world().broadcast_object(self.seed, root=0)
        self.sampler = ShardedSampler(len(self.dataset), self.batch_size, shuffle=self.shuffle, seed=self.seed,
                                      drop_last=self.drop_last, uneven=uneven, rank=rank, world_size=world_size)
        self.exact_augmentation = bool(exact_augmentation)

    @classmethod
    def from_loader(cls, loader: DataLoader, *, uneven: str = "pad", rank: int | None = None,
                    world_size: int | None = None, exact_augmentation: bool = True) -> "ShardedDataLoader":
        """The sharded twin of a ``DataLoader``: same dataset, global batch size, shuffling, seed,
        ``drop_last``, transform, ``as_tensors`` and current epoch. A training loop written for ``DataLoader``
        becomes data-parallel by swapping its loader for this one."""
        if not isinstance(loader, DataLoader):
            raise TypeError(f"from_loader expects a minibasis.data.DataLoader, got {type(loader).__name__}")
        sharded = cls(loader.dataset, loader.batch_size, shuffle=loader.shuffle, seed=loader.seed,
                      drop_last=loader.drop_last, transform=loader.transform, as_tensors=loader.as_tensors,
                      uneven=uneven, rank=rank,
                      world_size=world_size, exact_augmentation=exact_augmentation)
        sharded.set_epoch(loader.epoch)
        return sharded

    @property
    def rank(self) -> int:
        return self.sampler.rank

    @property
    def world_size(self) -> int:
        return self.sampler.world_size

    @property
    def local_batch_size(self) -> int:
        return self.sampler.local_batch_size

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sampler.seed = self.seed

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple]:
        epoch = self._epoch
        self.sampler.seed = self.seed
        rank, size = self.sampler.rank, self.sampler.world_size
        for batch_index, global_index in enumerate(self.sampler.global_batches(epoch)):
            share = len(global_index) // size
            mine = slice(rank * share, (rank + 1) * share)
            if self.transform is not None and self.exact_augmentation:
                x, y = self._fetch(global_index)
                rng = augmentation_generator(self.seed, epoch, batch_index)
                x = self.transform(x, rng)
                yield self._batch(x[mine], y[mine])
                continue
            x, y = self._fetch(global_index[mine])
            if self.transform is not None:
                rng = augmentation_generator(self.seed, epoch, batch_index, rank)
                x = self.transform(x, rng)
            yield self._batch(x, y)
        self._epoch = epoch + 1

    def __repr__(self) -> str:
        return (f"ShardedDataLoader({self.dataset!r}, batch_size={self.batch_size} (global; "
                f"{self.local_batch_size} per rank), rank={self.rank}, world_size={self.world_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
                f"uneven={self.sampler.uneven!r}, epoch={self._epoch})")
