"""Grouped (depthwise included), dilated and "same"/"valid" convs against PyTorch, gradchecks and counts.

PyTorch (CPU, float64) is the oracle for forward and backward; the counts are
compared with the closed form M·(C/g)·kh·kw·Ho·Wo per image (``formulas``),
backward per the documented convention (weight gradient + input gradient, each
the forward's count). Skipped where torch is not installed, except the gradchecks.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minibasis as mb
from minibasis import formulas, nn
from minibasis import functions as F
from minibasis.functions import conv as conv_module

from test_conv_paths import spy_paths


def torch_conv(x, w, gy, stride, padding, dilation, groups, bias=None):
    """PyTorch's forward and (input, weight, bias) gradients in float64."""
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = None if bias is None else torch.tensor(bias, requires_grad=True)
    y = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=padding, dilation=dilation, groups=groups)
    y.backward(torch.tensor(gy) if gy is not None else torch.ones_like(y))
    return (y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), None if bt is None else bt.grad.numpy())


def ours(x, w, gy, stride, padding, dilation, groups, bias=None):
    xt, wt = mb.tensor(x, requires_grad=True), mb.tensor(w, requires_grad=True)
    bt = None if bias is None else mb.tensor(bias, requires_grad=True)
    with mb.count_mults() as counter:
        y = F.conv2d(xt, wt, bt, stride=stride, padding=padding, dilation=dilation, groups=groups)
        y.backward(gy if gy is not None else np.ones(y.shape))
    return (y.data, xt.grad.data, wt.grad.data, None if bt is None else bt.grad.data), counter


@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 2, 3, 4]))
    c, m = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kind = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    stride = (1, 1) if kind == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = {"int": draw(st.integers(0, 3)), "pair": (draw(st.integers(0, 3)), draw(st.integers(0, 3))),
               "same": "same", "valid": "valid"}[kind]
    pads = conv_module.resolve_padding(padding, (kh, kw), stride, dilation)
    span = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    # H ≠ W, and big enough for the dilated kernel
    low_h, low_w = max(1, span[0] - pads[0] - pads[1]), max(1, span[1] - pads[2] - pads[3])
    h = draw(st.integers(low_h, low_h + 6))
    w = draw(st.integers(low_w, low_w + 6).filter(lambda v: v != h))
    n = draw(st.integers(1, 3))
    return dict(n=n, c=c, m=m, h=h, w=w, kernel=(kh, kw), stride=stride, padding=padding, dilation=dilation,
                groups=groups, seed=draw(st.integers(0, 2 ** 16)), chunk=draw(st.sampled_from([1, 10 ** 9])),
                bias=draw(st.booleans()))


