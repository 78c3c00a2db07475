"""F.batch_norm with weight=None / bias=None (PyTorch accepts both; issue 12 found minibasis
raising TypeError), and SyncBatchNorm as the same BatchNorm op with an injected all-reduce.

References: PyTorch's own batch_norm (optional oracle), a NumPy formula, float64 gradchecks.
"""
import numpy as np
import pytest

import minibasis as mb
from minibasis import functions as F
from minibasis.distributed import sync_batch_norm

SHAPES = [(6, 3), (4, 3, 5, 2)]
AFFINE = [(False, False), (True, False), (False, True), (True, True)]


def _axes(shape):
    return (0,) if len(shape) == 2 else (0, 2, 3)


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    return (rng.standard_normal(shape) * 2 + 0.5, rng.uniform(0.5, 2, c), rng.standard_normal(c),
            rng.standard_normal(c), rng.uniform(0.5, 2, c))


def _optional(array, present):
    return mb.tensor(array, requires_grad=True) if present else None


def test_the_issue_12_call_works():
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    y = F.batch_norm(mb.tensor(x), None, None, None, None, True)
    mean, var = x.mean((0, 2, 3), keepdims=True), x.var((0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y.numpy(), (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("has_weight, has_bias", AFFINE)
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch_forward_backward_and_running_stats(shape, has_weight, has_bias, training):
    torch = pytest.importorskip("torch")
    x, gamma, beta, running_mean, running_var = _inputs(shape)
    gy = np.random.default_rng(1).standard_normal(shape)

    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(gamma, requires_grad=True) if has_weight else None
    tb = torch.tensor(beta, requires_grad=True) if has_bias else None
    t_mean, t_var = torch.tensor(running_mean), torch.tensor(running_var)
    ty = torch.nn.functional.batch_norm(tx, t_mean, t_var, tw, tb, training, 0.2, 1e-5)
    ty.backward(torch.tensor(gy))

    mx, mw, mbias = mb.tensor(x, requires_grad=True), _optional(gamma, has_weight), _optional(beta, has_bias)
    m_mean, m_var = running_mean.copy(), running_var.copy()
    my = F.batch_norm(mx, m_mean, m_var, mw, mbias, training, 0.2, 1e-5)
    my.backward(mb.tensor(gy))

    np.testing.assert_allclose(my.numpy(), ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(mx.grad.numpy(), tx.grad.numpy(), rtol=1e-9, atol=1e-10)
    if has_weight:
        np.testing.assert_allclose(mw.grad.numpy(), tw.grad.numpy(), rtol=1e-9, atol=1e-10)
    if has_bias:
        np.testing.assert_allclose(mbias.grad.numpy(), tb.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(m_mean, t_mean.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m_var, t_var.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("has_weight, has_bias", AFFINE)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_with_optional_affine(shape, has_weight, has_bias, training):
    x, gamma, beta, running_mean, running_var = _inputs(shape, seed=2)
    leaves = [x] + [a for a, present in ((gamma, has_weight), (beta, has_bias)) if present]

    def fn(x, *affine):
        affine = list(affine)
        weight = affine.pop(0) if has_weight else None
        bias = affine.pop(0) if has_bias else None
        return F.batch_norm(x, running_mean.copy(), running_var.copy(), weight, bias, training=training)

    assert mb.gradcheck(fn, leaves, atol=1e-6, rtol=1e-5)


def test_no_weight_saves_exactly_the_scaling_products():
    x, gamma, beta, *_ = _inputs((4, 3, 5, 2))
    counts = {}
    for label, weight in (("with", mb.tensor(np.ones(3))), ("without", None)):
        with mb.count_mults() as counter:
            F.batch_norm(mb.tensor(x), None, None, weight, mb.tensor(beta), True)
        counts[label] = counter.total
    assert counts["with"] - counts["without"] == x.size  # one γ·x̂ product per element


def test_output_does_not_alias_the_saved_normalized_input():
    # No weight and no bias: the output equals x̂; a consumer writing into it must not change
    # the x̂ that backward uses.
    data = np.random.default_rng(3).standard_normal((5, 2))
    weights = mb.tensor(np.arange(10.0).reshape(5, 2))
    x = mb.tensor(data.copy(), requires_grad=True)
    y = F.batch_norm(x, None, None, None, None, True)
    y.data[...] = 0.0
    (y * weights).sum().backward()
    reference = mb.tensor(data.copy(), requires_grad=True)
    (F.batch_norm(reference, None, None, None, None, True) * weights).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), reference.grad.numpy(), rtol=1e-12)


class _TwinRanks:
    """A two-rank communicator whose other rank holds exactly this rank's batch: a sum over
    ranks is twice the local sum. The global batch is then [x; x]."""

    size, rank = 2, 0

    def allreduce_(self, array, op="sum"):
        assert op == "sum"
        array *= 2
        return array


@pytest.mark.parametrize("has_weight, has_bias", AFFINE)
def test_sync_batch_norm_is_batch_norm_over_the_global_batch(has_weight, has_bias):
    x, gamma, beta, running_mean, running_var = _inputs((3, 2, 4, 3), seed=4)
    gy = np.random.default_rng(5).standard_normal(x.shape)
    weight, bias = _optional(gamma, has_weight), _optional(beta, has_bias)
    xs = mb.tensor(x, requires_grad=True)
    sync_mean, sync_var = running_mean.copy(), running_var.copy()
    y = sync_batch_norm(xs, sync_mean, sync_var, weight, bias, True, 0.1, 1e-5, comm=_TwinRanks())
    y.backward(mb.tensor(gy))

    both = mb.tensor(np.concatenate([x, x]), requires_grad=True)
    ref_weight, ref_bias = _optional(gamma, has_weight), _optional(beta, has_bias)
    ref_mean, ref_var = running_mean.copy(), running_var.copy()
    ref = F.batch_norm(both, ref_mean, ref_var, ref_weight, ref_bias, True, 0.1, 1e-5)
    ref.backward(mb.tensor(np.concatenate([gy, gy])))

    np.testing.assert_allclose(y.numpy(), ref.numpy()[:3], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(xs.grad.numpy(), both.grad.numpy()[:3], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sync_mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(sync_var, ref_var, rtol=1e-12)  # unbiased over the global count
    if has_weight:  # parameter gradients stay local sums: half of the global batch's
        np.testing.assert_allclose(2 * weight.grad.numpy(), ref_weight.grad.numpy(), rtol=1e-10)
    if has_bias:
        np.testing.assert_allclose(2 * bias.grad.numpy(), ref_bias.grad.numpy(), rtol=1e-10)
