"""Elementwise activations, linear layers and shape ops."""
from __future__ import annotations

import numbers
from typing import Sequence

from minibasis import backend, parallel
from minibasis.autograd import Function, Tensor, as_tensor
from minibasis.autograd.ops import Reshape

__all__ = ["relu", "linear", "flatten", "concat", "pad", "dropout", "dropout2d"]


def _check_float(name: str, **arrays) -> None:
    for label, a in arrays.items():
        if a is not None and getattr(getattr(a, "dtype", None), "kind", "f") != "f":
            raise TypeError(f"{name}: {label} must be floating, got dtype {a.dtype}")


class ReLU(Function):
    def forward(self, x):
        y = backend.get_array_module(x).maximum(x, 0)
        if self.needs_input_grad[0]:
            self.y = y  # y > 0 exactly where x > 0: the output doubles as the mask (one pass, no extra array)
        return y

    def backward(self, gy):
        # A select, not a product: ReLU's backward costs no multiplications (PyTorch's threshold backward).
        return keep_where(gy, backend.get_array_module(gy).greater, self.y, 0)


def keep_where(values, compare, a, b):
    """``where(compare(a, b), values, 0)``: ``compare`` an ``xp`` comparison ufunc (``xp.greater``, ...),
    ``a`` an array of the values' shape, ``b`` a scalar (or broadcasting to ``a``).

    For floating ``values`` of the comparison's shape, a bit mask: the comparison writes
    0/1 straight into an integer array of the values' width, negation makes it all-ones /
    all-zeros, and a bitwise AND with the values' bits selects exactly the same values
    (+0.0 elsewhere). NumPy's ``where`` on float arrays is several times slower (measured
    7x on 0.9 M float32), and nothing is multiplied.
    """
    xp = backend.get_array_module(values)
    if values.dtype.kind != "f" or tuple(getattr(a, "shape", ())) != tuple(values.shape):
        return xp.where(compare(a, b), values, 0).astype(values.dtype, copy=False)
    mask = xp.empty(values.shape, dtype=xp.dtype(f"i{values.dtype.itemsize}"))
    compare(a, b, out=mask)
    xp.negative(mask, out=mask)  # 1 → all bits set, 0 → none
    xp.bitwise_and(xp.ascontiguousarray(values).view(mask.dtype), mask, out=mask)
    return mask.view(values.dtype)


def relu(x: Tensor) -> Tensor:
    return ReLU()(x)


#: Rows of one block of a linear layer's GEMMs (see :class:`Linear`).
LINEAR_BLOCK_ROWS = 64


