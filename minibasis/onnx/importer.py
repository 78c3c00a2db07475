"""An ONNX graph as a minibasis Module: :func:`load_model`.

Design. The graph's weighted nodes become real layers — every ``Conv`` an
:class:`~minibasis.nn.Conv2d`, every ``BatchNormalization`` a ``BatchNorm2d`` (or
``BatchNorm1d``), every ``Gemm``/``MatMul`` whose weight is an initializer a
:class:`~minibasis.nn.Linear` — placed at module paths taken from the initializer
names (``layer1.0.conv1.weight`` → module ``layer1.0.conv1``, so ``state_dict`` keys
read like the source framework's). Everything else (activations, adds, pools,
reshapes, ...) is a :class:`Step` that :class:`OnnxModel` runs on minibasis
functions, in the file's (topological) order. A step that calls a layer looks
it up by path on every call, so ``compress`` / ``fuse_batch_norm`` replacing a
layer with ``set_submodule`` changes what the graph runs.

Values are of two kinds: :class:`~minibasis.Tensor` (anything computed from the
input: differentiable, on the active backend, every product counted) and host
NumPy arrays (initializers, ``Constant`` nodes and the small integer shape
arithmetic exporters write for ``x.view(x.size(0), -1)``: ``Shape``, ``Gather``,
``Unsqueeze``, ``Concat``, ``Cast``, ...). Nodes whose inputs are all constant are
folded once at load time; shape arithmetic that starts from ``Shape`` is redone
on the host on each call (a handful of integers), so any batch size works.

Everything a graph needs is checked before anything runs: an operator outside
:data:`SUPPORTED_OPS`, an attribute value this importer does not implement, a
sub-graph (control flow), a non-default domain: all of them are listed, with node
counts, in one :class:`~minibasis.ModelFileError`.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from minibasis import backend
from minibasis import functions as F
from minibasis.autograd import Tensor, no_grad
from minibasis.autograd.ops import Cast as CastFunction
from minibasis.model_files import ModelFileError
from minibasis.nn import BatchNorm1d, BatchNorm2d, Conv2d, Linear, Module
from minibasis.onnx.reading import DEFAULT_MAX_BYTES, parse_model, read_model

__all__ = ["load_model", "model_from_proto", "OnnxModel", "SUPPORTED_OPS"]

#: The operator types :func:`load_model` runs (default domain, opsets 7–21).
SUPPORTED_OPS = frozenset("""
    Conv BatchNormalization Relu Clip LeakyRelu Sigmoid HardSigmoid HardSwish Mul Add Sub Div Concat Split
    Slice Pad Reshape Flatten Transpose Squeeze Unsqueeze MaxPool AveragePool GlobalAveragePool ReduceMean
    Gemm MatMul Softmax Dropout Identity Constant Shape Gather Cast
