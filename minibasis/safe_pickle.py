"""The one restricted unpickler that minibasis uses for every pickle it reads.

A pickle is a program: ``pickle.load`` on a file from outside can run any code.
Every loader in minibasis that meets a pickle (CIFAR batches, PyTorch
checkpoints) goes through :func:`safe_load` instead, which

1. reads the whole pickle into memory (at most ``limits.max_pickle_bytes``),
2. scans its opcodes with :mod:`pickletools` *before* anything is built:
   refuses opcodes that instantiate classes (INST, OBJ, NEWOBJ, NEWOBJ_EX),
   extension codes and out-of-band buffers, refuses GLOBALs outside the
   profile's allow-list, refuses persistent ids where the format has none,
   and bounds the opcode count and the memo indices (a huge ``LONG_BINPUT``
   index would make the C unpickler allocate a memo table of that size),
3. unpickles with a :class:`pickle.Unpickler` subclass whose ``find_class``
   returns *stand-ins implemented here* for the admitted globals (never the
   real numpy or torch callables; torch is never imported), so the pickle can
   only call functions that validate their arguments and build inert
   placeholder objects,
4. walks the result once (iteratively, no recursion) to replace the
   placeholders by NumPy arrays, refusing reference cycles, nesting deeper
   than ``limits.max_depth`` and structures whose size *with shared references
   counted every time they are reached* exceeds ``limits.max_nodes`` (a
   "billion laughs" DAG of lists referencing each other through the memo is
   tiny in memory but explodes in anything that walks it).

Profiles (what each format may name):

* :data:`CIFAR`: ``numpy.core.multiarray._reconstruct``,
  ``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``,
  ``collections.OrderedDict``. Arrays must have a numeric or bool dtype and
  carry exactly ``prod(shape) * itemsize`` bytes.
* :data:`TORCH`: ``torch._utils._rebuild_tensor_v2``,
  ``torch._utils._rebuild_tensor``, ``torch._utils._rebuild_parameter``,
  ``torch.<Type>Storage`` for the dtypes in :data:`TORCH_STORAGE_TYPES`,
  ``torch.UntypedStorage``, ``collections.OrderedDict``; persistent ids must
  be ``('storage', <storage type>, key, location, numel[, view])`` tuples (see
  :class:`TorchStorages`). Tensors become NumPy arrays only after their
  storages' bytes are attached (:func:`resolve`).
* :data:`PLAIN`: no globals at all (plain containers, numbers, strings).

Everything else raises :class:`UnsafePickleError` naming the global (or
opcode) and the file. Malformed or truncated pickles raise
:class:`PickleDataError`. Both are ``ValueError`` subclasses; nothing else
escapes :func:`safe_load`.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = [
    "PickleDataError", "UnsafePickleError", "Limits", "Profile", "CIFAR", "TORCH", "PLAIN",
    "safe_load", "safe_load_prefix", "resolve", "Resolved", "TorchStorage", "TorchStorages", "TorchElement",
    "TORCH_STORAGE_TYPES",
]


class PickleDataError(ValueError):
    """A pickle is malformed, truncated or inconsistent (names the file)."""


class UnsafePickleError(PickleDataError):
    """A pickle asks for something the restricted unpickler refuses: a global outside
    the allow-list, a forbidden opcode, a bad persistent id, or more resources than
    the limits allow. Names the offending global/opcode and the file."""


@dataclass(frozen=True)
class Limits:
    """Resource bounds applied to one pickle."""

    #: Largest pickle stream read into memory (bytes).
    max_pickle_bytes: int = 512 * 2**20
    #: Most opcodes in one pickle; each opcode builds at most one object.
    max_opcodes: int = 8_000_000
    #: Most nodes of the loaded structure, a shared object counted each time it is reached.
    max_nodes: int = 4_000_000
    #: Deepest nesting of containers.
    max_depth: int = 64
    #: Most dimensions of an array or tensor.
    max_ndim: int = 32
    #: Largest element count a storage may declare (the real bytes are checked too).
    max_storage_elements: int = 2**40


@dataclass(frozen=True)
class Profile:
    """What one file format may name: stand-ins keyed by ``"module.qualname"``."""

    name: str
    stand_ins: Mapping[str, "_Global"]
    #: How Python-2 ``str`` opcodes are decoded (CIFAR's official pickles need "bytes").
    encoding: str = "utf-8"
    limits: Limits = field(default_factory=Limits)

    def stand_in(self, module: str, qualname: str, source: str) -> "_Global":
        full_name = f"{module}.{qualname}"
        try:
            return self.stand_ins[full_name]
        except KeyError:
            raise UnsafePickleError(
                f"{source}: refused global {full_name!s:.200} (the {self.name!r} profile admits only "
                f"{sorted(self.stand_ins) or 'no globals'})") from None


# ---------------------------------------------------------------------------
# Stand-ins: what the pickle gets instead of the real globals
# ---------------------------------------------------------------------------
class _Global:
    """Stand-in for one admitted global: callable with positional arguments only.

    Instances have no ``__dict__`` and refuse BUILD, so a pickle cannot rewrite
    them (a plain function would let BUILD's slot-state set ``__defaults__``).
    """

    __slots__ = ("full_name", "_build")

    def __init__(self, full_name: str, build: Callable[..., Any]):
        self.full_name = full_name
        self._build = build

    def __call__(self, *args):
        return self._build(*args)

    def __setstate__(self, state):
        raise UnsafePickleError(f"BUILD applied to the global {self.full_name}")

    def __repr__(self):
        return f"<stand-in for {self.full_name}>"


class _Stub:
    """Placeholder built while unpickling; :func:`resolve` turns it into its final value."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafePickleError(f"BUILD applied to a {type(self).__name__.strip('_')}")

    def _finish(self, ctx: "_ResolveContext") -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def _is_int(value) -> bool:
    return type(value) is int  # bool excluded on purpose


def _check_shape(shape, what: str, limits: Limits) -> tuple[int, ...]:
    if type(shape) is not tuple or not all(_is_int(d) and d >= 0 for d in shape):
        raise UnsafePickleError(f"{what}: shape must be a tuple of non-negative ints, got {_describe(shape)}")
    if len(shape) > limits.max_ndim:
        raise UnsafePickleError(f"{what}: {len(shape)} dimensions exceed the limit of {limits.max_ndim}")
    return shape


def _describe(value) -> str:
    """A short, safe description of an untrusted value for error messages."""
    if isinstance(value, (int, float, bool, type(None))):
        return repr(value)
    if isinstance(value, (str, bytes)):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, tuple) and len(value) <= 8 and all(isinstance(v, (int, str, bytes, type(None))) for v in value):
        return repr(value)
    return f"<{type(value).__name__}>"


