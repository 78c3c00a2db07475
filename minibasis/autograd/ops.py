"""The Tensor's own algebra: arithmetic with broadcasting, matmul, shape ops, reductions.

Every product goes through ``backend.mul`` / ``backend.matmul`` so it is counted; the
GEMMs run with the BLAS held at one thread (``parallel.single_threaded_blas``), so their
bits do not depend on the BLAS's thread count.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

from minibasis import backend, parallel
from minibasis.autograd.tensor import Function, Tensor, as_tensor, sum_to


def _xp(a):
    return backend.get_array_module(a)


class Add(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a + b

    def backward(self, gy):
        return sum_to(gy, self.shapes[0]), sum_to(gy, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a - b

    def backward(self, gy):
        return sum_to(gy, self.shapes[0]), -sum_to(gy, self.shapes[1])


class Mul(Function):
    """Elementwise product. Backward: gy·b and gy·a (one product per element each, when needed)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return backend.mul(a, b)

    def backward(self, gy):
        ga = sum_to(backend.mul(gy, self.b), self.a.shape) if self.needs_input_grad[0] else None
        gb = sum_to(backend.mul(gy, self.a), self.b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        gq = gy / self.b
        ga = sum_to(gq, self.a.shape) if self.needs_input_grad[0] else None
        gb = sum_to(-backend.mul(gq, self.a) / self.b, self.b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, gy):
        return -gy


class Pow(Function):
    """``a ** p`` for a Python scalar exponent p."""

    def __init__(self, exponent):
        if isinstance(exponent, Tensor) or hasattr(exponent, "shape") or not isinstance(exponent, numbers.Real):
            raise TypeError(f"Tensor ** x supports Python scalar exponents only, got {type(exponent).__name__}")
        self.exponent = exponent

    def forward(self, a):
        self.a = a
        return a ** self.exponent

    def backward(self, gy):
        p = self.exponent
        return backend.mul(gy, p * self.a ** (p - 1))


class Exp(Function):
    def forward(self, a):
        self.y = _xp(a).exp(a)
        return self.y

    def backward(self, gy):
        return backend.mul(gy, self.y)


class Log(Function):
    def forward(self, a):
        self.a = a
        return _xp(a).log(a)

    def backward(self, gy):
        return gy / self.a


class MatMul(Function):
    """``a @ b`` for 2-D (or batched) operands. Backward: gy·bᵀ and aᵀ·gy, each counted."""

    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul needs operands with at least 2 dims, got shapes {a.shape} and {b.shape}")
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: inner dimensions differ, {a.shape} @ {b.shape}")
        self.a, self.b = a, b
        with parallel.single_threaded_blas():
            return backend.matmul(a, b)

    def backward(self, gy):
        ga = gb = None
        with parallel.single_threaded_blas():
            if self.needs_input_grad[0]:
                ga = sum_to(backend.matmul(gy, self.b.swapaxes(-1, -2)), self.a.shape)
            if self.needs_input_grad[1]:
                gb = sum_to(backend.matmul(self.a.swapaxes(-1, -2), gy), self.b.shape)
        return ga, gb


class Reshape(Function):
    def __init__(self, shape: tuple):
        self.shape = shape

    def forward(self, a):
        self.in_shape = a.shape
        return a.reshape(self.shape)

    def backward(self, gy):
        return gy.reshape(self.in_shape)


class Transpose(Function):
    def __init__(self, axes: tuple | None):
        self.axes = axes

    def forward(self, a):
        if self.axes and sorted(ax % a.ndim if isinstance(ax, numbers.Integral) and -a.ndim <= ax < a.ndim else -1
                                for ax in self.axes) != list(range(a.ndim)):
            raise ValueError(f"transpose: axes {self.axes} are not a permutation of the axes of shape {a.shape}")
        return a.transpose(self.axes) if self.axes else a.T

    def backward(self, gy):
        if not self.axes:
            return gy.T
        inverse = [0] * len(self.axes)
        for i, ax in enumerate(self.axes):
            inverse[ax % len(self.axes)] = i
        return gy.transpose(inverse)


def _normalize_axes(axis, shape, op: str):
    """``axis`` (None, an int or a sequence of ints) as non-negative axes, each checked against ``shape``."""
    ndim = len(shape)
    if axis is None:
        return tuple(range(ndim))
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    for ax in axes:
        if isinstance(ax, bool) or not isinstance(ax, numbers.Integral):
            raise TypeError(f"{op}: axis must be an int or a tuple of ints, got {axis!r}")
        if not -ndim <= ax < ndim:
            raise ValueError(f"{op}: axis {ax} is out of range for a tensor of shape {tuple(shape)}")
    return tuple(int(ax) % ndim for ax in axes)


class Sum(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.in_shape = a.shape
        self.axes = _normalize_axes(self.axis, a.shape, type(self).__name__.lower())
        return a.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        if not self.keepdims:
            shape = [1 if i in self.axes else n for i, n in enumerate(self.in_shape)]
            gy = gy.reshape(shape)
        return _xp(gy).broadcast_to(gy, self.in_shape)


class Mean(Sum):
    def forward(self, a):
        out = super().forward(a)
        count = 1
        for ax in self.axes:
            count *= a.shape[ax]
        self.count = count
        return out / count

    def backward(self, gy):
        return super().backward(gy / self.count)


class GetItem(Function):
    """Indexing and slicing; backward scatters into zeros (accumulating for repeated indices)."""

    def __init__(self, index):
        self.index = index.data if isinstance(index, Tensor) else index

    def forward(self, a):
        self.in_shape, self.in_dtype = a.shape, a.dtype
        return a[self.index]

    def backward(self, gy):
        xp = _xp(gy)
        gx = xp.zeros(self.in_shape, dtype=gy.dtype)
        if _is_basic_index(self.index):
            gx[self.index] = gy  # basic slices never repeat an element
        else:
            xp.add.at(gx, self.index, gy)
        return gx


def _is_basic_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in items)


def check_axis(axis, ndim: int, op: str) -> int:
    """``axis`` as a non-negative int below ``ndim`` (negative counts from the end)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{op}: dim must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{op}: dim {axis} is out of range for {ndim} axes (expected [{-ndim}, {ndim - 1}])")
    return int(axis) % ndim


def check_dtype(dtype, op: str):
    """``dtype`` (a name or a type) as the active array module's dtype object."""
    try:
        return _xp(None).dtype(dtype)
    except TypeError:
        raise TypeError(f"{op}: {dtype!r} is neither a dtype nor a backend "
                        f"({', '.join(backend.available_backends())}, cpu, cuda)") from None


def flattened_shape(shape: tuple, start_dim: int, end_dim: int) -> tuple:
    """``shape`` with axes ``start_dim`` … ``end_dim`` (inclusive) merged into one."""
    ndim = max(len(shape), 1)  # a 0-d tensor flattens to one element, as in PyTorch
    start, end = check_axis(start_dim, ndim, "flatten"), check_axis(end_dim, ndim, "flatten")
    if start > end:
        raise ValueError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim}")
    shape = tuple(shape) or (1,)
    merged = 1
    for n in shape[start:end + 1]:
        merged *= n
    return shape[:start] + (merged,) + shape[end + 1:]


