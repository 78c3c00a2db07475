"""compress(target_mult_ratio=R, allocation="sensitivity", calibration=(images, labels)).

The per-vector loss shares are checked against a hand-worked interpolation; on a net of two
convs with identical spectra and costs, one of which barely reaches the output, the measured
loss must send the budget's cuts to that one (the energy criterion cannot tell them apart).
"""
from __future__ import annotations

import numpy as np
import pytest

import minibasis
from minibasis import functions as F, nn
from minibasis.allocation import BudgetError, LayerCosts, sensitivity_grid, sensitivity_shares
from minibasis.autograd import no_grad, tensor


def _layer(rank=8, dim=27):
    ratios = np.minimum(1.0, np.arange(1, dim + 1) / rank)
    return LayerCosts(path="c", M=8, C=3, kernel=(3, 3), ratios=ratios, shares=np.full(dim, 1 / dim), rank=rank,
                      conv_mults=3456, basis_fixed=0, per_vector=560)


def test_shares_interpolate_clamp_and_make_the_measured_loss_non_increasing():
    layer = _layer()
    # measured Δ(Q): Q=5 measured above Q=3 (noise), Q=7 below zero (a lucky replacement)
    shares = sensitivity_shares(layer, {1: 0.9, 3: 0.3, 5: 0.35, 7: -0.1})
    # by hand: Δ(1..8) = 0.9, 0.6, 0.35, 0.35, 0.35, 0.175, 0, 0   (Δ(8) = Δ(rank) = 0)
    delta = {1: 0.9, 2: 0.6, 3: 0.35, 4: 0.35, 5: 0.35, 6: 0.175, 7: 0.0, 8: 0.0}
    expected = np.zeros(27)
    for j in range(1, 8):
        expected[j] = delta[j] - delta[j + 1]
    np.testing.assert_allclose(shares, expected, atol=1e-12)
    for q in range(1, 9):  # the shares from q on add up to the loss of keeping q vectors
        assert shares[q:].sum() == pytest.approx(delta[q])


def test_the_grid_holds_one_and_the_thresholds_counts_below_the_rank():
    grid = sensitivity_grid(_layer())
    assert grid[0] == 1 and grid == sorted(set(grid)) and max(grid) < 8


class OneConvMatters(nn.Module):
    """conv_a and conv_b: same weights (same spectrum, same cost); conv_b's output is scaled by 1e-4."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv_b.weight.data = self.conv_a.weight.data.copy()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.conv_a(x) + 1e-4 * self.conv_b(x))
        return self.head(y.mean(axis=(2, 3)))


def _calibration(model, n=64, seed=0):
    images = np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)
    with no_grad():
        labels = model(tensor(images)).numpy().argmax(axis=1)
    return images, labels


def _conv_mults(model, shape=(1, 3, 6, 6)) -> int:
    model.eval()
    with no_grad(), minibasis.count_mults() as counter:
        model(tensor(np.zeros(shape, dtype=np.float32)))
    return counter.conv


def test_the_measured_loss_sends_the_cuts_to_the_layer_that_does_not_matter():
    minibasis.manual_seed(0)
    model = OneConvMatters().eval()
    calibration = _calibration(model)
    shape = (2, 3, 6, 6)
    sens, report = minibasis.compress(model, target_mult_ratio=0.6, allocation="sensitivity",
                                      calibration=calibration, input_shape=shape)
    chosen = {row.name: (row.Q if row.replaced else None) for row in report.layers}
    # conv_b goes to a small basis; conv_a keeps more (or stays a conv)
    assert chosen["conv_b"] is not None
    assert chosen["conv_a"] is None or chosen["conv_a"] > chosen["conv_b"]
    assert _conv_mults(sens) / _conv_mults(model) <= 0.6 and report.allocation == "sensitivity"
    assert any("calibration images" in note for note in report.notes)
    # the energy criterion sees two identical layers and cuts in module order: conv_a first
    _, greedy = minibasis.compress(model, target_mult_ratio=0.6, allocation="greedy", input_shape=shape)
    energy_choice = {row.name: (row.Q if row.replaced else None) for row in greedy.layers}
    assert energy_choice["conv_a"] is not None and (energy_choice["conv_b"] is None
                                                    or energy_choice["conv_b"] >= energy_choice["conv_a"])
    # and the sensitivity model computes nearly the original function, the energy one does not
    images, _ = calibration
    greedy_model = minibasis.compress(model, target_mult_ratio=0.6, allocation="greedy", input_shape=shape)[0]
    with no_grad():
        want = model(tensor(images)).numpy()
        off_sens = np.abs(sens.eval()(tensor(images)).numpy() - want).max()
        off_energy = np.abs(greedy_model.eval()(tensor(images)).numpy() - want).max()
    assert off_sens < 0.01 * off_energy


def test_calibration_is_read_only_for_a_reachable_budget_and_checked():
    model = OneConvMatters()

    def unreadable():
        raise AssertionError("calibration read for a budget no allocation can meet")
    with pytest.raises(BudgetError, match="fewest reachable"):
        minibasis.compress(model, target_mult_ratio=0.01, allocation="sensitivity", calibration=unreadable,
                           input_shape=(1, 3, 6, 6))
    with pytest.raises(ValueError, match="give both or neither"):
        minibasis.compress(model, target_mult_ratio=0.6, allocation="sensitivity", input_shape=(1, 3, 6, 6))
    with pytest.raises(ValueError, match="give both or neither"):
        minibasis.compress(model, target_mult_ratio=0.6, allocation="greedy", calibration=_calibration(model),
                           input_shape=(1, 3, 6, 6))
    images, labels = _calibration(model)
    for bad in ((images, labels.astype(np.float32)), (images[0], labels), (images, labels[:3]), images):
        with pytest.raises(ValueError, match="calibration"):
            minibasis.compress(model, target_mult_ratio=0.6, allocation="sensitivity", calibration=bad,
                               input_shape=(1, 3, 6, 6))