""".split())


class Unsupported(Exception):
    """A node this importer cannot run; ``str(error)`` is the short description listed to the user."""


@dataclass
class Step:
    """One node to run: ``op`` with its input and output value names ("" = absent) and its
    checked settings; ``module`` is the path of the layer it calls (weighted nodes only)."""

    op: str
    name: str
    inputs: tuple
    outputs: tuple
    attrs: dict = field(default_factory=dict)
    module: str | None = None


class Container(Module):
    """A node of the module tree that only holds layers (``layer1``, ``layer1.0``)."""

    def forward(self, *args):
        raise TypeError("a Container groups layers of an imported graph and is not called itself")


class OnnxModel(Module):
    """An imported ONNX graph: layers at their source paths plus the steps that connect them.

    ``forward(x)`` takes the graph's input (N, C, H, W) and returns its output (a tuple
    when the graph has several). ``input_shape`` is the shape given to (or read by)
    :func:`load_model`; ``opset`` the file's operator-set version.
    """

    def __init__(self, steps, constants, input_names, output_names, input_shape, opset):
        super().__init__()
        self.steps = list(steps)
        self.constants = dict(constants)
        self.input_names, self.output_names = tuple(input_names), tuple(output_names)
        self.input_shape, self.opset = tuple(input_shape), opset

    def forward(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"this graph takes {len(self.input_names)} input(s), got {len(inputs)}")
        values = dict(self.constants)
        values.update(zip(self.input_names, inputs))
        for step in self.steps:
            args = [values[name] if name else None for name in step.inputs]
            try:
                outputs = run_step(self, step, args)
            except Unsupported as error:
                raise ValueError(f"ONNX node {step.name!r} ({step.op}): {error}") from None
            for name, value in zip(step.outputs, outputs):
                if name:
                    values[name] = value
        results = tuple(_tensor(values[name]) for name in self.output_names)
        return results[0] if len(results) == 1 else results

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, opset={self.opset}, steps={len(self.steps)}"


def run_step(model, step: Step, args: list) -> list:
    """The outputs of one step (host scalars as 0-d arrays, so they stay host values)."""
    return [np.asarray(v) if isinstance(v, np.generic) else v for v in RUNNERS[step.op](model, step, args)]


# ---------------------------------------------------------------------------
# value helpers
# ---------------------------------------------------------------------------
def _is_host(value) -> bool:
    return isinstance(value, np.ndarray)


def _tensor(value, like: Tensor | None = None) -> Tensor:
    """``value`` as a Tensor on the active backend (a host float constant takes ``like``'s float dtype)."""
    if isinstance(value, Tensor):
        return value
    array = np.asarray(value)
    dtype = like.dtype if like is not None and array.dtype.kind == "f" and like.dtype.kind == "f" else array.dtype
    return Tensor(backend.asarray(array, dtype=dtype))


def _ints(value) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise Unsupported(f"axis {axis} out of range for rank {rank}")
    return axis % rank


# ---------------------------------------------------------------------------
# runners: (model, step, args) -> list of outputs
# ---------------------------------------------------------------------------
def _run_conv(model, step, args):
    x = args[0]
    extra = step.attrs["extra_pads"]  # (top, bottom, left, right) beyond the layer's symmetric padding
    if any(extra):
        x = F.pad(x, ((0, 0), (0, 0), extra[:2], extra[2:]))
    return [model.get_submodule(step.module)(x)]


def _run_batch_norm(model, step, args):
    return [model.get_submodule(step.module)(args[0])] + [None] * (len(step.outputs) - 1)


def _run_linear(model, step, args):
    x, layer = args[0], model.get_submodule(step.module)
    if not isinstance(x, Tensor):
        x = _tensor(x, next(layer.parameters()))
    if x.ndim == 2:
        return [layer(x)]
    if x.ndim < 2:
        raise Unsupported(f"input of rank {x.ndim}")
    lead = tuple(x.shape[:-1])
    y = layer(x.reshape(math.prod(lead), x.shape[-1]))
    return [y.reshape(lead + (y.shape[-1],))]


def _binary(function, host):
    def run(model, step, args):
        a, b = args
        if _is_host(a) and _is_host(b):
            return [host(a, b)]
        like = a if isinstance(a, Tensor) else b
        return [function(_tensor(a, like), _tensor(b, like))]
    return run


def _host_div(a, b):
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        return np.trunc(a / b).astype(np.result_type(a, b))  # ONNX integer division truncates
    return a / b


def _unary(function):
    def run(model, step, args):
        return [function(_tensor(args[0]), **step.attrs)]
    return run


def _run_clip(model, step, args):
    low, high = step.attrs.get("min"), step.attrs.get("max")
    if len(args) > 1 and args[1] is not None:
        low = float(np.asarray(args[1]))
    if len(args) > 2 and args[2] is not None:
        high = float(np.asarray(args[2]))
    return [F.clip(_tensor(args[0]), low, high)]


def _run_identity(model, step, args):
    return [args[0]]


def _run_dropout(model, step, args):
    p = step.attrs.get("ratio", 0.5)
    if len(args) > 1 and args[1] is not None:
        p = float(np.asarray(args[1]))
    return [F.dropout(args[0], p, training=model.training)] + [None] * (len(step.outputs) - 1)


def _run_shape(model, step, args):
    shape = np.array(tuple(args[0].shape), dtype=np.int64)
    return [shape[step.attrs.get("start", 0):step.attrs.get("end")]]


def _run_cast(model, step, args):
    x, dtype = args[0], step.attrs["to"]
    if _is_host(x):
        return [x.astype(dtype)]
    if np.dtype(dtype).kind != "f" or x.dtype.kind != "f":
        raise Unsupported(f"a cast of computed values to {np.dtype(dtype)} (a data-dependent value)")
    return [x if x.dtype == dtype else CastFunction(backend.xp.dtype(dtype))(x)]


def _run_gather(model, step, args):
    data, indices = args
    if not _is_host(indices):
        raise Unsupported("computed gather indices (a data-dependent gather)")
    axis = _axis(step.attrs.get("axis", 0), len(data.shape))
    if _is_host(data):
        return [np.take(data, indices, axis=axis)]
    chosen = int(indices) if indices.ndim == 0 else backend.asarray(indices.astype(np.int64))  # on the device
    index = (slice(None),) * axis + (chosen,)
    return [data[index]]


def _unsqueeze_axes(step, args, rank_in):
    axes = step.attrs.get("axes")
    if axes is None:
        axes = _ints(args[1])
    rank = rank_in + len(axes)
    return sorted(_axis(a, rank) for a in axes)


def _run_unsqueeze(model, step, args):
    x = args[0]
    shape = list(x.shape)
    for axis in _unsqueeze_axes(step, args, len(shape)):
        shape.insert(axis, 1)
    return [x.reshape(tuple(shape))]


def _run_squeeze(model, step, args):
    x = args[0]
    axes = step.attrs.get("axes")
    if axes is None and len(args) > 1 and args[1] is not None:
        axes = _ints(args[1])
    rank = len(x.shape)
    drop = {_axis(a, rank) for a in axes} if axes is not None else {i for i, n in enumerate(x.shape) if n == 1}
    if any(x.shape[i] != 1 for i in drop):
        raise Unsupported(f"squeezing axes {sorted(drop)} of shape {tuple(x.shape)}")
    return [x.reshape(tuple(n for i, n in enumerate(x.shape) if i not in drop))]


def _run_concat(model, step, args):
    axis = step.attrs["axis"]
    if all(_is_host(a) for a in args):
        return [np.concatenate(args, axis=axis)]
    like = next(a for a in args if isinstance(a, Tensor))
    return [F.concat([_tensor(a, like) for a in args], axis=_axis(axis, like.ndim))]


def _run_reshape(model, step, args):
    x, target = args[0], _ints(args[1])
    if step.attrs.get("keeps_batch") and target:
        # a literal target that kept the traced batch (a static-batch export) keeps any batch
        target[0] = x.shape[0]
    if not step.attrs.get("allowzero", 0):
        target = [x.shape[i] if n == 0 else n for i, n in enumerate(target)]
    if target.count(-1) > 1:
        raise Unsupported(f"reshape target {target} has more than one -1")
    if -1 in target:
        known = math.prod(n for n in target if n != -1)
        target[target.index(-1)] = math.prod(x.shape) // known if known else 0
    return [x.reshape(tuple(target))]


def _run_flatten(model, step, args):
    x = args[0]
    axis = step.attrs.get("axis", 1)
    axis = axis % len(x.shape) if axis < 0 else axis
    return [x.reshape((math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))]


def _run_transpose(model, step, args):
    x = args[0]
    perm = step.attrs.get("perm") or list(range(len(x.shape)))[::-1]
    return [x.transpose(tuple(perm))]


def _run_slice(model, step, args):
    x = args[0]
    if "starts" in step.attrs:  # opset < 10: attributes
        starts, ends, axes, steps = step.attrs["starts"], step.attrs["ends"], step.attrs.get("axes"), None
    else:
        starts, ends = _ints(args[1]), _ints(args[2])
        axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else None
        steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else None
    rank = len(x.shape)
    axes = list(range(len(starts))) if axes is None else [_axis(a, rank) for a in axes]
    steps = steps or [1] * len(starts)
    index = [slice(None)] * rank
    for axis, start, end, stride in zip(axes, starts, ends, steps):
        if stride == 0:
            raise Unsupported("a slice step of 0")
        size = x.shape[axis]
        # ONNX's rule, spelled out (Python's own clamping differs for negative steps): a negative
        # index counts from the end, then start and end are clamped to [0, size] for a positive
        # step and to [0, size - 1] and [-1, size - 1] for a negative one, -1 meaning "before 0".
        start, end = start + size if start < 0 else start, end + size if end < 0 else end
        if stride > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
        else:
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
        index[axis] = slice(start, None if end < 0 else end, stride) if size else slice(0, 0)
    return [x[tuple(index)]]


def _run_split(model, step, args):
    x = args[0]
    axis = _axis(step.attrs.get("axis", 0), len(x.shape))
    sizes = step.attrs.get("split")
    if sizes is None and len(args) > 1 and args[1] is not None:
        sizes = _ints(args[1])
    count = len(step.outputs)
    if sizes is None:
        size = x.shape[axis]
        part = -(-size // count)  # ONNX (opset 18): equal parts, the last one smaller
        sizes = [min(part, size - i * part) for i in range(count)]
    outputs, start = [], 0
    for size in sizes:
        index = (slice(None),) * axis + (slice(start, start + size),)
        outputs.append(x[index])
        start += size
    return outputs


def _run_pad(model, step, args):
    x = args[0]
    pads = step.attrs.get("pads")
    if pads is None:
        pads = _ints(args[1])
    value = step.attrs.get("value", 0.0)
    if len(args) > 2 and args[2] is not None and np.asarray(args[2]).size:
        value = float(np.asarray(args[2]).reshape(-1)[0])
    rank = len(x.shape)
    axes = list(range(rank))
    if len(args) > 3 and args[3] is not None:
        axes = [_axis(a, rank) for a in _ints(args[3])]
    if any(p < 0 for p in pads):
        raise Unsupported(f"negative pads {pads} (cropping)")
    widths = [(0, 0)] * rank
    half = len(pads) // 2
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[i + half])
    return [F.pad(_tensor(x), widths, value)]


def _run_pool(model, step, args):
    x, a = _tensor(args[0]), step.attrs
    top, left, bottom, right = a["pads"]
    ph, pw = min(top, bottom), min(left, right)
    extra = (top - ph, bottom - ph, left - pw, right - pw)
    if step.op == "MaxPool":
        if any(extra):
            x = F.pad(x, ((0, 0), (0, 0), extra[:2], extra[2:]), -math.inf)
        y = F.max_pool2d(x, a["kernel"], a["strides"], (ph, pw), ceil_mode=a["ceil_mode"])
    else:
        if any(extra):
            x = F.pad(x, ((0, 0), (0, 0), extra[:2], extra[2:]))
        y = F.avg_pool2d(x, a["kernel"], a["strides"], (ph, pw), ceil_mode=a["ceil_mode"],
                         count_include_pad=a["count_include_pad"])
    return [y] + [None] * (len(step.outputs) - 1)


def _run_global_average_pool(model, step, args):
    return [F.global_avg_pool2d(_tensor(args[0]))]


def _run_reduce_mean(model, step, args):
    x = _tensor(args[0])
    axes = step.attrs.get("axes")
    if axes is None and len(args) > 1 and args[1] is not None:
        axes = _ints(args[1])
    if not axes:
        if step.attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(x.ndim))
    return [x.mean(axis=tuple(_axis(a, x.ndim) for a in axes), keepdims=bool(step.attrs.get("keepdims", 1)))]


