"""The PyTorch pickle profile :data:`TORCH`: tensors rebuilt from storages named by
persistent ids (:class:`TorchStorages`), storage types as markers, ``OrderedDict``. Tensors
become NumPy arrays only after their storages' bytes are attached (:func:`resolve`)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from numpy.lib.stride_tricks import as_strided

from minibasis.serialization.errors import PickleDataError, UnsafePickleError
from minibasis.serialization.unpickler import (
    Limits, Profile, _check_shape, _describe, _Global, _globals, _is_int, _ordered_dict, _Stub, _text,
)

__all__ = ["TORCH", "TORCH_STORAGE_TYPES", "TorchElement", "TorchStorage", "TorchStorages"]


# -- PyTorch tensors ---------------------------------------------------------
@dataclass(frozen=True)
class TorchElement:
    """How one torch storage type is stored: its raw NumPy element type and what it becomes."""

    name: str           # torch dtype name, e.g. "float32"
    raw: np.dtype       # element as stored (byte order applied at read time)
    bfloat16: bool = False


_TORCH_TYPES = {
    "DoubleStorage": TorchElement("float64", np.dtype("f8")),
    "FloatStorage": TorchElement("float32", np.dtype("f4")),
    "HalfStorage": TorchElement("float16", np.dtype("f2")),
    "BFloat16Storage": TorchElement("bfloat16", np.dtype("u2"), bfloat16=True),
    "LongStorage": TorchElement("int64", np.dtype("i8")),
    "IntStorage": TorchElement("int32", np.dtype("i4")),
    "ShortStorage": TorchElement("int16", np.dtype("i2")),
    "CharStorage": TorchElement("int8", np.dtype("i1")),
    "ByteStorage": TorchElement("uint8", np.dtype("u1")),
    "BoolStorage": TorchElement("bool", np.dtype("u1")),
    "ComplexFloatStorage": TorchElement("complex64", np.dtype("c8")),
    "ComplexDoubleStorage": TorchElement("complex128", np.dtype("c16")),
    "UntypedStorage": TorchElement("uint8", np.dtype("u1")),
}
#: torch storage type name → element description, all admitted by :data:`TORCH`.
TORCH_STORAGE_TYPES: Mapping[str, TorchElement] = dict(_TORCH_TYPES)


class _StorageType(_Global):
    """Stand-in for ``torch.FloatStorage`` & co.: only ever an argument of a persistent id."""

    __slots__ = ("element",)

    def __init__(self, type_name: str, element: TorchElement):
        def refuse(*args):
            raise UnsafePickleError(f"torch.{type_name} may only appear inside a storage persistent id")
        super().__init__(f"torch.{type_name}", refuse)
        self.element = element


class TorchStorage(_Stub):
    """One torch storage referenced by a checkpoint; ``data`` is attached by the file reader.

    ``numel`` is the element count the persistent id declares; ``data`` must hold at
    least ``numel * element.raw.itemsize`` bytes before :func:`resolve` runs.
    """

    __slots__ = ("key", "element", "numel", "location", "data")

    def __init__(self, key: str, element: TorchElement, numel: int, location: str):
        self.key = key
        self.element = element
        self.numel = numel
        self.location = location
        self.data = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.element.raw.itemsize

    def _finish(self, ctx):
        raise UnsafePickleError(f"{ctx.source}: a bare torch storage ({self.key}) is not a supported value")

    def __repr__(self):
        return f"TorchStorage(key={self.key!r}, {self.element.name}, numel={self.numel})"


class _TensorStub(_Stub):
    """``torch._utils._rebuild_tensor[_v2]``: a strided view of a storage, copied out at resolve time."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage, offset, shape, stride, limits: Limits):
        if not isinstance(storage, TorchStorage):
            raise UnsafePickleError(f"tensor storage must come from a storage persistent id, got {_describe(storage)}")
        if not _is_int(offset) or offset < 0:
            raise UnsafePickleError(f"tensor storage offset must be a non-negative int, got {_describe(offset)}")
        shape = _check_shape(shape, "tensor", limits)
        stride = _check_shape(stride, "tensor stride", limits)
        if len(stride) != len(shape):
            raise UnsafePickleError(f"tensor shape {shape} and stride {stride} differ in length")
        if math.prod(shape) > 0:
            last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
            if last >= storage.numel:
                raise UnsafePickleError(
                    f"tensor of shape {shape}, stride {stride}, offset {offset} reaches element {last} "
                    f"of storage {storage.key!r} which declares {storage.numel} elements")
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def _finish(self, ctx):
        storage, element = self.storage, self.storage.element
        out_dtype = np.dtype(np.float32) if element.bfloat16 else (
            np.dtype(bool) if element.name == "bool" else element.raw)
        ctx.spend(math.prod(self.shape) * out_dtype.itemsize, f"tensor of shape {self.shape}")
        if storage.data is None:
            raise PickleDataError(f"{ctx.source}: storage {storage.key!r} has no data")
        raw_dtype = element.raw.newbyteorder("<" if ctx.byteorder == "little" else ">")
        if len(storage.data) < storage.nbytes:
            raise PickleDataError(
                f"{ctx.source}: storage {storage.key!r} declares {storage.numel} elements "
                f"({storage.nbytes} bytes) but holds {len(storage.data)} bytes")
        if math.prod(self.shape) == 0:
            return np.zeros(self.shape, dtype=out_dtype)
        flat = np.frombuffer(storage.data, dtype=raw_dtype, count=storage.numel)
        view = as_strided(flat[self.offset:], shape=self.shape,
                          strides=tuple(s * raw_dtype.itemsize for s in self.stride), writeable=False)
        if element.bfloat16:
            # bfloat16 is the top half of a float32: widen exactly.
            ctx.note_bfloat16()
            return (view.astype(np.uint32) << 16).view(np.float32)
        if element.name == "bool":
            return view != 0
        return np.array(view, dtype=raw_dtype.newbyteorder("="), order="C")