def _text(value, what: str) -> str:
    """A str from a str or ASCII bytes (Python-2 pickles give bytes)."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise UnsafePickleError(f"{what} must be ASCII, got {_describe(value)}") from None
    if isinstance(value, str):
        return value
    raise UnsafePickleError(f"{what} must be a string, got {_describe(value)}")


# -- NumPy arrays (CIFAR batches) -------------------------------------------
_NUMERIC_KINDS = "biufc"
_DTYPE_NAME = re.compile(r"[biufc][0-9]{1,2}\Z")


class _DtypeStub(_Stub):
    """``numpy.dtype(name, align, copy)`` + BUILD state; only plain numeric/bool dtypes."""

    __slots__ = ("dtype", "_built")

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self._built = False

    def __setstate__(self, state):
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if self._built:
            raise UnsafePickleError("dtype BUILD applied twice")
        if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise UnsafePickleError(f"unexpected numpy dtype state {_describe(state)}")
        order = _text(state[1], "dtype byte order")
        if order not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"unexpected dtype byte order {order!r}")
        if state[2] is not None or state[3] is not None or state[4] is not None:
            raise UnsafePickleError("structured or subarray dtypes are not admitted")
        self.dtype = self.dtype.newbyteorder(order) if order != "|" else self.dtype
        self._built = True

    def _finish(self, ctx):
        return self.dtype


def _make_dtype(name, align=False, copy=True):
    text = _text(name, "numpy dtype name")
    if not _DTYPE_NAME.match(text):
        raise UnsafePickleError(f"numpy dtype {text!r:.40} is not admitted (numeric or bool kinds only)")
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise UnsafePickleError(f"unknown numpy dtype {text!r}") from None
    if dtype.kind not in _NUMERIC_KINDS:
        raise UnsafePickleError(f"numpy dtype {text!r} is not admitted (numeric or bool kinds only)")
    return _DtypeStub(dtype)


class _ArrayStub(_Stub):
    """``_reconstruct(ndarray, (0,), b'b')`` + BUILD ``(1, shape, dtype, is_fortran, raw_bytes)``."""

    __slots__ = ("array", "_limits")

    def __init__(self, limits: Limits):
        self.array = None
        self._limits = limits

    def __setstate__(self, state):
        if self.array is not None:
            raise UnsafePickleError("ndarray BUILD applied twice")
        if type(state) is not tuple or len(state) not in (4, 5):
            raise UnsafePickleError(f"unexpected ndarray state {_describe(state)}")
        if len(state) == 5:
            if state[0] != 1:
                raise UnsafePickleError(f"unsupported ndarray state version {_describe(state[0])}")
            state = state[1:]
        shape, dtype_stub, fortran, raw = state
        shape = _check_shape(shape, "ndarray", self._limits)
        if not isinstance(dtype_stub, _DtypeStub):
            raise UnsafePickleError(f"ndarray dtype must come from numpy.dtype, got {_describe(dtype_stub)}")
        if type(fortran) is not bool:
            raise UnsafePickleError(f"ndarray order flag must be a bool, got {_describe(fortran)}")
        if isinstance(raw, str):  # Python-2 str decoded as latin-1
            raw = raw.encode("latin-1")
        if not isinstance(raw, (bytes, bytearray)):
            raise UnsafePickleError(f"ndarray data must be raw bytes (object arrays are refused), got {_describe(raw)}")
        dtype = dtype_stub.dtype
        declared = math.prod(shape) * dtype.itemsize
        if declared != len(raw):
            raise UnsafePickleError(
                f"ndarray declares shape {shape} of {dtype} ({declared} bytes) but carries {len(raw)} bytes")
        flat = np.frombuffer(raw, dtype=dtype)
        array = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
        # A private, writable, native-order, C-contiguous copy.
        self.array = np.array(array, dtype=dtype.newbyteorder("="), order="C")

    def _finish(self, ctx):
        if self.array is None:
            raise PickleDataError("an ndarray was created but never given its data (no BUILD)")
        return self.array


class _Marker(_Global):
    """A global admitted only as an argument (``numpy.ndarray`` as _reconstruct's subtype)."""

    __slots__ = ()

    def __init__(self, full_name: str, role: str):
        def refuse(*args):
            raise UnsafePickleError(f"{full_name} may only appear as {role}, not be called")
        super().__init__(full_name, refuse)


_NDARRAY = _Marker("numpy.ndarray", "the subtype argument of numpy's _reconstruct")


def _reconstruct_factory(limits: Limits):
    def reconstruct(subtype, shape, typecode):
        if subtype is not _NDARRAY:
            raise UnsafePickleError(f"_reconstruct subtype must be numpy.ndarray, got {_describe(subtype)}")
        if shape != (0,) or typecode not in (b"b", "b"):
            raise UnsafePickleError(f"unexpected _reconstruct arguments {_describe(shape)}, {_describe(typecode)}")
        return _ArrayStub(limits)
    return reconstruct


# -- OrderedDict -------------------------------------------------------------
class _OrderedDictStub(collections.OrderedDict):
    """``collections.OrderedDict``; BUILD may only set torch's ``_metadata`` (dropped)."""

    def __setstate__(self, state):
        if type(state) is not dict or not set(state) <= {"_metadata"}:
            raise UnsafePickleError(
                f"OrderedDict BUILD may only set '_metadata', got {_describe(state) if type(state) is not dict else sorted(map(_describe, state))}")

    def __reduce__(self):  # pragma: no cover - never pickled by minibasis
        return (collections.OrderedDict, (list(self.items()),))


def _ordered_dict(*args):
    if len(args) > 1:
        raise UnsafePickleError(f"OrderedDict takes at most one argument, got {len(args)}")
    if args and type(args[0]) not in (list, tuple):
        raise UnsafePickleError(f"OrderedDict argument must be a list of pairs, got {_describe(args[0])}")
    return _OrderedDictStub(*args)


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


# ---------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------
def _globals(*pairs) -> dict[str, _Global]:
    return {g.full_name: g for g in pairs}


def _cifar_profile() -> Profile:
    limits = Limits()
    reconstruct = _reconstruct_factory(limits)
    return Profile(
        name="cifar",
        stand_ins=_globals(
            _Global("numpy.core.multiarray._reconstruct", reconstruct),
            _Global("numpy._core.multiarray._reconstruct", reconstruct),
            _NDARRAY,
            _Global("numpy.dtype", _make_dtype),
            _Global("collections.OrderedDict", _ordered_dict),
        ),
        encoding="bytes",
        limits=limits,
    )


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


#: CIFAR batches (Python-2 pickles of dicts with bytes keys and NumPy arrays).
CIFAR = _cifar_profile()
#: PyTorch checkpoints (``torch.save``), tensors via persistent storage ids.
TORCH = _torch_profile()
#: Plain data only: containers, numbers, strings, bytes, bools, None.
PLAIN = Profile(name="plain", stand_ins={}, encoding="utf-8", limits=Limits(max_pickle_bytes=64 * 2**20))


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
_REFUSED_OPCODES = {
    "INST": "instantiates a class", "OBJ": "instantiates a class",
    "NEWOBJ": "instantiates a class", "NEWOBJ_EX": "instantiates a class",
    "EXT1": "names a global through the copyreg extension registry",
    "EXT2": "names a global through the copyreg extension registry",
    "EXT4": "names a global through the copyreg extension registry",
    "NEXT_BUFFER": "needs out-of-band buffers", "READONLY_BUFFER": "needs out-of-band buffers",
}
_PERSISTENT_OPCODES = {"PERSID", "BINPERSID"}
_MEMO_PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}