def _run_softmax(model, step, args):
    x = _tensor(args[0])
    axis = _axis(step.attrs["axis"], x.ndim)
    if step.attrs["coerce_2d"]:  # opset < 13: softmax of the rows of the input flattened at axis
        rows = x.reshape((math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))
        return [F.softmax(rows).reshape(tuple(x.shape))]
    order = [i for i in range(x.ndim) if i != axis] + [axis]
    moved = x.transpose(tuple(order)) if axis != x.ndim - 1 else x
    y = F.softmax(moved.reshape((math.prod(moved.shape[:-1]), moved.shape[-1]))).reshape(tuple(moved.shape))
    inverse = [order.index(i) for i in range(x.ndim)]
    return [y.transpose(tuple(inverse)) if axis != x.ndim - 1 else y]


def _run_matmul(model, step, args):
    a, b = args
    if _is_host(a) and _is_host(b):
        return [a @ b]
    like = a if isinstance(a, Tensor) else b
    a, b = _tensor(a, like), _tensor(b, like)
    if step.op == "Gemm":
        if step.attrs.get("transA"):
            a = a.transpose((1, 0))
        if step.attrs.get("transB"):
            b = b.transpose((1, 0))
    return [F.matmul(a, b)]


def _gemm_with_bias(model, step, args):
    y = _run_matmul(model, step, args[:2])[0]
    return [y if len(args) < 3 or args[2] is None else F.add(y, _tensor(args[2], y))]


