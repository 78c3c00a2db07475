"""The channels-last prototypes of bench/channels_last.py compute what the engine computes.

The bench's decision (bench/README.md) rests on both layouts doing the same work, so each
prototype is checked here against the engine's conv2d → batch_norm → relu and its gradients.
"""
import numpy as np
import pytest

import minibasis as mb
from minibasis import functions as F

channels_last = pytest.importorskip("bench.channels_last")


@pytest.mark.parametrize("c, m, size, batch", [(3, 4, 5, 2), (4, 4, 6, 3)])
def test_both_layouts_match_the_engine(c, m, size, batch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, c, size, size))
    w = rng.standard_normal((m, c, 3, 3)) / 3
    gamma, beta = 1 + 0.1 * rng.standard_normal(m), 0.1 * rng.standard_normal(m)
    g_out = rng.standard_normal((batch, m, size, size))

    tx, tw = mb.tensor(x, requires_grad=True), mb.tensor(w, requires_grad=True)
    tg, tb = mb.tensor(gamma, requires_grad=True), mb.tensor(beta, requires_grad=True)
    out = F.relu(F.batch_norm(F.conv2d(tx, tw, None, 1, 1), np.zeros(m), np.ones(m), tg, tb, training=True))
    out.backward(g_out)
    expected = [out.data, tx.grad.data, tw.grad.data, tg.grad.data, tb.grad.data]

    nchw = channels_last.nchw_block(x, w, gamma, beta, g_out)
    nhwc = channels_last.nhwc_block(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, gamma, beta,
                                    np.ascontiguousarray(g_out.transpose(0, 2, 3, 1)))
    nhwc = [nhwc[0].transpose(0, 3, 1, 2), nhwc[1].transpose(0, 3, 1, 2), *nhwc[2:]]
    for name, want, got_nchw, got_nhwc in zip(("out", "gx", "gw", "g_gamma", "g_beta"), expected, nchw, nhwc):
        np.testing.assert_allclose(got_nchw, want, rtol=1e-9, atol=1e-9, err_msg=f"NCHW prototype: {name}")
        np.testing.assert_allclose(got_nhwc, want, rtol=1e-9, atol=1e-9, err_msg=f"NHWC prototype: {name}")
