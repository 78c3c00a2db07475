"""minibasis.distributed: sharding, bucketed reduction, SyncBN, and real multi-process runs.

The multi-process tests start ``mpirun`` themselves (subprocess with a time limit) and compare
with an independent single-process run that uses no distributed code; they skip with a reason
where no MPI launcher or no mpi4py is installed (``pip install '.[mpi]'`` provides both).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minibasis
from minibasis import distributed as dist
from minibasis import nn
from minibasis.data import DataLoader, RandomCrop, RandomHorizontalFlip, Compose
from minibasis.distributed.comm import Communicator
from minibasis.distributed.launcher import Launcher, launcher_env, mpirun_command

SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------
# Sharded sampler (pure logic: ranks simulated by passing rank/world_size)
# ---------------------------------------------------------------------------
def _index_dataset(n: int):
    """Images that carry their own index, so a batch tells which samples it holds."""
    return (np.arange(n, dtype=np.float64).reshape(n, 1, 1, 1), np.zeros(n, dtype=np.int64))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), world=st.integers(1, 4), local_batch=st.integers(1, 5),
       epoch=st.integers(0, 3), shuffle=st.booleans())
def test_ranks_cover_every_sample_once_and_rebuild_the_single_process_batches(n, world, local_batch, epoch, shuffle):
    """With N a multiple of W: the ranks' k-th batches are disjoint and together are the k-th
    batch of the single-process DataLoader (the reference), every sample exactly once."""
    n = max(world, n - n % world)
    batch = world * local_batch
    reference = DataLoader(_index_dataset(n), batch, shuffle=shuffle, seed=5)
    reference.set_epoch(epoch)
    expected = [x.reshape(-1).astype(int) for x, _ in reference]
    per_rank = [dist.ShardedSampler(n, batch, shuffle=shuffle, seed=5, rank=r, world_size=world).batches(epoch)
                for r in range(world)]
    assert all(len(b) == len(expected) for b in per_rank)
    for k, global_batch in enumerate(expected):
        parts = [per_rank[r][k] for r in range(world)]
        assert len({len(p) for p in parts}) == 1, "every rank takes the same number of samples"
        assert sorted(np.concatenate(parts).tolist()) == sorted(global_batch.tolist())
    everything = np.concatenate([b for batches in per_rank for b in batches])
    assert sorted(everything.tolist()) == list(range(n))


@pytest.mark.parametrize("n,world,batch", [(11, 2, 4), (10, 3, 6), (2, 4, 4), (7, 4, 8)])
def test_uneven_pad_repeats_the_first_samples_and_says_so(n, world, batch):
    missing = (-n) % world
    with pytest.warns(UserWarning, match=f"{missing} sample.*repeated"):
        dist.ShardedSampler(n, batch, seed=1, rank=0, world_size=world)
    samplers = [dist.ShardedSampler(n, batch, seed=1, rank=r, world_size=world) for r in range(1, world)]
    with pytest.warns(UserWarning):
        samplers.insert(0, dist.ShardedSampler(n, batch, seed=1, rank=0, world_size=world))
    order = minibasis.data.epoch_permutation(n, 1, 2)
    seen = np.concatenate([b for s in samplers for b in s.batches(2)])
    counts = np.bincount(seen, minlength=n)
    assert len(seen) == n + missing == n + samplers[0].num_padded
    # Exactly the first `missing` samples of the epoch's order (cycled) are seen twice.
    repeated = np.resize(order, missing)
    expected = np.ones(n, dtype=int)
    np.add.at(expected, repeated, 1)
    assert counts.tolist() == expected.tolist()
    assert len({len(b) for s in samplers for b in s.batches(2)[:-1]}) <= 1


def test_uneven_drop_leaves_out_the_tail_and_error_refuses():
    n, world, batch = 11, 2, 4
    with pytest.warns(UserWarning, match="1 sample.*left out"):
        s0 = dist.ShardedSampler(n, batch, seed=3, uneven="drop", rank=0, world_size=world)
    s1 = dist.ShardedSampler(n, batch, seed=3, uneven="drop", rank=1, world_size=world)
    seen = np.concatenate(s0.batches(0) + s1.batches(0))
    order = minibasis.data.epoch_permutation(n, 3, 0)
    assert sorted(seen.tolist()) == sorted(order[:-1].tolist())
    assert s0.num_dropped == 1 and len(seen) == len(set(seen.tolist()))
    with pytest.raises(ValueError, match="do not split evenly over 2 ranks"):
        dist.ShardedSampler(n, batch, uneven="error", rank=0, world_size=world).batches(0)
    with pytest.raises(ValueError, match="uneven must be one of"):
        dist.ShardedSampler(n, batch, uneven="spread", rank=0, world_size=world)


def test_drop_last_drops_the_incomplete_global_batch_like_the_data_loader():
    n, world, batch = 23, 2, 6
    reference = [x.reshape(-1).astype(int) for x, _ in DataLoader(_index_dataset(n), batch, shuffle=True,
                                                                    seed=4, drop_last=True)]
    parts = [dist.ShardedSampler(n, batch, seed=4, drop_last=True, rank=r, world_size=world).batches(0)
             for r in range(world)]
    assert len(parts[0]) == len(reference) == 3
    for k, ref in enumerate(reference):
        assert sorted(np.concatenate([p[k] for p in parts]).tolist()) == sorted(ref.tolist())


def test_sampler_rejects_a_global_batch_that_does_not_split_and_bad_ranks():
    with pytest.raises(ValueError, match="global batch size 5 must be a multiple of the world size 2"):
        dist.ShardedSampler(10, 5, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        dist.ShardedSampler(10, 4, rank=2, world_size=2)


def test_sharded_loader_with_exact_augmentation_gives_the_single_process_images():
    """Random crops and flips: the ranks' slices, put together, are bit for bit the batch that
    DataLoader hands one process (same seed, same epoch)."""
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 255, size=(20, 3, 8, 8), dtype=np.uint8), rng.integers(0, 10, size=20))
    transform = Compose([RandomCrop(8, padding=2), RandomHorizontalFlip()])
    reference = DataLoader(data, 8, shuffle=True, seed=11, transform=transform)
    reference.set_epoch(1)
    loaders = [dist.ShardedDataLoader(data, 8, shuffle=True, seed=11, transform=transform, rank=r, world_size=2)
               for r in range(2)]
    for loader in loaders:
        loader.set_epoch(1)
        assert len(loader) == len(reference) == 3
    batches = [list(loader) for loader in loaders]
    for (x_ref, y_ref), *parts in zip(reference, *batches):
        assert np.array_equal(np.concatenate([x for x, _ in parts]), x_ref)
        assert np.array_equal(np.concatenate([y for _, y in parts]), y_ref)
    assert all(loader.epoch == 2 for loader in loaders)
    # from_loader builds the same sharding from a DataLoader's own settings.
    reference.set_epoch(1)
    twins = [dist.ShardedDataLoader.from_loader(reference, rank=r, world_size=2) for r in range(2)]
    assert all(t.epoch == 1 and t.seed == 11 and t.local_batch_size == 4 for t in twins)
    for (x_ref, _), *parts in zip(reference, *[list(t) for t in twins]):
        assert np.array_equal(np.concatenate([x for x, _ in parts]), x_ref)
    # The cheap mode augments each slice with its own generator: reproducible, not identical.
    cheap = [dist.ShardedDataLoader(data, 8, shuffle=True, seed=11, transform=transform, rank=r, world_size=2,
                                    exact_augmentation=False) for r in range(2)]
    first = np.concatenate([next(iter(c))[0] for c in cheap])
    again = np.concatenate([next(iter(c))[0] for c in cheap])
    reference.set_epoch(0)
    assert np.array_equal(first, again) and not np.array_equal(first, next(iter(reference))[0])


# ---------------------------------------------------------------------------
# Gradient buckets, with ranks simulated by threads (no MPI needed)
# ---------------------------------------------------------------------------
class ThreadGroup:
    """W in-process 'ranks' (threads) whose all-reduce sums the arrays they deposit."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots: list = [None] * size
        self.calls = 0

    def member(self, rank: int) -> Communicator:
        group = self

        class Member(Communicator):
            name = "threads"

            def __init__(self):
                self.rank, self.size = rank, group.size

            def allreduce_(self, array, op="sum"):
                group.slots[rank] = array.copy()
                group.barrier.wait()
                total = sum(group.slots)
                if rank == 0:
                    group.calls += 1
                group.barrier.wait()
                array[...] = total
                return array

            def allgather_object(self, obj):
                group.slots[rank] = obj
                group.barrier.wait()
                out = list(group.slots)
                group.barrier.wait()
                return out

        return Member()


