"""GPU habits, checked on the CPU through the strict stand-in backend.

On a GPU, what costs is traffic and waiting: a host→device copy per array, a device→host copy,
and every single value read on the host (``float(loss)``, ``bool(flag)``), which makes the host
wait until the device has finished everything queued. ``backend_strict.count_transfers()``
counts all three while the engine runs on ``strict``, so these habits are tested everywhere:
one copy per batch array, no reads in a training step except the one flag that validates the
labels, dropout masks drawn on the device, device memory that stops growing after the first
steps (so CuPy's memory pool serves every later step from the blocks it already holds).
"""
from __future__ import annotations

import gc
import re
from pathlib import Path

import numpy as np
import pytest

import minibasis as mb
from minibasis import backend_strict, functions as F, nn, optim
from minibasis.backend_strict import StrictArray, count_transfers

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def strict():
    mb.use("strict")
    yield
    mb.use("numpy")


def _model():
    mb.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Dropout(0.2), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 2 * 2, 10))


def _batches(count, batch=6):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((batch, 3, 8, 8)).astype(np.float32), rng.integers(0, 10, batch))
            for _ in range(count)]


def _train_step(model, opt, x_host, y_host):
    x, y = mb.tensor(x_host), mb.tensor(y_host)  # the batch's one copy to the device (each array)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def test_a_training_step_copies_each_batch_array_once_and_waits_once(strict):
    model = _model()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    for step, (x_host, y_host) in enumerate(_batches(3)):
        with count_transfers() as counts:
            _train_step(model, opt, x_host, y_host)
        # images + labels in; nothing out; one host read: cross_entropy's label-range flag
        assert (counts.to_device, counts.to_host, counts.scalar_reads) == (2, 0, 1), f"step {step}: {counts}"


def test_evaluation_copies_the_batch_once_and_never_waits(strict):
    model = _model().eval()
    x_host, _ = _batches(1)[0]
    with count_transfers() as counts, mb.no_grad():
        logits = model(mb.tensor(x_host))
        predictions = logits.data.argmax(axis=1)
    assert isinstance(predictions, StrictArray)
    assert (counts.to_device, counts.to_host, counts.scalar_reads) == (1, 0, 0), counts


def test_counting_sees_every_kind_of_traffic(strict):
    """The counter itself: each kind of copy or read is counted once, and nothing else is."""
    with count_transfers() as counts:
        a = backend_strict.xp.asarray(np.ones(3))       # host → device
        b = a * 2 + a.sum()                              # device only
        host = mb.to_numpy(b)                            # device → host
        value = float(b[0]) + b.max().item()             # two single-value reads
        listed = b.tolist()                              # device → host
    assert host.tolist() == listed == [5.0, 5.0, 5.0] and value == 10.0
    assert (counts.to_device, counts.to_host, counts.scalar_reads) == (1, 2, 2), counts


def test_dropout_draws_its_mask_on_the_device(strict):
    x = mb.tensor(np.ones((64, 64), np.float32))
    mb.manual_seed(3)
    with count_transfers() as counts:
        y = F.dropout(x, 0.5, training=True)
    assert isinstance(y.data, StrictArray)
    assert (counts.to_device, counts.to_host, counts.scalar_reads) == (0, 0, 0), counts
    kept = mb.to_numpy(y) != 0
    assert 0.4 < kept.mean() < 0.6
    mb.manual_seed(3)  # the device generator is seeded by manual_seed: the same mask again
    np.testing.assert_array_equal(mb.to_numpy(F.dropout(x, 0.5, training=True)) != 0, kept)


def _live_device_bytes() -> int:
    """Bytes of device memory alive now: the storages of all StrictArrays (views counted once)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, StrictArray):
            base = obj._a
            while base.base is not None and isinstance(base.base, np.ndarray):
                base = base.base
            storages[id(base)] = base.nbytes
    return sum(storages.values())


def test_device_memory_stops_growing_after_the_first_steps(strict):
    """After momentum buffers exist, each step frees what it allocates: the live device bytes are
    the same after step 2 and after step 6, so a memory pool reuses its blocks instead of growing."""
    model = _model()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(6)
    live = []
    for x_host, y_host in batches:
        loss = _train_step(model, opt, x_host, y_host)
        del loss
        live.append(_live_device_bytes())
    assert live[1] == live[-1], f"live device bytes per step: {live}"


def test_the_library_never_empties_cupys_memory_pool():
    """Emptying the pool (free_all_blocks) or swapping allocators in library code would make every
    step allocate from the driver again; only the GPU check does it, between its measurements."""
    offenders = []
    for path in sorted((REPO_ROOT / "minibasis").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"free_all_blocks|set_allocator|set_pinned_memory_allocator", line):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
