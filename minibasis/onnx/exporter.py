"""Any minibasis model as a standard ONNX graph: :func:`save_model`.

Design: trace, do not describe. The model runs once, in eval mode, on an input
that requires a gradient, so every op records itself in the autograd graph (its
:class:`~minibasis.autograd.Function` object, settings and input tensors). Walking
that graph in creation order and writing one ONNX node per op (an emitter per
Function type, below) gives the graph the model actually computes — whatever its
Python ``forward`` does. No module needs an exporter of its own: a ``BasisConv2d``
runs two ``conv2d`` calls (its fixed basis, then the 1×1 coefficients, its
BatchNorm between when it has one) and so becomes two plain ``Conv`` nodes; the
option-A ResNet shortcut is a ``Slice`` and a ``Pad``; an imported graph comes back
as the ops it ran.

Tensors found in the model's ``state_dict`` become initializers under their
``state_dict`` keys (``layer1.0.conv1.weight``), so a file written here and read by
:func:`minibasis.onnx.load_model` gives the same paths back. Values computed from
weights alone (the coefficients reshaped to a 1×1 kernel) are stored as
initializers, already computed. The batch dimension is free (``N``); reshapes that
keep it write 0 ("copy this dimension") so the file runs at any batch size.
"""
from __future__ import annotations

import numpy as np

from minibasis import backend
from minibasis.autograd import Tensor, enable_grad
from minibasis.autograd import ops
from minibasis.checks import positive_int
from minibasis.functions import activations, basic, conv, loss, normalization, pooling
from minibasis.model_files import ModelFileError
from minibasis.nn import Module
from minibasis.serialization.atomic import atomic_write

__all__ = ["save_model", "to_onnx", "runtime_form", "check_with_onnxruntime", "CHECK_TOLERANCE"]

SUPPORTED_OPSETS = range(13, 22)


class _Graph:
    """The ONNX graph being written: nodes, initializers, and a name for every traced tensor."""

    def __init__(self, helper, numpy_helper, opset: int, names: dict[int, str]):
        self.helper, self.numpy_helper, self.opset = helper, numpy_helper, opset
        self.nodes, self.initializers = [], []
        self.known_arrays = names  # id(array) → state_dict key
        self.tensor_names: dict[int, str] = {}
        self.stored: dict[int, str] = {}  # id(model array) → initializer name
        self.batch = None
        self.used_names: set[str] = set()
        self.counter = 0

    def fresh(self, hint: str) -> str:
        self.counter += 1
        name = f"{hint}_{self.counter}"
        self.used_names.add(name)
        return name

    def constant(self, array, hint: str = "const", exact: bool = False) -> str:
        """An initializer holding ``array``: named by its state_dict key when it is a model array
        (each such array stored once), else ``hint`` (as it is with ``exact``, else numbered)."""
        key = self.known_arrays.get(id(array))
        if key is not None and id(array) in self.stored:
            return self.stored[id(array)]
        wanted = key if key is not None else (hint if exact else None)
        name = wanted if wanted is not None and wanted not in self.used_names else self.fresh(hint)
        self.used_names.add(name)
        if key is not None:
            self.stored[id(array)] = name
        host = np.ascontiguousarray(backend.to_numpy(array))
        self.initializers.append(self.numpy_helper.from_array(host, name))
        return name

    def ints(self, values, hint: str = "ints") -> str:
        return self.constant(np.asarray(values, dtype=np.int64), hint)

    def node(self, op: str, inputs, outputs=None, **attrs) -> list[str]:
        outputs = outputs or [self.fresh(op.lower())]
        self.nodes.append(self.helper.make_node(op, list(inputs), list(outputs), name=self.fresh(f"/{op}"), **attrs))
        return outputs


# ---------------------------------------------------------------------------
# emitters: (graph, fn, input names, input tensors, output tensors) -> output names
# ---------------------------------------------------------------------------
def _emit_conv(g, fn, names, tensors, outputs):
    top, bottom, left, right = fn.padding
    kh, kw = tensors[1].shape[2:]
    return g.node("Conv", names, kernel_shape=[kh, kw], strides=list(fn.stride), pads=[top, left, bottom, right],
                  dilations=list(fn.dilation), group=fn.groups)


