"""Tensor, Function and the reverse-mode traversal.

A :class:`Function` holds its forward (on raw arrays) and its backward (on raw
gradient arrays) side by side, DeZero style; the instance itself is the context
that carries what forward saved for backward. ``Tensor.backward`` walks the
graph iteratively in reverse creation order (no recursion, so a ResNet-1202 or
a DenseNet-190 is no problem), accumulates gradients of tensors used several
times, and frees each node's saved arrays once it has been visited.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import weakref
from typing import Any, Sequence

from minibasis import backend, counting

__all__ = ["Tensor", "Function", "tensor", "as_tensor", "no_grad", "enable_grad",
           "is_grad_enabled", "sum_to"]

_grad_enabled = True


def is_grad_enabled() -> bool:
    return _grad_enabled


@contextlib.contextmanager
def _set_grad_enabled(flag: bool):
    global _grad_enabled
    previous = _grad_enabled
    _grad_enabled = flag
    try:
        yield
    finally:
        _grad_enabled = previous


def no_grad():
    """Context manager: ops inside build no graph (inference, optimizer updates)."""
    return _set_grad_enabled(False)


def enable_grad():
    return _set_grad_enabled(True)


def sum_to(grad, shape: tuple):
    """Sum a broadcast gradient back down to ``shape`` (the inverse of broadcasting)."""
    if grad.shape == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1)
    out = grad.sum(axis=axes, keepdims=True) if axes else grad
    if lead:
        out = out.reshape(out.shape[lead:])
    return out.reshape(shape)


class Tensor:
    """An array (``.data``: numpy.ndarray or cupy.ndarray) with a gradient and a place in the graph."""

    __slots__ = ("data", "grad", "requires_grad", "creator", "name", "__weakref__")
    __array_priority__ = 1000  # so ndarray (op) Tensor defers to Tensor's reflected operators

    def __init__(self, data, requires_grad: bool = False, name: str | None = None):
        if isinstance(data, Tensor):
            raise TypeError("Tensor(data) takes an array, not a Tensor; use .detach() or .data")
        self.data = data
        self.grad: Tensor | None = None
        self.requires_grad = bool(requires_grad)
        self.creator: Function | None = None
        self.name = name

    # -- properties -------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    def size(self, dim: int | None = None):
        """The shape as a tuple, or the length of axis ``dim`` (PyTorch's ``size()``).

        Unlike NumPy's ``.size`` attribute this is a method and it is not the element
        count: use :meth:`numel` for that.
        """
        if dim is None:
            return tuple(self.data.shape)
        return self.data.shape[ops.check_axis(dim, self.ndim, "size")]

    def dim(self) -> int:
        """Number of axes (PyTorch's ``dim()``, the same as ``ndim``)."""
        return self.data.ndim

    def numel(self) -> int:
        """Number of elements (PyTorch's ``numel()``)."""
        return int(self.data.size)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def T(self) -> "Tensor":
        return self.transpose()

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad})"

    def __bool__(self):
        raise TypeError("the truth value of a Tensor is ambiguous; compare .item() or .data")

    # -- conversion -------------------------------------------------------
    def numpy(self):
        """A host NumPy copy of the data (a copy from the GPU under CuPy)."""
        return backend.to_numpy(self.data)

    def __array__(self, dtype=None, copy=None):
        """NumPy's view of a host tensor (``numpy.asarray(t)``), as PyTorch allows for CPU
        tensors; a device tensor refuses (use ``.numpy()``, which copies explicitly)."""
        if not backend.is_host_array(self.data):
            raise TypeError(f"a tensor on backend {backend.backend_of(self.data)!r} does not convert "
                            "implicitly to a NumPy array; use .numpy()")
        data = self.data if dtype is None else self.data.astype(dtype, copy=False)
        return data.copy() if copy else data

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def item(self):
        """The value of a one-element tensor as a Python number."""
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.item()

    def tolist(self):
        """The values as (nested) Python lists of numbers."""
        return self.data.tolist()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data, requires_grad=False)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        self.requires_grad = bool(flag)
        return self

    def zero_grad(self) -> None:
        self.grad = None

    def astype(self, dtype) -> "Tensor":
        return ops.Cast(dtype)(self)

    def to(self, target) -> "Tensor":
        """This tensor cast to a dtype (``"float64"``, ``numpy.float64``) or moved to a backend
        (``"numpy"``, ``"cupy"``; also ``"cpu"``/``"cuda"``), differentiably.

        Returns ``self`` when nothing changes, as PyTorch does. Moving a tensor does not switch
        the active backend (``minibasis.use``).
        """
        device = backend.device_backend(target)
        if device is not None:
            return self if backend.backend_of(self.data) == device else ops.ToBackend(device)(self)
        dtype = ops.check_dtype(target, "to")
        return self if self.dtype == dtype else ops.Cast(dtype)(self)

    def float(self) -> "Tensor":
        """``to("float32")``."""
        return self.to("float32")

    def double(self) -> "Tensor":
        """``to("float64")``."""
        return self.to("float64")

    def clone(self) -> "Tensor":
        """A copy with its own memory that stays in the graph (gradients flow back to self)."""
        return ops.Copy()(self)

    # -- backward ---------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        ``grad`` (array or Tensor, same shape as self) is required unless self is a
        scalar (one element), for which it defaults to 1.
        """
        if not self.requires_grad:
            # Silently doing nothing would hide e.g. a loss computed under no_grad (PyTorch raises too).
            raise RuntimeError(f"backward() on a tensor of shape {self.shape} that does not require grad "
                               "and has no graph (computed under no_grad, detached, or from constants only)")
        if grad is None:
            if self.numel() != 1:
                raise ValueError(
                    f"backward() without a gradient needs a scalar tensor, got shape {self.shape}; "
                    "pass grad= with that shape")
            grad = backend.get_array_module(self.data).ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            if tuple(grad.shape) != tuple(self.shape):
                raise ValueError(f"backward(grad): grad has shape {tuple(grad.shape)}, expected {self.shape}")
            if grad.dtype != self.dtype:
                grad = grad.astype(self.dtype)
        _run_backward(self, grad, retain_graph)

    # -- operators (the Tensor's own algebra lives in autograd.ops) -----------
    def __add__(self, other):
        return ops.add(self, other)

    __radd__ = __add__

    def __sub__(self, other):
        return ops.sub(self, other)

    def __rsub__(self, other):
        return ops.sub(other, self)

    def __mul__(self, other):
        return ops.mul(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return ops.div(self, other)

    def __rtruediv__(self, other):
        return ops.div(other, self)

    def __neg__(self):
        return ops.Neg()(self)

    def __pow__(self, exponent):
        return ops.Pow(exponent)(self)

    def __matmul__(self, other):
        return ops.matmul(self, other)

    def __rmatmul__(self, other):
        return ops.matmul(other, self)

    def __getitem__(self, index):
        return ops.GetItem(index)(self)

    def reshape(self, *shape) -> "Tensor":
        return ops.Reshape(_dims(shape))(self)

    def view(self, *shape) -> "Tensor":
        """PyTorch's ``view``: the same as :meth:`reshape` here (arrays need not be contiguous)."""
        return self.reshape(*shape)

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "Tensor":
        """Merge axes ``start_dim`` … ``end_dim`` (inclusive) into one; all of them by default."""
        return ops.Reshape(ops.flattened_shape(self.shape, start_dim, end_dim))(self)

    def unsqueeze(self, dim: int) -> "Tensor":
        """Insert an axis of length 1 at ``dim`` (in [-ndim - 1, ndim])."""
        shape = list(self.shape)
        shape.insert(ops.check_axis(dim, self.ndim + 1, "unsqueeze"), 1)
        return ops.Reshape(tuple(shape))(self)

    def squeeze(self, dim=None) -> "Tensor":
        """Drop axes of length 1: all of them, or those among ``dim`` (an int or a tuple); a
        named axis whose length is not 1 stays, as in PyTorch."""
        axes = range(self.ndim) if dim is None else [
            ops.check_axis(d, self.ndim, "squeeze") for d in (dim if isinstance(dim, (tuple, list)) else (dim,))]
        drop = {a for a in axes if self.shape[a] == 1}
        return ops.Reshape(tuple(n for i, n in enumerate(self.shape) if i not in drop))(self)

    def transpose(self, *axes) -> "Tensor":
        """PyTorch's ``transpose(dim0, dim1)`` with two dims given separately: those two swapped
        (negative dims count from the end). Otherwise NumPy's: ``transpose((perm...))`` or
        ``transpose(*perm)`` with every axis, and all axes reversed without arguments."""
        if len(axes) == 2 and all(isinstance(a, int) for a in axes):
            order = list(range(self.ndim))
            try:
                first, second = (order[a] for a in axes)
            except IndexError:
                raise ValueError(f"transpose: dims {axes} out of range for a tensor of shape "
                                 f"{tuple(self.shape)}") from None
            order[first], order[second] = order[second], order[first]
            return ops.Transpose(tuple(order))(self)
        axes = _dims(axes)
        return ops.Transpose(axes if axes else None)(self)

    def permute(self, *dims) -> "Tensor":
        """Reorder the axes: ``x.permute(0, 2, 3, 1)`` (NCHW → NHWC)."""
        dims = _dims(dims)
        if len(dims) != self.ndim:
            raise ValueError(f"permute: got {len(dims)} dims {dims} for a tensor with {self.ndim} axes")
        return ops.Transpose(dims)(self)

    def max(self, dim=None, keepdim: bool = False):
        """The largest element (a 0-d tensor), or with ``dim`` the pair ``(values, indices)``
        along that axis, as in PyTorch. Gradients go to the selected elements (shared
        equally among ties in the full reduction)."""
        return ops.extreme(self, "max", dim, keepdim)

    def min(self, dim=None, keepdim: bool = False):
        """As :meth:`max`, for the smallest element."""
        return ops.extreme(self, "min", dim, keepdim)

    def argmax(self, dim=None, keepdim: bool = False) -> "Tensor":
        """Indices (int64, no gradient) of the largest elements along ``dim``; of the flattened
        tensor without ``dim``."""
        return ops.arg_extreme(self, "max", dim, keepdim)

    def argmin(self, dim=None, keepdim: bool = False) -> "Tensor":
        """As :meth:`argmax`, for the smallest elements."""
        return ops.arg_extreme(self, "min", dim, keepdim)

    def sum(self, axis=None, keepdims: bool = False) -> "Tensor":
        return ops.Sum(axis, keepdims)(self)

    def mean(self, axis=None, keepdims: bool = False) -> "Tensor":
        return ops.Mean(axis, keepdims)(self)

    def exp(self) -> "Tensor":
        return ops.Exp()(self)

    def log(self) -> "Tensor":
        return ops.Log()(self)


