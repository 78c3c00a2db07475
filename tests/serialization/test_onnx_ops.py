"""Each imported ONNX operator against onnxruntime (forward), finite differences (backward)
and the closed-form multiplication count, on hypothesis-drawn shapes and attributes.

Every graph is one node (plus its initializers) built with ``onnx.helper``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import minibasis as mb  # noqa: E402
from minibasis.onnx import load_model  # noqa: E402

FAST = settings(max_examples=12, deadline=None)


def single_node_model(path, op, x_shape, attrs=None, initializers=(), extra_inputs=(), opset=17, outputs=1):
    """A graph: input "x" → ``op`` (x, *extra_inputs) → "y" (more outputs as y1, y2, ...)."""
    inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in initializers]
    out_names = ["y"] + [f"y{i}" for i in range(1, outputs)]
    node = helper.make_node(op, ["x", *extra_inputs], out_names, name=f"/{op}", **(attrs or {}))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in out_names], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    path.write_bytes(onnx.shape_inference.infer_shapes(model).SerializeToString())  # fills in the output shapes
    return path


def compare(path, x, atol=1e-5, rtol=1e-5):
    """Outputs of minibasis and onnxruntime on ``x``; returns the imported model."""
    model = load_model(path, input_shape=x.shape)
    ours = model(mb.tensor(x))
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b, atol=atol, rtol=rtol)
    return model


def gradcheck_input(model, x):
    model = model.double()
    assert mb.gradcheck(lambda t: model(t), [mb.tensor(x.astype(np.float64), requires_grad=True)], atol=1e-6)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@FAST
@given(n=st.integers(1, 2), c_per_group=st.integers(1, 3), groups=st.integers(1, 3), m_per_group=st.integers(1, 3),
       k=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2), size=st.integers(5, 8),
       pads=st.tuples(*[st.integers(0, 2)] * 4), bias=st.booleans(),
       auto_pad=st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]), seed=st.integers(0, 99))
def test_conv(tmp_path_factory, n, c_per_group, groups, m_per_group, k, stride, dilation, size, pads, bias,
              auto_pad, seed):
    rng = np.random.default_rng(seed)
    if auto_pad.startswith("SAME"):
        dilation = 1  # onnxruntime refuses dilation with SAME_UPPER/SAME_LOWER
    c, m = c_per_group * groups, m_per_group * groups
    inits = [("w", rand(rng, m, c_per_group, k, k))] + ([("b", rand(rng, m))] if bias else [])
    attrs = dict(strides=[stride, stride], dilations=[dilation, dilation], group=groups, auto_pad=auto_pad)
    if auto_pad == "NOTSET":
        attrs["pads"] = list(pads)
    path = single_node_model(tmp_path_factory.mktemp("conv") / "m.onnx", "Conv", (n, c, size, size), attrs, inits,
                             ["w"] + (["b"] if bias else []))
    x = rand(rng, n, c, size, size)
    model = compare(path, x, atol=1e-4)
    assert isinstance(model.get_submodule("w"), mb.nn.Conv2d)
    with mb.count_mults() as counter:
        y = model(mb.tensor(x))
    ho, wo = y.shape[2:]
    assert counter.forward.conv == n * m * c_per_group * k * k * ho * wo
    gradcheck_input(model, x)


@FAST
@given(op=st.sampled_from(["MaxPool", "AveragePool"]), k=st.integers(1, 3), stride=st.integers(1, 3),
       pad=st.integers(0, 1), ceil_mode=st.integers(0, 1), include=st.integers(0, 1), size=st.integers(4, 9),
       seed=st.integers(0, 99))
def test_pools(tmp_path_factory, op, k, stride, pad, ceil_mode, include, size, seed):
    pad = min(pad, k // 2)
    attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, ceil_mode=ceil_mode)
    if op == "AveragePool":
        attrs["count_include_pad"] = include
    path = single_node_model(tmp_path_factory.mktemp("pool") / "m.onnx", op, (2, 3, size, size), attrs)
    x = rand(np.random.default_rng(seed), 2, 3, size, size)
    model = compare(path, x)
    with mb.count_mults() as counter:
        model(mb.tensor(x))
    assert counter.forward.total == 0  # windows are compared and summed, never multiplied
    if op == "AveragePool":
        gradcheck_input(model, x)


ACTIVATIONS = {
    # op: (attributes, forward mults per element, backward mults per element)
    "Relu": ({}, 0, 0),
    "Sigmoid": ({}, 0, 2),
    "LeakyRelu": ({"alpha": 0.07}, 1, 1),
    "HardSigmoid": ({"alpha": 0.3, "beta": 0.45}, 1, 1),
    "HardSwish": ({}, 2, 1),
}


@FAST
@given(op=st.sampled_from(sorted(ACTIVATIONS)), shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       seed=st.integers(0, 99))
def test_activations(tmp_path_factory, op, shape, seed):
    attrs, forward, backward = ACTIVATIONS[op]
    path = single_node_model(tmp_path_factory.mktemp("act") / "m.onnx", op, shape, attrs)
    x = rand(np.random.default_rng(seed), *shape) * 4
    model = compare(path, x)
    xt = mb.tensor(x, requires_grad=True)
    with mb.count_mults() as counter:
        model(xt).sum().backward()
    assert counter.forward.total == forward * x.size
    assert counter.backward.total == backward * x.size
    gradcheck_input(model, x)


@FAST
@given(low=st.one_of(st.none(), st.floats(-2, 0)), high=st.one_of(st.none(), st.floats(0, 2)), seed=st.integers(0, 9))
def test_clip(tmp_path_factory, low, high, seed):
    inits = [(n, np.float32(v)) for n, v in (("lo", low), ("hi", high)) if v is not None]
    path = single_node_model(tmp_path_factory.mktemp("clip") / "m.onnx", "Clip", (3, 4), {}, inits,
                             ["lo" if low is not None else "", "hi" if high is not None else ""])
    x = rand(np.random.default_rng(seed), 3, 4) * 3
    gradcheck_input(compare(path, x), x)


def broadcastable_pair(draw_shape, rng):
    other = [n if rng.random() < 0.6 else 1 for n in draw_shape][rng.integers(0, len(draw_shape) + 1):]
    return other


@FAST
@given(op=st.sampled_from(["Add", "Sub", "Mul", "Div"]), shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       seed=st.integers(0, 99))
def test_binary_with_a_constant(tmp_path_factory, op, shape, seed):
    rng = np.random.default_rng(seed)
    other = broadcastable_pair(shape, rng)
    b = rand(rng, *other) + (3.0 if op == "Div" else 0.0)
    path = single_node_model(tmp_path_factory.mktemp("bin") / "m.onnx", op, shape, {}, [("b", b)], ["b"])
    x = rand(rng, *shape)
    model = compare(path, x)
    with mb.count_mults() as counter:
        model(mb.tensor(x))
    assert counter.forward.total == (math.prod(np.broadcast_shapes(x.shape, b.shape)) if op == "Mul" else 0)
    gradcheck_input(model, x)


@FAST
@given(axis=st.integers(-3, 2), sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3), seed=st.integers(0, 9))
def test_split_and_concat(tmp_path_factory, axis, sizes, seed):
    shape = [2, 3, 4]
    shape[axis] = sum(sizes)
    rng = np.random.default_rng(seed)
    path = single_node_model(tmp_path_factory.mktemp("split") / "m.onnx", "Split", shape, {"axis": axis},
                             [("s", np.array(sizes, dtype=np.int64))], ["s"], outputs=len(sizes))
    compare(path, rand(rng, *shape))
    c = rand(rng, *[n if i != axis % 3 else 2 for i, n in enumerate(shape)])
    path = single_node_model(tmp_path_factory.mktemp("cat") / "m.onnx", "Concat", shape, {"axis": axis},
                             [("c", c)], ["c"])
    x = rand(rng, *shape)
    gradcheck_input(compare(path, x), x)


@FAST
@given(starts=st.lists(st.integers(-6, 6), min_size=3, max_size=3), ends=st.lists(st.integers(-7, 7), min_size=3,
       max_size=3), steps=st.lists(st.sampled_from([-2, -1, 1, 2, 3]), min_size=3, max_size=3), seed=st.integers(0, 9))
def test_slice(tmp_path_factory, starts, ends, steps, seed):
    ints = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    path = single_node_model(tmp_path_factory.mktemp("slice") / "m.onnx", "Slice", (4, 5, 6), {},
                             [("s", ints(starts)), ("e", ints(ends)), ("a", ints([0, 1, 2])), ("t", ints(steps))],
                             ["s", "e", "a", "t"])
    x = rand(np.random.default_rng(seed), 4, 5, 6)
    model = compare(path, x)
    if model(mb.tensor(x)).numpy().size:
        gradcheck_input(model, x)


def test_slice_bounds_follow_onnxruntime_on_every_start_end_and_step():
    """Every start, end and step around a 4-long axis (1,530 slices), against onnxruntime: ONNX clamps a
    negative step's start to [0, size - 1] and its end to [-1, size - 1], which Python slicing does not."""
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"])], "slice",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])]
        + [helper.make_tensor_value_info(name, TensorProto.INT64, [1]) for name in "seat"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32)
    wrong = []
    for start in range(-7, 8):
        for end in range(-8, 9):
            for step in (-3, -2, -1, 1, 2, 3):
                feeds = {"x": x, **{k: np.array([v]) for k, v in zip("seat", (start, end, 0, step))}}
                theirs = session.run(None, feeds)[0]
                ours = _slice_of(x, start, end, step)
                if not np.array_equal(ours, theirs):
                    wrong.append((start, end, step, ours.tolist(), theirs.tolist()))
    assert not wrong, wrong[:5]