def _emit_batch_norm(g, fn, names, tensors, outputs):
    if fn.training:
        raise ModelFileError("export writes inference graphs: a BatchNorm ran in training mode (call model.eval())")
    channels = tensors[0].shape[1]
    dtype = tensors[0].dtype
    affine = list(names[1:])
    if not fn.has_weight:
        affine.insert(0, g.constant(np.ones(channels, dtype=dtype), "bn_scale"))
    if not fn.has_bias:
        affine.append(g.constant(np.zeros(channels, dtype=dtype), "bn_shift"))
    if fn.running_mean is None:
        raise ModelFileError("a BatchNorm without running statistics has no inference form to export")
    stats = [g.constant(fn.running_mean, "running_mean"), g.constant(fn.running_var, "running_var")]
    return g.node("BatchNormalization", [names[0]] + affine + stats, epsilon=float(fn.eps))


def _emit_linear(g, fn, names, tensors, outputs):
    return g.node("Gemm", names, transB=1)


def _simple(op):
    return lambda g, fn, names, tensors, outputs: g.node(op, names)


def _emit_reshape(g, fn, names, tensors, outputs):
    source, target = tensors[0].shape, list(outputs[0].shape)
    if target and source and target[0] == source[0] and g.batch is not None and source[0] == g.batch:
        target[0] = 0  # keep the (free) batch dimension
    return g.node("Reshape", [names[0], g.ints(target, "shape")])


def _emit_transpose(g, fn, names, tensors, outputs):
    perm = fn.axes if fn.axes else tuple(range(tensors[0].ndim))[::-1]
    return g.node("Transpose", names, perm=[int(a) % tensors[0].ndim for a in perm])


def _emit_reduce(op):
    def emit(g, fn, names, tensors, outputs):
        axes = [int(a) for a in fn.axes]
        if op == "ReduceSum" or g.opset >= 18:
            return g.node(op, [names[0], g.ints(axes, "axes")], keepdims=int(fn.keepdims))
        return g.node(op, names, axes=axes, keepdims=int(fn.keepdims))
    return emit


def _emit_getitem(g, fn, names, tensors, outputs):
    index = fn.index if isinstance(fn.index, tuple) else (fn.index,)
    if not all(isinstance(i, (int, slice)) for i in index):
        raise ModelFileError(f"export: indexing with {fn.index!r} has no ONNX form here (only slices and ints)")
    shape = tensors[0].shape
    starts, ends, axes, steps, drop = [], [], [], [], []
    for axis, item in enumerate(index):
        if isinstance(item, int):
            item, _ = slice(item, item + 1 if item != -1 else None), drop.append(axis)
        start, stop, step = item.indices(shape[axis])
        if (start, stop, step) == (0, shape[axis], 1):
            continue
        starts.append(start)
        ends.append(stop if stop >= 0 else -(2 ** 63))
        axes.append(axis)
        steps.append(step)
    out = names[0]
    if axes:
        out = g.node("Slice", [out, g.ints(starts, "starts"), g.ints(ends, "ends"), g.ints(axes, "axes"),
                               g.ints(steps, "steps")])[0]
    if drop:
        out = g.node("Squeeze", [out, g.ints(drop, "axes")])[0]
    return [out] if out != names[0] else g.node("Identity", [out])


def _emit_pad(g, fn, names, tensors, outputs):
    before = [a for a, _ in fn.widths]
    after = [b for _, b in fn.widths]
    value = g.constant(np.asarray(fn.value, dtype=tensors[0].dtype), "pad_value")
    return g.node("Pad", [names[0], g.ints(before + after, "pads"), value], mode="constant")


def _emit_concat(g, fn, names, tensors, outputs):
    return g.node("Concat", names, axis=int(fn.axis))