def _run_ranks(size: int, work) -> list:
    group, results, errors = ThreadGroup(size), [None] * size, []

    def target(rank):
        try:
            results[rank] = work(rank, group.member(rank))
        except Exception as exc:  # surfaced below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if errors:
        raise errors[0]
    return results, group


def _model_with_grads(seed: int, frozen_bias: bool = False, drop_grad: str | None = None):
    minibasis.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    if frozen_bias:
        model[0].bias.requires_grad_(False)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if p.requires_grad and name != drop_grad:
            p.grad = minibasis.tensor(rng.normal(size=p.shape).astype(p.dtype))
    return model


@pytest.mark.parametrize("bucket_bytes", [1, 250, 10**8])
def test_bucketed_allreduce_averages_every_gradient(bucket_bytes):
    size = 3
    models = [_model_with_grads(seed) for seed in range(size)]
    expected = {name: np.mean([dict(m.named_parameters())[name].grad.numpy() for m in models], axis=0)
                for name, _ in models[0].named_parameters()}

    def work(rank, comm):
        reducer = dist.GradientReducer(models[rank], bucket_bytes=bucket_bytes, comm=comm)
        reducer()
        return reducer

    reducers, group = _run_ranks(size, work)
    params = list(models[0].parameters())
    # Buckets: one per parameter when tiny, one for all when huge, several in between.
    assert len(reducers[0].buckets) == {1: len(params), 10**8: 1}.get(bucket_bytes, len(reducers[0].buckets))
    if bucket_bytes == 250:
        assert 1 < len(reducers[0].buckets) < len(params)
        for bucket in reducers[0].buckets:
            assert len(bucket.params) == 1 or sum(p.data.nbytes for p in bucket.params) <= 250
    assert group.calls == len(reducers[0].buckets)
    for m in models:
        for name, p in m.named_parameters():
            np.testing.assert_allclose(p.grad.numpy(), expected[name], rtol=1e-6, atol=1e-7)