RUNNERS = {
    "Conv": _run_conv,
    "BatchNormalization": _run_batch_norm,
    "Linear": _run_linear,
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(F.sigmoid),
    "HardSwish": _unary(F.hard_swish),
    "LeakyRelu": _unary(F.leaky_relu),
    "HardSigmoid": _unary(F.hard_sigmoid),
    "Clip": _run_clip,
    "Add": _binary(F.add, np.add),
    "Sub": _binary(F.sub, np.subtract),
    "Mul": _binary(F.mul, np.multiply),
    "Div": _binary(F.div, _host_div),
    "Identity": _run_identity,
    "Dropout": _run_dropout,
    "Shape": _run_shape,
    "Cast": _run_cast,
    "Gather": _run_gather,
    "Unsqueeze": _run_unsqueeze,
    "Squeeze": _run_squeeze,
    "Concat": _run_concat,
    "Reshape": _run_reshape,
    "Flatten": _run_flatten,
    "Transpose": _run_transpose,
    "Slice": _run_slice,
    "Split": _run_split,
    "Pad": _run_pad,
    "MaxPool": _run_pool,
    "AveragePool": _run_pool,
    "GlobalAveragePool": _run_global_average_pool,
    "ReduceMean": _run_reduce_mean,
    "Softmax": _run_softmax,
    "MatMul": _run_matmul,
    "Gemm": _gemm_with_bias,
}

#: Ops whose all-constant inputs are folded at load time (host NumPy arithmetic).
FOLDABLE = frozenset("""Identity Shape Cast Gather Unsqueeze Squeeze Concat Reshape Flatten Transpose Slice
                        Add Sub Mul Div MatMul""".split())


# ---------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------
_NAME_PART = re.compile(r"^[A-Za-z0-9_\-]+$")


def _path_from_weight(name: str) -> str | None:
    """The layer path an initializer name gives: "layer1.0.conv1.weight" → "layer1.0.conv1"; a dotted
    name of another kind ("features.0.basis", as minibasis exports a BasisConv) is the path itself."""
    parts = name.split(".")
    if parts[-1] == "weight" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts) if all(_NAME_PART.match(p) for p in parts) else None