def _emit_pool(g, fn, names, tensors, outputs):
    (ph, pw) = fn.padding
    attrs = dict(kernel_shape=list(fn.kernel), strides=list(fn.stride), pads=[ph, pw, ph, pw],
                 ceil_mode=int(fn.ceil_mode))
    if isinstance(fn, pooling.AvgPool2d):
        return g.node("AveragePool", names, count_include_pad=int(fn.count_include_pad), **attrs)
    return g.node("MaxPool", names, **attrs)


def _emit_clip(g, fn, names, tensors, outputs):
    dtype = tensors[0].dtype
    bounds = [g.constant(np.asarray(v, dtype=dtype), "clip") if v is not None else "" for v in (fn.low, fn.high)]
    return g.node("Clip", [names[0]] + bounds)


def _emit_cast(g, fn, names, tensors, outputs):
    return g.node("Cast", names, to=g.helper.np_dtype_to_tensor_dtype(np.dtype(fn.dtype)))


EMITTERS = {
    conv.Conv2dFunction: _emit_conv,
    normalization.BatchNorm: _emit_batch_norm,
    basic.Linear: _emit_linear,
    basic.ReLU: _simple("Relu"),
    basic.Concat: _emit_concat,
    basic.Pad: _emit_pad,
    activations.Sigmoid: _simple("Sigmoid"),
    activations.Clip: _emit_clip,
    activations.LeakyReLU: lambda g, fn, n, t, o: g.node("LeakyRelu", n, alpha=fn.alpha),
    activations.HardSigmoid: lambda g, fn, n, t, o: g.node("HardSigmoid", n, alpha=fn.alpha, beta=fn.beta),
    activations.HardSwish: _simple("HardSwish"),
    ops.Add: _simple("Add"),
    ops.Sub: _simple("Sub"),
    ops.Mul: _simple("Mul"),
    ops.Div: _simple("Div"),
    ops.Neg: _simple("Neg"),
    ops.Exp: _simple("Exp"),
    ops.Log: _simple("Log"),
    ops.MatMul: _simple("MatMul"),
    ops.Reshape: _emit_reshape,
    ops.Transpose: _emit_transpose,
    ops.Sum: _emit_reduce("ReduceSum"),
    ops.Mean: _emit_reduce("ReduceMean"),
    ops.GetItem: _emit_getitem,
    ops.Cast: _emit_cast,
    pooling.MaxPool2d: _emit_pool,
    pooling.AvgPool2d: _emit_pool,
    pooling.GlobalAvgPool2d: _simple("GlobalAveragePool"),
    loss.LogSoftmax: lambda g, fn, n, t, o: g.node("LogSoftmax", n, axis=1),
}


def _trace(model: Module, input_shape):
    """(input tensor, output tensors, functions in creation order) of one eval-mode forward."""
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None else backend.default_dtype
    rng = np.random.default_rng(0)
    x = Tensor(backend.asarray(rng.standard_normal(tuple(input_shape)).astype(dtype)), requires_grad=True)
    with enable_grad():
        out = model(x)
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    functions, seen, stack = [], set(), [t.creator for t in outputs if getattr(t, "creator", None) is not None]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        functions.append(fn)
        stack.extend(t.creator for t in fn.inputs or () if t.creator is not None)
    functions.sort(key=lambda fn: fn.order)
    return x, outputs, functions


