"""Autograd: the Tensor algebra's gradients (gradcheck with broadcasting) and the traversal's behaviour.

Expected gradients are worked out by hand from calculus (d(x²)/dx = 2x ...) or
by finite differences (gradcheck), never read back from the engine.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import minibasis as mb
from minibasis.autograd import Function

pytestmark = pytest.mark.engine  # runs on --backend (tests/conftest.py)

seeds = st.integers(0, 2 ** 31 - 1)
pair_shapes = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, min_side=1, max_side=4)


def leaf(array, requires_grad=True):
    return mb.tensor(np.asarray(array, dtype=np.float64), requires_grad=requires_grad)


# ---------------------------------------------------------------------------
# gradcheck of every Tensor op, with broadcasting
# ---------------------------------------------------------------------------
BINARY_OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
}


@pytest.mark.parametrize("op", sorted(BINARY_OPS))
@settings(max_examples=25, deadline=None)
@given(shapes=pair_shapes, seed=seeds)
def test_binary_ops_gradcheck_with_broadcasting(op, shapes, seed):
    rng = np.random.default_rng(seed)
    a_shape, b_shape = shapes.input_shapes
    a = rng.standard_normal(a_shape)
    b = rng.uniform(0.5, 2.0, b_shape) * rng.choice([-1.0, 1.0], b_shape)  # away from 0 for div
    fn = BINARY_OPS[op]
    out = fn(leaf(a), leaf(b))
    assert out.shape == np.broadcast_shapes(a_shape, b_shape)
    assert mb.gradcheck(fn, [a, b])


@settings(max_examples=25, deadline=None)
@given(shapes=pair_shapes, seed=seeds)
def test_broadcast_gradients_sum_over_the_broadcast_axes(shapes, seed):
    """d Σ w·(a·b) / da = Σ over b's extra axes of w·b, reduced to a's shape: checked with explicit sums."""
    rng = np.random.default_rng(seed)
    a_shape, b_shape = shapes.input_shapes
    out_shape = np.broadcast_shapes(a_shape, b_shape)
    a, b, w = rng.standard_normal(a_shape), rng.standard_normal(b_shape), rng.standard_normal(out_shape)
    ta, tb = leaf(a), leaf(b)
    (ta * tb).backward(mb.tensor(w))
    for t, own, other in ((ta, a_shape, b), (tb, b_shape, a)):
        full = w * np.broadcast_to(other, out_shape)
        lead = len(out_shape) - len(own)
        reduced = full.sum(axis=tuple(range(lead))) if lead else full
        axes = tuple(i for i, n in enumerate(own) if n == 1 and reduced.shape[i] != 1)
        reduced = reduced.sum(axis=axes, keepdims=True) if axes else reduced
        assert t.grad.shape == own
        np.testing.assert_allclose(t.grad.numpy(), reduced.reshape(own), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), seed=seeds)
def test_unary_ops_gradcheck(shape, seed):
    rng = np.random.default_rng(seed)
    positive = rng.uniform(0.5, 2.0, shape)
    anywhere = rng.standard_normal(shape)
    assert mb.gradcheck(lambda x: -x, [anywhere])
    assert mb.gradcheck(lambda x: x.exp(), [anywhere])
    assert mb.gradcheck(lambda x: x.log(), [positive])
    assert mb.gradcheck(lambda x: x ** 3, [anywhere])
    assert mb.gradcheck(lambda x: x ** -1.5, [positive])
    assert mb.gradcheck(lambda x: 2.0 - x, [anywhere])
    assert mb.gradcheck(lambda x: 3.0 / x, [positive])
    assert mb.gradcheck(lambda x: 0.5 * x + 1.0, [anywhere])


@settings(max_examples=25, deadline=None)
@given(batch=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=3),
       n=st.integers(1, 4), k=st.integers(1, 4), m=st.integers(1, 4), seed=seeds)
def test_matmul_gradcheck_with_batch_broadcasting(batch, n, k, m, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(batch.input_shapes[0] + (n, k))
    b = rng.standard_normal(batch.input_shapes[1] + (k, m))
    out = leaf(a) @ leaf(b)
    np.testing.assert_allclose(out.numpy(), np.matmul(a, b), rtol=1e-12)
    assert mb.gradcheck(lambda a, b: a @ b, [a, b])


@settings(max_examples=25, deadline=None)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), seed=seeds, data=st.data())
def test_shape_ops_and_reductions_gradcheck(shape, seed, data):
    x = np.random.default_rng(seed).standard_normal(shape)
    ndim = len(shape)
    axes = data.draw(st.lists(st.integers(-ndim, ndim - 1), unique_by=lambda a: a % ndim, max_size=ndim))
    axis = tuple(axes) if axes else None
    keepdims = data.draw(st.booleans())
    perm = data.draw(st.permutations(range(ndim)))
    assert mb.gradcheck(lambda x: x.sum(axis=axis, keepdims=keepdims), [x])
    assert mb.gradcheck(lambda x: x.mean(axis=axis, keepdims=keepdims), [x])
    assert mb.gradcheck(lambda x: x.transpose(*perm), [x])
    assert mb.gradcheck(lambda x: x.T, [x])
    assert mb.gradcheck(lambda x: x.reshape(-1), [x])
    assert mb.gradcheck(lambda x: x.reshape(tuple(reversed(shape))), [x])
    np.testing.assert_allclose(leaf(x).mean(axis=axis, keepdims=keepdims).numpy(),
                               x.mean(axis=axis, keepdims=keepdims), rtol=1e-12)


@pytest.mark.parametrize("index", [
    (slice(1, 3),), (0,), (Ellipsis, 1), (slice(None), slice(None, None, 2)), (None, 1),
    (np.array([0, 2, 2, 0]),),            # repeated rows: gradients must add up
    (np.array([1, 1]), np.array([0, 0])),  # the same element twice
])
def test_getitem_gradcheck(index, on_backend):
    x = np.random.default_rng(0).standard_normal((3, 4))
    index = tuple(on_backend.device(i) if isinstance(i, np.ndarray) else i for i in index)
    assert mb.gradcheck(lambda x: x[index], [x])


def test_getitem_repeated_index_accumulates(on_backend):
    x = leaf([1.0, 2.0, 3.0])
    x[on_backend.device(np.array([0, 0, 2, 0]))].sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 0.0, 1.0])


def test_getitem_boolean_mask():
    x = leaf([[1.0, -2.0], [3.0, -4.0]])
    mask = x.data > 0
    (x[mask] * 5.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[5.0, 0.0], [5.0, 0.0]])


# ---------------------------------------------------------------------------
# The traversal
# ---------------------------------------------------------------------------
def test_tensor_used_twice_accumulates():
    x = leaf([1.0, -2.0, 3.0])
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [2.0, -4.0, 6.0])
    y = leaf([1.0, 2.0])
    (y + y).sum().backward()
    np.testing.assert_allclose(y.grad.numpy(), [2.0, 2.0])


def test_diamond_graph():
    """x → a = 2x, b = x³ → c = a·b = 2x⁴: dc/dx = 8x³; plus a shared intermediate used three times."""
    x = leaf([0.5, -1.5, 2.0])
    a, b = x * 2.0, x ** 3
    (a * b).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 8 * x.numpy() ** 3, rtol=1e-12)

    z = leaf([0.3, -0.7])
    e = z.exp()
    (e * e + e - e / 2.0).sum().backward()  # e² + e/2: d/dz = 2e² + e/2
    ez = np.exp(z.numpy())
    np.testing.assert_allclose(z.grad.numpy(), 2 * ez ** 2 + ez / 2, rtol=1e-12)


def test_leaf_grad_accumulates_over_two_backward_calls():
    x = leaf([1.0, 2.0])
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3.0 + 2.0, 3.0 + 4.0])


def test_second_backward_without_retain_graph_raises():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_retain_graph_allows_a_second_backward():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), [4.0, 8.0])


def test_backward_frees_saved_arrays():
    x = leaf(np.ones(4))
    y = x * x
    fn = y.creator
    y.sum().backward()
    assert fn.inputs is None and not hasattr(fn, "a")


def test_backward_on_non_scalar_needs_a_gradient():
    x = leaf(np.ones((2, 3)))
    y = x * 2.0
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
        y.backward(np.ones((3, 2)))
    y.backward(mb.tensor(np.full((2, 3), 0.5)))
    np.testing.assert_allclose(x.grad.numpy(), np.ones((2, 3)))


def test_backward_on_a_tensor_outside_any_graph_raises():
    """A loss computed under no_grad (or from constants) has no graph: backward must say so, not do nothing."""
    x = leaf([1.0, 2.0])
    with mb.no_grad():
        y = (x * x).sum()
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_deep_chain_has_no_recursion_limit():
    x = leaf([1.0, 2.0])
    y = x
    for _ in range(5000):
        y = y * 1.0001 + 0.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [1.0001 ** 5000] * 2, rtol=1e-9)


def test_no_grad_builds_no_graph():
    x = leaf([1.0, 2.0])
    with mb.no_grad():
        y = x * 2.0 + x
        assert mb.autograd.is_grad_enabled() is False
        with mb.autograd.enable_grad():
            z = x * 2.0
    assert y.creator is None and not y.requires_grad
    assert z.creator is not None and z.requires_grad
    assert mb.autograd.is_grad_enabled() is True


def test_detach_cuts_the_graph_and_shares_data():
    x = leaf([1.0, 2.0])
    d = (x * 3.0).detach()
    assert d.creator is None and not d.requires_grad
    (x * d).sum().backward()  # d is a constant: grad = d
    np.testing.assert_allclose(x.grad.numpy(), [3.0, 6.0])
    y = x.detach()
    assert y.data is x.data


def test_requires_grad_toggle():
    x = leaf([1.0, 2.0], requires_grad=False)
    w = leaf([3.0, 4.0])
    (x * w).sum().backward()
    assert x.grad is None
    np.testing.assert_allclose(w.grad.numpy(), [1.0, 2.0])
    assert x.requires_grad_() is x and x.requires_grad
    (x * w).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3.0, 4.0])


def test_constants_get_no_graph():
    x = leaf([1.0], requires_grad=False)
    y = x * 2.0
    assert y.creator is None and not y.requires_grad


def test_float32_gradients_stay_float32():
    x = mb.tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    (x * 2.0 + 1.0).mean().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad.numpy(), [2 / 3] * 3, rtol=1e-6)


def test_gradient_has_its_tensor_dtype_under_mixed_precision():
    """float32 + a float64 array computes in float64, but x.grad must stay float32 (as in PyTorch)."""
    x = mb.tensor(np.array([1.0, 2.0], dtype=np.float32), requires_grad=True)
    (x * mb.tensor(np.array([3.0, 4.0]))).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 4.0])
    y = x * 2.0
    y.backward(mb.tensor(np.ones(2)))  # a float64 upstream gradient for a float32 output
    assert x.grad.dtype == np.float32


def test_tensor_constructor_dtypes():
    assert mb.tensor([1.0, 2.0]).dtype == np.float32  # Python floats → the default float32
    assert mb.tensor(np.ones(2)).dtype == np.float64  # arrays keep their dtype
    assert mb.tensor([1, 2]).dtype.kind == "i"
    with pytest.raises(TypeError, match="int"):
        mb.tensor([1, 2], requires_grad=True)


class _WrongSquare(Function):
    """x² with a deliberately wrong backward (x instead of 2x)."""

    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, gy):
        return gy * self.x


def test_gradcheck_catches_a_wrong_backward():
    with pytest.raises(AssertionError, match="gradcheck failed for input 0"):
        mb.gradcheck(lambda x: _WrongSquare()(x), [np.array([0.5, 1.5, -2.0])])