def test_missing_gradients_count_as_zero_unless_missing_everywhere():
    """A parameter without a gradient on one rank contributes zeros; one without a gradient on
    every rank keeps grad None (as one process would); frozen parameters are not touched."""
    models = [_model_with_grads(0, frozen_bias=True, drop_grad="3.bias"),
              _model_with_grads(1, frozen_bias=True, drop_grad="3.bias")]
    models[1][3].weight.grad = None  # present on rank 0 only
    w0 = models[0][3].weight.grad.numpy().copy()

    def work(rank, comm):
        dist.GradientReducer(models[rank], bucket_bytes=64, comm=comm)()

    _run_ranks(2, work)
    for m in models:
        np.testing.assert_allclose(m[3].weight.grad.numpy(), w0 / 2, rtol=1e-6)
        assert m[3].bias.grad is None
        assert m[0].bias.grad is None and not m[0].bias.requires_grad


def test_ranks_with_different_models_get_a_clear_error():
    def work(rank, comm):
        model = nn.Linear(3, 2 + rank)
        dist.GradientReducer(model, comm=comm)

    with pytest.raises(dist.DistributedError, match="rank 1 differs from rank 0"):
        _run_ranks(2, work)


def test_single_process_collectives_are_the_identity():
    assert dist.get_world_size() == 1 and dist.is_main_process()
    model = _model_with_grads(3)
    before = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    reducer = dist.allreduce_gradients(model, bucket_bytes=100)
    assert reducer.bytes_per_step >= sum(p.data.nbytes for p in model.parameters())
    for n, p in model.named_parameters():
        assert np.array_equal(p.grad.numpy(), before[n])
    assert dist.allreduce_metrics({"b": 2, "a": np.float32(1.5)}) == {"a": 1.5, "b": 2.0}
    with pytest.raises(TypeError, match="metric 'x' must be a number"):
        dist.allreduce_metrics({"x": "fast"})
    with pytest.raises(ValueError, match="op must be one of"):
        dist.allreduce_metrics({"x": 1.0}, op="mean")
    with minibasis.count_mults() as counter:
        nn.Linear(3, 2)(minibasis.tensor(np.ones((4, 3), dtype=np.float32)))
    counts = dist.global_counts(counter)
    assert counts["total"] == 4 * 3 * 2 + 0 * 1 == counter.total
    assert counts["world_size"] == 1 and counts["per_rank"] == [{"rank": 0, "total": 24, "conv": 0}]
    with pytest.raises(ValueError, match="comm must be"):
        dist.init("tcp")