def _dims(args: tuple) -> tuple:
    """``f(2, 3)`` and ``f((2, 3))`` alike: the dims as one tuple."""
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """A new Tensor on the active backend.

    Python numbers and lists of floats become ``backend.default_dtype`` (float32);
    arrays keep their dtype unless ``dtype`` is given.
    """
    if isinstance(data, Tensor):
        data = data.data
    _reject_non_numeric(data)
    has_dtype = hasattr(data, "dtype")
    array = _numeric(backend.asarray(data, dtype=dtype), data)
    if dtype is None and not has_dtype and array.dtype.kind == "f":
        array = array.astype(backend.default_dtype)
    if requires_grad and array.dtype.kind != "f":
        raise TypeError(f"only floating tensors can require gradients, got dtype {array.dtype}")
    return Tensor(array, requires_grad=requires_grad)


def as_tensor(value, like: Tensor | None = None) -> Tensor:
    """Wrap arrays and Python scalars; scalars take ``like``'s dtype so float32 stays float32."""
    if isinstance(value, Tensor):
        return value
    _reject_non_numeric(value)
    if like is not None and not hasattr(value, "shape"):
        module = backend.get_array_module(like.data)
        return Tensor(module.asarray(value, dtype=like.dtype))
    if hasattr(value, "shape"):
        return Tensor(_numeric(value, value))
    return Tensor(_numeric(backend.xp.asarray(value), value))


