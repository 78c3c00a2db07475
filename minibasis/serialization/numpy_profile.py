"""The NumPy pickle profile :data:`CIFAR`: numeric and bool ``ndarray``s through
``numpy.core.multiarray._reconstruct`` (and ``numpy._core``), ``numpy.dtype``,
``collections.OrderedDict``; arrays must carry exactly ``prod(shape) * itemsize`` bytes."""
from __future__ import annotations

import math
import re

import numpy as np

from minibasis.serialization.errors import PickleDataError, UnsafePickleError
from minibasis.serialization.unpickler import (
    Limits, Profile, _check_shape, _describe, _Global, _globals, _ordered_dict, _Stub, _text,
)

__all__ = ["CIFAR"]


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


#: CIFAR batches (Python-2 pickles of dicts with bytes keys and NumPy arrays).
CIFAR = _cifar_profile()