def test_sync_batchnorm_is_batchnorm_in_one_process_and_keeps_parameters_and_keys():
    minibasis.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
                          nn.BatchNorm1d(5))
    twin = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
                         nn.BatchNorm1d(5))
    twin.load_state_dict(model.state_dict())
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    dist.convert_sync_batchnorm(model)
    assert isinstance(model[1], dist.SyncBatchNorm) and isinstance(model[4], dist.SyncBatchNorm)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    x = np.random.default_rng(0).normal(size=(4, 2, 6, 6)).astype(np.float32)
    out, ref = model(minibasis.tensor(x)), twin(minibasis.tensor(x))
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(minibasis.to_numpy(v), minibasis.to_numpy(twin.state_dict()[k]), rtol=1e-6)


def test_mpirun_command_adds_open_mpi_flags_only_for_open_mpi():
    openmpi = Launcher("/x/mpirun", "openmpi", "mpirun (Open MPI) 5")
    command = mpirun_command(3, ["python", "a.py"], openmpi)
    assert command[0] == "/x/mpirun" and command[-4:] == ["-n", "3", "python", "a.py"]
    assert "--oversubscribe" in command
    assert ("--allow-run-as-root" in command) == (os.geteuid() == 0)
    mpich = Launcher("/y/mpiexec", "mpich", "HYDRA")
    assert mpirun_command(2, ["p"], mpich) == ["/y/mpiexec", "-n", "2", "p"]
    with pytest.raises(ValueError, match="positive int"):
        mpirun_command(0, ["p"], mpich)


# ---------------------------------------------------------------------------
# Real multi-process runs under mpirun
# ---------------------------------------------------------------------------
def _mpirun(launcher, n: int, script: str, *args: str, timeout: float):
    env = launcher_env(threads=1)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = mpirun_command(n, [sys.executable, str(SCRIPTS / script), *args], launcher)
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                            stdin=subprocess.DEVNULL)
    return result, time.monotonic() - start


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"mpi_scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_rank_run(launcher, tmp_path_factory):
    out = tmp_path_factory.mktemp("mpi_equivalence")
    result, _ = _mpirun(launcher, 2, "train_equivalence.py", "--out", str(out), timeout=180)
    assert result.returncode == 0, f"mpirun failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "syncbn"])
def test_two_ranks_train_to_the_same_parameters_as_one_process(two_rank_run, variant):
    """mpirun -n 2, batch 4 per rank, vs. one process with batch 8 and the same seed (float64):
    equal final parameters and BN running statistics, equal loss sums, equal summed counts."""
    script = _load_script("train_equivalence")
    reference = script.reference_run(variant)
    initial = {k: minibasis.to_numpy(v) for k, v in script.build_model(variant == "syncbn", script.SEED).state_dict().items()}
    for rank in range(2):
        saved = np.load(two_rank_run / f"rank{rank}_{variant}.npz")
        for key, ref in reference["state"].items():
            np.testing.assert_allclose(saved[f"state/{key}"], ref, rtol=0, atol=1e-6, err_msg=f"rank {rank} {key}")
        np.testing.assert_allclose(saved["loss_sums"], reference["loss_sums"], rtol=1e-9)
    # The comparison means something only if training moved the weights well beyond 1e-6.
    last = "7.weight" if variant == "plain" else "9.weight"
    for key in ("0.weight", last):
        assert np.abs(initial[key] - reference["state"][key]).max() > 1e-2, f"{key} barely trained"
    counts = json.loads((two_rank_run / f"counts_{variant}.json").read_text())
    assert counts["world_size"] == 2 and len(counts["per_rank"]) == 2
    assert counts["conv"] == reference["counts"]["conv"] == sum(r["conv"] for r in counts["per_rank"])
    assert counts["forward"]["conv"] == reference["counts"]["forward"]["conv"]
    if variant == "plain":  # every product scales with the batch; BN's running-stat updates do not
        assert counts["total"] == reference["counts"]["total"]