def _slice_of(x, start, end, step):
    """``x`` sliced as the importer runs a Slice node (one axis, the given start, end and step)."""
    from minibasis.onnx.importer import _run_slice

    class Node:
        attrs = {}
    return np.asarray(_run_slice(None, Node, [x, np.array([start]), np.array([end]), np.array([0]),
                                              np.array([step])])[0])


@FAST
@given(pads=st.lists(st.integers(0, 2), min_size=8, max_size=8), value=st.floats(-1, 1), seed=st.integers(0, 9))
def test_pad(tmp_path_factory, pads, value, seed):
    path = single_node_model(tmp_path_factory.mktemp("pad") / "m.onnx", "Pad", (1, 2, 3, 4), {"mode": "constant"},
                             [("p", np.array(pads, dtype=np.int64)), ("v", np.float32(value))], ["p", "v"])
    x = rand(np.random.default_rng(seed), 1, 2, 3, 4)
    gradcheck_input(compare(path, x), x)


@FAST
@given(seed=st.integers(0, 99), keepdims=st.integers(0, 1), axes=st.sampled_from([[1], [2, 3], [-1], [0, 2]]))
def test_shape_ops(tmp_path_factory, seed, keepdims, axes):
    rng = np.random.default_rng(seed)
    x = rand(rng, 2, 3, 4, 5)
    folder = tmp_path_factory.mktemp("shape")
    ints = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    cases = [("Reshape", {}, [("s", ints([0, -1, 5]))], ["s"]),
             ("Flatten", {"axis": 2}, [], []),
             ("Transpose", {"perm": [0, 2, 3, 1]}, [], []),
             ("Unsqueeze", {}, [("a", ints([0, -1]))], ["a"]),
             ("Softmax", {"axis": int(rng.integers(-4, 4))}, [], []),
             ("ReduceMean", {"axes": axes, "keepdims": keepdims}, [], []),
             ("GlobalAveragePool", {}, [], []),
             ("Identity", {}, [], []),
             ("Dropout", {}, [], [])]
    for i, (op, attrs, inits, extra) in enumerate(cases):
        model = compare(single_node_model(folder / f"{i}.onnx", op, x.shape, attrs, inits, extra), x)
        gradcheck_input(model, x)
    squeeze = single_node_model(folder / "sq.onnx", "Squeeze", (2, 1, 3, 1), {}, [("a", ints([1, 3]))], ["a"])
    compare(squeeze, rand(rng, 2, 1, 3, 1))


