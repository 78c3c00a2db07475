"""Bad input gets a clear ValueError/TypeError whose message names what was expected and what came."""
import re

import numpy as np
import pytest

import minibasis as mb
from minibasis import functions as F
from minibasis import nn


def f32(*shape):
    return mb.tensor(np.ones(shape, np.float32))


def f64(*shape):
    return mb.tensor(np.ones(shape, np.float64))


# Each case: (call, exception type, regex fragments that must all appear in the message).
CASES = {
    # wrong rank
    "conv2d input rank": (lambda: F.conv2d(f32(3, 8, 8), f32(4, 3, 3, 3)), ValueError, [r"\(N, C, H, W\)", r"\(3, 8, 8\)"]),
    "conv2d weight rank": (lambda: F.conv2d(f32(1, 3, 8, 8), f32(4, 27)), ValueError, [r"\(M, C, kh, kw\)", r"\(4, 27\)"]),
    "linear input rank": (lambda: F.linear(f32(2, 3, 4), f32(5, 4)), ValueError, [r"\(N, in_features\)", r"\(2, 3, 4\)"]),
    "max_pool input rank": (lambda: F.max_pool2d(f32(3, 8, 8), 2), ValueError, [r"\(N, C, H, W\)", r"\(3, 8, 8\)"]),
    "avg_pool input rank": (lambda: F.avg_pool2d(f32(8, 8), 2), ValueError, [r"\(N, C, H, W\)", r"\(8, 8\)"]),
    "global pool input rank": (lambda: F.global_avg_pool2d(f32(2, 3)), ValueError, [r"\(N, C, H, W\)", r"\(2, 3\)"]),
    "batch_norm input rank": (lambda: F.batch_norm(f32(2, 3, 4), None, None, f32(3), f32(3), True), ValueError,
                              [r"\(N, C\) or \(N, C, H, W\)", r"\(2, 3, 4\)"]),
    "BatchNorm2d layer rank": (lambda: nn.BatchNorm2d(3)(f32(4, 3)), ValueError, ["4-D", r"\(4, 3\)"]),
    "BatchNorm1d layer rank": (lambda: nn.BatchNorm1d(3)(f32(4, 3, 2, 2)), ValueError, ["2-D", r"\(4, 3, 2, 2\)"]),
    "log_softmax dim": (lambda: F.log_softmax(f32(2, 3), dim=2), ValueError, ["dim 2", "out of range"]),
    "cross_entropy logits rank": (lambda: F.cross_entropy(f32(6), np.zeros(6, np.int64)), ValueError,
                                  [r"\(N, K\)", r"\(6,\)"]),
    # channel / feature mismatch
    "conv2d channel mismatch": (lambda: F.conv2d(f32(1, 3, 8, 8), f32(4, 5, 3, 3)), ValueError,
                                ["3 channels", "expects 5"]),
    "Conv2d layer channel mismatch": (lambda: nn.Conv2d(16, 8, 3)(f32(1, 3, 8, 8)), ValueError,
                                      ["3 channels", "expects 16"]),
    "linear feature mismatch": (lambda: nn.Linear(10, 2)(f32(4, 7)), ValueError, [r"Linear\(10, 2\)", r"\(N, 10\)",
                                                                                  r"\(4, 7\)"]),
    "conv2d bias shape": (lambda: F.conv2d(f32(1, 3, 8, 8), f32(4, 3, 3, 3), f32(3)), ValueError, [r"\(4,\)", r"\(3,\)"]),
    "linear bias shape": (lambda: F.linear(f32(2, 3), f32(4, 3), f32(5)), ValueError, [r"\(4,\)", r"\(5,\)"]),
    "batch_norm weight shape": (lambda: F.batch_norm(f32(4, 3), None, None, f32(2), f32(3), True), ValueError,
                                ["weight", r"\(3,\)", r"\(2,\)"]),
    "matmul inner dims": (lambda: f32(2, 3) @ f32(4, 5), ValueError, [r"\(2, 3\)", r"\(4, 5\)"]),
    "concat off-axis shapes": (lambda: F.concat([f32(1, 2, 3), f32(1, 2, 4)], axis=1), ValueError,
                               [r"\(1, 2, 3\)", r"\(1, 2, 4\)"]),
    # kernel larger than the padded input
    "conv2d kernel too large": (lambda: F.conv2d(f32(1, 1, 4, 4), f32(1, 1, 7, 7), padding=1), ValueError,
                                [r"kernel \(7, 7\)", r"\(6, 6\)"]),
    "max_pool kernel too large": (lambda: F.max_pool2d(f32(1, 1, 3, 3), 5, padding=0), ValueError,
                                  [r"kernel \(5, 5\)", r"\(3, 3\)"]),
    "pool padding above half kernel": (lambda: F.avg_pool2d(f32(1, 1, 8, 8), 3, padding=2), ValueError,
                                       [r"padding \(2, 2\)", r"kernel \(3, 3\)"]),
    "conv2d zero stride": (lambda: F.conv2d(f32(1, 1, 4, 4), f32(1, 1, 3, 3), stride=0), ValueError,
                           [r"stride must be a positive integer", r"got 0"]),
    "adaptive pool non-global": (lambda: F.adaptive_avg_pool2d(f32(1, 1, 4, 4), 2), ValueError, ["output_size=1", "2"]),
    # dtypes
    "Parameter from ints": (lambda: nn.Parameter(np.arange(4)), TypeError, ["floating", "int64"]),
    "tensor ints requiring grad": (lambda: mb.tensor(np.arange(3), requires_grad=True), TypeError, ["int64"]),
    "conv2d integer input": (lambda: F.conv2d(mb.tensor(np.ones((1, 1, 4, 4), np.int32)), f32(1, 1, 3, 3)), TypeError,
                             ["floating", "int32", "float32"]),
    "conv2d dtype mismatch": (lambda: F.conv2d(f64(1, 1, 4, 4), f32(1, 1, 3, 3)), TypeError, ["float64", "float32"]),
    "Conv2d layer float64 input": (lambda: nn.Conv2d(1, 1, 3)(f64(1, 1, 4, 4)), TypeError, ["float64", "float32"]),
    "linear dtype mismatch": (lambda: nn.Linear(3, 2)(f64(4, 3)), TypeError, ["float64", "float32"]),
    "linear integer input": (lambda: F.linear(mb.tensor(np.ones((2, 3), np.int64)), f32(4, 3)), TypeError,
                             ["floating", "int64"]),
    "cross_entropy integer logits": (lambda: F.cross_entropy(mb.tensor(np.ones((2, 3), np.int64)), np.zeros(2, np.int64)),
                                     TypeError, ["floating", "int64"]),
    "cross_entropy float labels": (lambda: F.cross_entropy(f32(2, 3), np.zeros(2)), TypeError, ["integers", "float64"]),
    # labels
    "labels above range": (lambda: F.cross_entropy(f32(3, 4), np.array([0, 4, 1])), ValueError,
                           [r"\[0, 4\)", r"\[0, 4\]"]),
    "negative labels": (lambda: F.cross_entropy(f32(3, 4), np.array([0, -1, 1])), ValueError,
                        [r"\[0, 4\)", r"\[-1, 1\]"]),
    "labels shape": (lambda: F.cross_entropy(f32(3, 4), np.array([0, 1])), ValueError, [r"\(3,\)", r"\(2,\)"]),
    "cross_entropy reduction": (lambda: F.cross_entropy(f32(2, 3), np.array([0, 1]), reduction="avg"), ValueError,
                                ["'mean', 'sum', 'none'", "'avg'"]),
    # other arguments
    "dropout probability": (lambda: F.dropout(f32(2, 2), 1.0), ValueError, [r"\[0, 1\)", "1.0"]),
    "Dropout layer probability": (lambda: nn.Dropout(-0.1), ValueError, [r"\[0, 1\)", "-0.1"]),
    "pad widths": (lambda: F.pad(f32(2, 2), [(1, 1)]), ValueError, ["2 non-negative", r"\(\(1, 1\),\)"]),
    "Conv2d zero channels": (lambda: nn.Conv2d(0, 4, 3), ValueError, ["in_channels", "0"]),
    "Conv2d bad kernel": (lambda: nn.Conv2d(1, 4, 0), ValueError, ["kernel_size", "0"]),
    "batch_norm one value per channel": (lambda: F.batch_norm(f32(1, 3), None, None, f32(3), f32(3), True), ValueError,
                                         ["more than one value", r"\(1, 3\)"]),
    "batch_norm eval without stats": (lambda: F.batch_norm(f32(2, 3), None, None, f32(3), f32(3), False), ValueError,
                                      ["running_mean"]),
    "unknown backend": (lambda: mb.use("tpu"), ValueError, ["'tpu'", "numpy"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_a_clear_error(name):
    call, error, fragments = CASES[name]
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert re.search(fragment, message), f"{fragment!r} not in {message!r}"


def test_backward_on_a_non_scalar_without_gradient():
    x = mb.tensor(np.ones((2, 5), np.float32), requires_grad=True)
    with pytest.raises(ValueError, match=r"scalar.*\(2, 5\)"):
        (x * 2.0).backward()


def test_backward_with_a_gradient_of_the_wrong_shape():
    x = mb.tensor(np.ones((2, 5), np.float32), requires_grad=True)
    with pytest.raises(ValueError, match=r"\(5, 2\).*expected \(2, 5\)"):
        (x * 2.0).backward(np.ones((5, 2), np.float32))


def test_errors_are_raised_before_any_state_changes():
    """A failed batch_norm call must not have touched the running statistics."""
    mean, var = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError):
        F.batch_norm(mb.tensor(np.ones((4, 3))), mean, var, mb.tensor(np.ones(2)), mb.tensor(np.zeros(3)), True)
    np.testing.assert_array_equal(mean, np.zeros(3))
    np.testing.assert_array_equal(var, np.ones(3))