def _reject_non_numeric(value) -> None:
    # Checked before any conversion: asarray(None, float32) would silently give NaN, and
    # asarray("a", float32) a conversion error that names neither the argument nor its type.
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"expected a Tensor, an array or a number (numeric data), "
                        f"got {type(value).__name__} {value!r:.60}")


def _numeric(array, source):
    """``array`` after checking that its dtype is numeric (bool, int, float, complex)."""
    if getattr(getattr(array, "dtype", None), "kind", None) not in ("b", "i", "u", "f", "c"):
        raise TypeError(f"expected numeric data (bool, int, float), got {type(source).__name__} "
                        f"of dtype {getattr(array, 'dtype', None)}")
    return array


_creation_order = itertools.count()


class Function:
    """One differentiable op: ``forward`` on raw arrays, ``backward`` on raw gradients.

    Subclasses implement::

        def forward(self, *arrays) -> array | tuple[array, ...]
        def backward(self, *grad_outputs) -> array | tuple[array | None, ...]

    ``backward`` returns one gradient per forward input (``None`` where not
    needed; ``self.needs_input_grad[i]`` says which are). Whatever forward needs
    in backward is stored on ``self``. Multiplications inside forward and
    backward are recorded under ``name``; set ``is_conv = True`` on convolution
    ops so they count toward ``counter.conv``.
    """

    name: str | None = None
    is_conv = False

    inputs: Sequence[Tensor] | None
    needs_input_grad: tuple[bool, ...]

    def __call__(self, *inputs):
        like = next((x for x in inputs if isinstance(x, Tensor)), None)
        tensors = [as_tensor(x, like) for x in inputs]
        # Without a graph (no_grad) no input needs a gradient, so forward keeps nothing
        # for backward (no column buffers, masks or saved inputs in evaluation).
        self.needs_input_grad = tuple(_grad_enabled and t.requires_grad for t in tensors)
        record = counting.active()
        self.layer = counting.current_layer() if record else None
        op_name = self.op_name
        if record:
            with counting.op_scope(op_name, self.is_conv, "forward"):
                outputs = self.forward(*[t.data for t in tensors])
        else:
            outputs = self.forward(*[t.data for t in tensors])
        single = not isinstance(outputs, tuple)
        outputs = (outputs,) if single else outputs
        requires_grad = any(self.needs_input_grad)
        results = [Tensor(y, requires_grad=requires_grad) for y in outputs]
        if requires_grad:
            self.inputs = tensors
            self.order = next(_creation_order)
            self.outputs = [weakref.ref(r) for r in results]
            for r in results:
                r.creator = self
        return results[0] if single else tuple(results)

    @property
    def op_name(self) -> str:
        return self.name or type(self).__name__.lower()

    def forward(self, *xs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, *gys):  # pragma: no cover - abstract
        raise NotImplementedError


