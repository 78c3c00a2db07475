"""conv2d's fast paths give the definition's results and counts.

conv2d picks an algorithm by geometry: a batched GEMM for pointwise convs,
whole-plane shifted copies for "same" convs (stride 1, odd kernel, padding
(k − 1)/2), kn2row for "same" convs with few output channels, and a strided
window copy otherwise; the batch goes through in cache-sized chunks. Each path
is checked here against an independent float64 reference (sliding windows and
einsum, written in this file), with gradients, against the documented
multiplication counts, and across chunk sizes.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from numpy.lib.stride_tricks import sliding_window_view

import minibasis as mb
from minibasis import functions as F
from minibasis.functions import conv as conv_module

pytestmark = pytest.mark.engine  # runs on --backend (tests/conftest.py)


def reference_conv(x, w, stride, padding):
    """Cross-correlation by explicit windows: y[n, m, a, b] = Σ x_pad[n, c, a·sh + i, b·sw + j] · w[m, c, i, j]."""
    (sh, sw), (ph, pw) = stride, padding
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    windows = sliding_window_view(padded, w.shape[2:], axis=(2, 3))[:, :, ::sh, ::sw]
    return np.einsum("ncabij,mcij->nmab", windows, w)


def reference_grads(x, w, gy, stride, padding):
    """Input and weight gradients of Σ gy · conv(x, w), by the adjoint of the window extraction."""
    (sh, sw), (ph, pw) = stride, padding
    m, c, kh, kw = w.shape
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    windows = sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    gw = np.einsum("ncabij,nmab->mcij", windows, gy)
    g_windows = np.einsum("nmab,mcij->ncabij", gy, w)
    g_padded = np.zeros_like(padded)
    ho, wo = gy.shape[2:]
    for i in range(kh):
        for j in range(kw):
            g_padded[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw] += g_windows[..., i, j]
    return g_padded[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]], gw


def run(x, w, stride, padding, gy):
    xt, wt = mb.tensor(x, requires_grad=True), mb.tensor(w, requires_grad=True)
    with mb.count_mults() as counter:
        y = F.conv2d(xt, wt, stride=stride, padding=padding)
        y.backward(mb.tensor(gy))
    return y.numpy(), xt.grad.numpy(), wt.grad.numpy(), counter


@pytest.fixture
def restore_settings():
    saved = (conv_module.IM2COL_BUDGET_BYTES, conv_module.CHUNK_TARGET_BYTES, conv_module.KN2ROW_CHANNEL_RATIO)
    yield
    conv_module.IM2COL_BUDGET_BYTES, conv_module.CHUNK_TARGET_BYTES, conv_module.KN2ROW_CHANNEL_RATIO = saved


def spy_paths(monkeypatch, names=("_kn2row_forward", "_im2col_same", "_col2im_same")):
    """Record which of the conv module's functions ``names`` each conv2d call ran."""
    used = []
    for name in names:
        original = getattr(conv_module, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            used.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(conv_module, name, wrapper)
    return used


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 5), m=st.integers(1, 6), h=st.integers(1, 7), w=st.integers(1, 7),
       kh=st.sampled_from([1, 3, 5]), kw=st.sampled_from([1, 3, 5]), chunk=st.sampled_from([1, 10 ** 9]),
       seed=st.integers(0, 2 ** 16))
def test_same_convs_on_every_path_match_the_reference(n, c, m, h, w, kh, kw, chunk, seed):
    """"Same" convs (kernels wider than the image included): im2col planes, kn2row, chunks of one image or all."""
    rng = np.random.default_rng(seed)
    x, wt = rng.standard_normal((n, c, h, w)), rng.standard_normal((m, c, kh, kw))
    padding = ((kh - 1) // 2, (kw - 1) // 2)
    gy = rng.standard_normal((n, m, h, w))
    saved = conv_module.CHUNK_TARGET_BYTES
    conv_module.CHUNK_TARGET_BYTES = chunk
    try:
        y, gx, gw, counter = run(x, wt, (1, 1), padding, gy)
    finally:
        conv_module.CHUNK_TARGET_BYTES = saved
    np.testing.assert_allclose(y, reference_conv(x, wt, (1, 1), padding), rtol=1e-10, atol=1e-10)
    want_gx, want_gw = reference_grads(x, wt, gy, (1, 1), padding)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gw, want_gw, rtol=1e-10, atol=1e-10)
    d, p = c * kh * kw, h * w
    assert counter.forward.conv == n * m * d * p
    assert counter.backward.conv == 2 * n * m * d * p


@pytest.mark.parametrize("m, c, expected", [(2, 8, "_kn2row_forward"), (8, 8, "_im2col_same"), (16, 8, "_im2col_same")])
def test_kn2row_runs_for_few_output_channels_only(monkeypatch, serial_engine, m, c, expected):
    used = spy_paths(monkeypatch)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, c, 6, 6)), rng.standard_normal((m, c, 3, 3))
    with mb.no_grad():
        y = F.conv2d(mb.tensor(x), mb.tensor(w), padding=1)
    assert used == [expected]
    np.testing.assert_allclose(y.numpy(), reference_conv(x, w, (1, 1), (1, 1)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m, c, expected", [(2, 8, ["_same_input_grad"]), (8, 8, ["_col2im_same"])])
def test_input_gradient_of_few_output_channels_is_a_conv_of_gy(monkeypatch, serial_engine, m, c, expected):
    """Backward of a kn2row conv: the input gradient as the "same" conv of gy with the flipped,
    transposed kernel (no kh·kw·C columns, no col2im); other convs keep col2im."""
    used = spy_paths(monkeypatch, names=("_same_input_grad", "_col2im_same"))
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, c, 6, 5)), rng.standard_normal((m, c, 3, 3))
    gy = rng.standard_normal((2, m, 6, 5))
    xt = mb.tensor(x, requires_grad=True)
    with mb.count_mults() as counter:
        F.conv2d(xt, mb.tensor(w), padding=1).backward(mb.tensor(gy))
    assert used == expected
    np.testing.assert_allclose(xt.grad.numpy(), reference_grads(x, w, gy, (1, 1), (1, 1))[0], rtol=1e-10, atol=1e-10)
    assert counter.backward.conv == 2 * m * (c * 9) * 30  # the input gradient only: n·M·D·P