# Length-prefixed payloads (strings, bytes): the scan skips them instead of decoding
# (a CIFAR batch is one 30 MB string); value = (prefix size, signed).
_SKIPPED_PAYLOADS = {
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}


def _opcodes(stream: io.BytesIO, size: int):
    """Like ``pickletools.genops`` but skips long payloads: yields (opcode, arg, pos)."""
    while True:
        pos = stream.tell()
        code = stream.read(1)
        opcode = pickletools.code2op.get(code.decode("latin-1"))
        if opcode is None:
            if not code:
                raise ValueError("pickle exhausted before seeing STOP")
            raise ValueError(f"unknown opcode {code!r} at byte {pos}")
        arg = None
        if opcode.arg is not None:
            skipped = _SKIPPED_PAYLOADS.get(opcode.arg.n)
            if skipped is None:
                arg = opcode.arg.reader(stream)
            else:
                width, signed = skipped
                prefix = stream.read(width)
                if len(prefix) != width:
                    raise ValueError(f"truncated length of {opcode.name} at byte {pos}")
                length = int.from_bytes(prefix, "little", signed=signed)
                if length < 0 or stream.tell() + length > size:
                    raise ValueError(f"{opcode.name} at byte {pos} declares {length} bytes, "
                                     f"{size - stream.tell()} remain")
                stream.seek(length, io.SEEK_CUR)
        yield opcode, arg, pos
        if opcode.name == "STOP":
            return


