"""The array backend: the only module of the engine that imports numpy or cupy.

Everything above it (autograd, functions, nn) asks this module for the array
module (``backend.xp``, or ``get_array_module(array)``) so the same code runs on
NumPy and on CuPy. Always write ``backend.xp`` (attribute access at call time):
``from minibasis.backend import xp`` would freeze the module chosen at import.

It also owns the *counted primitives* (``matmul``, ``tensordot``, ``einsum``,
``mul``): every multiplication a differentiable op performs goes through one of
them, and each reports the multiplications it really executes, computed from
the operand shapes it was handed, to the recorder installed by
``minibasis.counting``. Nothing else in minibasis computes counts.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy

__all__ = [
    "xp", "use", "current", "get_array_module", "backend_of", "device_backend", "is_host_array", "to_numpy", "asarray", "to_backend", "as_strided",
    "register_backend", "available_backends", "default_dtype",
    "matmul", "tensordot", "einsum", "mul", "set_mult_recorder",
    "manual_seed", "host_rng", "random_uniform", "random_normal",
]


@dataclass(frozen=True)
class Backend:
    """One array library: its module, its array type(s) and how to copy to host."""

    name: str
    xp: Any
    array_types: tuple
    to_host: Callable[[Any], numpy.ndarray]


def _numpy_backend() -> Backend:
    return Backend("numpy", numpy, (numpy.ndarray,), numpy.asarray)


def _cupy_backend() -> Backend:
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "the 'cupy' backend needs CuPy: pip install 'minibasis[gpu]' (cupy-cuda12x) "
            f"on a machine with an NVIDIA GPU ({exc})") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(f"CuPy is installed but no CUDA device is usable: {exc}") from exc
    if count < 1:  # pragma: no cover
        raise RuntimeError("CuPy is installed but no CUDA device was found")
    return Backend("cupy", cupy, (cupy.ndarray,), cupy.asnumpy)


def _strict_backend() -> Backend:
    # A CPU-only stand-in for a device backend that refuses silent host/device mixing
    # (see minibasis/backend_strict.py); the engine's tests run on it.
    from minibasis import backend_strict
    return backend_strict.load()


_LOADERS: dict[str, Callable[[], Backend]] = {"numpy": _numpy_backend, "cupy": _cupy_backend,
                                              "strict": _strict_backend}
_LOADED: dict[str, Backend] = {}

_active: Backend = _numpy_backend()
_LOADED["numpy"] = _active
#: The array module of the active backend (numpy or cupy). Read it as ``backend.xp``.
xp: Any = numpy
#: The default floating dtype for new tensors and parameters.
default_dtype = numpy.float32


def register_backend(name: str, loader: Callable[[], Backend]) -> None:
    """Make ``use(name)`` available; ``loader`` builds the :class:`Backend` on first use."""
    _LOADERS[name] = loader
    _LOADED.pop(name, None)


def available_backends() -> list[str]:
    return sorted(_LOADERS)


def _load(name: str) -> Backend:
    if name not in _LOADERS:
        raise ValueError(f"unknown backend {name!r}; expected one of {available_backends()}")
    if name not in _LOADED:
        _LOADED[name] = _LOADERS[name]()
    return _LOADED[name]


def use(name: str) -> None:
    """Select the backend ("numpy", "cupy", or a registered one) for new tensors.

    This is the one global switch: everything created afterwards (tensors, parameters,
    data batches) lives on it. ``Module.to(name)`` only moves one module's arrays.
    """
    global _active, xp
    _active = _load(name)
    xp = _active.xp


def current() -> str:
    """Name of the active backend."""
    return _active.name


def get_array_module(*arrays) -> Any:
    """The array module that owns ``arrays`` (the first non-NumPy one wins), else the active one."""
    for backend in _LOADED.values():
        if backend.name == "numpy":
            continue
        if any(isinstance(a, backend.array_types) for a in arrays):
            return backend.xp
    if any(isinstance(a, numpy.ndarray) for a in arrays):
        return numpy
    return xp


def backend_of(array) -> str:
    """The name of the loaded backend that owns ``array`` ("numpy" for anything else)."""
    for backend in _LOADED.values():
        if backend.name != "numpy" and isinstance(array, backend.array_types):
            return backend.name
    return "numpy"


#: PyTorch's device names, read as the backend that plays their part.
DEVICE_ALIASES = {"cpu": "numpy", "cuda": "cupy"}


def device_backend(name) -> str | None:
    """The backend that ``name`` names (a backend name, or "cpu"/"cuda"); None if it names none."""
    if not isinstance(name, str):
        return None
    name = DEVICE_ALIASES.get(name, name)
    return name if name in _LOADERS else None


def is_host_array(array) -> bool:
    """True for a host NumPy array: reading a value from it never waits for a device."""
    return type(array) is numpy.ndarray


def to_numpy(array) -> numpy.ndarray:
    """Copy an array of any loaded backend (or a Tensor) to a host NumPy array."""
    # A minibasis Tensor (duck-typed: the backend sits below autograd) hands over its array.
    data = array.data if hasattr(array, "requires_grad") and hasattr(array, "creator") else array
    for backend in _LOADED.values():
        if isinstance(data, backend.array_types):
            return backend.to_host(data)
    return numpy.asarray(data)


def to_backend(obj, name: str, dtype=None):
    """``obj`` as an array of backend ``name`` (copied across host and device if needed).

    Unlike :func:`asarray` it does not use the active backend, and it does not change it.
    """
    return _convert(obj, _load(name), dtype)


def _convert(obj, target: Backend, dtype=None):
    """``obj`` as an array of ``target``: as it is if it already is one, else via the host."""
    if isinstance(obj, target.array_types):
        return obj if dtype is None or obj.dtype == dtype else obj.astype(dtype)
    for backend in _LOADED.values():
        if backend is not target and isinstance(obj, backend.array_types):
            obj = backend.to_host(obj)
            break
    return target.xp.asarray(obj, dtype=dtype)


def as_strided(array, shape: tuple, strides: tuple):
    """A view of ``array`` with the given shape and byte strides (NumPy's and CuPy's ``as_strided``).

    Nothing is checked: the caller guarantees that every element of the view lies
    inside ``array`` (as im2col's sliding windows over a padded input do).
    """
    module = get_array_module(array)
    return module.lib.stride_tricks.as_strided(array, shape=tuple(shape), strides=tuple(strides))


def asarray(obj, dtype=None):
    """``obj`` as an array of the active backend (host data is copied to the device)."""
    return _convert(obj, _active, dtype)


# ---------------------------------------------------------------------------
# Counted primitives
# ---------------------------------------------------------------------------
_recorder: Callable[[str, int], None] | None = None


def set_mult_recorder(recorder: Callable[[str, int], None] | None) -> None:
    """Install the sink that receives ``(primitive, mults)`` for every counted product."""
    global _recorder
    _recorder = recorder


def _report(primitive: str, mults: int) -> None:
    if _recorder is not None:
        _recorder(primitive, int(mults))


def _shape(a) -> tuple:
    return tuple(getattr(a, "shape", ()))


def _matmul_mults(a_shape: tuple, b_shape: tuple) -> int:
    """Multiplications of ``a @ b`` with NumPy's matmul semantics (1-D and batch broadcasting)."""
    a_shape = (1,) + a_shape if len(a_shape) == 1 else a_shape
    b_shape = b_shape + (1,) if len(b_shape) == 1 else b_shape
    batch = numpy.broadcast_shapes(a_shape[:-2], b_shape[:-2])
    m, k = a_shape[-2:]
    n = b_shape[-1]
    return math.prod(batch) * m * k * n


def matmul(a, b, out=None):
    """``a @ b``; records batch·m·k·n multiplications."""
    _report("matmul", _matmul_mults(_shape(a), _shape(b)))
    module = get_array_module(a, b)
    return module.matmul(a, b) if out is None else module.matmul(a, b, out=out)


def tensordot(a, b, axes):
    """``tensordot(a, b, axes)``; records size(a) × (size of b's free axes) multiplications."""
    module = get_array_module(a, b)
    if isinstance(axes, int):
        b_contracted = list(range(axes))
    else:
        b_contracted = [ax % b.ndim for ax in numpy.atleast_1d(axes[1]).tolist()]
    b_free = [d for i, d in enumerate(b.shape) if i not in b_contracted]
    _report("tensordot", a.size * math.prod(b_free))
    return module.tensordot(a, b, axes=axes)


def einsum(subscripts: str, *operands):
    """Plain (unoptimized) ``einsum``; records (operands − 1) × Π(all index sizes) multiplications.

    That is what the unoptimized summation loop multiplies: for every point of the
    full index space, the operands' entries are multiplied together once.
    """
    if "..." in subscripts or "->" not in subscripts:
        raise ValueError(f"einsum needs explicit subscripts with '->' and no ellipsis, got {subscripts!r}")
    inputs = subscripts.split("->")[0].split(",")
    if len(inputs) != len(operands):
        raise ValueError(f"einsum {subscripts!r} names {len(inputs)} operands, got {len(operands)}")
    sizes: dict[str, int] = {}
    for letters, op in zip(inputs, operands):
        if len(letters) != op.ndim:
            raise ValueError(f"einsum {subscripts!r}: operand {letters!r} has shape {op.shape}")
        for letter, size in zip(letters, op.shape):
            sizes[letter] = size
    _report("einsum", (len(operands) - 1) * math.prod(sizes.values()))
    return get_array_module(*operands).einsum(subscripts, *operands, optimize=False)


def mul(a, b, out=None):
    """Elementwise ``a * b`` (with broadcasting); records one multiplication per output element."""
    _report("mul", math.prod(numpy.broadcast_shapes(_shape(a), _shape(b))))
    module = get_array_module(a, b)
    return module.multiply(a, b) if out is None else module.multiply(a, b, out=out)


# ---------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------
# Parameter initialization draws on the host, from one NumPy generator, so the
# same seed gives the same initial weights on every backend; device-side
# randomness (dropout masks) uses the active array module's own generator.
_host_rng = numpy.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed parameter initialization (host) and device-side randomness (dropout).

    ``seed`` is an int in [0, 2**32 - 1] (the range of the device generators' legacy seeding).
    """
    global _host_rng
    # Checked before any generator changes, so a bad seed leaves every stream as it was.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"manual_seed: seed must be an int, got {seed!r}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"manual_seed: seed must be in [0, 2**32 - 1], got {seed}")
    _host_rng = numpy.random.default_rng(seed)
    for backend in _LOADED.values():
        backend.xp.random.seed(seed)


def host_rng() -> numpy.random.Generator:
    """The host generator used for parameter initialization."""
    return _host_rng


def random_uniform(low: float, high: float, shape: tuple, dtype=None):
    """Uniform samples drawn on the host, returned on the active backend."""
    values = _host_rng.uniform(low, high, size=shape).astype(dtype or default_dtype)
    return asarray(values)


def random_normal(mean: float, std: float, shape: tuple, dtype=None):
    """Normal samples drawn on the host, returned on the active backend."""
    values = _host_rng.normal(mean, std, size=shape).astype(dtype or default_dtype)
    return asarray(values)