class Copy(Function):
    """A copy with its own memory (``Tensor.clone``); the gradient passes through unchanged."""

    def forward(self, a):
        return a.copy()

    def backward(self, gy):
        return gy


class ToBackend(Function):
    """The array moved to backend ``name``; the gradient goes back to the input's backend."""

    def __init__(self, name: str):
        self.name_to = name

    def forward(self, a):
        self.source = backend.backend_of(a)
        return backend.to_backend(a, self.name_to)

    def backward(self, gy):
        return backend.to_backend(gy, self.source)


class ValuesIndices(NamedTuple):
    """What ``max(dim)`` / ``min(dim)`` return, as PyTorch's ``torch.return_types.max``."""

    values: Tensor
    indices: Tensor


class Extreme(Function):
    """The maximum (or minimum) along one axis; backward routes gy to the selected elements."""

    def __init__(self, which: str, axis: int, keepdims: bool):
        self.which, self.axis, self.keepdims = which, axis, keepdims

    def forward(self, a):
        xp = _xp(a)
        index = xp.expand_dims((xp.argmax if self.which == "max" else xp.argmin)(a, axis=self.axis), self.axis)
        self.index, self.in_shape = index, a.shape
        values = xp.take_along_axis(a, index, axis=self.axis)
        return values if self.keepdims else values.squeeze(self.axis)

    def backward(self, gy):
        xp = _xp(gy)
        gy = gy if self.keepdims else xp.expand_dims(gy, self.axis)
        positions = xp.arange(self.in_shape[self.axis]).reshape(
            [-1 if i == self.axis else 1 for i in range(len(self.in_shape))])
        # A select, not a product: the gradient lands where the index points.
        return xp.where(positions == self.index, gy, 0).astype(gy.dtype, copy=False)


