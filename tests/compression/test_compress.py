"""minibasis.compress: the input model stays untouched, t = 1 changes nothing, skipping,
layer selection, and a report whose counts agree with fresh measurements and the formulas."""
import json
from fractions import Fraction

import numpy as np
import pytest

import minibasis as mb
from minibasis import nn
from minibasis.compress import CompressionReport, copy_module

INPUT_SHAPE = (1, 3, 12, 12)
# (path, M, C, k, stride, padding, output side) of the convs of _small_net on 12×12 inputs.
CONVS = [("0", 6, 3, 3, 1, 1, 12), ("3", 12, 6, 3, 2, 1, 6), ("5", 4, 12, 1, 1, 0, 6)]


def _small_net(seed=0, low_rank=None):
    """conv-BN-ReLU, strided conv, 1×1 conv, global pool, linear; float64 with non-trivial BN statistics.

    ``low_rank``: {path: r} gives those convs weights of rank r.
    """
    mb.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 12, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(12, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    rng = np.random.default_rng(seed)
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                p.data = p.data.astype(np.float64)
        for name, b in list(module._buffers.items()):
            module._buffers[name] = b.astype(np.float64)
    bn = model[1]
    bn.running_mean[:] = rng.standard_normal(6)
    bn.running_var[:] = rng.uniform(0.5, 2.0, 6)
    bn.weight.data = rng.uniform(0.5, 1.5, 6)
    bn.bias.data = rng.standard_normal(6)
    for path, r in (low_rank or {}).items():
        conv = dict(model.named_modules())[path]
        m = conv.weight.shape[0]
        d = conv.weight.data[0].size
        conv.weight.data = (rng.standard_normal((m, r)) @ rng.standard_normal((r, d))).reshape(conv.weight.shape)
    return model


def _input(n=3, seed=1):
    return mb.tensor(np.random.default_rng(seed).standard_normal((n,) + INPUT_SHAPE[1:]))


def _snapshot(model):
    return {k: np.array(v, copy=True) for k, v in model.state_dict().items()}


def _fresh_conv_counts(model):
    """Whole-model and per-layer conv mults per image, counted here independently of compress."""
    model.eval()
    n = 2
    with mb.no_grad(), mb.count_mults() as counter:
        model(mb.tensor(np.zeros((n,) + INPUT_SHAPE[1:])))
    return counter.conv // n, {k: v // n for k, v in counter.conv_by_layer().items()}


def test_input_model_untouched_and_t1_reproduces_outputs():
    model = _small_net()
    model.train()
    before = _snapshot(model)
    x = _input()
    reference = model.eval()(x).numpy()
    model.train()

    new_model, report = mb.compress(model, energy_threshold=1.0, skip_unprofitable=False, input_shape=INPUT_SHAPE)

    after = _snapshot(model)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules()), "the input's mode is left as it was"
    assert [type(model[int(p)]) for p, *_ in CONVS] == [nn.Conv2d] * 3
    assert all(m.training for m in new_model.modules()), "the copy keeps the input's mode"

    assert [type(new_model[int(p)]) for p, *_ in CONVS] == [nn.BasisConv2d] * 3
    assert [row.replaced for row in report.layers] == [True] * 3
    # No array of the new model aliases one of the input model.
    old_arrays = [p.data for p in model.parameters()] + [b for _, b in model.named_buffers()]
    for _, array in list(new_model.named_buffers()) + [(n, p.data) for n, p in new_model.named_parameters()]:
        assert not any(np.shares_memory(array, old) for old in old_arrays)

    out = new_model.eval()(x).numpy()
    assert np.abs(out - reference).max() <= 1e-10 * np.abs(reference).max()
    np.testing.assert_array_equal(model.eval()(x).numpy(), reference)