@settings(max_examples=80, deadline=None)
@given(geometries())
def test_forward_backward_and_counts_match_pytorch(geometry):
    pytest.importorskip("torch")
    g = geometry
    rng = np.random.default_rng(g["seed"])
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    w = rng.standard_normal((g["m"], g["c"] // g["groups"]) + g["kernel"])
    b = rng.standard_normal(g["m"]) if g["bias"] else None
    args = (g["stride"], g["padding"], g["dilation"], g["groups"])
    want = torch_conv(x, w, None, *args, bias=b)
    gy = rng.standard_normal(want[0].shape)
    want = torch_conv(x, w, gy, *args, bias=b)
    saved = conv_module.CHUNK_TARGET_BYTES
    conv_module.CHUNK_TARGET_BYTES = g["chunk"]
    try:
        got, counter = ours(x, w, gy, *args, bias=b)
    finally:
        conv_module.CHUNK_TARGET_BYTES = saved
    for name, a, e in zip(("output", "input grad", "weight grad", "bias grad"), got, want):
        if e is not None:
            np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-9, err_msg=name)
    ho, wo = want[0].shape[2:]
    per_image = formulas.conv_mults(g["m"], g["c"], g["kernel"], ho, wo, groups=g["groups"])
    assert counter.forward.conv == g["n"] * per_image
    assert counter.backward.conv == 2 * g["n"] * per_image
    assert counter.conv == counter.total  # the conv products all count as convolution


@pytest.mark.parametrize("kernel, dilation", [((2, 2), (1, 1)), ((4, 3), (1, 1)), ((3, 2), (2, 3)), ((2, 4), (3, 1))])
def test_same_with_even_total_padding_pads_bottom_right_like_pytorch(kernel, dilation):
    """An odd total d·(k − 1) puts the extra zero row/column at the bottom/right, as PyTorch does."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3) + kernel)
    y = F.conv2d(mb.tensor(x), mb.tensor(w), padding="same", dilation=dilation)
    want = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), padding="same", dilation=dilation)
    assert y.shape == (2, 4, 7, 6)
    np.testing.assert_allclose(y.data, want.numpy(), rtol=1e-10, atol=1e-10)
    total = (dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1))
    top, bottom, left, right = conv_module.resolve_padding("same", kernel, (1, 1), dilation)
    assert (top + bottom, left + right) == total and bottom - top == total[0] % 2 and right - left == total[1] % 2


@pytest.mark.parametrize("case", [
    dict(groups=2, c=4, m=2, kernel=3, stride=1, padding=1, dilation=1),
    dict(groups=3, c=3, m=3, kernel=3, stride=2, padding=1, dilation=1),   # depthwise, strided
    dict(groups=2, c=2, m=4, kernel=2, stride=1, padding="same", dilation=2),
    dict(groups=1, c=2, m=3, kernel=3, stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
    dict(groups=2, c=4, m=2, kernel=1, stride=1, padding=0, dilation=1),    # grouped pointwise
    dict(groups=4, c=4, m=4, kernel=3, stride=1, padding="same", dilation=1),  # depthwise "same": plane shifts
])
def test_gradcheck_float64(case):
    rng = np.random.default_rng(1)
    k = case["kernel"]
    x = mb.tensor(rng.standard_normal((2, case["c"], 5, 6)), requires_grad=True)
    w = mb.tensor(rng.standard_normal((case["m"], case["c"] // case["groups"], k, k)), requires_grad=True)
    b = mb.tensor(rng.standard_normal(case["m"]), requires_grad=True)
    assert mb.gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=case["stride"], padding=case["padding"],
                                                 dilation=case["dilation"], groups=case["groups"]), [x, w, b])


def test_depthwise_counts_are_one_filter_per_channel():
    """Depthwise 3×3 (C = M = g = 8): M·1·9·Ho·Wo per image forward, twice that backward, as measured."""
    x = mb.tensor(np.ones((3, 8, 6, 5), dtype=np.float32), requires_grad=True)
    w = mb.tensor(np.ones((8, 1, 3, 3), dtype=np.float32), requires_grad=True)
    with mb.count_mults() as counter:
        y = F.conv2d(x, w, padding=1, groups=8)
        y.backward(np.ones(y.shape, dtype=np.float32))
    assert counter.forward.conv == 3 * 8 * 9 * 6 * 5 == 3 * formulas.conv_mults(8, 8, 3, 6, 5, groups=8)
    assert counter.backward.conv == 2 * counter.forward.conv
    # only the input gradient: half the backward
    with mb.count_mults() as counter:
        y = F.conv2d(x, mb.tensor(w.data), padding=1, groups=8)
        y.backward(np.ones(y.shape, dtype=np.float32))
    assert counter.backward.conv == 3 * 8 * 9 * 6 * 5
    assert x.grad.dtype == np.float32


def test_grouped_conv_is_one_batched_gemm_per_chunk(monkeypatch, serial_engine):
    """No loop over groups: each chunk makes one matmul, on (g, ...) stacked operands."""
    from minibasis import backend
    calls = []
    original = backend.matmul

    def spy(a, b, out=None):
        calls.append((a.shape, b.shape))
        return original(a, b, out)
    monkeypatch.setattr(backend, "matmul", spy)
    rng = np.random.default_rng(2)
    x = mb.tensor(rng.standard_normal((2, 12, 5, 5)), requires_grad=True)
    w = mb.tensor(rng.standard_normal((6, 4, 3, 3)), requires_grad=True)
    y = F.conv2d(x, w, stride=2, groups=3)
    assert calls == [((3, 2, 36), (3, 36, 2 * 2 * 2))]
    y.backward(np.ones(y.shape))
    assert len(calls) == 3 and all(a[0] == 3 and b[0] == 3 for a, b in calls)


def spy_column_sizes(monkeypatch) -> list[int]:
    """The bytes of every column buffer conv2d builds from now on (im2col spied), in call order."""
    sizes, original = [], conv_module.im2col

    def spy(*args, **kwargs):
        col = original(*args, **kwargs)
        sizes.append(col.nbytes)
        return col
    monkeypatch.setattr(conv_module, "im2col", spy)
    return sizes


@pytest.mark.parametrize("geometry", [dict(padding=1, dilation=1, groups=4), dict(padding=2, dilation=2, groups=2),
                                      dict(padding="same", dilation=(1, 2), groups=8)])
def test_chunked_equals_unchunked_and_columns_stay_within_budget(monkeypatch, serial_engine, geometry):
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((7, 8, 6, 7)), rng.standard_normal((8, 8 // geometry["groups"], 3, 3))
    gy = None
    sizes = spy_column_sizes(monkeypatch)
    monkeypatch.setattr(conv_module, "CHUNK_TARGET_BYTES", 10 ** 9)
    whole, whole_count = ours(x, w, gy, 1, **geometry)
    per_image = max(sizes) // 7
    sizes.clear()
    budget = 3 * per_image  # room for 3 images' columns
    monkeypatch.setattr(conv_module, "IM2COL_BUDGET_BYTES", budget)
    chunked, chunked_count = ours(x, w, gy, 1, **geometry)
    # 3 chunks of at most 3 images, made an even count (parallel.CHUNK_COUNT_MULTIPLE): 2, 2, 2, 1 images,
    # forward and backward
    assert max(sizes) <= budget and sorted(sizes) == sorted([2 * per_image] * 6 + [per_image] * 2)
    for a, e in zip(chunked[:3], whole[:3]):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-12)
    assert chunked_count.as_dict() == whole_count.as_dict()


def test_nn_conv2d_groups_dilation_same_match_pytorch_layer():
    torch = pytest.importorskip("torch")
    layer = nn.Conv2d(6, 4, 3, padding="same", dilation=2, groups=2)
    assert layer.weight.shape == (4, 3, 3, 3) and layer.groups == 2 and layer.dilation == (2, 2)
    assert layer.padding == "same"
    ref = torch.nn.Conv2d(6, 4, 3, padding="same", dilation=2, groups=2).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(layer.weight.data))
        ref.bias.copy_(torch.tensor(layer.bias.data))
    x = np.random.default_rng(4).standard_normal((2, 6, 7, 5)).astype(np.float32)
    np.testing.assert_allclose(layer(mb.tensor(x)).data, ref(torch.tensor(x, dtype=torch.float64)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    assert "groups=2" in repr(layer) and "dilation=(2, 2)" in repr(layer) and "'same'" in repr(layer)
    # PyTorch's default init bound 1/√(C/g·k·k)
    assert float(abs(layer.weight.data).max()) <= 1 / np.sqrt(3 * 9)


@pytest.mark.parametrize("call, exc, words", [
    (lambda: F.conv2d(mb.tensor(np.ones((1, 4, 5, 5))), mb.tensor(np.ones((4, 2, 3, 3))), groups=3),
     ValueError, ["groups=3", "4"]),
    (lambda: F.conv2d(mb.tensor(np.ones((1, 4, 5, 5))), mb.tensor(np.ones((4, 1, 3, 3))), groups=2),
     ValueError, ["4 channels", "expects 2"]),
    (lambda: F.conv2d(mb.tensor(np.ones((1, 2, 5, 5))), mb.tensor(np.ones((4, 2, 3, 3))), stride=2, padding="same"),
     ValueError, ["'same'", "stride"]),
    (lambda: F.conv2d(mb.tensor(np.ones((1, 2, 5, 5))), mb.tensor(np.ones((4, 2, 3, 3))), dilation=3),
     ValueError, ["dilation (3, 3)", "(7, 7)", "(5, 5)"]),
    (lambda: F.conv2d(mb.tensor(np.ones((1, 2, 5, 5))), mb.tensor(np.ones((4, 2, 3, 3))), dilation=0),
     ValueError, ["dilation"]),
    (lambda: nn.Conv2d(4, 6, 3, groups=4), ValueError, ["groups=4", "out_channels (6)"]),
    (lambda: nn.Conv2d(4, 4, 3, stride=2, padding="same"), ValueError, ["'same'", "stride"]),
    (lambda: nn.Conv2d(4, 4, 3, groups=1.5), TypeError, ["groups", "1.5"]),
])
def test_bad_grouped_or_dilated_arguments_are_named(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_formulas_groups_and_dilation():
    # hand-worked: 8 channels in, 16 out, 4 groups: each filter sees 2 channels of 3×3
    assert formulas.conv_mults(16, 8, 3, 5, 7, groups=4) == 16 * 2 * 9 * 35
    assert formulas.conv_output_size(10, 3, stride=1, padding=0, dilation=2) == 6   # span 5
    assert formulas.conv_output_size(10, 3, stride=2, padding=2, dilation=3) == 4   # (14 − 7) // 2 + 1
    with pytest.raises(ValueError, match="groups=3"):
        formulas.conv_mults(16, 8, 3, 5, 7, groups=3)
    with pytest.raises(ValueError, match="spanning 7 with dilation 3"):
        formulas.conv_output_size(5, 3, dilation=3)


@pytest.mark.parametrize("kernel, chunk", [((3, 3), 1), ((3, 3), 10 ** 9), ((5, 3), 1), ((1, 5), 10 ** 9)])
def test_depthwise_same_conv_runs_by_shifted_products(monkeypatch, kernel, chunk):
    """A "same" depthwise conv needs no column buffer: per offset one product over the channel-first
    input (forward, input gradient) and one im2col row (weight gradient); results and counts as PyTorch's."""
    used = spy_paths(monkeypatch, ("_depthwise_same", "_depthwise_same_weight_grad", "im2col"))
    monkeypatch.setattr(conv_module, "CHUNK_TARGET_BYTES", chunk)
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((3, 6, 5, 7)), rng.standard_normal((6, 1) + kernel)
    padding = ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
    gy, b = rng.standard_normal((3, 6, 5, 7)), rng.standard_normal(6)
    got, counter = ours(x, w, gy, 1, padding, 1, 6, bias=b)
    assert "im2col" not in used and {"_depthwise_same", "_depthwise_same_weight_grad"} <= set(used)
    want = torch_conv(x, w, gy, 1, padding, 1, 6, bias=b)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-10)
    per_image = formulas.conv_mults(6, 6, kernel, 5, 7, groups=6)
    assert counter.forward.conv == 3 * per_image and counter.backward.conv == 2 * 3 * per_image


