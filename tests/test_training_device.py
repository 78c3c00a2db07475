"""GPU habits of minibasis.training, checked on the strict stand-in device (no GPU needed):
one host→device copy per batch, and the loop's own host reads only at log/check points."""
import sys

import numpy as np
import pytest

import minibasis as mb
from minibasis import backend, backend_strict, data, nn, optim
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


def _count_device_traffic(monkeypatch, package_dir: str) -> dict:
    """Count host→device copies (backend.asarray) and device→host reads made by code in
    ``package_dir`` (to_numpy, float/int/bool/item of a device array)."""
    counts = {"copies": 0, "reads": 0}
    real_asarray, real_to_numpy = backend.asarray, backend.to_numpy

    def ours() -> bool:
        return package_dir in sys._getframe(2).f_code.co_filename

    def asarray(*args, **kwargs):
        counts["copies"] += ours()
        return real_asarray(*args, **kwargs)

    def to_numpy(*args, **kwargs):
        counts["reads"] += ours()
        return real_to_numpy(*args, **kwargs)

    monkeypatch.setattr(backend, "asarray", asarray)
    monkeypatch.setattr(backend, "to_numpy", to_numpy)
    for name in ("__float__", "__int__", "__bool__", "item"):
        original = getattr(backend_strict.StrictArray, name)

        def counted(self, *args, _original=original):
            counts["reads"] += ours()
            return _original(self, *args)
        monkeypatch.setattr(backend_strict.StrictArray, name, counted)
    return counts


def test_trainer_copies_once_per_batch_and_reads_only_at_check_points(strict, monkeypatch):
    x = np.random.default_rng(0).random((64, 3, 8, 8), dtype=np.float32)
    y = np.arange(64) % 3
    loader = data.DataLoader((x, y), batch_size=8, shuffle=True, seed=0)
    model = _net()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loader, epochs=1,
                      progress=False, sync_every=4)
    counts = _count_device_traffic(monkeypatch, "minibasis/training")
    (row,) = trainer.fit()
    assert counts["copies"] == 8                     # 8 batches, images and labels in one copy each
    # 8 steps checked every 4: two guard reads, then the epoch's loss and hit count once each.
    assert counts["reads"] <= 2 + 2 + 1, counts
    assert np.isfinite(row["train_loss"]) and 0 <= row["train_acc"] <= 1


def test_trainer_on_strict_matches_numpy_bit_for_bit(monkeypatch):
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


def test_evaluate_reads_the_device_once(strict, monkeypatch):
    x = np.random.default_rng(2).random((40, 3, 8, 8), dtype=np.float32)
    y = np.arange(40) % 3
    model = _net()
    counts = _count_device_traffic(monkeypatch, "minibasis/training")
    result = evaluate(model, x, y, batch_size=8, progress=False)
    assert counts["copies"] == 1 + 5                 # the labels once, then one copy per batch
    assert counts["reads"] <= 2                      # hit count and loss sum, at the end
    mb.use("numpy")
    reference = evaluate(_net(), x, y, batch_size=8, progress=False)
    assert (result.correct, result.loss) == (reference.correct, pytest.approx(reference.loss, rel=1e-12))