def test_skip_unprofitable_keeps_convs_where_basisconv_costs_more():
    # At t = 1 a full-rank conv keeps Q = min(D, M) filters, so Q/M + Q/D >= 1; a rank-2
    # 6→12 3×3 conv needs Q = 2: 2/12 + 2/54 < 1.
    model = _small_net(low_rank={"3": 2})
    new_model, report = mb.compress(model, energy_threshold=1.0, input_shape=INPUT_SHAPE)
    rows = {row.name: row for row in report.layers}
    assert [row.name for row in report.layers] == [p for p, *_ in CONVS]
    assert rows["3"].num_basis == 2 and rows["3"].replaced
    assert rows["3"].formula_ratio == Fraction(2, 12) + Fraction(2, 54)
    for path, m, c, k, *_ in (CONVS[0], CONVS[2]):
        q = min(m, c * k * k)
        assert rows[path].num_basis == q and not rows[path].replaced
        assert rows[path].formula_ratio == Fraction(q, m) + Fraction(q, c * k * k) >= 1
        assert ">= 1" in rows[path].skip_reason
        assert rows[path].mults_after == rows[path].mults_before
        assert rows[path].params_after == rows[path].params_before
    assert [type(new_model[i]) for i in (0, 3, 5)] == [nn.Conv2d, nn.BasisConv2d, nn.Conv2d]
    assert new_model[0] is not model[0], "kept layers are copies too"

    everything, report_all = mb.compress(model, energy_threshold=1.0, skip_unprofitable=False,
                                         input_shape=INPUT_SHAPE)
    assert [type(everything[i]) for i in (0, 3, 5)] == [nn.BasisConv2d] * 3
    assert [r.mults_after > r.mults_before for r in report_all.layers] == [True, False, True]
    x = _input()
    np.testing.assert_allclose(new_model.eval()(x).numpy(), model.eval()(x).numpy(), rtol=1e-10, atol=1e-12)


def test_ratio_exactly_one_is_unprofitable():
    mb.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 2))  # D = M = 8; Q = 4 gives 4/8 + 4/8 = 1 exactly
    kept, report = mb.compress(model, num_basis=4, input_shape=(1, 2, 5, 5))
    assert report.layers[0].formula_ratio == 1 and not report.layers[0].replaced
    assert isinstance(kept[0], nn.Conv2d)
    assert report.layers[0].mults_after == report.layers[0].mults_before == 8 * 8 * 16
    replaced, _ = mb.compress(model, num_basis=3, input_shape=(1, 2, 5, 5))
    assert isinstance(replaced[0], nn.BasisConv2d)


def test_layers_restricts_the_replacement():
    model = _small_net()
    new_model, report = mb.compress(model, num_basis=3, layers=["3"], input_shape=INPUT_SHAPE)
    assert [row.name for row in report.layers] == ["3"]
    assert report.layers[0].num_basis == 3 and report.layers[0].replaced
    assert [type(new_model[i]) for i in (0, 3, 5)] == [nn.Conv2d, nn.BasisConv2d, nn.Conv2d]
    np.testing.assert_array_equal(new_model[0].weight.data, model[0].weight.data)


def test_report_matches_fresh_counts_and_formulas():
    model = _small_net()
    new_model, report = mb.compress(model, num_basis=3, skip_unprofitable=False, input_shape=INPUT_SHAPE)
    total_before, layers_before = _fresh_conv_counts(copy_module(model))
    total_after, layers_after = _fresh_conv_counts(new_model)
    assert (report.conv_mults_before, report.conv_mults_after) == (total_before, total_after)
    assert sum(r.mults_before - r.mults_after for r in report.layers) == total_before - total_after
    for (path, m, c, k, stride, padding, side), row in zip(CONVS, report.layers):
        d, q, positions = c * k * k, 3, side * side
        assert (row.name, row.out_channels, row.in_channels, row.kernel_size, row.filter_dim, row.num_basis) == \
            (path, m, c, (k, k), d, q)
        assert row.mults_before == layers_before[path] == m * d * positions
        assert row.mults_after == layers_after[path] == q * d * positions + m * q * positions
        assert Fraction(row.mults_after, row.mults_before) == row.formula_ratio == Fraction(q, m) + Fraction(q, d)
        assert row.params_before == m * d + m and row.params_after == m * q + m
        assert 0 < row.energy <= 1
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in new_model.parameters())
    assert report.params_before - report.params_after == sum(r.params_before - r.params_after for r in report.layers)


