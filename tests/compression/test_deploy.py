"""minibasis.deploy: the inference-only form computes the source model's function, counts what it executes."""
from __future__ import annotations

import numpy as np
import pytest

import minibasis as mb
from minibasis import models
from minibasis.deployment import InferenceError
from minibasis.nn import BasisConv2d, BatchNorm2d

#: (zoo name, keyword arguments, batch): every architecture of the zoo, small where it has a size knob.
ZOO = [
    ("resnet_cifar", {"depth": 8}, 3),
    ("resnet_cifar", {"depth": 8, "shortcut": "B"}, 3),
    ("vgg", {"depth": 11, "batch_norm": True}, 2),
    ("vgg", {"depth": 11}, 2),
    ("alexnet", {}, 3),
    ("table3_cnn", {}, 3),
    ("mobilenet_v2", {}, 2),
    ("densenet_bc", {"depth": 10, "growth_rate": 4}, 3),
]


def _randomize_batch_norms(model, seed=0):
    """Non-trivial running statistics and affine parameters (a fresh BN is the identity map)."""
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            values = (rng.normal(0, 0.2, m.num_features), rng.uniform(0.5, 2.0, m.num_features),
                      rng.uniform(0.5, 1.5, m.num_features), rng.normal(0, 0.2, m.num_features))
            for target, value in zip((m.running_mean, m.running_var, m.weight.data, m.bias.data), values):
                target[...] = mb.backend.asarray(value, dtype=target.dtype)  # on the model's backend
    return model


def _build(name, kwargs, threshold=None):
    mb.manual_seed(0)
    model = _randomize_batch_norms(models.get_model(name, **kwargs)).eval()
    if threshold is not None:
        # every layer replaced, even where it does not pay (t = 1); VGG's first convs only (its eigen-bases are slow)
        layers = [path for path, _ in mb.measure.conv_layers(model)][:4] if name == "vgg" else None
        model, _ = mb.compress(model, energy_threshold=threshold, skip_unprofitable=False, layers=layers)
        model.eval()
    return model


def _input(batch, seed=1):
    return np.random.default_rng(seed).normal(size=(batch, 3, 32, 32)).astype(np.float32)


def _run_counted(model, x):
    with mb.no_grad(), mb.count_mults() as counter:
        out = model(mb.tensor(x))
    return out.data, counter


def _folded_batch_norm_mults(name, counter) -> int:
    """Products of the BatchNorms that read a conv's output alone (all of them but DenseNet's
    pre-activation ones, which read a concatenation; a DenseNet bottleneck's bn2 follows its conv1)."""
    by_layer = counter.forward._select()
    total = 0
    for (phase, op, layer, _), n in by_layer:
        if op != "batch_norm":
            continue
        if name == "densenet_bc" and not (layer.startswith("dense") and layer.endswith(".bn2")):
            continue
        total += n
    return total


def _assert_same_function(name, source, x):
    expected, source_counts = _run_counted(source, x)
    deployed = mb.deploy(source)
    got, deployed_counts = _run_counted(deployed, x)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * scale)
    # conv products are the same (folding BN changes values, not shapes); BN's products are gone
    assert deployed_counts.conv == source_counts.conv > 0
    folded = _folded_batch_norm_mults(name, source_counts)
    assert deployed_counts.total == source_counts.total - folded
    if name not in ("densenet_bc",):
        assert "batch_norm" not in deployed_counts.by_op
    return deployed, deployed_counts


@pytest.mark.parametrize("name,kwargs,batch", ZOO, ids=[f"{n}-{k}" for n, k, _ in ZOO])
def test_deployed_zoo_model_equals_source(name, kwargs, batch):
    source = _build(name, kwargs)
    deployed, counts = _assert_same_function(name, source, _input(batch))
    assert not deployed.report.unfused
    assert not deployed.report.kept_batch_norms or name == "densenet_bc"  # DenseNet keeps its pre-activation BNs
    # weights are buffers; a kept module's parameters are frozen
    assert not any(p.requires_grad for p in deployed.parameters())
    assert list(deployed.parameters()) == [] or name == "densenet_bc"


