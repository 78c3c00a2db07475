"""ONNX files as untrusted input, and zoo models through save_model → onnxruntime → load_model."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import minibasis as mb  # noqa: E402
from minibasis import models  # noqa: E402
from minibasis.model_files import ModelFileError  # noqa: E402
from minibasis.onnx import load_model, save_model  # noqa: E402


def graph_file(path, nodes, initializers=(), x_shape=(1, 2, 4, 4)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    path.write_bytes(onnx.shape_inference.infer_shapes(proto).SerializeToString())
    return path


def test_every_unsupported_op_is_listed_with_its_count_before_anything_runs(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Erf", ["a"], ["b"]),
             helper.make_node("Erf", ["b"], ["c"]),
             helper.make_node("Tanh", ["c"], ["d"]),
             helper.make_node("Pad", ["d", "p"], ["y"], mode="reflect")]
    path = graph_file(tmp_path / "m.onnx", nodes, [numpy_helper.from_array(np.zeros(8, np.int64), "p")])
    with pytest.raises(ModelFileError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "Erf ×2" in message and "Tanh ×1" in message
    with mb.count_mults() as counter:  # nothing ran
        with pytest.raises(ModelFileError):
            load_model(path)
    assert counter.total == 0
    # attributes the importer does not implement are listed the same way
    path = graph_file(tmp_path / "pad.onnx", [nodes[0], helper.make_node("Pad", ["a", "p"], ["y"], mode="reflect")],
                      [numpy_helper.from_array(np.zeros(8, np.int64), "p")])
    with pytest.raises(ModelFileError, match=r"Pad \(mode 'reflect'\) ×1"):
        load_model(path)


def test_control_flow_is_refused(tmp_path):
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "b", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
             helper.make_node("Cast", ["m"], ["cond"], to=TensorProto.BOOL),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    (tmp_path / "if.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(ModelFileError, match=r"If \(control flow: sub-graphs\) ×1"):
        load_model(tmp_path / "if.onnx")


def test_truncated_and_foreign_files_are_refused(tmp_path):
    model = models.table3_cnn().eval()
    save_model(model, tmp_path / "ok.onnx", (1, 3, 32, 32))
    data = (tmp_path / "ok.onnx").read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 10):
        (tmp_path / "cut.onnx").write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="not an ONNX model|not a valid ONNX model"):
            load_model(tmp_path / "cut.onnx")
    (tmp_path / "text.onnx").write_text("hello, this is not a network\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    np.savez(tmp_path / "weights.npz", w=np.ones(3))
    for name in ("text.onnx", "empty.onnx", "weights.npz"):
        with pytest.raises(ModelFileError):
            load_model(tmp_path / name)
    with pytest.raises(ModelFileError, match="byte limit"):
        load_model(tmp_path / "ok.onnx", max_bytes=1000)


def _external(path, location):
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "conv.weight")
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Conv", ["x", "conv.weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    path.write_bytes(proto.SerializeToString())
    return path


def test_external_data_only_beside_the_model_and_only_when_allowed(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(4, 7, np.float32).tobytes())
    (folder / "w.bin").write_bytes(np.full(4, 2, np.float32).tobytes())
    (folder / "link.bin").symlink_to(secret)
    inside = _external(folder / "in.onnx", "w.bin")
    with pytest.raises(ModelFileError, match="allow_external_data"):
        load_model(inside)
    model = load_model(inside, allow_external_data=True)
    np.testing.assert_array_equal(mb.to_numpy(model.get_submodule("conv").weight.data), np.full((2, 2, 1, 1), 2.0))
    for location in ("../secret.bin", str(secret), "link.bin", "missing.bin"):
        with pytest.raises(ModelFileError, match="external data"):
            load_model(_external(folder / "out.onnx", location), allow_external_data=True)


def _zoo():
    return {"resnet20_A": lambda: models.resnet_cifar(20, shortcut="A"),
            "vgg16_bn": lambda: models.vgg16(10, batch_norm=True),
            "table3_basis": lambda: models.table3_cnn(basis=True),
            "densenet_bc": lambda: models.densenet_bc(depth=22, growth_rate=4, num_classes=10),
            "alexnet": lambda: models.alexnet(10),
            "resnet20_B": lambda: models.resnet_cifar(20, shortcut="B"),
            "mobilenet_v2": lambda: models.get_model("mobilenet_v2", num_classes=10)}


@pytest.mark.parametrize("name", sorted(_zoo()))
def test_zoo_models_and_their_compressed_forms_round_trip(tmp_path, name):
    mb.manual_seed(0)
    model = _zoo()[name]().eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    first_convs = [path for path, m in model.named_modules() if isinstance(m, mb.nn.Conv2d)][:3]
    compressed, report = mb.compress(model, 0.9, layers=first_convs, skip_unprofitable=False)  # small D: fast
    assert any(row.replaced for row in report.layers) or not first_convs  # table3_basis: BasisConvs already
    for label, net in (("original", model), ("compressed", compressed.eval())):
        with mb.no_grad():
            expected = net(mb.tensor(x)).numpy()
        path = tmp_path / f"{label}.onnx"
        save_model(net, path, (1, 3, 32, 32))
        tolerance = 2e-5 * max(1.0, float(np.abs(expected).max()))
        runtime = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        np.testing.assert_allclose(runtime, expected, rtol=0, atol=tolerance)
        back = load_model(path)
        with mb.no_grad():
            np.testing.assert_array_equal(back(mb.tensor(x)).numpy(), expected)  # the same ops, the same order


def test_a_basis_conv_is_two_plain_convs_and_a_failed_export_writes_nothing(tmp_path):
    model = models.table3_cnn(basis=True).eval()
    save_model(model, tmp_path / "b.onnx", (1, 3, 32, 32))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node]
    basis_convs = sum(isinstance(m, mb.nn.BasisConv2d) for m in model.modules())
    plain_convs = sum(isinstance(m, mb.nn.Conv2d) for m in model.modules())
    assert ops.count("Conv") == 2 * basis_convs + plain_convs
    assert set(ops) <= {"Conv", "BatchNormalization", "Relu", "MaxPool", "Reshape", "Gemm", "Identity"}
    model.train()
    with pytest.raises(ValueError):
        save_model(model.get_submodule("features"), tmp_path / "bad.onnx", (1, 3, 32, 32), opset=12)
    assert not (tmp_path / "bad.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.onnx"]
    assert model.training  # modes restored


def test_import_minibasis_does_not_import_onnx():
    import subprocess
    import sys
    code = ("import sys, minibasis, minibasis.model_files, minibasis.measure; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'minibasis.onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_imported_network_compressed_here_round_trips_through_a_model_file(tmp_path):
    model = models.table3_cnn().eval()
    save_model(model, tmp_path / "net.onnx", (1, 3, 32, 32))
    imported, meta = mb.load_model(tmp_path / "net.onnx")  # .onnx files go through minibasis.load_model too
    assert meta.format == "onnx" and meta.num_classes == 10
    compressed, report = mb.compress(imported, 0.9, skip_unprofitable=False)
    assert any(row.replaced for row in report.layers)
    mb.save_model(compressed, tmp_path / "compressed.npz")
    back, meta = mb.load_model(tmp_path / "compressed.npz")
    assert meta.architecture["name"] == "onnx"
    assert [type(m).__name__ for _, m in back.named_modules()] == [type(m).__name__ for _, m in
                                                                  compressed.named_modules()]
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with mb.no_grad():
        np.testing.assert_array_equal(back(mb.tensor(x)).numpy(), compressed.eval()(mb.tensor(x)).numpy())


def test_import_and_export_run_on_a_device_backend(tmp_path):
    """On the strict stand-in device (arrays that refuse silent conversion to host NumPy, like CuPy's)."""
    mb.manual_seed(2)
    model = models.resnet_cifar(20, shortcut="A").eval()
    save_model(model, tmp_path / "r.onnx", (1, 3, 32, 32))
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expected = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    mb.use("strict")
    try:
        imported = load_model(tmp_path / "r.onnx")
        y = imported(mb.tensor(x, requires_grad=True))
        y.sum().backward()  # trainable on the device too
        np.testing.assert_allclose(mb.to_numpy(y.data), expected, rtol=0, atol=2e-5 * np.abs(expected).max())
        save_model(imported, tmp_path / "again.onnx", (1, 3, 32, 32), fold_batch_norm=True, check=True)
    finally:
        mb.use("numpy")


def test_data_dependent_shapes_are_refused_before_anything_runs(tmp_path):
    """A reshape whose target shape is computed from the input's values, not its shape."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
             helper.make_node("Cast", ["m"], ["n"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["x", "n"], ["y"]),
             helper.make_node("Relu", ["y"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["d"])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    (tmp_path / "dd.onnx").write_bytes(proto.SerializeToString())
    with mb.count_mults() as counter, pytest.raises(ModelFileError) as caught:
        load_model(tmp_path / "dd.onnx")
    assert "Cast (data-dependent: computed values cast to integers) ×1" in str(caught.value)
    assert "Reshape (data-dependent: input 1 computed from the data) ×1" in str(caught.value)
    assert counter.total == 0


def test_a_static_batch_reshape_keeps_any_batch_and_a_non_batch_one_stays_literal(tmp_path):
    """The dynamo exporter writes x.flatten(1) as Reshape to the literal (N_export, -1): the imported
    model must run at every batch (compress measures at batch 1 too), while a reshape whose
    leading entry is not the batch keeps its literal target."""
    w = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "flat"], ["f"]),          # (2, 4·4·4) at the export batch 2
             helper.make_node("Reshape", ["f", "pairs"], ["y"])]         # (2·64/32, 32): not a batch-keeping one
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([2, -1], np.int64), "flat"),
             numpy_helper.from_array(np.array([-1, 32], np.int64), "pairs")]
    path = graph_file(tmp_path / "static.onnx", nodes, inits, x_shape=(2, 2, 4, 4))
    model = load_model(path, input_shape=(2, 2, 4, 4))
    for batch in (1, 2, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 2, 4, 4)).astype(np.float32)
        with mb.no_grad():
            got = model(mb.tensor(x)).numpy()
        conv = np.stack([sum(np.pad(x[:, c], ((0, 0), (1, 1), (1, 1)))[:, i:i + 4, j:j + 4] * w[m, c, i, j]
                             for c in range(2) for i in range(3) for j in range(3)) for m in range(4)], axis=1)
        np.testing.assert_allclose(got, conv.reshape(batch, -1).reshape(-1, 32), rtol=1e-5, atol=1e-5)