def _path_from_node_name(name: str) -> str | None:
    """PyTorch's exporter names nodes by module scope, each scope named within its parent and a
    container's child repeating the container's name: "/layer1/layer1.0/conv1/Conv" →
    "layer1.0.conv1", "/layer1/layer1.1/shortcut/shortcut.0/Conv" → "layer1.1.shortcut.0"."""
    parts = [p for p in name.split("/") if p][:-1]
    path: list[str] = []
    for part in parts:
        if path and part.startswith(path[-1] + "."):
            path[-1:] = part.split(".")
        else:
            path.extend(part.split("."))
    if path and all(_NAME_PART.match(p) for p in path):
        return ".".join(path)
    return None


class _Builder:
    def __init__(self, model_proto, input_shape):
        import onnx
        from onnx import numpy_helper

        self.onnx, self.numpy_helper = onnx, numpy_helper
        self.graph = model_proto.graph
        self.opset = next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.input_names = [i.name for i in self.graph.input if i.name not in self.constants]
        self.input_shape = self._input_shape(input_shape)
        self.shapes = self._infer_shapes(model_proto)
        self.data: set[str] = set()  # filled by build(): values computed from the input's data
        self.root = OnnxModel([], {}, self.input_names, [o.name for o in self.graph.output], self.input_shape,
                              self.opset)
        self.steps: list[Step] = []
        self.problems: Counter = Counter()
        self.layer_of_weight: dict[str, str] = {}

    # -- shapes --------------------------------------------------------------
    def _input_shape(self, given):
        if len(self.input_names) != 1:
            raise ModelFileError(f"the graph has {len(self.input_names)} inputs ({self.input_names}); "
                                 "only single-input networks are supported")
        value = next(i for i in self.graph.input if i.name == self.input_names[0])
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if given is not None:
            given = tuple(int(n) for n in given)
            if len(given) != len(dims) or any(d not in (None, 0, g) for d, g in zip(dims, given)):
                raise ModelFileError(f"input_shape {given} does not fit the graph's input {dims}")
            return given
        if not dims:
            raise ModelFileError("the graph's input has no declared shape: pass input_shape")
        if any(d in (None, 0) for d in dims[1:]):
            raise ModelFileError(f"the graph's input shape {dims} has free dimensions beyond the batch: "
                                 "pass input_shape")
        return (1,) + tuple(dims[1:])

    def _infer_shapes(self, model_proto) -> dict[str, tuple]:
        """Value name → static shape for the given input shape (what ONNX shape inference can tell)."""
        fixed = self.onnx.ModelProto()
        fixed.CopyFrom(model_proto)
        for value in fixed.graph.input:
            if value.name == self.input_names[0]:
                shape = value.type.tensor_type.shape
                del shape.dim[:]
                for n in self.input_shape:
                    shape.dim.add().dim_value = n
        try:
            inferred = self.onnx.shape_inference.infer_shapes(fixed)
        except Exception as error:  # the onnx package raises several types here
            raise ModelFileError(f"ONNX shape inference failed on this graph: {error}") from None
        shapes = {}
        for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            dims = value.type.tensor_type.shape.dim
            if value.type.tensor_type.HasField("shape"):
                shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        return shapes

    # -- modules -------------------------------------------------------------
    def place(self, module: Module, weight_name: str, node) -> str:
        path = _path_from_weight(weight_name) or _path_from_node_name(node.name)
        if path is None or not self._free(path):
            base = (path or node.op_type.lower()).replace(".", "_")
            path, k = base, 1
            while not self._free(path):
                k += 1
                path = f"{base}_{k}"
        parent = self.root
        parts = path.split(".")
        for part in parts[:-1]:
            if part not in parent._modules:
                parent.add_module(part, Container())
            parent = parent._modules[part]
        parent.add_module(parts[-1], module)
        return path

    def _free(self, path: str) -> bool:
        module = self.root
        for part in path.split("."):
            child = module._modules.get(part)
            if child is None:
                return True
            if not isinstance(child, Container):
                return False
            module = child
        return False  # an existing container

    def parameter(self, name: str, who: str):
        if name not in self.constants:
            raise Unsupported(f"{who} with a computed (non-initializer) weight or statistics")
        return self.constants[name]

    # -- the graph -----------------------------------------------------------
    def check_op_types(self):
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                self.problems[f"{node.domain}::{node.op_type} (custom domain)"] += 1
            elif any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
                self.problems[f"{node.op_type} (control flow: sub-graphs)"] += 1
            elif node.op_type not in SUPPORTED_OPS:
                self.problems[node.op_type] += 1
        if len(self.graph.node) and getattr(self.graph, "sparse_initializer", None):
            self.problems["sparse initializers"] += len(self.graph.sparse_initializer)

    def build(self):
        data = self.data = set(self.input_names)  # values computed from the input's data (not only its shape)
        for node in self.graph.node:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = self._constant(node)
                continue
            attrs = {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type != "Shape" and any(name in data for name in node.input):
                data.update(node.output)
            try:
                _check_static_inputs(node, attrs, data, self.onnx.helper)
                if node.op_type in FOLDABLE and self._fold(node, attrs):
                    continue
                self.steps.append(BUILDERS.get(node.op_type, _build_plain)(self, node, attrs))
            except Unsupported as error:
                self.problems[f"{node.op_type} ({error})"] += 1

    def _constant(self, node):
        a = {x.name: x for x in node.attribute}
        helper = self.onnx.helper
        if "value" in a:
            return self.numpy_helper.to_array(a["value"].t)
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                           ("value_ints", np.int64)):
            if key in a:
                return np.asarray(helper.get_attribute_value(a[key]), dtype=dtype)
        self.problems[f"Constant ({', '.join(a)})"] += 1
        return np.zeros(0, dtype=np.float32)

    def _fold(self, node, attrs) -> bool:
        """Evaluate ``node`` now when all its inputs are constants; True if it was."""
        if not all(name == "" or name in self.constants for name in node.input):
            return False
        if node.op_type == "Shape":
            return False  # of a constant: still cheap at run time, and keeps one code path
        step = BUILDERS.get(node.op_type, _build_plain)(self, node, attrs)
        args = [self.constants[name] if name else None for name in node.input]
        outputs = run_step(None, step, args)
        if not all(_is_host(v) for v in outputs):
            return False
        self.constants.update(zip(node.output, outputs))
        return True

    def finish(self) -> OnnxModel:
        root = self.root
        root.steps = self.steps
        needed = {name for step in self.steps for name in step.inputs} | set(root.output_names)
        root.constants = {k: v for k, v in self.constants.items() if k in needed}
        return root