class Linear(Function):
    """y = x Wᵀ + b. Mults: forward N·in·out; backward N·out·in per needed gradient (x, W).

    The rows go in blocks of ``LINEAR_BLOCK_ROWS``; with engine threads
    (``minibasis.set_num_threads``) the blocks' GEMMs run inside the pooled section,
    single-threaded: a GEMM outside it would wake the BLAS's own threads, which then
    spin for a while beside the engine's and slow the conv sections that follow (a
    Table 3 CNN step at 2 engine threads: 150 → 120 ms, bench/README.md). The weight
    gradient sums the blocks' parts in block order; the blocks depend on N only, so
    every result is the same on any number of threads.
    """

    def forward(self, x, weight, bias=None):
        self.x, self.weight = x, weight
        self.blocks, self.workers = self._row_blocks(x, weight)
        y = backend.get_array_module(x).empty((x.shape[0], weight.shape[0]), dtype=x.dtype)

        def block_forward(start, stop):
            backend.matmul(x[start:stop], weight.T, out=y[start:stop])
        parallel.run_chunks(block_forward, self.blocks, self.workers)
        if bias is not None:
            y += bias
        return y

    @staticmethod
    def _row_blocks(x, weight) -> tuple[list, int]:
        return parallel.chunk_ranges(x.shape[0], LINEAR_BLOCK_ROWS), parallel.workers_for(x, weight)

    def backward(self, gy):
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        gx = backend.get_array_module(gy).empty(self.x.shape, dtype=gy.dtype) if need_x else None
        gw = None

        def block_backward(start, stop):
            if need_x:
                backend.matmul(gy[start:stop], self.weight, out=gx[start:stop])
            return backend.matmul(gy[start:stop].T, self.x[start:stop]) if need_w else None
        for part in parallel.map_chunks(block_backward, self.blocks, self.workers):
            if part is not None:
                gw = part if gw is None else gw + part
        if need_w and gw is None:  # no rows at all
            gw = backend.get_array_module(gy).zeros(self.weight.shape, dtype=gy.dtype)
        if len(self.needs_input_grad) == 2:
            return gx, gw
        gb = gy.sum(axis=0) if self.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (N, in), weight (out, in), bias (out,) → (N, out)."""
    x, weight = as_tensor(x), as_tensor(weight)  # arrays are welcome; None or a str gets a TypeError
    x_shape, w_shape = tuple(x.shape), tuple(weight.shape)
    if len(x_shape) != 2:
        raise ValueError(f"linear expects input of shape (N, in_features), got {x_shape}")
    if len(w_shape) != 2:
        raise ValueError(f"linear: weight must have shape (out_features, in_features), got {w_shape}")
    if w_shape[1] != x_shape[1]:
        raise ValueError(f"linear: the input has {x_shape[1]} features (shape {x_shape}), but the weight "
                         f"{w_shape} expects {w_shape[1]}")
    if bias is not None and tuple(bias.shape) != (w_shape[0],):
        raise ValueError(f"linear: bias must have shape ({w_shape[0]},), got {tuple(bias.shape)}")
    _check_float("linear", input=x, weight=weight)
    if x.dtype != weight.dtype:
        raise TypeError(f"linear: input dtype {x.dtype} differs from weight dtype {weight.dtype}")
    fn = Linear()
    return fn(x, weight) if bias is None else fn(x, weight, bias)


def flatten(x: Tensor, start_dim: int = 1) -> Tensor:
    """Merge all axes from ``start_dim`` on: (N, C, H, W) → (N, C·H·W)."""
    shape = tuple(x.shape)
    if isinstance(start_dim, bool) or not isinstance(start_dim, numbers.Integral):
        raise TypeError(f"flatten: start_dim must be an int, got {start_dim!r}")
    if not -len(shape) <= start_dim < len(shape):
        raise ValueError(f"flatten: start_dim {start_dim} is out of range for input of shape {shape}")
    tail = 1
    for n in shape[start_dim:]:
        tail *= n
    return Reshape(shape[:start_dim] + (tail,))(x)


class Concat(Function):
    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, *xs):
        self.sizes = [x.shape[self.axis] for x in xs]
        return backend.get_array_module(*xs).concatenate(xs, axis=self.axis)

    def backward(self, gy):
        out, start = [], 0
        index = [slice(None)] * gy.ndim
        for size in self.sizes:
            index[self.axis] = slice(start, start + size)
            out.append(gy[tuple(index)])
            start += size
        return tuple(out)


def concat(tensors: Sequence[Tensor], axis: int = 1) -> Tensor:
    """Concatenate along ``axis`` (channels by default, as DenseNet needs)."""
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"concat needs a list or tuple of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError("concat needs at least one tensor")
    tensors = [as_tensor(t) for t in tensors]
    shapes = [tuple(t.shape) for t in tensors]
    ndim = len(shapes[0])
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -ndim <= axis < ndim:
        raise ValueError(f"concat: axis {axis!r} is out of range for inputs of shape {shapes[0]}")
    axis = axis % ndim
    for s in shapes:
        if len(s) != ndim or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != axis):
            raise ValueError(f"concat along axis {axis}: shapes differ off that axis: {shapes}")
    return Concat(axis)(*tensors)


class Pad(Function):
    def __init__(self, widths: tuple, value: float):
        self.widths, self.value = widths, value

    def forward(self, x):
        xp = backend.get_array_module(x)
        out = xp.full(tuple(n + a + b for n, (a, b) in zip(x.shape, self.widths)), self.value, dtype=x.dtype)
        out[self._inner(x.shape)] = x
        return out

    def _inner(self, shape):
        return tuple(slice(a, a + n) for n, (a, _) in zip(shape, self.widths))

    def backward(self, gy):
        shape = tuple(n - a - b for n, (a, b) in zip(gy.shape, self.widths))
        return gy[self._inner(shape)]


def pad(x: Tensor, widths: Sequence[tuple[int, int]], value: float = 0.0) -> Tensor:
    """Constant padding; ``widths`` has one (before, after) pair per axis of x (NumPy's convention)."""
    try:
        widths = tuple((int(a), int(b)) for a, b in widths)
    except (TypeError, ValueError):
        raise ValueError(f"pad: need {x.ndim} non-negative (before, after) pairs, got {widths!r}") from None
    if len(widths) != x.ndim or any(a < 0 or b < 0 for a, b in widths):
        raise ValueError(f"pad: need {x.ndim} non-negative (before, after) pairs, got {widths}")
    return Pad(widths, value)(x)


class Dropout(Function):
    """Inverted dropout: kept units are scaled by 1/(1 − p) so evaluation needs no rescaling.

    ``channels``: one draw per (sample, channel) of an (N, C, ...) input, so whole feature
    maps are dropped (``dropout2d``); the mask broadcasts over the spatial axes, and the
    product is still one multiplication per element.
    """

    def __init__(self, p: float, channels: bool = False):
        self.p, self.channels = p, channels

    def forward(self, x):
        xp = backend.get_array_module(x)
        shape = x.shape[:2] + (1,) * (x.ndim - 2) if self.channels else x.shape
        keep = xp.random.random_sample(shape) >= self.p
        self.mask = xp.where(keep, x.dtype.type(1.0 / (1.0 - self.p)), x.dtype.type(0)).astype(x.dtype)
        return backend.mul(x, self.mask)

    def backward(self, gy):
        return backend.mul(gy, self.mask)


def check_dropout_probability(p) -> None:
    """Raise TypeError unless ``p`` is a real number, ValueError unless it is in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout probability must be a number in [0, 1), got {p!r}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability ``p`` in training; identity in evaluation."""
    check_dropout_probability(p)
    if not training or p == 0.0:
        return as_tensor(x)
    return Dropout(p)(x)


def dropout2d(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero whole channels of x (N, C, H, W) with probability ``p`` in training; identity in evaluation."""
    check_dropout_probability(p)
    if len(tuple(x.shape)) != 4:
        raise ValueError(f"dropout2d expects input of shape (N, C, H, W), got {tuple(x.shape)}")
    if not training or p == 0.0:
        return as_tensor(x)
    return Dropout(p, channels=True)(x)
