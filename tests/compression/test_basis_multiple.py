"""compress(..., basis_multiple=K): each layer's Q rounded up to a multiple of K (a runtime's channel block)."""
from __future__ import annotations

import numpy as np
import pytest

import minibasis as mb
from minibasis import models, nn
from minibasis.basis import eigen_basis
from minibasis.cli import main


@pytest.fixture(scope="module")
def model():
    mb.manual_seed(7)
    return models.resnet_cifar(20).eval()


def test_each_q_is_the_thresholds_q_rounded_up_and_counts_follow(model):
    t, block = 0.7, 16
    plain, plain_report = mb.compress(model, energy_threshold=t, input_shape=(2, 3, 32, 32))
    blocked, report = mb.compress(model, energy_threshold=t, basis_multiple=block, input_shape=(2, 3, 32, 32))
    layers = {path: m for path, m in blocked.named_modules() if isinstance(m, nn.BasisConv2d)}
    assert layers and report.basis_multiple == block and "multiple of 16" in report.table()
    for row in report.layers:
        conv = model.get_submodule(row.name)
        m, c, kh, kw = conv.weight.shape
        # Q of the threshold, computed here from the spectrum independently of compress
        q_t = eigen_basis(conv.weight.data, energy_threshold=t).num_basis
        expected = min(-(-q_t // block) * block, m, c * kh * kw)
        ratio = expected / m + expected / (c * kh * kw)
        if ratio >= 1:
            assert not row.replaced and row.name not in layers
            continue
        assert row.replaced and layers[row.name].num_basis == expected and expected % block == 0
        assert row.energy >= t - 1e-6
        # measured per-layer multiplications: Q'·(D + M) per output position
        positions = row.mults_before // (m * c * kh * kw)
        assert row.mults_after == expected * (c * kh * kw + m) * positions
    assert report.mult_ratio >= plain_report.mult_ratio
    x = mb.tensor(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    with mb.no_grad():
        assert np.isfinite(blocked(x).numpy()).all()


def test_basis_multiple_one_changes_nothing(model):
    a, ra = mb.compress(model, energy_threshold=0.8)
    b, rb = mb.compress(model, energy_threshold=0.8, basis_multiple=1)
    assert [r.num_basis for r in ra.layers] == [r.num_basis for r in rb.layers]
    assert ra.conv_mults_after == rb.conv_mults_after


def test_basis_multiple_needs_a_threshold_and_a_positive_integer(model):
    with pytest.raises(ValueError, match="needs energy_threshold"):
        mb.compress(model, num_basis=4, basis_multiple=16)
    with pytest.raises(ValueError, match="needs energy_threshold"):
        mb.compress(model, target_mult_ratio=0.5, basis_multiple=16)
    with pytest.raises((ValueError, TypeError), match="basis_multiple"):
        mb.compress(model, energy_threshold=0.8, basis_multiple=0)


def test_cli_compress_takes_basis_multiple_and_refuses_it_with_a_budget(tmp_path, model, capsys):
    mb.save_model(model, tmp_path / "m.npz")
    assert main(["compress", "--checkpoint", str(tmp_path / "m.npz"), "--threshold", "0.7", "--basis-multiple", "16",
                 "--output", str(tmp_path / "run")]) == 0
    assert "Q rounded up to a multiple of 16" in capsys.readouterr().out
    assert main(["compress", "--checkpoint", str(tmp_path / "m.npz"), "--target-mult-ratio", "0.5", "--basis-multiple",
                 "16", "--output", str(tmp_path / "run2")]) != 0
    assert "--basis-multiple" in capsys.readouterr().err and not (tmp_path / "run2").exists()