def _tensor_factory(limits: Limits):
    def rebuild_tensor_v2(storage, offset, shape, stride, requires_grad=False, backward_hooks=None, metadata=None):
        return _TensorStub(storage, offset, shape, stride, limits)

    def rebuild_tensor(storage, offset, shape, stride):
        return _TensorStub(storage, offset, shape, stride, limits)

    def rebuild_parameter(data, requires_grad=True, backward_hooks=None):
        if not isinstance(data, _TensorStub):
            raise UnsafePickleError(f"_rebuild_parameter needs a tensor, got {_describe(data)}")
        return data

    return rebuild_tensor_v2, rebuild_tensor, rebuild_parameter


_STORAGE_KEY = re.compile(r"[A-Za-z0-9_]{1,128}\Z")


class TorchStorages:
    """``persistent_load`` for torch pickles: validates each persistent id and hands out
    one :class:`TorchStorage` per key (tensors sharing a storage share the object).

    Accepted ids: zip format ``('storage', StorageType, key, location, numel)``;
    legacy format ``('storage', StorageType, key, location, numel, view)`` with
    ``view`` None or ``(view_key, offset, size)`` (a slice of the root storage).
    Keys must match ``[A-Za-z0-9_]{1,128}``: a key cannot name a path, so it cannot
    point outside the archive. Whether the key's data exists is the reader's check.
    """

    def __init__(self, source: str, *, legacy: bool, limits: Limits | None = None):
        self.source = source
        self.legacy = legacy
        self.limits = limits or TORCH.limits
        self.roots: dict[str, TorchStorage] = {}
        #: view key → (root storage, element offset, view storage)
        self.views: dict[str, tuple[TorchStorage, int, TorchStorage]] = {}

    def _key(self, value, what: str) -> str:
        key = _text(value, f"{self.source}: {what}")
        if not _STORAGE_KEY.match(key):
            raise UnsafePickleError(
                f"{self.source}: {what} {key!r:.80} is not a plain storage name (it could point outside the archive)")
        return key

    def __call__(self, pid):
        expected = 6 if self.legacy else 5
        if type(pid) is not tuple or len(pid) != expected:
            raise UnsafePickleError(
                f"{self.source}: persistent id must be a {expected}-tuple ('storage', type, key, location, numel"
                f"{', view' if self.legacy else ''}), got {_describe(pid)}")
        if _text(pid[0], f"{self.source}: persistent id kind") != "storage":
            raise UnsafePickleError(f"{self.source}: persistent id kind must be 'storage', got {_describe(pid[0])}")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"{self.source}: persistent id storage type must be a torch storage class, "
                                    f"got {_describe(storage_type)}")
        key = self._key(key, "storage key")
        location = _text(location, f"{self.source}: storage location")
        if not _is_int(numel) or not 0 <= numel <= self.limits.max_storage_elements:
            raise UnsafePickleError(f"{self.source}: storage {key!r} declares an invalid element count {_describe(numel)}")
        root = self.roots.get(key)
        if root is None:
            root = self.roots[key] = TorchStorage(key, storage_type.element, numel, location)
        elif root.element != storage_type.element or root.numel != numel:
            raise UnsafePickleError(f"{self.source}: storage {key!r} is declared twice with different type or size")
        view = pid[5] if self.legacy else None
        if view is None:
            return root
        if type(view) is not tuple or len(view) != 3:
            raise UnsafePickleError(f"{self.source}: storage view must be (key, offset, size), got {_describe(view)}")
        view_key = self._key(view[0], "storage view key")
        offset, size = view[1], view[2]
        if not (_is_int(offset) and _is_int(size) and offset >= 0 and size >= 0 and offset + size <= numel):
            raise UnsafePickleError(f"{self.source}: storage view {view_key!r} ({_describe(offset)}, "
                                    f"{_describe(size)}) lies outside storage {key!r} of {numel} elements")
        if view_key in self.views:
            known_root, known_offset, known = self.views[view_key]
            if known_root is not root or known_offset != offset or known.numel != size:
                raise UnsafePickleError(f"{self.source}: storage view {view_key!r} is declared twice differently")
            return known
        storage = TorchStorage(view_key, root.element, size, location)
        self.views[view_key] = (root, offset, storage)
        return storage

    def attach_views(self) -> None:
        """Give every view storage its slice of the root's data (after the roots got theirs)."""
        for root, offset, view in self.views.values():
            if root.data is not None:
                start = offset * root.element.raw.itemsize
                view.data = root.data[start:start + view.nbytes]


def _torch_profile() -> Profile:
    limits = Limits(max_pickle_bytes=256 * 2**20)
    v2, v1, parameter = _tensor_factory(limits)
    storage_types = [_StorageType(name, element) for name, element in _TORCH_TYPES.items()]
    return Profile(
        name="torch",
        stand_ins=_globals(
            _Global("torch._utils._rebuild_tensor_v2", v2),
            _Global("torch._utils._rebuild_tensor", v1),
            _Global("torch._utils._rebuild_parameter", parameter),
            _Global("collections.OrderedDict", _ordered_dict),
            *storage_types,
        ),
        encoding="utf-8",
        limits=limits,
    )


#: PyTorch checkpoints (``torch.save``), tensors via persistent storage ids.
TORCH = _torch_profile()
