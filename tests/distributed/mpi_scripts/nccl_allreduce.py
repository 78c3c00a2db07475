"""NCCL path check, for tests/distributed/test_distributed.py on machines with >= 2 GPUs.

Under ``mpirun -n W`` (one GPU per rank): CuPy arrays are all-reduced and broadcast through
NCCL, and a model's gradients on the GPU are averaged; every result is compared with the same
reduction computed on the host from values each rank can rebuild. Prints "nccl ok" on rank 0.
"""
import numpy as np

import minibasis
from minibasis import distributed as dist
from minibasis import nn


def main() -> None:
    world = dist.init()
    minibasis.use("cupy")
    import cupy

    rank, size = world.rank, world.size
    assert cupy.cuda.Device().id == world.local_rank % cupy.cuda.runtime.getDeviceCount()
    for dtype in (np.float32, np.float64):
        values = [np.random.default_rng(r).normal(size=1000).astype(dtype) for r in range(size)]
        device = cupy.asarray(values[rank])
        world.allreduce_(device, "sum")
        np.testing.assert_allclose(device.get(), np.sum(values, axis=0), rtol=1e-5)
        world.broadcast_(device := cupy.asarray(values[rank]), root=size - 1)
        assert np.array_equal(device.get(), values[size - 1])
    assert world._nccl is not None, "CuPy arrays did not go through NCCL"

    minibasis.manual_seed(rank)  # different weights per rank, fixed by the broadcast
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    dist.broadcast_parameters(model)
    x = np.random.default_rng(100 + rank).normal(size=(2, 3, 8, 8)).astype(np.float32)
    model(minibasis.tensor(x)).sum().backward()
    local = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    everyone = world.allgather_object(local)
    dist.allreduce_gradients(model, bucket_bytes=1024)
    for name, p in model.named_parameters():
        expected = np.mean([g[name] for g in everyone], axis=0)
        np.testing.assert_allclose(p.grad.numpy(), expected, rtol=1e-5, atol=1e-6)
    if rank == 0:
        print("nccl ok", flush=True)


if __name__ == "__main__":
    main()
