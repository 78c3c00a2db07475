"""minibasis.summary: per layer output shape, learnable and stored values, measured multiplications.

Expected numbers are worked out here from the layer definitions (a conv output element is
a dot product of length C·kh·kw; a linear output one of length fan_in), not taken from the
engine.
"""
import json

import numpy as np
import pytest

import minibasis as mb
from minibasis import nn


def small_net():
    mb.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 2 * 3, 5))


def test_rows_shapes_values_and_mults():
    s = mb.summary(small_net(), (2, 2, 4, 6))
    rows = {r.path: r for r in s.rows}
    assert list(rows) == ["0", "1", "2", "3", "4", "5"]
    assert rows["0"].output_shape == (2, 3, 4, 6) and rows["3"].output_shape == (2, 3, 2, 3)
    assert rows["5"].output_shape == (2, 5)
    assert rows["0"].mults == 3 * (2 * 9) * 4 * 6            # per image
    assert rows["5"].mults == 18 * 5
    assert rows["2"].mults == 0 and rows["3"].mults == 0      # comparisons are not products
    assert rows["1"].mults > 0                                # BatchNorm scales
    assert (rows["0"].learnable, rows["0"].stored) == (3 * 18 + 3, 3 * 18 + 3)
    assert (rows["1"].learnable, rows["1"].stored) == (6, 12)  # weight, bias; + running mean, var
    assert s.totals["learnable"] == 57 + 6 + 18 * 5 + 5
    assert s.totals["mults"] == sum(r.mults for r in s.rows)
    assert s.totals["conv_mults"] == rows["0"].mults
    table = s.table()
    assert "2x3x4x6" in table and "learnable parameters: 158" in table
    assert json.loads(s.to_json())["rows"][5]["output_shape"] == [2, 5]


def test_a_basisconv_is_one_row_with_its_q():
    model = nn.Sequential(nn.BasisConv2d.random(3, 8, 3, 5, padding=1, bn=True, seed=0), nn.ReLU())
    s = mb.summary(model, (1, 3, 6, 6))
    assert [r.path for r in s.rows] == ["0", "1"]
    row = s.rows[0]
    assert row.Q == 5 and row.type == "BasisConv2d" and row.output_shape == (1, 8, 6, 6)
    # coefficients 8·5 + bias 8 + BN weight and bias 2·5; stored adds the basis 5·27 and BN statistics 2·5
    assert row.learnable == 40 + 8 + 10 and row.stored == row.learnable + 135 + 10
    assert row.mults >= 5 * 27 * 36 + 8 * 5 * 36  # both conv stages, plus the BatchNorm's products
    assert "BasisConv2d(Q=5)" in s.table()


def test_model_is_left_as_it_was():
    model = small_net().train()
    before = {k: np.array(v) for k, v in model.state_dict().items()}
    mb.summary(model, (1, 2, 4, 6))
    assert model.training and all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.get_submodule("0").__dict__.get("_forward_hooks")


def test_bad_arguments():
    with pytest.raises(TypeError, match="Module"):
        mb.summary("resnet20", (1, 3, 32, 32))
    with pytest.raises(ValueError, match="input_shape"):
        mb.summary(small_net(), (1, 0, 4, 4))
