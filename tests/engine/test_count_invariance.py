"""Measured counts do not depend on the batch, its chunks or the engine threads.

A real batch (128 images) takes the engine's multi-chunk, threaded loops; a test batch of a few
small images takes one chunk, so a count slip in the chunk loops (a chunk after the first not
counted) passes every batch-1 check. Here ``minibasis.functions.smallest_chunks()`` puts every
image (every linear row) in a chunk of its own and every chunk loop on the engine threads, and
on 1 and 2 engine threads, forward and backward:

* every conv path (``CONV_PATHS``, grouped convs among them), BasisConv2d and Linear: the count
  at batch N, in one piece and in N chunks, is exactly N × the count at batch 1, and that is
  N × the count by definition (M·(C/g)·kh·kw per output value; Q·D + M·Q for BasisConv;
  in·out per linear row; output positions counted one by one, tests/reference.py);
* batch norm (training): the count is affine in N, not proportional: per-element products
  (N·C·H·W each) plus per-channel ones that do not grow with the batch (the running-statistics
  update, γ·(σ² + ε)^-1/2 in backward); the slope is checked to be a whole number of C·H·W;
* pooling multiplies nothing: its count is 0 at every batch and chunking (max pool's values
  and gradients are those of one piece, bitwise).

The geometries per path come from ``verify formulas``' stratified strategy; that each really
takes its path is asserted here (``trace_paths``).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import minibasis as mb
from minibasis import functions as F
from minibasis import nn
from minibasis.functions import smallest_chunks
from minibasis.functions.conv import trace_paths
from minibasis.verify import GeometrySpace
from minibasis.verify.layer_formulas import STRATA, case_strategy
from reference import output_positions

SPACE = GeometrySpace(max_batch=5, max_channels_per_group=4, max_kernel=5, max_extra_size=4)
#: The engine thread count (the fixture) stays the same for every input hypothesis draws.
FIXED_THREADS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    previous = mb.set_num_threads(request.param)
    yield request.param
    mb.set_num_threads(previous)


def measure(layer, x_shape, input_grad=True, chunked=False):
    """(counter, paths) of ``layer`` forward and backward on a seeded input of ``x_shape``."""
    x = mb.tensor(np.random.default_rng(0).standard_normal(x_shape).astype(np.float32), requires_grad=input_grad)
    with trace_paths() as paths, mb.count_mults() as counter:
        if chunked:
            with smallest_chunks():
                y = layer(x)
                y.backward(np.ones(y.shape, np.float32))
        else:
            y = layer(x)
            y.backward(np.ones(y.shape, np.float32))
    return counter, paths


def counts(counter):
    return counter.forward.conv, counter.backward.conv, counter.forward.total, counter.backward.total


def assert_proportional(layer, case_shape, batch, input_grad=True):
    """Counts at ``batch`` (one piece, and one image per chunk) = batch × counts at 1; returns (counter, paths) at 1."""
    one, paths = measure(layer, (1,) + case_shape, input_grad)
    whole, _ = measure(layer, (batch,) + case_shape, input_grad)
    chunked, _ = measure(layer, (batch,) + case_shape, input_grad, chunked=True)
    expected = tuple(batch * c for c in counts(one))
    assert counts(whole) == expected, f"batch {batch} in one piece: {counts(whole)} != {batch} × {counts(one)}"
    assert counts(chunked) == expected, f"batch {batch} in {batch} chunks: {counts(chunked)} != {batch} × {counts(one)}"
    return one, paths


def output_hw(case):
    """(Ho, Wo) counted window by window (no formula): "same" keeps the size by definition."""
    if case.padding == "same":
        return case.height, case.width
    padding = (0, 0) if case.padding == "valid" else case.padding
    return tuple(output_positions(size, case.dilation[a] * (case.kernel_size[a] - 1) + 1, case.stride[a], padding[a])
                 for a, size in enumerate((case.height, case.width)))


def conv_layer(case):
    return nn.Conv2d(case.in_channels, case.out_channels, case.kernel_size, stride=case.stride,
                     padding=case.padding, dilation=case.dilation, groups=case.groups, bias=case.bias)


@pytest.mark.parametrize("stratum", STRATA)
@settings(max_examples=5, **FIXED_THREADS)
@given(data=st.data())
def test_conv_counts_are_n_times_batch_one_on_every_path(stratum, threads, data):
    case = data.draw(case_strategy(SPACE, stratum))
    layer = conv_layer(case)
    if not case.weight_grad:
        layer.requires_grad_(False)
    one, paths = assert_proportional(layer, (case.in_channels, case.height, case.width), case.batch,
                                     case.input_grad)
    assert paths == [stratum] or (stratum == "grouped" and case.groups > 1 and len(paths) == 1)
    ho, wo = output_hw(case)
    kh, kw = case.kernel_size
    per_image = case.out_channels * (case.in_channels // case.groups) * kh * kw * ho * wo
    assert one.forward.conv == one.forward.total == per_image
    assert one.backward.conv == one.backward.total == per_image * (case.input_grad + case.weight_grad)


@pytest.mark.parametrize("stratum", [s for s in STRATA if s not in ("grouped", "depthwise-same")])
@settings(max_examples=4, **FIXED_THREADS)
@given(data=st.data())
def test_basisconv_counts_are_n_times_batch_one(stratum, threads, data):
    case = data.draw(case_strategy(SPACE, stratum))
    m, c, q = case.out_channels, case.in_channels, case.num_basis
    layer = nn.BasisConv2d(c, m, case.kernel_size, q, stride=case.stride, padding=case.padding,
                           dilation=case.dilation, bias=case.bias)
    if not case.weight_grad:
        layer.requires_grad_(False)
    one, paths = assert_proportional(layer, (c, case.height, case.width), case.batch, case.input_grad)
    assert len(paths) == 2 and paths[1] == "pointwise"  # the basis stage, then the 1×1 coefficient stage
    ho, wo = output_hw(case)
    positions, dim = ho * wo, c * case.kernel_size[0] * case.kernel_size[1]
    assert one.forward.conv == one.forward.total == (q * dim + m * q) * positions
    # coefficient gradient if learned; the intermediate's and the basis stage's input gradient if the input needs one
    backward = m * q * positions * case.weight_grad + (m * q + q * dim) * positions * case.input_grad
    assert one.backward.conv == one.backward.total == backward


@settings(max_examples=10, **FIXED_THREADS)
@given(batch=st.integers(2, 6), fan_in=st.integers(1, 9), fan_out=st.integers(1, 9), input_grad=st.booleans())
def test_linear_counts_are_n_times_batch_one(threads, batch, fan_in, fan_out, input_grad):
    layer = nn.Linear(fan_in, fan_out)
    one, _ = assert_proportional(layer, (fan_in,), batch, input_grad)
    assert one.forward.total == one.forward.by_op["linear"] == fan_in * fan_out
    assert one.backward.total == fan_in * fan_out * (1 + input_grad)  # the weight gradient, and x's if needed
    assert one.conv == 0


@settings(max_examples=6, **FIXED_THREADS)
@given(batch=st.integers(3, 6), channels=st.integers(1, 4), size=st.integers(2, 5), affine=st.booleans())
def test_batch_norm_counts_are_affine_in_the_batch(threads, batch, channels, size, affine):
    layer = nn.BatchNorm2d(channels, affine=affine)
    layer.train()
    shape = (channels, size, size)
    one, _ = measure(layer, (1,) + shape)
    two, _ = measure(layer, (2,) + shape)
    at_n, _ = measure(layer, (batch,) + shape, chunked=True)
    for phase in ("forward", "backward"):
        t1, t2, tn = (getattr(c, phase).total for c in (one, two, at_n))
        slope = t2 - t1
        assert tn == t1 + (batch - 1) * slope, f"{phase}: {tn} is not affine in N ({t1} at 1, {t2} at 2)"
        assert slope > 0 and slope % (channels * size * size) == 0  # whole per-element passes
    assert at_n.conv == 0


@pytest.mark.parametrize("pool", ["max", "avg"])
@settings(max_examples=5, **FIXED_THREADS)
@given(batch=st.integers(2, 5), channels=st.integers(1, 3), size=st.integers(3, 7), kernel=st.integers(1, 3),
       stride=st.integers(1, 2))
def test_pooling_counts_nothing_and_chunks_do_not_change_it(threads, pool, batch, channels, size, kernel, stride):
    padding = kernel // 2

    def run(chunked):
        x = mb.tensor(np.random.default_rng(1).standard_normal((batch, channels, size, size)).astype(np.float32),
                      requires_grad=True)
        with mb.count_mults() as counter:
            if chunked:
                with smallest_chunks():
                    y = (F.max_pool2d if pool == "max" else F.avg_pool2d)(x, kernel, stride, padding)
                    y.backward(np.ones(y.shape, np.float32))
            else:
                y = (F.max_pool2d if pool == "max" else F.avg_pool2d)(x, kernel, stride, padding)
                y.backward(np.ones(y.shape, np.float32))
        return counter.total, mb.to_numpy(y.data), mb.to_numpy(x.grad)

    whole, chunked = run(False), run(True)
    assert whole[0] == chunked[0] == 0
    np.testing.assert_array_equal(chunked[1], whole[1])
    np.testing.assert_array_equal(chunked[2], whole[2])


def test_a_small_network_counts_n_times_its_convs_and_linear_and_affine_batch_norm(threads):
    mb.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.BasisConv2d(4, 6, 3, 2, padding="same"), nn.Conv2d(6, 6, 1), nn.Flatten(),
                        nn.Linear(6 * 4 * 4, 3))
    shape = (3, 8, 8)
    one, _ = measure(net, (1,) + shape)
    two, _ = measure(net, (2,) + shape)
    at_n, paths = measure(net, (5,) + shape, chunked=True)
    assert paths == ["same-runs", "kn2row", "pointwise", "pointwise"]
    assert (at_n.forward.conv, at_n.backward.conv) == (5 * one.forward.conv, 5 * one.backward.conv)
    linear = [c.forward.by_op["linear"] + c.backward.by_op["linear"] for c in (one, at_n)]
    assert linear[1] == 5 * linear[0]
    assert at_n.total == one.total + 4 * (two.total - one.total)