#: Inputs that set shapes, indices or bounds: they must come from constants or from ``Shape``, never
#: from the input's data (a data-dependent shape).
STATIC_INPUTS = {"Reshape": (1,), "Slice": (1, 2, 3, 4), "Gather": (1,), "Pad": (1, 2, 3), "Split": (1,),
                 "Unsqueeze": (1,), "Squeeze": (1,), "ReduceMean": (1,), "Clip": (1, 2), "Dropout": (1, 2)}


def _check_static_inputs(node, attrs: dict, data: set, helper) -> None:
    for i in STATIC_INPUTS.get(node.op_type, ()):
        if i < len(node.input) and node.input[i] in data:
            raise Unsupported(f"data-dependent: input {i} computed from the data")
    if node.op_type == "Cast" and node.input[0] in data and \
            np.dtype(helper.tensor_dtype_to_np_dtype(attrs["to"])).kind != "f":
        raise Unsupported("data-dependent: computed values cast to integers")


def _check_attrs(node, attrs: dict, known: set):
    unknown = sorted(set(attrs) - known)
    if unknown:
        raise Unsupported(f"attributes {unknown}")


def _build_plain(builder, node, attrs):
    return Step(node.op_type, node.name, tuple(node.input), tuple(node.output), attrs)


def _build_reshape(builder, node, attrs):
    """A Reshape; a literal target whose leading entry is the traced batch, applied to a value whose
    leading dimension is the traced batch, is marked to keep the batch at run time. The dynamo
    exporter writes such literals (``x.flatten(1)`` as Reshape to (N, -1) with N of the export),
    so without this a graph exported at batch 2 would not run at batch 1 or 256."""
    target = builder.constants.get(node.input[1]) if len(node.input) > 1 else None
    traced = builder.shapes.get(node.input[0])
    batch = builder.input_shape[0]
    if (target is not None and np.ndim(target) == 1 and len(target) and int(target[0]) == batch
            and traced and traced[0] == batch and node.input[0] in builder.data):
        attrs = {**attrs, "keeps_batch": 1}
    return _build_plain(builder, node, attrs)


