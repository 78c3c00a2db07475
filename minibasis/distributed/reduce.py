"""Data-parallel synchronization: initial broadcast, bucketed gradient all-reduce, metrics, counts.

The data-parallel recipe (PyTorch DDP's, without the overlap of communication and backward):
every rank holds a full replica; ``broadcast_parameters`` makes the replicas equal once; each
step every rank runs forward and backward on its own slice of the global batch, then
``allreduce_gradients`` replaces each gradient by the mean over ranks. Since each rank's loss is
the mean over its ``B/W`` samples, the mean of the ranks' gradients is exactly the gradient of
the mean loss over the ``B`` samples of the global batch: the same update one process makes.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Iterable, Mapping

import numpy

from minibasis import backend
from minibasis.autograd import Tensor
from minibasis.distributed.comm import Communicator, DistributedError, _check_op, get_world
from minibasis.nn.module import Module, Parameter

__all__ = ["broadcast_parameters", "GradientReducer", "allreduce_gradients", "allreduce_metrics",
           "global_counts", "DEFAULT_BUCKET_BYTES"]

#: PyTorch DDP's default bucket: large enough that per-call latency is amortized, small enough
#: that the staging buffer stays modest.
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


def _check_structure(comm: Communicator, signature: list, what: str) -> None:
    """Every rank must hold the same arrays in the same order, else the collectives pair up
    mismatched data (or deadlock). Compare each rank's signature with rank 0's."""
    if comm.size == 1:
        return
    signatures = comm.allgather_object(signature)
    for rank, other in enumerate(signatures):
        if other != signatures[0]:
            diff = next((i for i, (a, b) in enumerate(zip(signatures[0], other)) if a != b),
                        min(len(other), len(signatures[0])))
            raise DistributedError(
                f"{what}: rank {rank} differs from rank 0 at entry {diff}: rank 0 has "
                f"{signatures[0][diff] if diff < len(signatures[0]) else 'nothing'}, rank {rank} has "
                f"{other[diff] if diff < len(other) else 'nothing'} ({len(signatures[0])} vs {len(other)} entries)")


def broadcast_parameters(model: Module | Iterable[Parameter], root: int = 0, buffers: bool = True,
                         comm: Communicator | None = None) -> None:
    """Copy rank ``root``'s parameters (and, for a Module, its buffers: BN running statistics,
    fixed bases) to every rank, in place. Checks first that all ranks hold the same names, shapes
    and dtypes, and raises :class:`DistributedError` naming the first difference otherwise."""
    comm = comm or get_world()
    if isinstance(model, Module):
        entries = [(name, p.data, p, None) for name, p in model.named_parameters()]
        if buffers:
            owners = dict(model._owners())
            for name, array in model.named_buffers():
                module, attr = owners[name]
                entries.append((name, array, None, (module, attr)))
    else:
        entries = [(f"param{i}", p.data, p, None) for i, p in enumerate(model)]
    _check_structure(comm, [(name, tuple(a.shape), str(a.dtype)) for name, a, _, _ in entries],
                     "broadcast_parameters")
    if comm.size == 1:
        return
    for name, array, param, owner in entries:
        xp = backend.get_array_module(array)
        target = array if array.flags.c_contiguous else xp.ascontiguousarray(array)
        comm.broadcast_(target, root)
        if target is not array:
            if param is not None:
                param.data = target
            else:
                module, attr = owner
                module._buffers[attr] = target


class _Bucket:
    """Consecutive gradients of one dtype and device packed into one flat buffer."""

    def __init__(self, params: list[Parameter], xp, dtype, flags: int):
        self.params = params
        self.offsets = numpy.cumsum([0] + [p.numel() for p in params]).tolist()
        # The last ``flags`` entries count, per parameter of the whole reducer, how many ranks
        # had a gradient (only the final bucket carries them).
        self.flags = flags
        self.buffer = xp.empty(self.offsets[-1] + flags, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)


class GradientReducer:
    """Average the gradients of ``params`` over all ranks, in buckets of about ``bucket_bytes``.

    Gradients are copied into one contiguous buffer per bucket (parameters of the same dtype
    and device, in registration order, until the bucket holds ``bucket_bytes``; a larger
    parameter gets a bucket of its own), each buffer is all-reduced in one call, and the
    results are copied back. Buffers are allocated once and reused every step.

    A parameter without a gradient on some rank counts as a zero gradient there; one that has
    no gradient on *any* rank keeps ``grad = None``, as in a single process (the final bucket
    carries one presence count per parameter for that). Parameters with ``requires_grad``
    False are left out entirely.

    Construct it at the same point on every rank (it checks that all ranks hold the same
    parameter shapes). ``last_seconds`` is the time the last call spent packing, reducing and
    unpacking; ``bytes_per_step`` the payload it all-reduces.
    """

    def __init__(self, params: Module | Iterable[Parameter], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 average: bool = True, comm: Communicator | None = None):
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, (int, numpy.integer)) or bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
        self.comm = comm or get_world()
        source = params.parameters() if isinstance(params, Module) else params
        self.params = [p for p in source if p.requires_grad]
        for p in self.params:
            if not isinstance(p, Tensor):
                raise TypeError(f"GradientReducer expects Parameters, got {type(p).__name__}")
        self.average = bool(average)
        self.bucket_bytes = int(bucket_bytes)
        _check_structure(self.comm, [(tuple(p.shape), str(p.dtype)) for p in self.params], "GradientReducer")
        self.buckets = self._plan()
        self.last_seconds = 0.0

    def _plan(self) -> list[_Bucket]:
        groups: list[list[Parameter]] = []
        current: list[Parameter] = []
        size = 0
        for p in self.params:
            key = (backend.get_array_module(p.data), p.dtype)
            if current and (size + p.data.nbytes > self.bucket_bytes
                            or key != (backend.get_array_module(current[0].data), current[0].dtype)):
                groups.append(current)
                current, size = [], 0
            current.append(p)
            size += p.data.nbytes
        if current:
            groups.append(current)
        flags = len(self.params)
        return [_Bucket(g, backend.get_array_module(g[0].data), g[0].dtype, flags if i == len(groups) - 1 else 0)
                for i, g in enumerate(groups)]

    @property
    def bytes_per_step(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def __call__(self) -> None:
        start = time.perf_counter()
        comm = self.comm
        presence = [p.grad is not None for p in self.params]
        if comm.size > 1:
            for bucket in self.buckets:
                self._pack(bucket, presence)
                comm.allreduce_(bucket.buffer, "sum")
                self._unpack(bucket)
        # One rank: the mean (or sum) over one rank is the gradient itself.
        self.last_seconds = time.perf_counter() - start

    def _pack(self, bucket: _Bucket, presence: list[bool]) -> None:
        buffer, offsets = bucket.buffer, bucket.offsets
        for p, start, end in zip(bucket.params, offsets[:-1], offsets[1:]):
            if p.grad is None:
                buffer[start:end] = 0
            else:
                grad = p.grad.data
                if tuple(grad.shape) != tuple(p.shape):
                    raise ValueError(f"gradient of shape {tuple(grad.shape)} for a parameter of shape {tuple(p.shape)}")
                buffer[start:end] = grad.reshape(-1)
        if bucket.flags:
            buffer[offsets[-1]:] = backend.get_array_module(buffer).asarray(presence, dtype=buffer.dtype)

    def _unpack(self, bucket: _Bucket) -> None:
        buffer, offsets = bucket.buffer, bucket.offsets
        if self.average:
            buffer[:offsets[-1]] /= self.comm.size
        # Which parameters had a gradient on at least one rank (the counts ride in the last bucket).
        if bucket.flags:
            self._present = (buffer[offsets[-1]:] > 0).tolist()
        for p, start, end in zip(bucket.params, offsets[:-1], offsets[1:]):
            reduced = buffer[start:end].reshape(p.shape)
            if p.grad is not None:
                p.grad.data[...] = reduced
            else:
                p.grad = Tensor(reduced.copy())
        if bucket.flags:
            for p, present in zip(self.params, self._present):
                if not present:
                    p.grad = None


# Reducers built by allreduce_gradients, keyed by the identity of their parameter list, so that
# calling the function every step reuses the plan and the buffers. Bounded: a script that builds
# many models does not accumulate buffers without end.
_reducer_cache: "OrderedDict[tuple, GradientReducer]" = OrderedDict()
_CACHE_SIZE = 4


def allreduce_gradients(params: Module | Iterable[Parameter], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                        average: bool = True, comm: Communicator | None = None) -> GradientReducer:
    """Average (or, with ``average=False``, sum) every gradient over all ranks, in place.

    Call it after ``loss.backward()`` and before ``optimizer.step()``, on every rank. It reuses a
    :class:`GradientReducer` for the same parameters and bucket size across calls and returns it
    (``.last_seconds``, ``.bytes_per_step`` for timing).
    """
    comm = comm or get_world()
    params = list(params.parameters() if isinstance(params, Module) else params)
    key = (tuple(id(p) for p in params), int(bucket_bytes), bool(average), id(comm))
    reducer = _reducer_cache.get(key)
    if reducer is None:
        reducer = GradientReducer(params, bucket_bytes=bucket_bytes, average=average, comm=comm)
        _reducer_cache[key] = reducer
        while len(_reducer_cache) > _CACHE_SIZE:
            _reducer_cache.popitem(last=False)
    else:
        _reducer_cache.move_to_end(key)
    reducer()
    return reducer


def allreduce_metrics(metrics: Mapping[str, float], op: str = "sum", average: bool = False,
                      comm: Communicator | None = None) -> dict[str, float]:
    """Combine per-rank scalars (loss sums, correct counts, sample counts, seconds) over all ranks.

    ``op`` is "sum", "max" or "min"; ``average=True`` divides the sums by the world size. Every
    rank must pass the same keys (checked, with a clear error). Values are reduced in float64
    and returned as Python floats. Typical use: ``allreduce_metrics({"loss_sum": s, "correct": c,
    "seen": n})`` then ``loss = loss_sum / seen``: an exact global mean even for unequal counts.
    """
    comm = comm or get_world()
    _check_op(op)
    if average and op != "sum":
        raise ValueError(f"allreduce_metrics: average=True needs op='sum', got {op!r}")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"allreduce_metrics expects a mapping of name to number, got {type(metrics).__name__}")
    keys = sorted(metrics)
    values = numpy.empty(len(keys), dtype=numpy.float64)
    for i, key in enumerate(keys):
        value = metrics[key]
        value = backend.to_numpy(value) if not isinstance(value, (int, float)) else value
        try:
            values[i] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"allreduce_metrics: metric {key!r} must be a number, got {value!r}") from None
    if comm.size > 1:
        all_keys = comm.allgather_object(keys)
        for rank, other in enumerate(all_keys):
            if other != keys:
                raise DistributedError(f"allreduce_metrics: rank {rank} passed keys {other}, rank {comm.rank} passed {keys}")
        comm.allreduce_(values, op)
    if average:
        values /= comm.size
    return {key: float(v) for key, v in zip(keys, values)}


def _sum_nested(dicts: list):
    """Element-wise sum of equally shaped nested dicts of ints (missing keys count as 0)."""
    if all(isinstance(d, dict) for d in dicts):
        keys = []
        for d in dicts:
            keys.extend(k for k in d if k not in keys)
        return {k: _sum_nested([d.get(k, 0) for d in dicts]) for k in keys}
    return sum(d if not isinstance(d, dict) else 0 for d in dicts)


def global_counts(counter, comm: Communicator | None = None) -> dict:
    """Multiplication counts summed over all ranks.

    ``counter`` is a ``minibasis.count_mults()`` counter, which always holds this rank's own
    counts. The result has the layout of ``counter.as_dict()`` (total, conv, by_op, by_layer,
    forward, backward) with every number summed over ranks, plus ``world_size`` and
    ``per_rank`` (each rank's own ``total`` and ``conv``). A collective: call it on every rank.
    """
    comm = comm or get_world()
    local = counter.as_dict()
    everyone = comm.allgather_object(local)
    summed = _sum_nested(everyone)
    summed["world_size"] = comm.size
    summed["per_rank"] = [{"rank": r, "total": d["total"], "conv": d["conv"]} for r, d in enumerate(everyone)]
    return summed
