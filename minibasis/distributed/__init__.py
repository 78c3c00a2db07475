"""Data-parallel training over processes (MPI, via mpi4py) and GPUs (NCCL, via CuPy).

Run the same program on W processes with ``mpirun -n W ...``; each process (rank) holds a full
replica of the model and trains on its 1/W slice of every global batch::

    from minibasis import distributed as dist

    dist.init()                                   # MPI under mpirun, else one process
    model = build_model()                         # may differ per rank (seeds): fixed next line
    dist.broadcast_parameters(model)              # rank 0's parameters and buffers everywhere
    # model = dist.convert_sync_batchnorm(model)  # optional: BN statistics over the global batch
    loader = dist.ShardedDataLoader((images, labels), batch_size=B, shuffle=True, seed=0)
    for x, y in loader:                           # this rank's B / W samples
        loss = F.cross_entropy(model(tensor(x)), y)
        optimizer.zero_grad(); loss.backward()
        dist.allreduce_gradients(model)           # mean over ranks, in buckets
        optimizer.step()
    totals = dist.allreduce_metrics({"loss_sum": ..., "seen": ...})
    if dist.is_main_process(): save_checkpoint(...)

With the same seed, the parameters after any number of steps equal those of one process with
batch B (to rounding), with BatchNorm synchronized or absent; with local BatchNorm (the
default, as in PyTorch DDP) each rank normalizes its own B/W samples.

In one process (no launcher) every call works and every collective is the identity, so a
training loop written this way needs no separate single-process branch.
"""
from minibasis.distributed.comm import (
    Communicator,
    DistributedError,
    MPICommunicator,
    NCCLReducer,
    SingleProcess,
    abort,
    barrier,
    describe,
    finalize,
    get_local_rank,
    get_rank,
    get_world,
    get_world_size,
    init,
    is_initialized,
    is_main_process,
    launched_by_mpi,
    main_process_decides,
)
from minibasis.distributed.reduce import (
    DEFAULT_BUCKET_BYTES,
    GradientReducer,
    allreduce_gradients,
    allreduce_metrics,
    broadcast_parameters,
    global_counts,
)
from minibasis.distributed.sampler import UNEVEN_POLICIES, ShardedDataLoader, ShardedSampler, even_order, shard_batches
from minibasis.distributed.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm

#: The short name some users reach for first.
shard_indices = shard_batches

__all__ = [
    "init", "get_world", "is_initialized", "get_rank", "get_world_size", "get_local_rank", "is_main_process",
    "barrier", "abort", "finalize", "describe", "launched_by_mpi", "main_process_decides", "Communicator", "SingleProcess",
    "MPICommunicator", "NCCLReducer", "DistributedError",
    "broadcast_parameters", "GradientReducer", "allreduce_gradients", "allreduce_metrics", "global_counts",
    "DEFAULT_BUCKET_BYTES",
    "ShardedSampler", "ShardedDataLoader", "shard_batches", "shard_indices", "even_order", "UNEVEN_POLICIES",
    "SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm",
]