def _spatial_pads(builder, node, attrs, kernel, strides, dilations):
    """(top, left, bottom, right) padding of a conv/pool node, auto_pad resolved."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        return pads
    if auto == "VALID":
        return [0, 0, 0, 0]
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise Unsupported(f"auto_pad {auto}")
    shape = builder.shapes.get(node.input[0])
    if shape is None or len(shape) != 4 or None in shape[2:]:
        raise Unsupported(f"auto_pad {auto} with an input of unknown spatial size")
    begin, end = [], []
    for size, k, s, d in zip(shape[2:], kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin + end


def _build_conv(builder, node, attrs):
    _check_attrs(node, attrs, {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"})
    weight = builder.parameter(node.input[1], "Conv")
    if weight.ndim != 4:
        raise Unsupported(f"{weight.ndim - 2}-D convolution")
    bias = builder.parameter(node.input[2], "Conv") if len(node.input) > 2 and node.input[2] else None
    m, c_per_group, kh, kw = weight.shape
    groups = attrs.get("group", 1)
    strides = tuple(attrs.get("strides", (1, 1)))
    dilations = tuple(attrs.get("dilations", (1, 1)))
    if tuple(attrs.get("kernel_shape", (kh, kw))) != (kh, kw):
        raise Unsupported("kernel_shape differs from the weight's")
    top, left, bottom, right = _spatial_pads(builder, node, attrs, (kh, kw), strides, dilations)
    ph, pw = min(top, bottom), min(left, right)
    key = (node.input[1], node.input[2] if len(node.input) > 2 else "", strides, (ph, pw), dilations, groups)
    path = builder.layer_of_weight.get(key)
    if path is None:
        layer = Conv2d(c_per_group * groups, m, (kh, kw), strides, (ph, pw), dilations, groups, bias is not None)
        layer.weight.data = backend.asarray(weight)
        if bias is not None:
            layer.bias.data = backend.asarray(bias)
        path = builder.layer_of_weight[key] = builder.place(layer, node.input[1], node)
    return Step("Conv", node.name, (node.input[0],), tuple(node.output),
                {"extra_pads": (top - ph, bottom - ph, left - pw, right - pw)}, path)


def _build_batch_norm(builder, node, attrs):
    _check_attrs(node, attrs, {"epsilon", "momentum", "training_mode", "spatial"})
    if attrs.get("spatial", 1) != 1:
        raise Unsupported("spatial=0")
    if len([o for o in node.output[1:] if o]):
        raise Unsupported("training outputs (running mean/var) used by the graph")
    scale, bias, mean, var = (builder.parameter(name, "BatchNormalization") for name in node.input[1:5])
    rank = len(builder.shapes.get(node.input[0], (0,) * 4))
    if rank not in (2, 4):
        raise Unsupported(f"a rank-{rank} input")
    layer_type = BatchNorm2d if rank == 4 else BatchNorm1d
    # ONNX stores float32 attributes: 1e-5 reads back as 9.99999974e-06, so round to 7 digits
    eps, momentum = (float(f"{v:.7g}") for v in (attrs.get("epsilon", 1e-5), 1.0 - attrs.get("momentum", 0.9)))
    layer = layer_type(scale.shape[0], eps=eps, momentum=momentum)
    layer.weight.data, layer.bias.data = backend.asarray(scale), backend.asarray(bias)
    layer.running_mean, layer.running_var = backend.asarray(mean), backend.asarray(var)
    path = builder.place(layer, node.input[1], node)
    return Step("BatchNormalization", node.name, (node.input[0],), tuple(node.output), {}, path)


def _linear_layer(builder, node, weight_out_in, bias):
    layer = Linear(weight_out_in.shape[1], weight_out_in.shape[0], bias=bias is not None)
    layer.weight.data = backend.asarray(np.ascontiguousarray(weight_out_in))
    if bias is not None:
        layer.bias.data = backend.asarray(np.ascontiguousarray(bias))
    return layer


def _build_gemm(builder, node, attrs):
    _check_attrs(node, attrs, {"alpha", "beta", "transA", "transB"})
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise Unsupported("alpha or beta other than 1")
    if node.input[1] not in builder.constants or attrs.get("transA", 0):
        return _build_plain(builder, node, attrs)
    weight = builder.parameter(node.input[1], "Gemm")
    weight = weight if attrs.get("transB", 0) else weight.T
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = builder.parameter(node.input[2], "Gemm")
        if bias.size not in (1, weight.shape[0]):
            raise Unsupported(f"a bias of shape {bias.shape} (not one value per output)")
        bias = np.broadcast_to(bias.reshape(-1), (weight.shape[0],))
    path = builder.place(_linear_layer(builder, node, weight, bias), node.input[1], node)
    return Step("Linear", node.name, (node.input[0],), tuple(node.output), {}, path)


def _build_matmul(builder, node, attrs):
    weight = builder.constants.get(node.input[1])
    if weight is None or weight.ndim != 2 or node.input[0] in builder.constants:
        return _build_plain(builder, node, attrs)
    path = builder.place(_linear_layer(builder, node, weight.T, None), node.input[1], node)
    return Step("Linear", node.name, (node.input[0],), tuple(node.output), {}, path)


def _build_pool(builder, node, attrs):
    _check_attrs(node, attrs, {"auto_pad", "ceil_mode", "count_include_pad", "dilations", "kernel_shape", "pads",
                               "strides", "storage_order"})
    kernel = tuple(attrs["kernel_shape"])
    if len(kernel) != 2:
        raise Unsupported(f"{len(kernel)}-D pooling")
    if tuple(attrs.get("dilations", (1, 1))) != (1, 1):
        raise Unsupported("dilated pooling")
    if attrs.get("storage_order", 0):
        raise Unsupported("storage_order=1")
    if len([o for o in node.output[1:] if o]):
        raise Unsupported("the indices output")
    strides = tuple(attrs.get("strides", (1, 1)))
    pads = _spatial_pads(builder, node, attrs, kernel, strides, (1, 1))
    ceil_mode, include = bool(attrs.get("ceil_mode", 0)), bool(attrs.get("count_include_pad", 0))
    asymmetric = pads[0] != pads[2] or pads[1] != pads[3]
    if asymmetric and node.op_type == "AveragePool" and (ceil_mode or not include):
        raise Unsupported("asymmetric pads with ceil_mode or without count_include_pad")
    if pads[0] + pads[2] >= 2 * kernel[0] or pads[1] + pads[3] >= 2 * kernel[1]:
        raise Unsupported("padding of half the kernel or more")
    return Step(node.op_type, node.name, (node.input[0],), tuple(node.output),
                {"kernel": kernel, "strides": strides, "pads": tuple(pads), "ceil_mode": ceil_mode,
                 "count_include_pad": include})


def _build_pad(builder, node, attrs):
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise Unsupported(f"mode '{mode}'")
    pads = attrs.get("pads", builder.constants.get(node.input[1]) if len(node.input) > 1 else None)
    if pads is not None and min(_ints(pads), default=0) < 0:
        raise Unsupported("negative pads (cropping)")
    return _build_plain(builder, node, attrs)


def _build_softmax(builder, node, attrs):
    coerce = builder.opset < 13
    return Step("Softmax", node.name, tuple(node.input), tuple(node.output),
                {"axis": attrs.get("axis", 1 if coerce else -1), "coerce_2d": coerce})


def _build_activation(builder, node, attrs):
    defaults = {"LeakyRelu": {"alpha": 0.01}, "HardSigmoid": {"alpha": 0.2, "beta": 0.5}}.get(node.op_type, {})
    _check_attrs(node, attrs, set(defaults))
    return Step(node.op_type, node.name, tuple(node.input), tuple(node.output), {**defaults, **attrs})


def _build_cast(builder, node, attrs):
    dtype = builder.onnx.helper.tensor_dtype_to_np_dtype(attrs["to"])
    return Step("Cast", node.name, tuple(node.input), tuple(node.output), {"to": dtype})


def _build_concat(builder, node, attrs):
    return Step("Concat", node.name, tuple(node.input), tuple(node.output), {"axis": attrs["axis"]})


BUILDERS = {
    "Conv": _build_conv,
    "BatchNormalization": _build_batch_norm,
    "Gemm": _build_gemm,
    "MatMul": _build_matmul,
    "MaxPool": _build_pool,
    "AveragePool": _build_pool,
    "Pad": _build_pad,
    "Softmax": _build_softmax,
    "Relu": _build_activation,
    "Sigmoid": _build_activation,
    "HardSwish": _build_activation,
    "LeakyRelu": _build_activation,
    "HardSigmoid": _build_activation,
    "Cast": _build_cast,
    "Concat": _build_concat,
    "Reshape": _build_reshape,
}


def load_model(path, input_shape=None, *, max_bytes: int = DEFAULT_MAX_BYTES,
               allow_external_data: bool = False) -> OnnxModel:
    """The ONNX network in the file at ``path`` as a trainable :class:`OnnxModel` (eval mode).

    Args:
        path: an ``.onnx`` file (untrusted input: see :mod:`minibasis.onnx.reading`).
        input_shape: (N, C, H, W) to fix the graph's free dimensions (shape inference and
            ``auto_pad``); by default the declared shape with batch 1. Any batch size runs.
        max_bytes: the size limit (model plus external data).
        allow_external_data: read tensors stored in files beside the model.

    Raises :class:`~minibasis.ModelFileError` for unreadable files and, before anything
    runs, for graphs with anything unsupported (all of it listed, with node counts).
    """
    proto = read_model(path, max_bytes=max_bytes, allow_external_data=allow_external_data)
    return model_from_proto(proto, input_shape, str(path))


def model_from_bytes(data: bytes, source: str, input_shape=None) -> OnnxModel:
    """The graph embedded in a minibasis model file (``OnnxModel.graph_bytes``), checked as a file is."""
    return model_from_proto(parse_model(data, source), input_shape, source)


def model_from_proto(proto, input_shape=None, source: str = "<graph>") -> OnnxModel:
    """:func:`load_model` for a checked ``onnx.ModelProto`` (see :mod:`minibasis.onnx.reading`)."""
    builder = _Builder(proto, input_shape)
    builder.check_op_types()
    if not builder.problems:
        builder.build()
    if builder.problems:
        listed = ", ".join(f"{op} ×{count}" for op, count in sorted(builder.problems.items()))
        raise ModelFileError(f"{source}: unsupported ONNX content (nodes per kind): {listed}")
    model = builder.finish()
    # what minibasis.save_model records to rebuild the graph (its layers' weights come from the state_dict)
    model.architecture = {"name": "onnx", "kwargs": {"input_shape": list(model.input_shape)}}
    model.graph_bytes = proto.SerializeToString()
    model.eval()
    with no_grad():  # one dry run: a graph that cannot run at its own input shape fails here, not later
        try:
            model(Tensor(backend.xp.zeros(model.input_shape, dtype=backend.default_dtype)))
        except (ValueError, TypeError, Unsupported) as error:
            raise ModelFileError(f"{source}: the graph does not run at input shape {model.input_shape}: {error}") \
                from None
    return model
