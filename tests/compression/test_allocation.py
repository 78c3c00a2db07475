"""compress(target_mult_ratio=R, allocation=...): Q per layer under a measured multiplication budget.

The greedy answer on a two-layer net with chosen spectra is worked out by hand below (every
move, its score and the multiplications it saves, written as plain arithmetic), and the
measured ratio of every returned model is re-measured here with count_mults.
"""
from __future__ import annotations

import numpy as np
import pytest

import minibasis
from minibasis import functions as F, nn
from minibasis.allocation import BudgetError
from minibasis.autograd import no_grad, tensor

SHAPE = (1, 3, 4, 4)
SPECTRUM_A = [0.40, 0.20, 0.15, 0.10, 0.05, 0.04, 0.03, 0.03]   # conv1's eigenvalues (sum 1)
SPECTRUM_B = [0.50, 0.30, 0.12, 0.04, 0.01, 0.01, 0.01, 0.01]   # conv2's eigenvalues (sum 1)


def _weight_with_spectrum(eigenvalues, out_channels, in_channels, k, seed):
    """A conv weight (M, C, k, k) whose filter matrix F (D × M) has F·Fᵀ eigenvalues ``eigenvalues``."""
    rng = np.random.default_rng(seed)
    d = in_channels * k * k
    u, _ = np.linalg.qr(rng.standard_normal((d, out_channels)))            # D × M, orthonormal columns
    v, _ = np.linalg.qr(rng.standard_normal((out_channels, out_channels)))  # M × M, orthogonal
    filters = u @ np.diag(np.sqrt(eigenvalues)) @ v.T                       # F = U Σ Vᵀ
    return filters.T.reshape(out_channels, in_channels, k, k).astype(np.float32)