@pytest.mark.parametrize("threshold", [1.0, 0.8])
@pytest.mark.parametrize("name,kwargs,batch", [z for z in ZOO if z[0] != "vgg" or z[1].get("batch_norm")],
                         ids=[f"{n}-{k}" for n, k, _ in ZOO if n != "vgg" or k.get("batch_norm")])
def test_deployed_compressed_model_equals_source(name, kwargs, batch, threshold):
    source = _build(name, kwargs, threshold)
    assert any(isinstance(m, BasisConv2d) for m in source.modules())
    _assert_same_function(name, source, _input(batch))


def test_random_basis_net_with_intermediate_batch_norm():
    # BasisConv2d.random: an intermediate BatchNorm and a basis bias, both folded into the 1×1 stage
    source = _build("table3_cnn", {"basis": True, "seed": 3})
    for layer in source.conv_layers():
        assert layer.bn is not None and layer.basis_bias is not None
    _randomize_batch_norms(source, seed=5)
    deployed, counts = _assert_same_function("table3_cnn", source, _input(3))
    # the 1×1 stage's products stay: Q·D·P + M·Q·P per image, measured
    layers, pixels = source.conv_layers(), (32 * 32, 15 * 15, 7 * 7)
    assert counts.conv == 3 * sum((layer.num_basis * layer.in_channels * 25 + layer.out_channels * layer.num_basis) * p
                                  for layer, p in zip(layers, pixels))


@pytest.mark.parametrize("name,kwargs", [("resnet_cifar", {"depth": 8, "shortcut": "B"}), ("mobilenet_v2", {}),
                                         ("densenet_bc", {"depth": 10, "growth_rate": 4})])
def test_many_chunks_on_two_threads_equal_one_chunk(name, kwargs):
    from minibasis.functions.chunking import smallest_chunks

    source = _build(name, kwargs, threshold=0.8)
    x = _input(4)
    deployed = mb.deploy(source)
    whole, whole_counts = _run_counted(deployed, x)
    previous = mb.set_num_threads(2)
    try:
        with smallest_chunks():  # one image per chunk, every chunk loop on the engine threads
            (first, counts), (second, _) = _run_counted(deployed, x), _run_counted(deployed, x)
    finally:
        mb.set_num_threads(previous)
    np.testing.assert_array_equal(first, second)  # identical run to run
    np.testing.assert_allclose(first, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    assert counts.as_dict() == whole_counts.as_dict()


def test_deployed_model_refuses_training_and_backward():
    deployed = mb.deploy(_build("resnet_cifar", {"depth": 8}))
    x = mb.tensor(_input(2), requires_grad=True)
    out = deployed(x)
    assert out.creator is None and not out.requires_grad
    with pytest.raises(InferenceError, match="inference-only"):
        out.backward()
    with pytest.raises(InferenceError, match="cannot be trained"):
        deployed.train()
    with pytest.raises(InferenceError, match="cannot be trained"):
        deployed.layer1.train()
    deployed.eval()  # harmless
    assert x.grad is None
    with pytest.raises(ValueError, match="deployed already"):
        mb.deploy(deployed)


def test_source_model_is_unchanged():
    source = _build("resnet_cifar", {"depth": 8, "shortcut": "B"}, threshold=0.8)
    source.train()
    before = {k: np.array(v) for k, v in source.state_dict().items()}
    kinds = [type(m) for m in source.modules()]
    deployed = mb.deploy(source)
    assert all(m.training for m in source.modules())
    assert [type(m) for m in source.modules()] == kinds
    after = source.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[key]), value, err_msg=key)
    # and the deployed model computes the eval-mode function
    source.eval()
    np.testing.assert_allclose(deployed(_input(2)).data, source(mb.tensor(_input(2))).data, atol=1e-4)


def test_input_arrays_are_not_written():
    deployed = mb.deploy(_build("resnet_cifar", {"depth": 8}))
    x = _input(2)
    copy = x.copy()
    deployed(x)
    np.testing.assert_array_equal(x, copy)


def test_counts_attribute_to_the_source_layer_paths():
    source = _build("resnet_cifar", {"depth": 8, "shortcut": "B"}, threshold=0.8)
    _, source_counts = _run_counted(source, _input(2))
    _, deployed_counts = _run_counted(mb.deploy(source), _input(2))
    assert deployed_counts.forward.conv_by_layer() == source_counts.forward.conv_by_layer()