def _prescan(stream: io.BytesIO, start: int, profile: Profile, persistent: bool, source: str) -> int:
    """Check every opcode of the pickle starting at ``start``; returns the offset after STOP."""
    limits = profile.limits
    size = stream.seek(0, io.SEEK_END)
    stream.seek(start)
    count = 0
    try:
        for opcode, arg, pos in _opcodes(stream, size):
            count += 1
            if count > limits.max_opcodes:
                raise UnsafePickleError(f"{source}: more than {limits.max_opcodes} opcodes (limit)")
            if pos - start > limits.max_pickle_bytes:
                raise UnsafePickleError(f"{source}: pickle longer than {limits.max_pickle_bytes} bytes (limit)")
            name = opcode.name
            if name in _REFUSED_OPCODES:
                detail = f" naming {str(arg).replace(' ', '.')!s:.200}" if name in ("INST",) else ""
                raise UnsafePickleError(
                    f"{source}: refused opcode {name}{detail} at byte {pos} (it {_REFUSED_OPCODES[name]})")
            if name == "PROTO" and not 0 <= arg <= pickle.HIGHEST_PROTOCOL:
                raise PickleDataError(f"{source}: unsupported pickle protocol {arg} at byte {pos}")
            if name == "GLOBAL":
                module, _, qualname = str(arg).partition(" ")
                profile.stand_in(module, qualname, source)  # raises with the global's name
            elif name in _PERSISTENT_OPCODES and not persistent:
                raise UnsafePickleError(f"{source}: persistent id at byte {pos}, but this format has none")
            elif name in _MEMO_PUT_OPCODES and not 0 <= arg <= count:
                # The pickler numbers memo entries 0, 1, 2, ...; a larger index would
                # make the C unpickler allocate a memo table of that size.
                raise UnsafePickleError(f"{source}: memo index {arg} at byte {pos} out of range (limit {count})")
    except PickleDataError:
        raise
    except Exception as exc:  # pickletools raises ValueError on truncation, others on garbage
        raise PickleDataError(f"{source}: malformed or truncated pickle: {exc}") from exc
    return stream.tell()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, stream, profile: Profile, source: str, persistent_load):
        super().__init__(stream, encoding=profile.encoding, errors="strict")
        self._profile = profile
        self._source = source
        self._persistent = persistent_load

    def find_class(self, module, name):
        return self._profile.stand_in(module, name, self._source)

    def persistent_load(self, pid):
        if self._persistent is None:
            raise UnsafePickleError(f"{self._source}: persistent id, but this format has none")
        return self._persistent(pid)