class TwoConvs(nn.Module):
    """conv1: 3 → 8, 3×3, padding 1 (D = 27); conv2: 8 → 8, 1×1 (D = 8); on a 4×4 input (16 positions)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.conv1.weight.data = minibasis.backend.asarray(_weight_with_spectrum(SPECTRUM_A, 8, 3, 3, seed=1))
        self.conv2.weight.data = minibasis.backend.asarray(_weight_with_spectrum(SPECTRUM_B, 8, 8, 1, seed=2))

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def _conv_mults(model, shape=SHAPE) -> int:
    """Conv multiplications of one forward pass, counted here (not taken from the report)."""
    model.eval()
    with no_grad(), minibasis.count_mults() as counter:
        model(tensor(np.zeros(shape, dtype=np.float32)))
    return counter.conv // shape[0]


def _chosen(report) -> list:
    return [row.Q if row.replaced else "conv" for row in report.layers]


def _hand_greedy(budget_fraction):
    """The greedy allocation of TwoConvs worked out by hand; returns [Q of conv1, Q of conv2].

    Costs per image (16 output positions): conv1 as a conv 8·27·16 = 3456, one basis vector
    (27 + 8)·16 = 560; conv2 as a conv 8·8·16 = 1024, one vector (8 + 8)·16 = 256. Original: 4480.
    conv1's BasisConv is cheaper than its conv up to Q = 6 (6·560 = 3360 < 3456); its first move
    goes to the Q of least energy lost per multiplication saved:
        Q=6: 0.06/96  Q=5: 0.10/656  Q=4: 0.15/1216 (best, 1.23e-4)  Q=3: 0.25/1776  Q=2: 0.40/2336  Q=1: 0.60/2896
    conv2's is cheaper up to Q = 3 (768 < 1024):
        Q=3: 0.08/256 (best, 3.13e-4)  Q=2: 0.20/512  Q=1: 0.50/768
    Later moves drop one vector: its eigenvalue over the vector's cost.
    """
    moves = [  # (score, layer, new Q, multiplications saved)
        (0.15 / 1216, 0, 4, 1216),
        (0.10 / 560, 0, 3, 560), (0.15 / 560, 0, 2, 560), (0.20 / 560, 0, 1, 560),
        (0.08 / 256, 1, 3, 256),
        (0.12 / 256, 1, 2, 256), (0.30 / 256, 1, 1, 256),
    ]
    q, mults = ["conv", "conv"], 4480
    for _, layer, new_q, saved in sorted(moves):
        if mults <= budget_fraction * 4480:
            break
        q[layer], mults = new_q, mults - saved
    assert mults <= budget_fraction * 4480, "the hand-worked sequence must reach the budgets tested"
    return q


@pytest.mark.parametrize("budget, expected", [(0.8, [4, "conv"]), (0.7, [3, "conv"]), (0.5, [2, "conv"]),
                                              (0.45, [2, 3]), (0.3, [1, 3]), (0.2, [1, 1])])
def test_greedy_on_known_spectra_matches_the_hand_worked_answer(budget, expected):
    assert _hand_greedy(budget) == expected            # the worked sequence, read off by hand
    model = TwoConvs()
    compressed, report = minibasis.compress(model, target_mult_ratio=budget, allocation="greedy", input_shape=SHAPE)
    assert _chosen(report) == expected
    for row, spectrum in zip(report.layers, (SPECTRUM_A, SPECTRUM_B)):
        if row.replaced:
            assert row.energy == pytest.approx(sum(spectrum[:row.Q]), abs=1e-6)
    assert _conv_mults(compressed) == report.conv_mults_after
    assert report.conv_mults_after / _conv_mults(model) <= budget


def test_uniform_on_known_spectra_takes_the_largest_fitting_threshold():
    # Budget 0.5 of 4480 = 2240. Cumulative energies: conv1 .4 .6 .75 .85 ..., conv2 .5 .8 .92 ...
    # t = 0.75: Q = (3, 2), 3·560 + 2·256 = 2192 fits; the next t (0.8) gives Q = (4, 2): 2752, too many.
    _, report = minibasis.compress(TwoConvs(), target_mult_ratio=0.5, input_shape=SHAPE)
    assert _chosen(report) == [3, 2] and report.conv_mults_after == 2192
    assert report.energy_threshold == pytest.approx(0.75, abs=1e-6)
    # The same net under greedy keeps more energy per layer on average (0.6 and 1.0 against 0.75 and 0.8).
    _, greedy = minibasis.compress(TwoConvs(), target_mult_ratio=0.5, allocation="greedy", input_shape=SHAPE)
    assert greedy.energy_kept == pytest.approx(0.8, abs=1e-6) and report.energy_kept == pytest.approx(0.775, abs=1e-6)


def test_uniform_on_a_grid_matches_compress_at_that_threshold():
    model = TwoConvs()
    compressed, report = minibasis.compress(model, target_mult_ratio=0.5, thresholds=[1.0, 0.9, 0.7, 0.5],
                                            input_shape=SHAPE)
    reference, at_t = minibasis.compress(model, energy_threshold=0.7, input_shape=SHAPE)
    assert report.energy_threshold == 0.7 and _chosen(report) == _chosen(at_t)
    for (name, a), (_, b) in zip(compressed.state_dict().items(), reference.state_dict().items()):
        assert np.array_equal(minibasis.backend.to_numpy(a), minibasis.backend.to_numpy(b)), name


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_budget_one_replaces_nothing(allocation):
    model = TwoConvs()
    compressed, report = minibasis.compress(model, target_mult_ratio=1.0, allocation=allocation, input_shape=SHAPE)
    assert not report.replaced and report.mult_ratio == 1.0
    assert _conv_mults(compressed) == _conv_mults(model) == 4480


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_an_impossible_budget_is_refused(allocation):
    # Every layer at Q = 1 costs 560 + 256 = 816 of 4480 (0.182): 0.15 is out of reach.
    with pytest.raises(BudgetError, match=r"fewest reachable are 816 of 4,480"):
        minibasis.compress(TwoConvs(), target_mult_ratio=0.15, allocation=allocation, input_shape=SHAPE)
    with pytest.raises(BudgetError, match="no threshold in"):  # a grid that stops too early
        minibasis.compress(TwoConvs(), target_mult_ratio=0.3, thresholds=[1.0, 0.9], input_shape=SHAPE)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(target_mult_ratio=0.5, energy_threshold=0.9), "exactly one"),
    (dict(energy_threshold=0.9, allocation="greedy"), "need target_mult_ratio"),
    (dict(target_mult_ratio=0.5, allocation="best"), "allocation must be one of"),
    (dict(target_mult_ratio=1.5), "target_mult_ratio must be in"),
    (dict(target_mult_ratio=0.5, allocation="greedy", thresholds=[0.9]), "grid of the uniform"),
    (dict(target_mult_ratio=0.5, thresholds=[]), "non-empty"),
])
def test_bad_budget_settings_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        minibasis.compress(TwoConvs(), input_shape=SHAPE, **kwargs)


class PretrainedLike(nn.Module):
    """Four convs of different widths whose spectra fall at different rates, as in a trained net."""

    def __init__(self):
        super().__init__()
        shapes = [(3, 16, 3), (16, 16, 3), (16, 32, 3), (32, 32, 3)]
        self.convs = nn.Sequential(*[nn.Conv2d(c, m, k, padding=1, bias=False) for c, m, k in shapes])
        for i, (conv, (c, m, k), decay) in enumerate(zip(self.convs, shapes, (0.6, 0.85, 0.7, 0.93))):
            spectrum = decay ** np.arange(min(m, c * k * k))
            full = np.zeros(m)
            full[:len(spectrum)] = spectrum / spectrum.sum()
            conv.weight.data = minibasis.backend.asarray(_weight_with_spectrum(full, m, c, k, seed=10 + i))

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return x


@pytest.mark.parametrize("budget", [0.7, 0.5, 0.35])
def test_greedy_keeps_at_least_the_energy_of_uniform_and_both_meet_the_measured_budget(budget):
    model = PretrainedLike()
    shape = (2, 3, 8, 8)
    original = _conv_mults(model, shape)
    kept = {}
    for allocation in ("uniform", "greedy"):
        compressed, report = minibasis.compress(model, target_mult_ratio=budget, allocation=allocation,
                                                input_shape=shape)
        assert _conv_mults(compressed, shape) / original <= budget
        assert _conv_mults(compressed, shape) == report.conv_mults_after
        kept[allocation] = report.energy_kept
    assert kept["greedy"] >= kept["uniform"]


def test_on_the_pretrained_resnet20_greedy_keeps_more_energy_at_the_uniform_runs_budget(akamaster_dir):
    from minibasis.io import load_torch_checkpoint
    from minibasis.models import resnet_cifar

    matches = sorted(akamaster_dir.glob("resnet20-*.th"))
    if not matches:
        pytest.skip(f"resnet20-*.th not found in {akamaster_dir}")
    model = resnet_cifar(20, num_classes=10, shortcut="A")
    model.load_state_dict(load_torch_checkpoint(matches[0]), strict=True)
    _, uniform = minibasis.compress(model, target_mult_ratio=0.4523)
    _, greedy = minibasis.compress(model, target_mult_ratio=0.4523, allocation="greedy")
    assert uniform.mult_ratio <= 0.4523 and greedy.mult_ratio <= 0.4523
    assert greedy.energy_kept > uniform.energy_kept