def _run_backward(root: Tensor, grad, retain_graph: bool) -> None:
    """Process every Function reachable from ``root`` once, latest-created first.

    A Function is created after all of its inputs' creators, so visiting in
    decreasing creation order guarantees that all gradient contributions to a
    tensor have been summed before its creator consumes it. A heap keyed on the
    creation counter gives that order without recursion.
    """
    if root.creator is None:
        if root.requires_grad:
            _accumulate_leaf(root, grad)
        return
    # id(tensor) -> (tensor, summed gradient); holding the tensor keeps its id unique
    # until its gradient is consumed, and popping it lets its memory go.
    grads: dict[int, tuple[Tensor, Any]] = {id(root): (root, grad)}
    heap: list[tuple[int, Function]] = []
    seen: set[int] = set()

    def push(fn: Function):
        if id(fn) not in seen:
            seen.add(id(fn))
            heapq.heappush(heap, (-fn.order, fn))

    push(root.creator)
    record = counting.active()
    while heap:
        _, fn = heapq.heappop(heap)
        if fn.inputs is None:
            raise RuntimeError("backward through a graph a second time: its saved arrays were freed; "
                               "pass retain_graph=True to the first backward()")
        gys = []
        for ref in fn.outputs:
            out = ref()
            entry = grads.pop(id(out), None) if out is not None else None
            if entry is not None:
                gys.append(entry[1])
            elif out is not None:
                gys.append(backend.get_array_module(out.data).zeros_like(out.data))
            else:
                gys.append(None)
        if record:
            with counting.op_scope(fn.op_name, fn.is_conv, "backward", fn.layer or ""):
                gxs = fn.backward(*gys)
        else:
            gxs = fn.backward(*gys)
        gxs = gxs if isinstance(gxs, tuple) else (gxs,)
        if len(gxs) != len(fn.inputs):
            raise RuntimeError(f"{fn.op_name}.backward returned {len(gxs)} gradients for {len(fn.inputs)} inputs")
        for x, gx in zip(fn.inputs, gxs):
            if gx is None or not x.requires_grad:
                continue
            if tuple(gx.shape) != tuple(x.shape):
                raise RuntimeError(f"{fn.op_name}.backward gave a gradient of shape {tuple(gx.shape)} "
                                   f"for an input of shape {x.shape}")
            if gx.dtype != x.dtype:
                # Mixed-dtype ops (float32 + float64 array) compute in the wider type; a
                # gradient always has its tensor's dtype, so float32 parameters keep float32 grads.
                gx = gx.astype(x.dtype)
            if x.creator is None:
                _accumulate_leaf(x, gx)
                continue
            key = id(x)
            if key in grads:
                # The tensor is used more than once: sum the contributions (a new
                # array, since either one may alias a gradient held elsewhere).
                grads[key] = (x, grads[key][1] + gx)
            else:
                grads[key] = (x, gx)
            push(x.creator)
        if not retain_graph:
            _free(fn)


_KEEP_AFTER_BACKWARD = frozenset(("inputs", "outputs", "order", "needs_input_grad", "layer"))


def _free(fn: Function) -> None:
    """Drop what forward saved for backward (column buffers, masks) once it is used."""
    fn.inputs = None
    for attr in [a for a in vars(fn) if a not in _KEEP_AFTER_BACKWARD]:
        delattr(fn, attr)


def _accumulate_leaf(leaf: Tensor, grad) -> None:
    if leaf.grad is None:
        # Always own the memory: the same gradient array may be handed to several
        # inputs (e.g. by add), and later accumulation is in place.
        leaf.grad = Tensor(grad.copy())
    else:
        leaf.grad.data += grad


# The Tensor's operators live in ops, which builds on Function and Tensor above; importing it
# here, once both exist, binds them for every method without an import per call (and without
# a cycle: ops finds this module complete).
from minibasis.autograd import ops  # noqa: E402