class ExtremeAll(Function):
    """The maximum (or minimum) of all elements; ties share the gradient equally (as PyTorch)."""

    def __init__(self, which: str):
        self.which = which

    def forward(self, a):
        self.a = a
        self.y = a.max() if self.which == "max" else a.min()
        return self.y

    def backward(self, gy):
        xp = _xp(gy)
        hit = self.a == self.y
        return xp.where(hit, gy / hit.sum(), 0).astype(gy.dtype, copy=False)


def extreme(x: Tensor, which: str, dim, keepdim: bool):
    """``x.max()`` / ``x.min()``: a 0-d tensor without ``dim``, else ``(values, indices)``."""
    if dim is None:
        if x.numel() == 0:
            raise ValueError(f"{which}() of an empty tensor")
        return ExtremeAll(which)(x)
    fn = Extreme(which, check_axis(dim, x.ndim, which), bool(keepdim))
    values = fn(x)
    index = fn.index if keepdim else fn.index.squeeze(fn.axis)
    return ValuesIndices(values, Tensor(index.astype(_xp(index).int64, copy=False)))


def arg_extreme(x: Tensor, which: str, dim, keepdim: bool) -> Tensor:
    """``x.argmax(dim)`` / ``x.argmin(dim)``: int64 indices, outside the graph."""
    xp, data = _xp(x.data), x.data
    find = xp.argmax if which == "max" else xp.argmin
    if dim is None:
        index = find(data.reshape(-1))
        if keepdim:
            index = index.reshape((1,) * data.ndim)
    else:
        axis = check_axis(dim, x.ndim, f"arg{which}")
        index = find(data, axis=axis)
        if keepdim:
            index = xp.expand_dims(index, axis)
    return Tensor(xp.asarray(index).astype(xp.int64))


class Cast(Function):
    def __init__(self, dtype):
        self.dtype = dtype

    def forward(self, a):
        self.in_dtype = a.dtype
        return a.astype(self.dtype)

    def backward(self, gy):
        return gy.astype(self.in_dtype)


def _pair(a, b):
    """Operands as Tensors; Python scalars take the Tensor operand's dtype."""
    like = a if isinstance(a, Tensor) else b
    return as_tensor(a, like), as_tensor(b, like)


def _broadcastable(op: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The operands, after checking NumPy's broadcasting rule (so the error names the op and both shapes)."""
    for x, y in zip(reversed(a.shape), reversed(b.shape)):
        if x != y and x != 1 and y != 1:
            raise ValueError(f"{op}: shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast "
                             f"(sizes {x} and {y} differ and neither is 1)")
    return a, b


def add(a, b) -> Tensor:
    return Add()(*_broadcastable("add", *_pair(a, b)))


def sub(a, b) -> Tensor:
    return Sub()(*_broadcastable("sub", *_pair(a, b)))


def mul(a, b) -> Tensor:
    return Mul()(*_broadcastable("mul", *_pair(a, b)))


def div(a, b) -> Tensor:
    return Div()(*_broadcastable("div", *_pair(a, b)))


def matmul(a, b) -> Tensor:
    return MatMul()(*_pair(a, b))