def safe_load_prefix(data: bytes, offset: int = 0, *, profile: Profile,
                     persistent_load: Callable[[Any], Any] | None = None,
                     name: str = "<pickle>", resolve: bool = True) -> tuple[Any, int]:
    """Load the pickle that starts at ``data[offset]``; returns ``(object, offset after it)``.

    Used for files that hold several pickles back to back (legacy torch checkpoints).
    With ``resolve=False`` the result still holds placeholders (tensors whose storage
    bytes come later) and must be passed through :func:`resolve`.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if not 0 <= offset <= len(data):
        raise PickleDataError(f"{name}: offset {offset} outside the {len(data)}-byte buffer")
    stream = io.BytesIO(data)  # shares the bytes object, no copy
    end = _prescan(stream, offset, profile, persistent_load is not None, name)
    stream.seek(offset)
    try:
        obj = _RestrictedUnpickler(stream, profile, name, persistent_load).load()
    except PickleDataError as exc:
        raise _naming(exc, name) from exc.__cause__
    except Exception as exc:  # UnpicklingError, TypeError from a bad REDUCE, ...
        raise PickleDataError(f"{name}: malformed pickle: {type(exc).__name__}: {exc}"[:2000]) from exc
    if stream.tell() != end:
        raise PickleDataError(f"{name}: unpickler stopped at byte {stream.tell()}, scan at byte {end}")
    if resolve:
        obj = _resolve(obj, name=name, limits=profile.limits)
    return obj, end


def _naming(exc: PickleDataError, name: str) -> PickleDataError:
    """``exc`` with the file name in front (stand-ins raise without knowing the file)."""
    message = str(exc)
    return exc if message.startswith(f"{name}:") else type(exc)(f"{name}: {message}")


def _read_bounded(source, limit: int, name: str) -> tuple[bytes, int | None]:
    """Up to ``limit`` bytes from the current position, allocating only what is there
    (``read(n)`` on a buffered file allocates n bytes up front)."""
    if source.seekable():
        start = source.tell()
        remaining = source.seek(0, io.SEEK_END) - start
        source.seek(start)
        data = source.read(max(0, min(limit, remaining)))
    else:
        start, chunks, total = None, [], 0
        while total < limit:
            chunk = source.read(min(2**20, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        data = b"".join(chunks) if chunks else source.read(0)
    if not isinstance(data, bytes):
        raise TypeError(f"{name}: safe_load needs a binary file, read gave {type(data).__name__}")
    return data, start


def safe_load(source, *, profile: Profile, persistent_load: Callable[[Any], Any] | None = None,
              name: str | None = None, resolve: bool = True) -> Any:
    """Load one pickle from ``source`` (bytes-like or a binary file) through the allow-list
    of ``profile``. A file is read from its current position; a seekable file is left just
    after the pickle. Raises :class:`UnsafePickleError` / :class:`PickleDataError` only.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        obj, _ = safe_load_prefix(bytes(source), 0, profile=profile, persistent_load=persistent_load,
                                  name=name or "<bytes>", resolve=resolve)
        return obj
    name = name or str(getattr(source, "name", "<file>"))
    data, start = _read_bounded(source, profile.limits.max_pickle_bytes + 1, name)
    obj, end = safe_load_prefix(data, 0, profile=profile, persistent_load=persistent_load,
                                name=name, resolve=resolve)
    if start is not None:
        source.seek(start + end)
    return obj


# ---------------------------------------------------------------------------
# Resolving placeholders
# ---------------------------------------------------------------------------
class _ResolveContext:
    def __init__(self, source: str, byteorder: str, output_budget: int | None):
        self.source = source
        self.byteorder = byteorder
        self.budget = output_budget
        self.bfloat16_count = 0

    def spend(self, nbytes: int, what: str) -> None:
        if self.budget is None:
            return
        self.budget -= nbytes
        if self.budget < 0:
            raise UnsafePickleError(f"{self.source}: {what} exceeds the output budget "
                                    "(more bytes than the file can justify)")

    def note_bfloat16(self) -> None:
        self.bfloat16_count += 1