@FAST
@given(n=st.integers(1, 3), k=st.integers(1, 5), m=st.integers(1, 4), trans_b=st.integers(0, 1), seed=st.integers(0, 9))
def test_gemm_and_matmul_become_linear_layers(tmp_path_factory, n, k, m, trans_b, seed):
    rng = np.random.default_rng(seed)
    w = rand(rng, m, k) if trans_b else rand(rng, k, m)
    folder = tmp_path_factory.mktemp("gemm")
    gemm = single_node_model(folder / "g.onnx", "Gemm", (n, k), {"transB": trans_b},
                             [("fc.weight", w), ("fc.bias", rand(rng, m))], ["fc.weight", "fc.bias"])
    x = rand(rng, n, k)
    model = compare(gemm, x)
    assert isinstance(model.get_submodule("fc"), mb.nn.Linear)
    with mb.count_mults() as counter:
        model(mb.tensor(x))
    assert counter.forward.total == n * k * m
    gradcheck_input(model, x)
    matmul = single_node_model(folder / "m.onnx", "MatMul", (2, n, k), {}, [("proj.weight", rand(rng, k, m))],
                               ["proj.weight"])
    x = rand(rng, 2, n, k)
    model = compare(matmul, x)
    assert isinstance(model.get_submodule("proj"), mb.nn.Linear)
    gradcheck_input(model, x)


