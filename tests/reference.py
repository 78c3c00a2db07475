"""Independent reference implementations for the engine's tests (plain NumPy, float64).

Everything here is written from the textbook definition, window by window or
element by element, and shares no code with ``minibasis``: the engine's
im2col/GEMM convolution, strided-slice pooling and fused batch norm are checked
against these loops, which are slow but obviously right.
"""
from __future__ import annotations

import numpy as np


def output_positions(size: int, kernel: int, stride: int, padding: int) -> int:
    """How many window positions fit along one axis, counted one by one (no formula)."""
    count, start = 0, 0
    while start + kernel <= size + 2 * padding:
        count += 1
        start += stride
    return count


def zero_pad(x: np.ndarray, padding: int, value: float = 0.0) -> np.ndarray:
    """(N, C, H, W) with ``padding`` rows/columns of ``value`` on every side."""
    n, c, h, w = x.shape
    out = np.full((n, c, h + 2 * padding, w + 2 * padding), value, dtype=x.dtype)
    out[:, :, padding:padding + h, padding:padding + w] = x
    return out


def conv2d_direct(x, weight, bias=None, stride: int = 1, padding: int = 0) -> np.ndarray:
    """Cross-correlation, one output position at a time.

    out[n, m, i, j] = Σ_{c, a, b} x_pad[n, c, i·s + a, j·s + b] · weight[m, c, a, b] + bias[m]
    """
    n, c, h, w = x.shape
    m, c2, kh, kw = weight.shape
    assert c == c2
    ho = output_positions(h, kh, stride, padding)
    wo = output_positions(w, kw, stride, padding)
    xp = zero_pad(x, padding)
    out = np.zeros((n, m, ho, wo), dtype=np.float64)
    for i in range(ho):
        for j in range(wo):
            window = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]  # (N, C, kh, kw)
            for mm in range(m):
                out[:, mm, i, j] = (window * weight[mm]).sum(axis=(1, 2, 3))
    if bias is not None:
        out += bias.reshape(1, m, 1, 1)
    return out


def conv2d_direct_grads(x, weight, grad_out, stride: int = 1, padding: int = 0):
    """Gradients of Σ grad_out · conv2d(x, weight) w.r.t. x, weight and bias, window by window."""
    n, c, h, w = x.shape
    m, _, kh, kw = weight.shape
    _, _, ho, wo = grad_out.shape
    xp = zero_pad(x, padding)
    gx_pad = np.zeros_like(xp)
    gw = np.zeros_like(weight, dtype=np.float64)
    for i in range(ho):
        for j in range(wo):
            rows = slice(i * stride, i * stride + kh)
            cols = slice(j * stride, j * stride + kw)
            g = grad_out[:, :, i, j]  # (N, M)
            for mm in range(m):
                gx_pad[:, :, rows, cols] += g[:, mm][:, None, None, None] * weight[mm][None]
                gw[mm] += (g[:, mm][:, None, None, None] * xp[:, :, rows, cols]).sum(axis=0)
    gx = gx_pad[:, :, padding:padding + h, padding:padding + w]
    gb = grad_out.sum(axis=(0, 2, 3))
    return gx, gw, gb


def _pool_windows(h, w, kernel, stride, padding):
    ho = output_positions(h, kernel, stride, padding)
    wo = output_positions(w, kernel, stride, padding)
    for i in range(ho):
        for j in range(wo):
            yield i, j, slice(i * stride, i * stride + kernel), slice(j * stride, j * stride + kernel)