def test_unknown_module_runs_unfused_and_says_so():
    class Custom(mb.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = mb.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = mb.nn.BatchNorm2d(4)

        def forward(self, x):
            return mb.functions.relu(self.bn(self.conv(x))) * 2.0

    mb.manual_seed(0)
    source = _randomize_batch_norms(Custom()).eval()
    deployed = mb.deploy(source, input_shape=(1, 3, 8, 8))
    assert [path for path, _ in deployed.report.unfused] == [""]
    assert "not known to deploy" in str(deployed.report)
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(deployed(x).data, source(mb.tensor(x)).data, rtol=1e-5, atol=1e-5)
    assert deployed.report.folded_batch_norms == 1  # folded even though not fused


def test_report_names_what_was_fused():
    deployed = mb.deploy(_build("resnet_cifar", {"depth": 8}))
    fused = dict(deployed.report.fused)
    assert fused["conv1"] == "conv + ReLU"
    assert "option-A shortcut" in fused["layer2.0.conv2"]
    assert "identity shortcut" in fused["layer1.0.conv2"]
    assert deployed.report.folded_batch_norms == 7 and not deployed.report.kept_batch_norms


def test_eval_and_compress_take_deploy(tmp_path, cifar10_dir, akamaster_dir):
    import json

    from minibasis.cli import main

    common = ["--limit", "64", "--batch-size", "32", "--quiet"]
    results = []
    for extra in ([], ["--deploy"]):
        out = tmp_path / f"eval{len(extra)}.json"
        assert main(["eval", *common, *extra, "--output", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    plain, deployed = results
    assert deployed["deployed"] and not plain["deployed"]
    assert deployed["correct"] == plain["correct"] and deployed["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert main(["compress", "--threshold", "0.8", "--evaluate", "--deploy", *common,
                 "--output", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["deployed"] and 0 <= report["test_acc_compressed"] <= 1
    # --deploy needs --evaluate
    assert main(["compress", "--threshold", "0.8", "--deploy", "--output", str(tmp_path / "d")]) != 0


# -- the fused kernel against the engine's conv, on every path ---------------------------------
from minibasis.functions import fused  # noqa: E402

KERNEL_CASES = [  # (C, M, k, stride, padding, dilation, groups)
    (8, 16, 3, 1, 1, 1, 1),    # im2col "same"
    (16, 4, 3, 1, 1, 1, 1),    # kn2row (M < 0.75 C)
    (8, 8, 3, 2, 1, 1, 1),     # strided
    (6, 6, 3, 1, 1, 1, 6),     # depthwise "same"
    (6, 12, 3, 2, 1, 1, 3),    # grouped, strided
    (8, 8, 1, 1, 0, 1, 1),     # pointwise
    (4, 6, 3, 1, 2, 2, 1),     # dilated
    (4, 6, 5, 1, 0, 1, 1),     # no padding
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[str(c) for c in KERNEL_CASES])
def test_fused_conv_equals_conv_bias_residual_relu(case):
    c, m, k, stride, padding, dilation, groups = case
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, c, 9, 9)).astype(np.float32)
    weight = rng.normal(size=(m, c // groups, k, k)).astype(np.float32)
    bias = rng.normal(size=m).astype(np.float32)
    with mb.count_mults() as expected_counts:
        y = mb.functions.conv2d(mb.tensor(x), mb.tensor(weight), mb.tensor(bias), stride, padding, dilation,
                                groups).data
    source = rng.normal(size=(3, m // 2, y.shape[2] * 2, y.shape[3] * 2)).astype(np.float32)
    expected = y.copy()
    expected[:, 1:1 + m // 2] += source[:, :, ::2, ::2]
    expected = np.maximum(expected, 0)
    geometry = fused.ConvGeometry((stride, stride), (padding,) * 4, (dilation, dilation), groups)
    with mb.count_mults() as counts:
        got = fused.fused_conv2d(x, weight, bias, geometry, residual=fused.Residual(source, 1, 2), relu=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert counts.conv == expected_counts.conv > 0


def test_fused_basis_conv_applies_both_stages_per_chunk():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 8, 8, 8)).astype(np.float32)
    basis = rng.normal(size=(5, 8, 3, 3)).astype(np.float32)
    coeffs = rng.normal(size=(12, 5)).astype(np.float32)
    with mb.chunk_sizes(conv_bytes=1), mb.count_mults() as counts:  # one image per chunk
        got = fused.fused_conv2d(x, basis, None, fused.ConvGeometry((1, 1), (1, 1, 1, 1)), coeffs=coeffs)
    maps = mb.functions.conv2d(mb.tensor(x), mb.tensor(basis), padding=1).data
    np.testing.assert_allclose(got, np.einsum("mq,nqhw->nmhw", coeffs, maps), rtol=1e-4, atol=1e-4)
    assert counts.conv == 5 * (5 * 72 * 64 + 12 * 5 * 64)  # N·(Q·D·P + M·Q·P)


def test_fused_conv_writes_through_a_sliced_output():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    weight = rng.normal(size=(3, 4, 1, 1)).astype(np.float32)
    buffer = np.zeros((2, 3, 5, 7), np.float32)
    fused.fused_conv2d(x, weight, out=buffer[:, :, :, 1:6])  # no reshape of this slice is a view
    np.testing.assert_allclose(buffer[:, :, :, 1:6], np.einsum("mc,nchw->nmhw", weight[:, :, 0, 0], x), atol=1e-5)
    assert not buffer[:, :, :, 0].any() and not buffer[:, :, :, 6].any()


def test_block_with_an_unfoldable_batch_norm_runs_unfused():
    source = _build("resnet_cifar", {"depth": 8})
    source.layer2[0].bn1 = BatchNorm2d(32, track_running_stats=False)  # batch statistics even in eval mode
    deployed = mb.deploy(source)
    assert [path for path, _ in deployed.report.unfused] == ["layer2.0"]
    assert "layer1.0.conv2" in dict(deployed.report.fused)
    x = _input(3)
    np.testing.assert_allclose(deployed(x).data, source(mb.tensor(x)).data, rtol=1e-5, atol=1e-5)


@pytest.fixture
def strict_backend():
    previous = mb.backend.current()
    mb.use("strict")
    yield
    mb.use(previous)


@pytest.mark.parametrize("name,kwargs", [("resnet_cifar", {"depth": 8, "shortcut": "B"}),
                                         ("densenet_bc", {"depth": 10, "growth_rate": 4}),
                                         ("table3_cnn", {"basis": True})])
def test_deployed_model_on_a_device_backend(strict_backend, name, kwargs):
    # the strict stand-in refuses silent host/device mixing, as CuPy does: the deployed kernels stay on the device
    from minibasis.backend_strict import StrictArray

    source, _ = mb.compress(_build(name, kwargs), energy_threshold=0.8)
    source.eval()
    x = mb.backend.asarray(_input(2))
    deployed = mb.deploy(source)
    out = deployed(x).data
    assert isinstance(out, StrictArray)
    with mb.no_grad():
        expected = mb.to_numpy(source(mb.tensor(x)).data)
    np.testing.assert_allclose(mb.to_numpy(out), expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_densenet_on_maps_that_do_not_split_into_pool_tiles():
    source = _build("densenet_bc", {"depth": 10, "growth_rate": 4})
    x = np.random.default_rng(0).normal(size=(2, 3, 28, 28)).astype(np.float32)  # 28 → 14 → 7: an odd map
    deployed = mb.deploy(source, (1, 3, 28, 28))
    np.testing.assert_allclose(deployed(x).data, source(mb.tensor(x)).data, rtol=1e-5, atol=1e-5)


def test_deployed_counts_are_per_image():
    deployed = mb.deploy(_build("mobilenet_v2", {}, threshold=0.8))
    _, one = _run_counted(deployed, _input(1))
    _, three = _run_counted(deployed, _input(3))
    assert three.conv == 3 * one.conv and three.total == 3 * one.total
    assert three.forward.conv_by_layer() == {layer: 3 * n for layer, n in one.forward.conv_by_layer().items()}
