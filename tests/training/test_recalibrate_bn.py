"""BatchNorm recalibration before fine-tuning (``finetune --recalibrate-bn N``).

The reference is computed here in NumPy from the definition: the running mean and variance
become the plain average, over the batches, of each batch's mean and unbiased variance of the
BatchNorm's input, where every BatchNorm upstream normalizes with the batch's own statistics
(train mode).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import minibasis
from minibasis import nn
from minibasis.cli import main
from minibasis import training as finetune

EPS = 1e-5


def _net(rng):
    """BN(3) → ReLU → BN(3), with non-trivial affine parameters and stale running statistics."""
    model = nn.Sequential(nn.BatchNorm2d(3, eps=EPS), nn.ReLU(), nn.BatchNorm2d(3, eps=EPS))
    for bn in (model[0], model[2]):
        bn.weight.data[...] = rng.uniform(0.5, 2.0, 3).astype(np.float32)
        bn.bias.data[...] = rng.normal(size=3).astype(np.float32)
        bn.running_mean[...] = 7.0   # stale: must leave no trace
        bn.running_var[...] = 42.0
    return model


def _reference(model, images, batch_size):
    """Expected (mean, var) of both BatchNorms, in float64 from the definition."""
    w0, b0 = (np.asarray(model[0].weight.data, np.float64), np.asarray(model[0].bias.data, np.float64))
    stats = {0: [], 2: []}
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].astype(np.float64)
        stats[0].append((x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3), ddof=1)))
        mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
        h = np.maximum((x - mean) / np.sqrt(var + EPS) * w0[None, :, None, None] + b0[None, :, None, None], 0.0)
        stats[2].append((h.mean(axis=(0, 2, 3)), h.var(axis=(0, 2, 3), ddof=1)))
    return {k: (np.mean([m for m, _ in v], axis=0), np.mean([s for _, s in v], axis=0)) for k, v in stats.items()}


@pytest.mark.parametrize("batch_size", [4, 64])
def test_running_statistics_are_the_average_over_batches(batch_size):
    rng = np.random.default_rng(0)
    model = _net(rng)
    model.eval()
    images = (rng.normal(size=(10, 3, 5, 5)) * [[[[1.0]], [[3.0]], [[0.2]]]] + 2.0).astype(np.float32)
    params_before = [np.array(p.data) for p in model.parameters()]
    count = finetune.recalibrate_batch_norm(model, images, batch_size=batch_size)
    assert count == 10
    expected = _reference(model, images, batch_size)
    for index in (0, 2):
        mean, var = expected[index]
        np.testing.assert_allclose(model[index].running_mean, mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(model[index].running_var, var, rtol=1e-4, atol=1e-5)
    # No parameter moved, the mode and each layer's momentum are as they were.
    assert all(np.array_equal(a, np.array(p.data)) for a, p in zip(params_before, model.parameters()))
    assert model.training is False and model[0].training is False
    assert model[0].momentum == 0.1 and model[2].momentum == 0.1


def test_matches_torch_cumulative_average():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    images = rng.normal(size=(9, 3, 4, 4)).astype(np.float32)
    model = nn.Sequential(nn.BatchNorm2d(3))
    finetune.recalibrate_batch_norm(model, images, batch_size=4, transform=lambda b: b * 2.0 - 1.0)
    oracle = torch.nn.BatchNorm2d(3, momentum=None)  # momentum=None: cumulative moving average
    oracle.train()
    with torch.no_grad():
        for start in range(0, 9, 4):
            oracle(torch.from_numpy(images[start:start + 4] * 2.0 - 1.0))
    np.testing.assert_allclose(model[0].running_mean, oracle.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model[0].running_var, oracle.running_var.numpy(), rtol=1e-5, atol=1e-6)


def test_the_mode_is_restored_after_an_error_and_bad_batch_size_is_rejected():
    model = nn.Sequential(nn.BatchNorm2d(3))
    model.eval()
    with pytest.raises(ValueError, match="channels"):
        finetune.recalibrate_batch_norm(model, np.zeros((2, 4, 3, 3), np.float32))
    assert model.training is False and model[0].momentum == 0.1
    with pytest.raises(ValueError, match="batch_size"):
        finetune.recalibrate_batch_norm(model, np.zeros((2, 3, 3, 3), np.float32), batch_size=0)
    assert finetune.recalibrate_batch_norm(nn.Sequential(nn.ReLU()), np.zeros((2, 3, 3, 3), np.float32)) == 0


def test_finetune_option_recalibrates_and_reports(tmp_path):
    out = tmp_path / "ft"
    common = ["finetune", "--depth", "8", "--checkpoint", "none", "--dataset", "synthetic", "--normalize", "cifar10",
              "--threshold", "0.9", "--replace-all", "--train-subset", "32", "--limit", "16", "--epochs1", "0",
              "--epochs2", "0", "--batch-size", "16", "--quiet"]
    assert main(common + ["--recalibrate-bn", "32", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recalibrate_bn"] == 32
    assert 0.0 <= results["test_acc_recalibrated"] <= 1.0
    # Nothing was trained (0 epochs), so the saved statistics can only come from the recalibration:
    # a fresh BatchNorm holds mean 0 and variance 1.
    state = minibasis.io.load(out / "model.npz")["state_dict"]
    means = [np.asarray(v) for k, v in state.items() if k.endswith("running_mean")]
    assert means and all(np.abs(m).max() > 0 for m in means)
    assert main(common + ["--recalibrate-bn", "-1", "--output", str(tmp_path / "bad")]) != 0
