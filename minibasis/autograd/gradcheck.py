"""Finite-difference gradient checking in float64."""
from __future__ import annotations

from typing import Callable, Sequence

from minibasis import backend
from minibasis.autograd.tensor import Tensor, no_grad

__all__ = ["gradcheck", "numerical_grad"]


def _as_float64_leaf(x) -> Tensor:
    data = x.data if isinstance(x, Tensor) else x
    data = backend.asarray(data).astype("float64")
    requires = x.requires_grad if isinstance(x, Tensor) else True
    return Tensor(data.copy(), requires_grad=requires)


def numerical_grad(fn: Callable[..., Tensor], inputs: Sequence[Tensor], index: int, weight, eps: float):
    """Central differences of Σ(weight · fn(*inputs)) with respect to ``inputs[index]``."""
    x = inputs[index].data
    xp = backend.get_array_module(x)
    grad = xp.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    with no_grad():
        for i in range(flat.size):
            original = flat[i].item()
            flat[i] = original + eps
            plus = float((fn(*inputs).data * weight).sum())
            flat[i] = original - eps
            minus = float((fn(*inputs).data * weight).sum())
            flat[i] = original
            gflat[i] = (plus - minus) / (2 * eps)
    return grad


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence, eps: float = 1e-6,
              atol: float = 1e-7, rtol: float = 1e-5, seed: int = 0) -> bool:
    """Compare analytic and central-difference gradients of ``fn`` in float64.

    ``inputs`` are Tensors or arrays (converted to float64 copies; arrays and
    Tensors with ``requires_grad`` are checked). The scalar checked is
    Σ(w · fn(*inputs)) for a fixed random weight w, so every output element
    contributes with a different weight. Raises ``AssertionError`` naming the
    input and the worst element on mismatch; returns True otherwise.
    """
    leaves = [_as_float64_leaf(x) for x in inputs]
    out = fn(*leaves)
    xp = backend.get_array_module(out.data)
    rng = xp.random.RandomState(seed) if hasattr(xp.random, "RandomState") else xp.random
    weight = rng.standard_normal(out.shape).astype("float64")
    out.backward(weight)
    for i, leaf in enumerate(leaves):
        if not leaf.requires_grad:
            continue
        numeric = numerical_grad(fn, leaves, i, weight, eps)
        analytic = leaf.grad.data if leaf.grad is not None else xp.zeros_like(leaf.data)
        error = abs(analytic - numeric) - (atol + rtol * abs(numeric))
        if (error > 0).any():
            worst = int(error.reshape(-1).argmax())
            raise AssertionError(
                f"gradcheck failed for input {i} (shape {leaf.shape}) at flat index {worst}: "
                f"analytic {analytic.reshape(-1)[worst].item():.10g} vs numeric {numeric.reshape(-1)[worst].item():.10g}; "
                f"max |diff| {float(abs(analytic - numeric).max()):.3g}")
    return True
