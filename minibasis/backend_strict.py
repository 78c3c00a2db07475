"""A strict stand-in for a device backend: ``minibasis.use("strict")`` on any CPU-only machine.

The classic bug of a NumPy/CuPy framework is a silent host/device mix-up: an
``numpy.asarray`` on a device array, an op between a device array and a host
array, a host constant written into a device buffer. NumPy never notices (every
array is a host array) and CuPy notices only on a machine with a GPU. This
backend makes such code fail everywhere, so the engine's tests catch it without
a GPU.

:class:`StrictArray` wraps a NumPy array (the "device memory") and behaves like
``cupy.ndarray`` where it matters:

* no implicit conversion to host NumPy: ``__array__`` raises, so
  ``numpy.asarray(a)``, ``numpy.array(a)`` and NumPy functions fail, and NumPy
  ufuncs refuse it (``__array_ufunc__ = None``);
* arithmetic, comparisons, indexing and assignment with a host ``numpy.ndarray``
  raise ``TypeError`` (Python and NumPy *scalars* are fine, as on CuPy);
* reductions return 0-d device arrays (as CuPy does), not NumPy scalars;
* ``float(a)``, ``int(a)``, ``bool(a)`` and ``a.item()`` work (on CuPy they
  synchronize and copy one value: allowed, as on CuPy).

Its array module (:data:`xp`) mirrors NumPy's namespace: every function and
submodule (``xp.random``, ``xp.lib.stride_tricks``, ``xp.linalg``) takes and returns
StrictArrays and refuses host arrays, except ``xp.asarray``/``xp.array`` (host →
device copies, like ``cupy.asarray``). ``backend.to_numpy`` copies back
explicitly, like ``cupy.asnumpy``. Results are computed by NumPy, so they equal
the "numpy" backend's bit for bit: a test can compare the two exactly.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import types
from dataclasses import dataclass
from typing import Iterator

import numpy

__all__ = ["StrictArray", "HostDeviceMixError", "TransferCounts", "count_transfers", "xp", "to_host", "load"]


class HostDeviceMixError(TypeError):
    """A host NumPy array met a device array without an explicit copy."""


@dataclass
class TransferCounts:
    """Explicit host/device traffic seen by the strict backend inside :func:`count_transfers`.

    ``to_device``: host data copied to the device (``xp.asarray``/``xp.array`` of host data,
    as ``cupy.asarray`` copies); ``to_host``: device arrays copied to the host (``to_host``,
    ``.get()``, ``.tolist()``, as ``cupy.asnumpy``); ``scalar_reads``: single values read on
    the host (``float()``, ``int()``, ``bool()``, ``.item()``, ``__index__``): on CuPy each one
    waits for the device to finish, so a training loop should do them only to log a number.
    """

    to_device: int = 0
    to_host: int = 0
    scalar_reads: int = 0


_counters: list[TransferCounts] = []


def _count(kind: str) -> None:
    for counts in _counters:
        setattr(counts, kind, getattr(counts, kind) + 1)


@contextlib.contextmanager
def count_transfers() -> Iterator[TransferCounts]:
    """``with count_transfers() as counts:`` — host/device copies and scalar reads, counted."""
    counts = TransferCounts()
    _counters.append(counts)
    try:
        yield counts
    finally:
        _counters.remove(counts)


def _refuse_host(value, where: str):
    raise HostDeviceMixError(
        f"{where}: got a host numpy.ndarray (shape {value.shape}, dtype {value.dtype}) where a device array "
        "of the 'strict' backend is needed; copy it explicitly with backend.asarray(...) "
        "(CuPy would refuse this too)")


def _unwrap(value, where: str):
    """Device array → its NumPy storage; host arrays are refused; containers are walked."""
    if isinstance(value, StrictArray):
        return value._a
    if isinstance(value, numpy.ndarray):
        _refuse_host(value, where)
    if isinstance(value, (tuple, list)):
        return type(value)(_unwrap(v, where) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v, where) for k, v in value.items()}
    return value


def _wrap(value):
    """NumPy results → device arrays (NumPy scalars become 0-d device arrays, as CuPy returns)."""
    if isinstance(value, numpy.ndarray):
        return StrictArray(value)
    if isinstance(value, numpy.generic) and not isinstance(value, (numpy.str_, numpy.bytes_, numpy.void)):
        return StrictArray(numpy.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    if isinstance(value, (numpy.random.RandomState, numpy.random.Generator)):
        return _StrictProxy(value, type(value).__name__)
    return value


def _binary(op, name: str, reflected: bool = False):
    def method(self, other):
        if isinstance(other, numpy.ndarray):
            _refuse_host(other, f"StrictArray.{name}")
        if not isinstance(other, (StrictArray, int, float, complex, bool, numpy.generic)):
            return NotImplemented  # e.g. a minibasis Tensor: let its reflected operator run
        other = other._a if isinstance(other, StrictArray) else other
        return _wrap(op(other, self._a) if reflected else op(self._a, other))
    method.__name__ = name
    return method


def _inplace(op, name: str):
    def method(self, other):
        if isinstance(other, numpy.ndarray):
            _refuse_host(other, f"StrictArray.{name}")
        op(self._a, other._a if isinstance(other, StrictArray) else other)
        return self
    method.__name__ = name
    return method


def _unary(op, name: str):
    def method(self):
        return _wrap(op(self._a))
    method.__name__ = name
    return method


def _forwarded_method(name: str):
    def method(self, *args, **kwargs):
        where = f"StrictArray.{name}"
        return _wrap(getattr(self._a, name)(*_unwrap(args, where), **_unwrap(kwargs, where)))
    method.__name__ = name
    return method


class StrictArray:
    """A device array of the strict backend (a NumPy array that will not pass as a host array)."""

    __slots__ = ("_a", "__weakref__")
    __array_ufunc__ = None  # NumPy ufuncs (and ndarray operators) refuse it / defer to it
    __array_priority__ = 100  # below minibasis.Tensor (1000), so Tensor's operators win

    def __init__(self, array: numpy.ndarray):
        if not isinstance(array, numpy.ndarray):
            raise TypeError(f"StrictArray wraps a numpy.ndarray, got {type(array).__name__}")
        self._a = array

    # -- no silent conversion to host ------------------------------------------------
    def __array__(self, *args, **kwargs):
        raise HostDeviceMixError(
            "implicit conversion of a 'strict' device array to a host NumPy array; "
            "use minibasis.backend.to_numpy(...) (cupy.asnumpy on CuPy)")

    def __array_function__(self, func, types_, args, kwargs):
        raise HostDeviceMixError(
            f"numpy.{func.__name__} was called on a 'strict' device array; use the backend's array "
            "module (backend.xp / backend.get_array_module) instead of numpy")

    def __iter__(self):
        # Iterating yields device sub-arrays (as on CuPy), never host values.
        return (StrictArray(self._a[i]) if self._a.ndim > 1 else _wrap(self._a[i]) for i in range(len(self)))

    # -- attributes -----------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: StrictArray(self._a.T))

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"StrictArray({self._a!r})"

    # -- scalar conversion (a synchronizing copy of one value on CuPy: allowed) -----------------
    def item(self, *args):
        _count("scalar_reads")
        return self._a.item(*args)

    def __float__(self):
        _count("scalar_reads")
        return float(self._a)

    def __int__(self):
        _count("scalar_reads")
        return int(self._a)

    def __index__(self):
        _count("scalar_reads")
        return operator.index(self._a)

    def __bool__(self):
        _count("scalar_reads")
        return bool(self._a)

    def __complex__(self):
        _count("scalar_reads")
        return complex(self._a)

    # -- indexing -----------------------------------------------------------------------
    def __getitem__(self, index):
        return _wrap(self._a[_unwrap(index, "StrictArray.__getitem__ index")])

    def __setitem__(self, index, value):
        self._a[_unwrap(index, "StrictArray.__setitem__ index")] = _unwrap(value, "StrictArray.__setitem__ value")

    # -- operators ------------------------------------------------------------------------
    __add__, __radd__ = _binary(operator.add, "__add__"), _binary(operator.add, "__radd__", True)
    __sub__, __rsub__ = _binary(operator.sub, "__sub__"), _binary(operator.sub, "__rsub__", True)
    __mul__, __rmul__ = _binary(operator.mul, "__mul__"), _binary(operator.mul, "__rmul__", True)
    __truediv__ = _binary(operator.truediv, "__truediv__")
    __rtruediv__ = _binary(operator.truediv, "__rtruediv__", True)
    __floordiv__ = _binary(operator.floordiv, "__floordiv__")
    __rfloordiv__ = _binary(operator.floordiv, "__rfloordiv__", True)
    __mod__, __rmod__ = _binary(operator.mod, "__mod__"), _binary(operator.mod, "__rmod__", True)
    __pow__, __rpow__ = _binary(operator.pow, "__pow__"), _binary(operator.pow, "__rpow__", True)
    __matmul__ = _binary(operator.matmul, "__matmul__")
    __rmatmul__ = _binary(operator.matmul, "__rmatmul__", True)
    __and__, __rand__ = _binary(operator.and_, "__and__"), _binary(operator.and_, "__rand__", True)
    __or__, __ror__ = _binary(operator.or_, "__or__"), _binary(operator.or_, "__ror__", True)
    __xor__, __rxor__ = _binary(operator.xor, "__xor__"), _binary(operator.xor, "__rxor__", True)
    __lt__, __le__ = _binary(operator.lt, "__lt__"), _binary(operator.le, "__le__")
    __gt__, __ge__ = _binary(operator.gt, "__gt__"), _binary(operator.ge, "__ge__")
    __eq__, __ne__ = _binary(operator.eq, "__eq__"), _binary(operator.ne, "__ne__")
    __hash__ = None
    __iadd__, __isub__ = _inplace(operator.iadd, "__iadd__"), _inplace(operator.isub, "__isub__")
    __imul__, __itruediv__ = _inplace(operator.imul, "__imul__"), _inplace(operator.itruediv, "__itruediv__")
    __ipow__, __imod__ = _inplace(operator.ipow, "__ipow__"), _inplace(operator.imod, "__imod__")
    __iand__, __ior__ = _inplace(operator.iand, "__iand__"), _inplace(operator.ior, "__ior__")
    __neg__, __pos__ = _unary(operator.neg, "__neg__"), _unary(operator.pos, "__pos__")
    __abs__, __invert__ = _unary(operator.abs, "__abs__"), _unary(operator.invert, "__invert__")

    def get(self) -> numpy.ndarray:
        """A host copy, as ``cupy.ndarray.get()``."""
        _count("to_host")
        return self._a.copy()

    def tolist(self):
        """Host Python values, as ``cupy.ndarray.tolist()`` (a device → host copy)."""
        _count("to_host")
        return self._a.tolist()


# Methods of cupy.ndarray the engine may use: forwarded to NumPy, device arrays in and out.
for _name in ("reshape", "transpose", "swapaxes", "sum", "mean", "max", "min", "argmax", "argmin",
              "prod", "var", "std", "cumsum", "any", "all", "astype", "copy", "fill", "ravel",
              "flatten", "squeeze", "clip", "dot", "nonzero", "round", "view", "take", "repeat",
              "conj", "diagonal", "trace", "sort", "argsort"):
    setattr(StrictArray, _name, _forwarded_method(_name))
del _name


class _StrictProxy:
    """Wraps a NumPy object (a random generator, a submodule) so that it speaks StrictArrays."""

    def __init__(self, target, label: str):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_label", label)

    def __getattr__(self, name):
        value = getattr(self._target, name)
        label = f"{self._label}.{name}"
        if isinstance(value, types.ModuleType):
            return _StrictProxy(value, label)
        if name == "ndarray":
            return StrictArray
        if isinstance(value, type):
            if issubclass(value, (numpy.random.RandomState, numpy.random.Generator)):
                return _wrapped_callable(value, label)
            return value  # dtypes and scalar types (xp.float32, xp.dtype) are the same on CuPy
        if isinstance(value, numpy.ufunc):
            return _StrictUfunc(value, label)  # keeps .at / .reduce / .outer (cupy.ufunc has them)
        if callable(value):
            return _wrapped_callable(value, label)
        return value  # constants: pi, inf, newaxis

    def __dir__(self):
        return dir(self._target)

    def __repr__(self) -> str:
        return f"<strict stand-in for {self._label}>"


class _StrictUfunc(_StrictProxy):
    """A NumPy ufunc that speaks StrictArrays: called directly, and through ``at``, ``reduce``, ``outer`` ..."""

    def __call__(self, *args, **kwargs):
        return _wrap(self._target(*_unwrap(args, self._label), **_unwrap(kwargs, self._label)))


def _wrapped_callable(func, label: str):
    @functools.wraps(func)
    def call(*args, **kwargs):
        return _wrap(func(*_unwrap(args, label), **_unwrap(kwargs, label)))
    return call


def _asarray(obj, dtype=None, order=None):
    """``xp.asarray``: a device array as is (cast if asked), host data copied to the device.

    This is the explicit host → device copy that ``cupy.asarray`` also performs.
    """
    if isinstance(obj, StrictArray):
        return _wrap(numpy.asarray(obj._a, dtype=dtype, order=order))
    _count("to_device")
    return StrictArray(numpy.array(_unwrap(obj, "strict.asarray") if isinstance(obj, (list, tuple)) else obj,
                                   dtype=dtype, order=order, copy=True))


def _array(obj, dtype=None, copy=True, order="K", ndmin=0):
    """``xp.array``: like :func:`_asarray` but copies device arrays too (by default)."""
    source = obj._a if isinstance(obj, StrictArray) else (
        _unwrap(obj, "strict.array") if isinstance(obj, (list, tuple)) else obj)
    if not isinstance(obj, StrictArray):
        copy = True
        _count("to_device")
    return StrictArray(numpy.array(source, dtype=dtype, copy=copy, order=order, ndmin=ndmin))


class _StrictModule(_StrictProxy):
    """The strict backend's array module: NumPy's namespace, device arrays in and out."""

    def __init__(self):
        super().__init__(numpy, "strict")
        object.__setattr__(self, "asarray", _asarray)
        object.__setattr__(self, "array", _array)
        object.__setattr__(self, "ascontiguousarray", _wrapped_callable(numpy.ascontiguousarray, "strict.ascontiguousarray"))
        object.__setattr__(self, "asnumpy", to_host)
        object.__setattr__(self, "__name__", "minibasis.backend_strict.xp")

    def __getattr__(self, name):
        value = super().__getattr__(name)
        # Cache so repeated look-ups (xp.zeros in a loop) cost one dict access.
        object.__setattr__(self, name, value)
        return value

    def get_array_module(self, *arrays):
        return self


def to_host(array) -> numpy.ndarray:
    """Explicit device → host copy (``cupy.asnumpy``)."""
    if isinstance(array, StrictArray):
        _count("to_host")
        return array._a.copy()
    if isinstance(array, numpy.ndarray):
        return array
    raise TypeError(f"to_host expects a StrictArray, got {type(array).__name__}")


#: The array module of the strict backend (what ``backend.xp`` is after ``use("strict")``).
xp = _StrictModule()


def load():
    """The :class:`minibasis.backend.Backend` record for ``register_backend("strict", load)``."""
    from minibasis import backend
    return backend.Backend("strict", xp, (StrictArray,), to_host)