_SCALAR_TYPES = (str, bytes, bytearray, int, float, bool, type(None))
_SEQUENCE_TYPES = (list, tuple, set, frozenset)


class Resolved:
    """Notes from :func:`resolve` about conversions made (bfloat16 → float32)."""

    def __init__(self):
        self.bfloat16_tensors = 0


def resolve(obj, *, name: str = "<pickle>", limits: Limits | None = None, byteorder: str = "little",
            output_budget: int | None = None, notes: Resolved | None = None) -> Any:
    """Replace placeholders by their values (NumPy arrays, OrderedDicts) and check the shape
    of the whole structure: no cycles, depth ≤ ``limits.max_depth``, and at most
    ``limits.max_nodes`` nodes counting shared references every time (billion laughs).

    ``output_budget`` bounds the bytes of tensors materialized from storages (a tensor
    with zero strides could otherwise expand a tiny storage to any size).
    Shared containers stay shared in the result.
    """
    limits = limits or Limits()
    if byteorder not in ("little", "big"):
        raise PickleDataError(f"{name}: byte order must be 'little' or 'big', got {byteorder!r}")
    ctx = _ResolveContext(name, byteorder, output_budget)
    done: dict[int, tuple[Any, int]] = {}
    on_path: set[int] = set()
    stack: list[list] = []  # frames: [obj, children, next index, values, size, depth]

    def visit(item, depth):
        """(value, size) of a finished node, or None when a frame was pushed for it."""
        kind = type(item)
        if kind in _SCALAR_TYPES:
            return item, 1
        key = id(item)
        if key in done:
            return done[key]
        if key in on_path:
            raise UnsafePickleError(f"{name}: reference cycle through a {kind.__name__}")
        if depth > limits.max_depth:
            raise UnsafePickleError(f"{name}: containers nested deeper than {limits.max_depth} (limit)")
        if kind in (dict, _OrderedDictStub):
            children = [x for pair in item.items() for x in pair]
        elif kind in _SEQUENCE_TYPES:
            if kind in (list, tuple) and all(type(x) in _SCALAR_TYPES for x in item):
                result = (item, len(item) + 1)  # nothing to replace: keep the object
                _account(result[1])
                done[key] = result
                return result
            children = list(item)
        elif isinstance(item, _Stub):
            result = (item._finish(ctx), 1)
            done[key] = result
            return result
        elif isinstance(item, _Global):
            raise UnsafePickleError(f"{name}: the global {item.full_name} appears as a value")
        else:
            raise UnsafePickleError(f"{name}: unexpected object of type {kind.__name__} in the pickle")
        on_path.add(key)
        stack.append([item, children, 0, [], 1, depth])
        return None

    def _account(size):
        if size > limits.max_nodes:
            raise UnsafePickleError(f"{name}: structure has more than {limits.max_nodes} nodes counting "
                                    "shared references (limit; a 'billion laughs' pickle?)")

    def build(item, values):
        kind = type(item)
        try:
            if kind is dict:
                return dict(zip(values[0::2], values[1::2]))
            if kind is _OrderedDictStub:
                return collections.OrderedDict(zip(values[0::2], values[1::2]))
            return kind(values)
        except TypeError as exc:  # e.g. an array used as a dict key
            raise PickleDataError(f"{name}: cannot rebuild a {kind.__name__}: {exc}") from exc

    first = visit(obj, 0)
    if first is not None:
        value = first[0]
    else:
        value = None
        while stack:
            frame = stack[-1]
            item, children, index, values, size, depth = frame
            if index < len(children):
                frame[2] = index + 1
                child = visit(children[index], depth + 1)
                if child is not None:
                    values.append(child[0])
                    frame[4] = size + child[1]
                    _account(frame[4])
                continue
            stack.pop()
            on_path.discard(id(item))
            result = (build(item, values), size)
            done[id(item)] = result
            if stack:
                parent = stack[-1]
                parent[3].append(result[0])
                parent[4] += size
                _account(parent[4])
            else:
                value = result[0]
    if notes is not None:
        notes.bfloat16_tensors += ctx.bfloat16_count
    return value


_resolve = resolve  # safe_load's ``resolve`` flag shadows the function's name there
