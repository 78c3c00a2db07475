"""bench/norm_passes.py's batch-norm pass variants compute what the engine's batch norm computes.

The bench's verdict on chunking batch norm's passes (bench/README.md) rests on the chunked
and the whole-array variants doing the engine's work, so both are checked here against
F.batch_norm's training output and input gradient, on ragged and one-image chunks.
"""
import numpy as np
import pytest

import minibasis as mb
from minibasis import functions as F

norm_passes = pytest.importorskip("bench.norm_passes")


@pytest.mark.parametrize("step", [1, 3, 7])
def test_chunked_and_whole_passes_match_the_engine(step):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 3, 4, 5)) * 2 + 0.5
    gy = rng.standard_normal(x.shape)
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    tx = mb.tensor(x, requires_grad=True)
    y = F.batch_norm(tx, None, None, mb.tensor(gamma, requires_grad=True), mb.tensor(beta, requires_grad=True), True)
    y.backward(mb.tensor(gy))

    bench_y, bench_dx = norm_passes.bn_train_passes(x, gamma, beta, gy, step)
    np.testing.assert_allclose(bench_y, y.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bench_dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
