"""bench/resnet.py --gemm-time: the GEMM timer sees GEMMs, only GEMMs, and leaves the engine as it was."""
import numpy as np

import minibasis as mb
from bench.resnet import timed_gemms
from minibasis import backend, functions as F


def test_timed_gemms_accumulates_inside_gemm_calls_only_and_restores_them():
    matmul, tensordot = backend.matmul, backend.tensordot
    a = np.ones((64, 64), np.float32)
    with timed_gemms() as spent:
        assert backend.matmul is not matmul and backend.tensordot is not tensordot
        backend.mul(a, a)
        assert spent[0] == 0.0  # an elementwise product is not a GEMM
        x = mb.tensor(np.random.default_rng(0).standard_normal((2, 3, 8, 8), dtype=np.float32))
        F.conv2d(x, np.ones((4, 3, 3, 3), np.float32), padding=1)  # the conv's GEMM goes through backend.matmul
        after_conv = spent[0]
        assert after_conv > 0.0
        backend.tensordot(a, a, axes=1)
        assert spent[0] > after_conv
    assert backend.matmul is matmul and backend.tensordot is tensordot