def test_grouped_dilated_and_depthwise_paths_run_on_a_device_backend():
    """On the strict stand-in for a device backend (no silent host/device mixing) the new paths give NumPy's results."""
    from minibasis import backend

    cases = [(6, 6, 6, 3, 1, 1, 1), (6, 4, 2, 3, 2, "valid", 2), (4, 4, 4, 3, 2, 1, 1), (4, 6, 2, 2, 1, "same", 1),
             (4, 4, 2, 1, 1, 0, 1)]

    def run(name):
        rng = np.random.default_rng(0)
        mb.use(name)
        try:
            results = []
            for c, m, g, k, stride, padding, dilation in cases:
                x = mb.tensor(backend.asarray(rng.standard_normal((2, c, 7, 6))), requires_grad=True)
                w = mb.tensor(backend.asarray(rng.standard_normal((m, c // g, k, k))), requires_grad=True)
                y = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=g)
                y.backward(backend.asarray(np.ones(y.shape)))
                results += [backend.to_numpy(t) for t in (y.data, x.grad.data, w.grad.data)]
            x = mb.tensor(backend.asarray(rng.standard_normal((1, 2, 7, 7))), requires_grad=True)
            y = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
            y.backward(backend.asarray(np.ones(y.shape)))
            z = F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)
            return results + [backend.to_numpy(t) for t in (y.data, x.grad.data, z.data)]
        finally:
            mb.use("numpy")

    for got, want in zip(run("strict"), run("numpy")):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