@FAST
@given(n=st.integers(1, 3), c=st.integers(1, 4), seed=st.integers(0, 9))
def test_batch_normalization_becomes_a_layer_with_running_statistics(tmp_path_factory, n, c, seed):
    rng = np.random.default_rng(seed)
    stats = [("bn.weight", rand(rng, c)), ("bn.bias", rand(rng, c)), ("bn.running_mean", rand(rng, c)),
             ("bn.running_var", rng.uniform(0.5, 2, c).astype(np.float32))]
    path = single_node_model(tmp_path_factory.mktemp("bn") / "m.onnx", "BatchNormalization", (n, c, 3, 3),
                             {"epsilon": 1e-3}, stats, [name for name, _ in stats])
    x = rand(rng, n, c, 3, 3)
    model = compare(path, x)
    layer = model.get_submodule("bn")
    assert isinstance(layer, mb.nn.BatchNorm2d) and layer.eps == 1e-3
    np.testing.assert_array_equal(layer.running_var, stats[3][1])
    gradcheck_input(model, x)


def test_view_shape_arithmetic_runs_at_any_batch_size(tmp_path):
    """x.view(x.size(0), -1) as the exporters write it: Shape → Gather → Unsqueeze → Concat → Reshape."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
             helper.make_node("Cast", ["shape"], ["shape64"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["x", "shape64"], ["y"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    (tmp_path / "v.onnx").write_bytes(onnx.shape_inference.infer_shapes(proto).SerializeToString())
    model = load_model(tmp_path / "v.onnx", input_shape=(1, 2, 3))
    for batch in (1, 4):
        x = rand(np.random.default_rng(batch), batch, 2, 3)
        assert model(mb.tensor(x)).shape == (batch, 6)
        compare(tmp_path / "v.onnx", x)


@FAST
@given(axis=st.integers(-3, 2), indices=st.lists(st.integers(-3, 2), min_size=1, max_size=4), scalar=st.booleans(),
       seed=st.integers(0, 9))
def test_gather_with_constant_indices(tmp_path_factory, axis, indices, scalar, seed):
    index = np.array(indices[0] if scalar else indices, dtype=np.int64)  # repeats accumulate in backward
    path = single_node_model(tmp_path_factory.mktemp("gather") / "m.onnx", "Gather", (3, 3, 3), {"axis": axis},
                             [("i", index)], ["i"])
    x = rand(np.random.default_rng(seed), 3, 3, 3)
    gradcheck_input(compare(path, x), x)
