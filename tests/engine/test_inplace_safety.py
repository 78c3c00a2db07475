"""In-place safety: no op may overwrite an array that another op (or the caller) still reads.

The engine writes in place where it owns the buffer (batch norm's centered input
becomes x̂, its output takes β in place, ReLU's backward writes its mask buffer, the
separable max pool and im2col zero columns of their own copies). A wrong in-place
write would change a forward value or a gradient only where an array is shared, so
these graphs share every array they can: one activation feeds batch norm, ReLU, max
pooling and a residual add; one gradient array reaches several consumers (an add
hands the same gradient to both operands); the caller's input and output gradient
are checked unchanged. Reference: the same graph in PyTorch, float64.
"""
from __future__ import annotations

import numpy as np
import pytest

import minibasis as mb
from minibasis import functions as F

torch = pytest.importorskip("torch")


def graph(lib, x, w, gamma, beta, r1, r2, r3, running):
    """h = conv(x) feeds ReLU, batch norm, two pools and h + h; u + v hands ONE gradient array to batch norm and ReLU."""
    if lib == "mb":
        h = F.conv2d(x, w, padding=1)
        v = F.relu(h)  # created before u: backward visits batch norm first, then ReLU with the same gradient
        u = F.batch_norm(h, running[0], running[1], gamma, beta, training=True)
        p = F.max_pool2d(F.relu(h + h), 3, 2)
        q = F.max_pool2d(h, 2) * r2[:, :, :3, :3]
        return (u + v) * r1, p * r3, q
    tf = torch.nn.functional
    h = tf.conv2d(x, w, padding=1)
    v = torch.relu(h)
    u = tf.batch_norm(h, running[0], running[1], gamma, beta, training=True)
    p = tf.max_pool2d(torch.relu(h + h), 3, 2)
    q = tf.max_pool2d(h, 2) * r2[:, :, :3, :3]
    return (u + v) * r1, p * r3, q


def test_shared_activations_and_gradients_match_pytorch():
    rng = np.random.default_rng(0)
    arrays = dict(x=rng.standard_normal((2, 3, 7, 7)), w=rng.standard_normal((4, 3, 3, 3)),
                  gamma=rng.standard_normal(4), beta=rng.standard_normal(4))
    r1, r2 = rng.standard_normal((2, 4, 7, 7)), rng.standard_normal((2, 4, 7, 7))  # r2: only [:3, :3] used
    r3 = rng.standard_normal((2, 4, 3, 3))
    grads_out = [rng.standard_normal((2, 4, 7, 7)), rng.standard_normal((2, 4, 3, 3)),
                 rng.standard_normal((2, 4, 3, 3))]
    kept = {k: v.copy() for k, v in arrays.items()}
    kept_grads = [g.copy() for g in grads_out]

    ours = {k: mb.tensor(v, requires_grad=True) for k, v in arrays.items()}
    running = (np.zeros(4), np.ones(4))
    outs = graph("mb", ours["x"], ours["w"], ours["gamma"], ours["beta"], mb.tensor(r1), mb.tensor(r2),
                 mb.tensor(r3), running)
    loss = sum(((o * mb.tensor(g)).sum() for o, g in zip(outs, grads_out)), mb.tensor(0.0, dtype=np.float64))
    loss.backward()

    theirs = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    t_running = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    t_outs = graph("torch", theirs["x"], theirs["w"], theirs["gamma"], theirs["beta"], torch.tensor(r1),
                   torch.tensor(r2), torch.tensor(r3), t_running)
    sum((o * torch.tensor(g)).sum() for o, g in zip(t_outs, grads_out)).backward()

    for ours_out, their_out in zip(outs, t_outs):
        np.testing.assert_allclose(ours_out.data, their_out.detach().numpy(), rtol=1e-10, atol=1e-10)
    for key in arrays:
        np.testing.assert_allclose(ours[key].grad.data, theirs[key].grad.numpy(), rtol=1e-9, atol=1e-9,
                                   err_msg=f"gradient of {key}")
        np.testing.assert_array_equal(arrays[key], kept[key])  # inputs never written
    for g, kept_g in zip(grads_out, kept_grads):
        np.testing.assert_array_equal(g, kept_g)
    np.testing.assert_allclose(running[0], t_running[0].numpy(), rtol=1e-12)
    np.testing.assert_allclose(running[1], t_running[1].numpy(), rtol=1e-12)


@pytest.mark.parametrize("op", ["relu", "max_pool", "batch_norm_eval", "batch_norm_train", "conv_same"])
def test_backward_leaves_the_output_gradient_and_saved_arrays_alone(op):
    """Backward twice with retain_graph: the second must equal the first (nothing saved was overwritten)."""
    rng = np.random.default_rng(1)
    x = mb.tensor(rng.standard_normal((2, 3, 6, 6)), requires_grad=True)
    fns = {
        "relu": lambda t: F.relu(t),
        "max_pool": lambda t: F.max_pool2d(t, 3, 2),
        "batch_norm_eval": lambda t: F.batch_norm(t, np.zeros(3), np.ones(3), mb.tensor(np.ones(3)), None),
        "batch_norm_train": lambda t: F.batch_norm(t, None, None, mb.tensor(rng.standard_normal(3)),
                                                   mb.tensor(rng.standard_normal(3)), training=True),
        "conv_same": lambda t: F.conv2d(t, mb.tensor(rng.standard_normal((3, 3, 3, 3))), padding="same"),
    }
    y = fns[op](x)
    gy = rng.standard_normal(y.shape)
    kept = gy.copy()
    y.backward(gy, retain_graph=True)
    first = x.grad.data.copy()
    x.grad = None
    y.backward(gy)
    np.testing.assert_array_equal(x.grad.data, first)
    np.testing.assert_array_equal(gy, kept)