def runtime_form(model: Module, pad_basis_to: int | None = None, merge_above: float | None = None):
    """(copy of ``model``, one line per BasisConv2d saying how it is written) for a runtime's kernels.

    The paper's form runs every ``BasisConv2d`` as two convs. A production runtime's fast conv
    kernels block channels (onnxruntime's NCHWc: 16 on AVX-512, 8 on AVX2); a basis count Q off
    that grid drops the basis stage to a slower kernel with layout conversions around it, and a
    layer that saves few multiplications can be slower as two convs than as one. So:

    * ``pad_basis_to``: Q is rounded up to a multiple of it (:meth:`BasisConv2d.padded`: zero
      filters, same function, (Q' − Q)·(D + M) more multiplications per output position);
    * ``merge_above``: a layer whose own multiplication ratio (Q'/M + Q'/D, after rounding)
      is above it is written as the one conv it equals (:meth:`BasisConv2d.to_conv`).

    Both None: the layers are left as they are (the copy is still made). The choice is a
    deterministic function of the shapes; what it costs and buys in a given runtime is
    measured by ``bench/onnx.py``. The result is an inference form (eval mode).
    """
    from minibasis.compress import copy_module
    from minibasis.nn import BasisConv2d

    if pad_basis_to is not None:
        pad_basis_to = positive_int("pad_basis_to", pad_basis_to)
    if merge_above is not None and not (isinstance(merge_above, (int, float)) and merge_above > 0):
        raise ValueError(f"merge_above must be a positive number (a layer's own multiplication ratio), "
                         f"got {merge_above!r}")
    copy = copy_module(model).eval()
    lines = []
    for path, layer in list(copy.named_modules()):
        if not isinstance(layer, BasisConv2d):
            continue
        new = layer.padded(pad_basis_to) if pad_basis_to is not None else layer
        m, q = new.out_channels, new.num_basis
        d = new.in_channels * new.kernel_size[0] * new.kernel_size[1]
        ratio = q / m + q / d
        if merge_above is not None and ratio > merge_above:
            new = new.to_conv()
            lines.append(f"{path}: one conv (own ratio {ratio:.3f} > {merge_above:g} with Q = {q})")
        else:
            lines.append(f"{path}: two convs, Q = {layer.num_basis}" +
                         (f" -> {q}" if q != layer.num_basis else "") + f" (own ratio {ratio:.3f})")
        if new is not layer:
            copy.set_submodule(path, new)
    return copy, lines


def to_onnx(model: Module, input_shape, opset: int = 17, fold_batch_norm: bool = False,
            pad_basis_to: int | None = None, merge_above: float | None = None):
    """``model`` (in eval mode) as an ``onnx.ModelProto``; see :func:`save_model`."""
    import onnx
    from onnx import helper, numpy_helper

    if not isinstance(model, Module):
        raise TypeError(f"save_model needs a minibasis.nn.Module, got {type(model).__name__}")
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset must be in {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}, got {opset}")
    input_shape = tuple(int(n) for n in input_shape)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if fold_batch_norm:
            from minibasis.fusion import fuse_batch_norm
            model = fuse_batch_norm(model, input_shape)
        if pad_basis_to is not None or merge_above is not None:
            model, _ = runtime_form(model, pad_basis_to, merge_above)
        x, outputs, functions = _trace(model, input_shape)
    finally:
        for m, mode in modes:
            m.training = mode
    names = {id(array): key for key, array in model.state_dict().items()}
    for key, p in model.named_parameters():
        names.setdefault(id(p.data), key)
    g = _Graph(helper, numpy_helper, opset, names)
    g.batch = input_shape[0]
    g.tensor_names[id(x)] = "input"
    depends = {id(x)}
    for fn in functions:
        tensors = list(fn.inputs)
        outs = [ref() for ref in fn.outputs]
        if not any(id(t) in depends for t in tensors):
            # computed from weights alone (a BasisConv's coefficients as a 1×1 kernel): store the result,
            # named after the weight it was reshaped from
            source = next((t for t in tensors if id(t.data) in names), None)
            hint = names[id(source.data)] if source is not None and isinstance(fn, ops.Reshape) else None
            for t in outs:
                if t is not None:
                    g.tensor_names[id(t)] = g.constant(t.data, hint or "folded", exact=hint is not None)
            continue
        emitter = EMITTERS.get(type(fn))
        if emitter is None:
            raise ModelFileError(f"export: no ONNX form for the op {type(fn).__name__} this model runs")
        input_names = [g.tensor_names[id(t)] if id(t) in g.tensor_names else g.constant(t.data) for t in tensors]
        for t, name in zip(tensors, input_names):
            g.tensor_names.setdefault(id(t), name)
        result = emitter(g, fn, input_names, tensors, outs)
        for t, name in zip(outs, result):
            if t is not None:
                g.tensor_names[id(t)] = name
                depends.add(id(t))
    output_names = []
    for i, t in enumerate(outputs):
        name = "logits" if len(outputs) == 1 else f"output_{i}"
        g.node("Identity", [g.tensor_names[id(t)]], [name])
        output_names.append(name)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(x.dtype))
    graph = helper.make_graph(
        g.nodes, "minibasis",
        [helper.make_tensor_value_info("input", elem, ["N", *input_shape[1:]])],
        [helper.make_tensor_value_info(name, elem, ["N", *t.shape[1:]]) for name, t in zip(output_names, outputs)],
        g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="minibasis")
    proto.ir_version = min(proto.ir_version, 9)  # readable by runtimes a year old
    onnx.checker.check_model(proto)
    return proto


