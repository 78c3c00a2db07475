"""bench/blas_kernels.py records every GEMM the engine makes, with the shapes and layouts it replays."""
import numpy as np
import pytest

import minibasis as mb
from minibasis import functions as F, nn

blas_kernels = pytest.importorskip("bench.blas_kernels")


def test_recorded_gemms_make_the_engine_count_and_replay_with_their_layouts():
    mb.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1),  # kn2row
                          nn.Conv2d(2, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = mb.tensor(np.random.default_rng(0).standard_normal((3, 3, 6, 6)).astype(np.float32), requires_grad=True)

    def step():
        F.cross_entropy(model(x), mb.tensor(np.array([0, 1, 2]))).backward()
    seen, counted = blas_kernels.record_gemms(step)
    with mb.count_mults() as counter:
        step()
    recorded = sum(blas_kernels.gemm_mults(key) * calls for key, calls in seen.items())
    # every product the engine counts in this step is a GEMM's (ReLU, flatten and the loss multiply
    # nothing counted here but the softmax gradient's scale, which is not a matmul)
    assert recorded == counted > 0
    assert counted <= counter.total
    assert counter.by_op["conv2d"] + counter.by_op["linear"] <= recorded
    assert {kind for key in seen for kind in (key[1], key[3])} <= {"C", "T", "other"}
    assert "T" in {kind for key in seen for kind in (key[1], key[3])}  # backward multiplies transposed views
    replayed = blas_kernels.replay([list(key) for key in seen], repeats=1)
    assert len(replayed["seconds"]) == len(seen) and all(s > 0 for s in replayed["seconds"])


def test_operands_are_built_in_the_recorded_layout():
    rng = np.random.default_rng(0)
    for shape in [(4, 6), (2, 4, 6)]:
        assert blas_kernels.layout(blas_kernels.operand(rng, shape, "C", "float32")) == "C"
        transposed = blas_kernels.operand(rng, shape, "T", "float32")
        assert transposed.shape == shape and blas_kernels.layout(transposed) == "T"