def max_pool2d_loop(x, kernel: int, stride: int, padding: int = 0):
    """Max pooling with −inf padding; returns (output, gradient routing (N, C, Ho, Wo) → flat index).

    The gradient goes to the first maximum in row-major window order (PyTorch's choice).
    """
    n, c, h, w = x.shape
    xp = zero_pad(x, padding, -np.inf)
    ho = output_positions(h, kernel, stride, padding)
    wo = output_positions(w, kernel, stride, padding)
    out = np.empty((n, c, ho, wo), dtype=x.dtype)
    winner = np.empty((n, c, ho, wo, 2), dtype=np.int64)  # (row, col) in the unpadded input
    for i, j, rows, cols in _pool_windows(h, w, kernel, stride, padding):
        for a in range(n):
            for b in range(c):
                window = xp[a, b, rows, cols]
                flat = int(np.argmax(window))  # argmax returns the first maximum
                out[a, b, i, j] = window.reshape(-1)[flat]
                winner[a, b, i, j] = (rows.start + flat // kernel - padding, cols.start + flat % kernel - padding)
    return out, winner


def max_pool2d_loop_grad(x, grad_out, kernel: int, stride: int, padding: int = 0):
    """Gradient of Σ grad_out · max_pool2d(x) w.r.t. x."""
    _, winner = max_pool2d_loop(x, kernel, stride, padding)
    gx = np.zeros_like(x, dtype=np.float64)
    n, c, ho, wo = grad_out.shape
    for a in range(n):
        for b in range(c):
            for i in range(ho):
                for j in range(wo):
                    r, s = winner[a, b, i, j]
                    gx[a, b, r, s] += grad_out[a, b, i, j]
    return gx


def avg_pool2d_loop(x, kernel: int, stride: int, padding: int = 0):
    """Average pooling; zero padding counts in the divisor (PyTorch's count_include_pad=True)."""
    n, c, h, w = x.shape
    xp = zero_pad(x, padding)
    out = np.empty((n, c, output_positions(h, kernel, stride, padding), output_positions(w, kernel, stride, padding)))
    for i, j, rows, cols in _pool_windows(h, w, kernel, stride, padding):
        out[:, :, i, j] = xp[:, :, rows, cols].sum(axis=(2, 3)) / (kernel * kernel)
    return out


def batch_norm_numpy(x, running_mean, running_var, gamma, beta, training: bool, momentum=0.1, eps=1e-5):
    """Batch norm per channel for (N, C) or (N, C, H, W); returns (y, new_running_mean, new_running_var).

    Training: batch mean and biased variance normalize; the running variance is
    updated with the unbiased one (PyTorch's convention).
    """
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
    if training:
        count = x.size // x.shape[1]
        mean = x.mean(axis=axes)
        var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)
        new_mean = (1 - momentum) * running_mean + momentum * mean
        new_var = (1 - momentum) * running_var + momentum * var * count / (count - 1)
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * gamma.reshape(shape) + beta.reshape(shape)
    return y, new_mean, new_var


def softmax_cross_entropy_numpy(logits, labels):
    """Mean −log softmax(logits)[label] and its gradient w.r.t. logits, row by row."""
    n, k = logits.shape
    loss = 0.0
    grad = np.zeros_like(logits, dtype=np.float64)
    for i in range(n):
        row = logits[i] - logits[i].max()
        p = np.exp(row) / np.exp(row).sum()
        loss += np.log(np.exp(row).sum()) - row[labels[i]]  # −log p, without log(1 − tiny) cancellation
        grad[i] = p
        grad[i, labels[i]] -= 1.0
    return loss / n, grad / n


def sgd_reference(param, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """The parameter after one SGD step per gradient in ``grads`` (torch.optim.SGD's documented rule)."""
    p = np.array(param, dtype=np.float64)
    buf = None
    for g in grads:
        d = np.asarray(g, dtype=np.float64) + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


# ---------------------------------------------------------------------------
# Shapes for the property tests (hypothesis strategies shared by several files)
# ---------------------------------------------------------------------------
from hypothesis import assume, strategies as st  # noqa: E402


@st.composite
def window_geometry(draw, max_batch: int = 2, max_channels: int = 2, max_out_channels: int = 2,
                    pooling: bool = False, max_extra: int = 4):
    """A conv or pooling case: batch, channels, out channels, H, W, kernel 1–7, stride 1–3, padding 0–3.

    H and W are drawn so that the padded input holds at least one window; with
    ``pooling`` the padding obeys pooling's rule padding ≤ kernel // 2.
    """
    kernel = draw(st.integers(1, 7))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 3))
    if pooling:
        assume(padding <= kernel // 2)
    smallest = max(1, kernel - 2 * padding)
    return dict(
        batch=draw(st.integers(1, max_batch)),
        channels=draw(st.integers(1, max_channels)),
        out_channels=draw(st.integers(1, max_out_channels)),
        height=draw(st.integers(smallest, smallest + max_extra)),
        width=draw(st.integers(smallest, smallest + max_extra)),
        kernel=kernel, stride=stride, padding=padding,
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def distinct_values(rng, shape, spacing: float = 0.05) -> np.ndarray:
    """Random values at least ``spacing`` apart and away from 0 (no ties or kinks for max/relu under
    finite differences)."""
    size = int(np.prod(shape))
    values = (np.arange(size) - size // 2 + 0.5) * spacing  # (k + ½)·spacing: never 0
    return rng.permutation(values).reshape(shape)