def check_with_onnxruntime(model: Module, data: bytes, input_shape, batches: int = 3, seed: int = 0) -> float:
    """Run the serialized graph ``data`` in onnxruntime on ``batches`` random inputs of ``input_shape``
    and compare with ``model``'s logits; returns the largest difference relative to the logits'
    scale (max |difference| / max(1, max |logit|)). Raises :class:`ModelFileError` above
    :data:`CHECK_TOLERANCE` (float32 rounding)."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelFileError("checking an export needs onnxruntime: pip install 'minibasis[onnx]'") from None
    from minibasis.autograd import no_grad

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None else backend.default_dtype
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    worst = 0.0
    try:
        for _ in range(batches):
            x = rng.standard_normal(tuple(input_shape)).astype(np.dtype(str(dtype)))
            with no_grad():
                ours = backend.to_numpy(model(Tensor(backend.asarray(x))).data)
            theirs = session.run(None, {"input": x})[0]
            if theirs.shape != ours.shape:
                raise ModelFileError(f"export check: onnxruntime returned shape {theirs.shape}, minibasis {ours.shape}")
            worst = max(worst, float(np.abs(theirs - ours).max()) / max(1.0, float(np.abs(ours).max())))
    finally:
        for m, mode in modes:
            m.training = mode
    if not worst <= CHECK_TOLERANCE:
        raise ModelFileError(f"export check: onnxruntime's logits differ from minibasis's by {worst:.3g} "
                             f"(relative to the logits' scale; allowed {CHECK_TOLERANCE:g}); nothing written")
    return worst


#: Float32 rounding, relative to the logits' scale, allowed between minibasis and onnxruntime.
CHECK_TOLERANCE = 1e-4


def save_model(model: Module, path, input_shape, opset: int = 17, fold_batch_norm: bool = False,
               check: bool = False, pad_basis_to: int | None = None, merge_above: float | None = None) -> float | None:
    """Write ``model`` as an ONNX inference graph at ``path`` (atomically: all or nothing).

    Args:
        model: any minibasis model (zoo, imported, compressed); exported in eval mode
            (its modes are restored afterwards).
        input_shape: (N, C, H, W) of the traced forward pass; N becomes a free dimension.
        opset: the ONNX operator-set version written (13–21).
        fold_batch_norm: fold each BatchNorm into the conv before it first
            (:func:`minibasis.fuse_batch_norm`; ``model`` itself is not changed).
        check: before writing, run the graph in onnxruntime on a few random inputs and
            refuse (:class:`ModelFileError`, no file) unless its logits equal ``model``'s to
            float32 rounding (:func:`check_with_onnxruntime`).
        pad_basis_to, merge_above: write each BasisConv2d in the form a runtime runs fastest
            (:func:`runtime_form`: Q rounded up to a multiple of ``pad_basis_to``; a layer
            whose own multiplication ratio exceeds ``merge_above`` as one conv). Default:
            the paper's two convs per layer, as the model runs them.

    Returns the check's largest relative difference (None without ``check``).
    """
    proto = to_onnx(model, input_shape, opset, fold_batch_norm, pad_basis_to, merge_above)
    data = proto.SerializeToString()
    worst = check_with_onnxruntime(model, data, input_shape) if check else None
    with atomic_write(path) as handle:
        handle.write(data)
    return worst