def test_report_prints_and_serializes():
    model = _small_net(low_rank={"3": 2})
    _, report = mb.compress(model, energy_threshold=0.999, input_shape=INPUT_SHAPE)
    assert isinstance(report, CompressionReport)
    data = json.loads(report.to_json())
    assert data == report.to_dict()
    assert [row["name"] for row in data["layers"]] == ["0", "3", "5"]
    row = data["layers"][1]
    assert row["formula_ratio"] == pytest.approx(2 / 12 + 2 / 54) and row["formula_ratio_exact"] == "11/54"
    assert row["replaced"] is True and row["Q"] == 2 and row["D"] == 54
    assert data["totals"]["conv_mults_before"] == report.conv_mults_before
    assert data["totals"]["layers_replaced"] == 1 and data["input_shape"] == list(INPUT_SHAPE)
    text = report.table()
    assert str(report) == text
    assert "replaced" in text and "kept" in text and f"{report.conv_mults_before:,}" in text
    assert len(text.splitlines()) >= 3 + len(report.layers)


def test_t_below_one_drops_energy_and_multiplications():
    model = _small_net(low_rank={"3": 4})
    new_model, report = mb.compress(model, energy_threshold=0.5, input_shape=INPUT_SHAPE)
    row = report.layers[1]
    assert row.replaced and row.num_basis < 4 and 0.5 <= row.energy < 1
    assert report.conv_mults_after < report.conv_mults_before


def test_shared_conv_is_replaced_everywhere():
    mb.manual_seed(0)
    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    new_model, report = mb.compress(model, num_basis=1, input_shape=(1, 3, 6, 6))
    assert len(report.layers) == 1
    assert isinstance(new_model[0], nn.BasisConv2d) and new_model[0] is new_model[2]
    assert report.layers[0].mults_before == 2 * 3 * 27 * 36, "both calls of the shared conv are counted"


def test_copy_module_is_deep_and_keeps_sharing():
    mb.manual_seed(0)
    linear = nn.Linear(3, 3)
    model = nn.Sequential(linear, nn.ReLU(), linear)
    model[0].weight.grad = mb.tensor(np.ones((3, 3), dtype=np.float32))
    duplicate = copy_module(model)
    assert duplicate[0] is duplicate[2] and duplicate[0] is not model[0]
    assert not np.shares_memory(duplicate[0].weight.data, model[0].weight.data)
    assert duplicate[0].weight.grad is None and model[0].weight.grad is not None
    duplicate[0].weight.data[:] = 0
    assert np.abs(model[0].weight.data).sum() > 0
    with pytest.raises(TypeError, match="Module"):
        copy_module(object())


def test_callable_after_submodule_import():
    import importlib

    importlib.import_module("minibasis.compress")
    model = _small_net()
    new_model, report = mb.compress(model, num_basis=2, layers=["5"], input_shape=INPUT_SHAPE)
    assert isinstance(new_model[5], nn.BasisConv2d)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(), ValueError, "exactly one"),
    (dict(energy_threshold=0.9, num_basis=2), ValueError, "exactly one"),
    (dict(energy_threshold=0.0), ValueError, r"\(0, 1\]"),
    (dict(energy_threshold=1.2), ValueError, r"\(0, 1\]"),
    (dict(energy_threshold=True), ValueError, r"\(0, 1\]"),
    (dict(num_basis=0), ValueError, "positive integer"),
    # 7 > min(D, M) = min(27, 6) for the first conv
    (dict(num_basis=7), ValueError, r"layer '0' \(weight \(6, 3, 3, 3\)\).*\[1, 6\]"),
    (dict(energy_threshold=0.9, layers=["9"]), ValueError, r"no module at path '9'.*\['0', '3', '5'\]"),
    (dict(energy_threshold=0.9, layers=["1"]), ValueError, "'1' is a BatchNorm2d, not a Conv2d"),
    (dict(energy_threshold=0.9, layers="3"), TypeError, "list of module paths"),
    (dict(energy_threshold=0.9, input_shape=(1, 3, 0, 12)), ValueError, "input_shape"),
])
def test_bad_input(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        mb.compress(_small_net(), **kwargs)


def test_not_a_module():
    with pytest.raises(TypeError, match="Module.*list"):
        mb.compress([nn.Conv2d(3, 4, 3)], energy_threshold=0.9)