def test_kn2row_counts_exactly_the_im2col_multiplications(restore_settings):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 8, 5, 7)).astype(np.float32), rng.standard_normal((2, 8, 3, 5)).astype(np.float32)
    counts, outputs = [], []
    for ratio in (0.0, 1.0):  # never kn2row, then kn2row (M = 2 < 8)
        conv_module.KN2ROW_CHANNEL_RATIO = ratio
        with mb.count_mults() as counter, mb.no_grad():
            outputs.append(F.conv2d(mb.tensor(x), mb.tensor(w), padding=(1, 2)).numpy())
        counts.append(counter.conv)
    assert counts[0] == counts[1] == 3 * 2 * (8 * 3 * 5) * (5 * 7)
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert outputs[1].dtype == np.float32


@pytest.mark.parametrize("geometry", [((3, 3), (2, 2), (1, 1)), ((3, 3), (1, 1), (0, 0)), ((2, 2), (1, 1), (1, 1)),
                                      ((1, 1), (2, 2), (0, 0)), ((5, 3), (2, 1), (2, 0)), ((3, 3), (1, 1), (2, 2))])
def test_other_geometries_match_the_reference(geometry):
    kernel, stride, padding = geometry
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 3, 9, 8)), rng.standard_normal((4, 3) + kernel)
    ref = reference_conv(x, w, stride, padding)
    gy = rng.standard_normal(ref.shape)
    y, gx, gw, counter = run(x, w, stride, padding, gy)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip((gx, gw), reference_grads(x, w, gy, stride, padding)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert counter.forward.conv == 2 * 4 * (3 * kernel[0] * kernel[1]) * ref.shape[2] * ref.shape[3]


@pytest.mark.parametrize("chunk_bytes", [1, 5000, 10 ** 9])
@pytest.mark.parametrize("m", [2, 6])
def test_chunk_size_changes_nothing_but_rounding(restore_settings, chunk_bytes, m):
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((7, 4, 6, 6)), rng.standard_normal((m, 4, 3, 3))
    gy = rng.standard_normal((7, m, 6, 6))
    conv_module.CHUNK_TARGET_BYTES = 10 ** 9
    whole = run(x, w, (1, 1), (1, 1), gy)
    conv_module.CHUNK_TARGET_BYTES = chunk_bytes
    chunked = run(x, w, (1, 1), (1, 1), gy)
    for got, want in zip(chunked[:3], whole[:3]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert chunked[3].as_dict() == whole[3].as_dict()


def test_float32_stays_float32_on_every_path():
    rng = np.random.default_rng(5)
    for m, kernel, stride, padding in [(2, 3, 1, 1), (8, 3, 1, 1), (8, 3, 2, 1), (8, 1, 1, 0)]:
        x = mb.tensor(rng.standard_normal((2, 4, 6, 6)).astype(np.float32), requires_grad=True)
        w = mb.tensor(rng.standard_normal((m, 4, kernel, kernel)).astype(np.float32), requires_grad=True)
        y = F.conv2d(x, w, stride=stride, padding=padding)
        y.backward(mb.tensor(np.ones(y.shape, dtype=np.float32)))
        assert y.dtype == x.grad.dtype == w.grad.dtype == np.float32


def test_non_contiguous_input_is_handled():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 8, 10))[:, :, :, ::2]  # a strided view
    for m in (2, 6):  # kn2row and im2col planes
        w = rng.standard_normal((m, 4, 3, 3))
        y = F.conv2d(mb.tensor(x), mb.tensor(w), padding=1)
        np.testing.assert_allclose(y.numpy(), reference_conv(np.ascontiguousarray(x), w, (1, 1), (1, 1)),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_resnet56_evaluation_at_batch_256_stays_under_2_gib(on_backend):
    """No graph, so no column buffers or saved activations: peak traced memory well under 2 GiB."""
    on_backend.require_host_memory("tracemalloc")
    import tracemalloc
    models = pytest.importorskip("minibasis.models")
    model = models.resnet_cifar(56).eval()
    x = mb.tensor(np.random.default_rng(0).standard_normal((256, 3, 32, 32)).astype(np.float32))
    tracemalloc.start()
    try:
        with mb.no_grad():
            model(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2 ** 30
    # Tighter: a few activations (16 MiB each) and one chunk of columns, not the network's worth.
    assert peak < 256 * 2 ** 20, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_relu_backward_bit_mask_selects_exactly_like_where(dtype):
    """ReLU's backward selects by a bit mask instead of numpy.where: bit-identical results, NaN and ±0 included."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4, 5, 6)).astype(dtype)
    x.flat[:4] = [np.nan, 0.0, -0.0, np.inf]
    gy = rng.standard_normal(x.shape).astype(dtype)
    gy.flat[4:8] = [np.nan, -0.0, np.inf, -np.inf]
    xt = mb.tensor(x, requires_grad=True)
    F.relu(xt).backward(mb.tensor(gy))
    want = np.where(x > 0, gy, 0).astype(dtype)  # PyTorch's threshold backward: NaN input → 0
    ints = np.dtype(f"i{np.dtype(dtype).itemsize}")
    assert xt.grad.dtype == dtype
    np.testing.assert_array_equal(xt.grad.numpy().view(ints), want.view(ints))
