"""Measured multiplication counts: exact values for conv2d and linear, attribution by op, layer and phase.

Expected counts are computed here from the definition: a convolution output
element is a dot product of length C·k², and the output positions Ho, Wo are
counted one window at a time (tests/reference.py), not taken from the engine.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minibasis as mb
from minibasis import functions as F
from minibasis import nn
from minibasis.functions import conv as conv_module
from reference import output_positions, window_geometry

pytestmark = pytest.mark.engine  # runs on --backend (tests/conftest.py)


def tensors_for(g, x_grad, w_grad, bias=False):
    rng = np.random.default_rng(g["seed"])
    x = mb.tensor(rng.standard_normal((g["batch"], g["channels"], g["height"], g["width"])).astype(np.float32),
                  requires_grad=x_grad)
    w = mb.tensor(rng.standard_normal((g["out_channels"], g["channels"], g["kernel"], g["kernel"])).astype(np.float32),
                  requires_grad=w_grad)
    b = mb.tensor(np.zeros(g["out_channels"], np.float32), requires_grad=True) if bias else None
    return x, w, b


def conv_definition_mults(g):
    """N · M · (C·k² per output element) · Ho · Wo."""
    ho = output_positions(g["height"], g["kernel"], g["stride"], g["padding"])
    wo = output_positions(g["width"], g["kernel"], g["stride"], g["padding"])
    return g["batch"] * g["out_channels"] * g["channels"] * g["kernel"] ** 2 * ho * wo


@settings(max_examples=40, deadline=None)
@given(window_geometry(max_batch=3, max_channels=4, max_out_channels=4), st.booleans())
def test_conv_forward_count_is_exact(g, bias):
    x, w, b = tensors_for(g, False, False, bias)
    with mb.count_mults() as counter:
        F.conv2d(x, w, b, stride=g["stride"], padding=g["padding"])
    expected = conv_definition_mults(g)
    assert counter.conv == expected
    assert counter.total == expected  # the bias is an addition
    assert counter.forward.conv == expected and counter.backward.total == 0
    assert counter.by_op == {"conv2d": expected}


@pytest.mark.parametrize("x_grad, w_grad", [(True, True), (False, True), (True, False)])
@settings(max_examples=20, deadline=None)
@given(g=window_geometry(max_batch=3, max_channels=3, max_out_channels=3))
def test_conv_backward_count_is_what_backward_computes(x_grad, w_grad, g):
    """Weight grad N·M·P·D when the weight needs it, input grad N·D·M·P when the input needs it."""
    x, w, b = tensors_for(g, x_grad, w_grad, bias=True)
    forward = conv_definition_mults(g)
    with mb.count_mults() as counter:
        y = F.conv2d(x, w, b, stride=g["stride"], padding=g["padding"])
        y.backward(mb.tensor(np.ones(y.shape, np.float32)))
    assert counter.forward.conv == forward
    assert counter.backward.conv == forward * (int(x_grad) + int(w_grad))
    assert counter.conv == counter.forward.conv + counter.backward.conv == counter.total


def test_conv_count_is_the_same_when_chunked():
    g = dict(batch=5, channels=3, out_channels=4, height=8, width=8, kernel=3, stride=1, padding=1, seed=0)
    previous = conv_module.set_im2col_budget(1)  # one sample per chunk
    try:
        x, w, _ = tensors_for(g, True, True)
        with mb.count_mults() as counter:
            y = F.conv2d(x, w, padding=1)
            y.backward(mb.tensor(np.ones(y.shape, np.float32)))
    finally:
        conv_module.set_im2col_budget(previous)
    assert counter.forward.conv == conv_definition_mults(g)
    assert counter.backward.conv == 2 * conv_definition_mults(g)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), fan_in=st.integers(1, 9), fan_out=st.integers(1, 9), x_grad=st.booleans())
def test_linear_counts(n, fan_in, fan_out, x_grad):
    x = mb.tensor(np.ones((n, fan_in), np.float32), requires_grad=x_grad)
    layer = nn.Linear(fan_in, fan_out)
    with mb.count_mults() as counter:
        y = layer(x)
        y.backward(mb.tensor(np.ones((n, fan_out), np.float32)))
    assert counter.forward.total == n * fan_in * fan_out
    assert counter.forward.by_op == {"linear": n * fan_in * fan_out}
    # weight gradient always (a parameter), input gradient only when x requires it
    assert counter.backward.total == n * fan_in * fan_out * (1 + int(x_grad))
    assert counter.conv == 0  # linear layers are not convolutions


def test_nothing_is_recorded_outside_a_counter():
    x = mb.tensor(np.ones((2, 3, 5, 5), np.float32), requires_grad=True)
    w = mb.tensor(np.ones((4, 3, 3, 3), np.float32), requires_grad=True)
    with mb.count_mults() as counter:
        pass
    y = F.conv2d(x, w)  # outside: not recorded anywhere
    with mb.count_mults() as later:
        y.backward(mb.tensor(np.ones(y.shape, np.float32)))  # backward of a graph built outside: counted as backward
    assert counter.total == 0
    assert later.forward.total == 0
    assert later.backward.conv == 2 * (2 * 4 * 27 * 3 * 3)


def test_nested_counters_each_see_their_own_span():
    x = mb.tensor(np.ones((1, 2, 4, 4), np.float32))
    w = mb.tensor(np.ones((3, 2, 3, 3), np.float32))
    one_conv = 1 * 3 * 18 * 2 * 2
    with mb.count_mults() as outer:
        F.conv2d(x, w)
        with mb.count_mults() as inner:
            F.conv2d(x, w)
        F.conv2d(x, w)
    assert inner.conv == one_conv
    assert outer.conv == 3 * one_conv


def test_counter_is_released_after_an_exception():
    x = mb.tensor(np.ones((1, 2, 4, 4), np.float32))
    w = mb.tensor(np.ones((3, 2, 3, 3), np.float32))
    with pytest.raises(RuntimeError):
        with mb.count_mults() as counter:
            raise RuntimeError("boom")
    F.conv2d(x, w)
    assert counter.total == 0
    from minibasis import counting
    assert not counting.active()


class Net(nn.Module):
    """features: conv-bn-relu-conv, classifier: linear; paths features.0, features.1, features.3, classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                                      nn.Conv2d(3, 4, 3, stride=2))
        self.classifier = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.classifier(F.flatten(self.features(x)))


