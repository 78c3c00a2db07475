"""The Tensor's own algebra: arithmetic with broadcasting, matmul, shape ops, reductions.

Every product goes through ``backend.mul`` / ``backend.matmul`` so it is counted; the
GEMMs run with the BLAS held at one thread (``parallel.single_threaded_blas``), so their
bits do not depend on the BLAS's thread count.
"""
from __future__ import annotations

import numbers

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