@pytest.mark.slow
def test_two_ranks_see_disjoint_slices_covering_each_epoch(two_rank_run):
    script = _load_script("train_equivalence")
    seen = [np.load(two_rank_run / f"rank{r}_plain.npz")["seen"] for r in range(2)]
    for epoch in range(script.EPOCHS):
        a, b = seen[0][epoch].tolist(), seen[1][epoch].tolist()
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(script.NUM_SAMPLES))
        order = minibasis.data.epoch_permutation(script.NUM_SAMPLES, script.SEED, epoch)
        local = script.GLOBAL_BATCH // 2
        for k in range(script.NUM_SAMPLES // script.GLOBAL_BATCH):
            got = a[k * local:(k + 1) * local] + b[k * local:(k + 1) * local]
            assert sorted(got) == sorted(order[k * script.GLOBAL_BATCH:(k + 1) * script.GLOBAL_BATCH].tolist())


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_a_failing_rank_ends_every_rank_with_a_clear_message(launcher, mode):
    """Rank 1 fails while rank 0 waits in a collective: both must end, well within the limit."""
    limit = 60
    try:
        result, seconds = _mpirun(launcher, 2, "fail_on_rank1.py", mode, timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks hung: mpirun still running after {limit} s")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "passed the collective" not in output
    if mode == "raise":
        assert "rank 1 of 2 failed with RuntimeError: deliberate failure on rank 1" in output, output
    else:
        assert "rank 1 of 2: exiting with status 3" in output, output
    assert seconds < limit


def _gpu_count() -> int:
    if importlib.util.find_spec("cupy") is None:
        return 0
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@pytest.mark.gpu
def test_nccl_allreduce_matches_host_reduction(launcher):
    if _gpu_count() < 2:
        pytest.skip(f"the NCCL path needs at least 2 GPUs (one per rank), found {_gpu_count()}")
    result, _ = _mpirun(launcher, 2, "nccl_allreduce.py", timeout=180)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "nccl ok" in result.stdout


# ---------------------------------------------------------------------------
# The experiments Trainer under mpirun
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_under_mpirun_matches_one_process_writes_once_and_resumes(launcher, tmp_path):
    """Trainer with mpirun -n 2: same checkpoint as the Trainer in one process; only rank 0
    writes the run folder (each epoch logged once); a run stopped after epoch 1 and resumed under
    mpirun ends where the uninterrupted one does."""
    from minibasis.training import load_checkpoint

    sys.path.insert(0, str(SCRIPTS))
    try:
        trainer_run = _load_script("trainer_run")
    finally:
        sys.path.remove(str(SCRIPTS))
    trainer_run.run(tmp_path / "reference", epochs=2)
    runs = [("full", "--epochs", "2"), ("resumed", "--epochs", "1"), ("resumed", "--epochs", "2", "--resume")]
    for name, *args in runs:
        result, _ = _mpirun(launcher, 2, "trainer_run.py", "--out", str(tmp_path / name), *args, timeout=180)
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    reference = load_checkpoint(tmp_path / "reference" / "checkpoint-train.npz")
    for name in ("full", "resumed"):
        saved = load_checkpoint(tmp_path / name / "checkpoint-train.npz")
        for key, ref in reference["model"].items():
            np.testing.assert_allclose(saved["model"][key], ref, rtol=0, atol=1e-6, err_msg=f"{name} {key}")
        assert saved["meta"]["epoch"] == 2
        # Epoch figures are global: the loss over all 24 samples, as in one process.
        np.testing.assert_allclose([r["train_loss"] for r in saved["meta"]["history"]],
                                   [r["train_loss"] for r in reference["meta"]["history"]], rtol=1e-9)
    log = (tmp_path / "full" / "log.txt").read_text().splitlines()
    assert sum("] epoch 1," in line for line in log) == 1 and sum("] epoch 2," in line for line in log) == 1
    resumed_log = (tmp_path / "resumed" / "log.txt").read_text()
    assert resumed_log.count("resumed from") == 1