def test_by_layer_uses_module_paths_and_phases_stay_apart():
    net = Net()
    x = mb.tensor(np.random.default_rng(0).standard_normal((2, 2, 6, 6)).astype(np.float32))
    with mb.count_mults() as counter:
        loss = F.cross_entropy(net(x), np.array([0, 3]))
        forward_snapshot = counter.total
        loss.backward()
    conv0 = 2 * 3 * (2 * 9) * 6 * 6
    conv3 = 2 * 4 * (3 * 9) * 2 * 2
    fc = 2 * 16 * 5
    fwd = counter.forward
    assert fwd.total == forward_snapshot  # nothing is counted as forward during backward
    assert fwd.by_layer["features.0"] == conv0
    assert fwd.by_layer["features.3"] == conv3
    assert fwd.by_layer["classifier"] == fc
    assert fwd.conv == conv0 + conv3
    assert fwd.conv_by_layer() == {"features.0": conv0, "features.3": conv3}
    assert "features.1" in fwd.by_layer and fwd.by_op["batch_norm"] == fwd.by_layer["features.1"] > 0
    assert "features.2" not in fwd.by_layer  # relu compares, it does not multiply
    # backward: x needs no gradient, so the first conv only computes its weight gradient
    bwd = counter.backward
    assert bwd.conv_by_layer() == {"features.0": conv0, "features.3": 2 * conv3}
    assert bwd.by_layer["classifier"] == 2 * fc
    assert counter.total == fwd.total + bwd.total
    assert counter.by_layer["features.0"] == 2 * conv0


def test_sequential_top_level_paths_and_unowned_ops():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1))
    x = mb.tensor(np.ones((1, 1, 5, 5), np.float32))
    with mb.count_mults() as counter:
        y = model(x)
        y * 2.0  # an op outside any module
    assert counter.by_layer["0"] == 2 * 9 * 3 * 3
    assert counter.by_layer["2"] == 2 * 2 * 3 * 3
    assert counter.by_layer[""] == 2 * 3 * 3  # the elementwise product, one per element
    assert counter.by_op["mul"] == 18


def test_reset_and_as_dict():
    x = mb.tensor(np.ones((1, 1, 3, 3), np.float32))
    w = mb.tensor(np.ones((1, 1, 3, 3), np.float32))
    with mb.count_mults() as counter:
        F.conv2d(x, w)
        summary = counter.as_dict()
        counter.reset()
    assert summary["conv"] == 9 and summary["forward"]["conv"] == 9 and summary["backward"]["total"] == 0
    assert counter.total == 0
