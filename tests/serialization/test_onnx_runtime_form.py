"""The runtime form of an export: basis counts rounded up to a channel block, unprofitable layers as one conv.

Both rewrites must leave the function unchanged (checked against the model, in float64 where the
arithmetic allows, and against onnxruntime on the written file) and cost exactly the
multiplications they say (measured, compared with the closed forms).
"""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

import minibasis as mb  # noqa: E402
from minibasis import models, nn  # noqa: E402
from minibasis.cli import main  # noqa: E402
from minibasis.onnx import runtime_form, save_model  # noqa: E402


def trained_layer(bn: bool, basis_bias: bool, q=5, c=3, m=7, k=3, seed=0):
    """A BasisConv2d with every optional part set to non-trivial values, float64, eval mode."""
    mb.manual_seed(seed)
    rng = np.random.default_rng(seed)
    layer = nn.BasisConv2d.random(c, m, k, q, padding=1, bias=True, bn=bn, basis_bias=basis_bias, seed=seed,
                                  dtype="float64")
    if bn:
        layer.bn.weight.data = rng.uniform(0.5, 2.0, q)
        layer.bn.bias.data = rng.standard_normal(q)
        layer.bn._buffers["running_mean"] = rng.standard_normal(q)
        layer.bn._buffers["running_var"] = rng.uniform(0.5, 2.0, q)
    return layer.eval()


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("basis_bias", [False, True])
@pytest.mark.parametrize("multiple", [1, 4, 8, 16])
def test_padded_layer_computes_the_same_function_and_costs_the_stated_extra(bn, basis_bias, multiple):
    layer = trained_layer(bn, basis_bias)
    padded = layer.padded(multiple)
    q, q2 = layer.num_basis, padded.num_basis
    assert q2 % multiple == 0 and q <= q2 < q + multiple
    assert padded.bn is None and padded.basis_bias is None  # folded into the 1×1 stage
    x = mb.tensor(np.random.default_rng(1).standard_normal((4, 3, 6, 6)))
    with mb.no_grad():
        with mb.count_mults() as before:
            want = layer(x).numpy()
        with mb.count_mults() as after:
            got = padded(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    d, m, positions = 3 * 9, 7, 4 * 6 * 6
    assert after.conv - before.conv == (q2 - q) * (d + m) * positions
    # the source layer is untouched
    assert layer.num_basis == q and (layer.bn is not None) == bn


def test_padded_refuses_a_multiple_that_is_not_a_positive_integer():
    layer = trained_layer(False, False)
    for bad in (0, -16, 2.5, "16"):
        with pytest.raises((ValueError, TypeError), match="multiple"):
            layer.padded(bad)


@pytest.fixture(scope="module")
def compressed():
    mb.manual_seed(3)
    model = models.resnet_cifar(20).eval()
    net, report = mb.compress(model, energy_threshold=0.7, input_shape=(1, 3, 32, 32))
    return net.eval(), report


def basis_layers(model):
    return {path: layer for path, layer in model.named_modules() if isinstance(layer, nn.BasisConv2d)}


def test_runtime_form_rounds_merges_by_the_stated_rule_and_keeps_the_logits(compressed):
    net, _ = compressed
    source = basis_layers(net)
    qs = {path: layer.num_basis for path, layer in source.items()}
    form, lines = runtime_form(net, pad_basis_to=16, merge_above=0.7)
    kept = basis_layers(form)
    assert len(lines) == len(source) > 0
    merged = 0
    for path, layer in source.items():
        q2 = -(-layer.num_basis // 16) * 16
        d = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        own = q2 / layer.out_channels + q2 / d
        if own > 0.7:
            merged += 1
            assert path not in kept and isinstance(form.get_submodule(path), nn.Conv2d), path
        else:
            assert kept[path].num_basis == q2, path
    assert 0 < merged < len(source)  # the fixture exercises both branches
    assert {path: layer.num_basis for path, layer in basis_layers(net).items()} == qs  # the source is untouched
    assert any(q % 16 for q in qs.values())  # and some of its layers really were off the grid
    x = mb.tensor(np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32))
    with mb.no_grad():
        want, got = net(x).numpy(), form(x).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_runtime_form_without_options_changes_nothing_and_refuses_bad_options(compressed):
    net, _ = compressed
    form, lines = runtime_form(net)
    assert {p: l.num_basis for p, l in basis_layers(form).items()} == {p: l.num_basis for p, l in basis_layers(net).items()}
    assert all("two convs" in line for line in lines)
    with pytest.raises(ValueError, match="merge_above"):
        runtime_form(net, merge_above=0)
    with pytest.raises(ValueError, match="pad_basis_to"):
        runtime_form(net, pad_basis_to=0)


@pytest.mark.parametrize("fold", [False, True])
def test_saved_runtime_form_runs_in_onnxruntime_with_blocked_channel_counts(tmp_path, compressed, fold):
    net, _ = compressed
    path = tmp_path / "net.onnx"
    worst = save_model(net, path, (1, 3, 32, 32), fold_batch_norm=fold, check=True, pad_basis_to=16, merge_above=0.7)
    assert worst <= 1e-4
    graph = onnx.load(str(path)).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    convs = [weights[node.input[1]].shape for node in graph.node if node.op_type == "Conv"]
    # every conv's output and input channels are on the 16-grid, except the RGB input's
    assert all(shape[0] % 16 == 0 for shape in convs)
    assert all(shape[1] % 16 == 0 for shape in convs[1:])
    x = np.random.default_rng(4).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with mb.no_grad():
        want = net(mb.tensor(x)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_export_cli_writes_the_runtime_form_and_says_which_layer_became_what(tmp_path, compressed, capsys):
    net, _ = compressed
    mb.save_model(net, tmp_path / "model.npz")
    out = tmp_path / "model.onnx"
    assert main(["export", str(tmp_path / "model.npz"), "--format", "onnx", "--output", str(out),
                 "--fold-batch-norm", "--pad-basis-to", "16", "--merge-above", "0.7"]) == 0
    text = capsys.readouterr().out
    assert "one conv (own ratio" in text and "two convs, Q =" in text and out.is_file()
    target = tmp_path / "model.safetensors"
    assert main(["export", str(tmp_path / "model.npz"), "--format", "safetensors", "--output", str(target),
                 "--pad-basis-to", "16"]) != 0
    assert "apply to --format onnx only" in capsys.readouterr().err and not target.exists()
