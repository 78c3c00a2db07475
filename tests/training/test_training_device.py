"""GPU habits of minibasis.training, checked on the strict stand-in device (no GPU needed):
one host→device copy per batch, and the loop's own host reads only at log/check points."""
import numpy as np
import pytest

import minibasis as mb
from minibasis import backend, data, nn, optim
from minibasis.backend_strict import count_transfers
from minibasis.training import Trainer, evaluate


@pytest.fixture
def strict():
    previous = backend.current()
    mb.use("strict")
    try:
        yield
    finally:
        mb.use(previous)


def _net():
    mb.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_trainer_copies_once_per_batch_and_reads_only_at_check_points(strict):
    x = np.random.default_rng(0).random((64, 3, 8, 8), dtype=np.float32)
    y = np.arange(64) % 3
    loader = data.DataLoader((x, y), batch_size=8, shuffle=True, seed=0)
    model = _net()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loader, epochs=1,
                      progress=False, sync_every=4)
    with count_transfers() as counts:
        (row,) = trainer.fit()
    assert counts.to_device == 8                 # 8 batches, images and labels in one copy each
    assert counts.to_host == 2                   # the guard: the losses of steps 1-4, then of steps 5-8
    # cross_entropy's label-range flag once per step, and the epoch's loss and hit count once each
    assert counts.scalar_reads == 8 + 2, counts
    assert np.isfinite(row["train_loss"]) and 0 <= row["train_acc"] <= 1


def test_trainer_on_strict_matches_numpy_bit_for_bit(serial_engine):
    # strict arrays always take the serial chunk loop; bitwise equality needs the same chunks on numpy
    x = np.random.default_rng(1).random((32, 3, 8, 8), dtype=np.float32)
    y = np.arange(32) % 3
    results = {}
    for device in ("numpy", "strict"):
        mb.use(device)
        try:
            model = _net()
            model.to(device)
            loader = data.DataLoader((x, y), batch_size=8, shuffle=True, seed=0)
            history = Trainer(model, optim.SGD(model.parameters(), lr=0.1), loader, epochs=2,
                              progress=False).fit()
            results[device] = ({k: mb.to_numpy(v).copy() for k, v in model.state_dict().items()},
                               [(r["train_loss"], r["train_acc"]) for r in history])
        finally:
            mb.use("numpy")
    (state_a, hist_a), (state_b, hist_b) = results["numpy"], results["strict"]
    assert all(np.array_equal(state_a[k], state_b[k]) for k in state_a)
    assert hist_a == hist_b


def test_evaluate_reads_the_device_once(strict):
    x = np.random.default_rng(2).random((40, 3, 8, 8), dtype=np.float32)
    y = np.arange(40) % 3
    model = _net()
    with count_transfers() as counts:
        result = evaluate(model, x, y, batch_size=8, progress=False)
    assert counts.to_device == 1 + 5                 # the labels once, then one copy per batch
    assert (counts.to_host, counts.scalar_reads) == (0, 2), counts   # hit count and loss sum, at the end
    mb.use("numpy")
    reference = evaluate(_net(), x, y, batch_size=8, progress=False)
    assert (result.correct, result.loss) == (reference.correct, pytest.approx(reference.loss, rel=1e-12))
