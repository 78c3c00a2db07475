"""minibasis.measure.profile: one pass, measured vs hand-computed counts, learnable vs stored values."""
import numpy as np
import pytest

import minibasis as mb
from minibasis import measure, nn


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)             # 10x10 -> 10x10
        self.b = nn.Conv2d(8, 4, 3, stride=2, bias=False)  # 10x10 -> 4x4
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(mb.functions.relu(self.a(x)))


def test_rows_match_hand_counts():
    prof = measure.profile(TwoConvs(), (2, 3, 10, 10))
    a, b, unused = prof.rows
    assert (a.path, a.kind, a.M, a.C, a.k, a.D, a.input, a.output) == ("a", "conv", 8, 3, (3, 3), 27, (10, 10), (10, 10))
    assert a.mults == a.formula_mults == 8 * 27 * 100          # per image, batch 2 divided out
    assert (b.output, b.mults, b.formula_mults) == ((4, 4), 4 * 72 * 16, 4 * 72 * 16)
    assert (a.learnable, a.stored, b.learnable, b.stored) == (8 * 27 + 8, 8 * 27 + 8, 4 * 72, 4 * 72)
    assert not unused.ran and unused.mults == 0 and unused.input is None
    assert prof.totals["mults"] == 8 * 27 * 100 + 4 * 72 * 16
    assert prof.totals["backward_mults"] is None


def test_backward_counts_weight_and_input_gradients():
    model = TwoConvs()
    prof = measure.profile(model, (1, 3, 10, 10), backward=True)
    a, b, _ = prof.rows
    assert a.backward_mults == 8 * 27 * 100            # weight gradient only: the image needs none
    assert b.backward_mults == 2 * 4 * 72 * 16         # weight and input gradients
    assert all(p.grad is None or not np.any(mb.to_numpy(p.grad.data)) for p in model.parameters())


def test_basisconv_row_stores_the_basis_but_learns_only_coefficients():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    model = nn.Sequential(nn.BasisConv2d.from_conv(conv, num_basis=5))
    (row,) = measure.profile(model, (1, 4, 8, 8)).rows
    d = 4 * 9
    assert (row.kind, row.Q, row.M, row.D) == ("basisconv", 5, 6, d)
    assert row.learnable == 6 * 5 + 6                  # coefficients + bias
    assert row.stored == 6 * 5 + 6 + 5 * d             # ... + the fixed basis
    assert row.mults == row.formula_mults == 5 * d * 64 + 6 * 5 * 64


def test_profile_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.train()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    measure.profile(model, (1, 3, 6, 6))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "_forward_hooks", None) for m in model.modules())


def test_table_and_json_give_learnable_and_stored():
    prof = measure.profile(TwoConvs(), (1, 3, 10, 10))
    text = prof.table()
    assert "learnable" in text and "stored" in text and "formula" in text
    import json
    doc = json.loads(prof.to_json())
    assert doc["rows"][0]["D"] == 27 and doc["totals"]["stored"] == prof.totals["stored"]


@pytest.mark.parametrize("bad", [(), (0, 3, 8, 8), "1,3,8,8", (1.5, 3, 8, 8), (True, 3, 8, 8)])
def test_bad_input_shape(bad):
    with pytest.raises(ValueError, match="input_shape"):
        measure.profile(TwoConvs(), bad)


# ---------------------------------------------------------------------------
# compress's report is built on the profile
# ---------------------------------------------------------------------------
def _three_convs():
    mb.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 1, 1), nn.ReLU(),
                         nn.Conv2d(1, 8, 3, padding=1))


def test_every_kept_conv_has_a_reason_and_rows_expose_q_m_d():
    model = _three_convs()
    _, report = mb.compress(model, energy_threshold=0.4, layers=["0", "2"], input_shape=(1, 3, 8, 8))
    kept = [r for r in report.all_layers if not r.replaced]
    assert kept and all(r.reason for r in kept)
    by_name = {r.name: r for r in report.all_layers}
    assert by_name["4"].reason == "not in layers=" and by_name["4"].Q is None
    assert by_name["2"].reason.startswith("unprofitable: Q/M + Q/D")   # M = 1: Q/M alone is 1
    row = by_name["0"]
    assert (row.M, row.D) == (16, 27) and row.Q == row.num_basis and row.replaced and row.reason is None
    assert "kept: not in layers=" in report.table()


def test_report_gives_stored_values_beside_learnable_parameters():
    model = _three_convs()
    new_model, report = mb.compress(model, num_basis=4, layers=["0"], input_shape=(1, 3, 8, 8))
    row = report.layers[0]
    assert row.params_after == 16 * 4 + 16                      # coefficients + bias
    assert row.stored_after == 16 * 4 + 16 + 4 * 27             # ... + the basis, stored but not learned
    assert report.stored_after == sum(v.size for v in new_model.state_dict().values())
    assert report.params_after == sum(p.numel() for p in new_model.parameters())
    totals = report.to_dict()["totals"]
    assert totals["stored_after"] == report.stored_after and totals["params_after"] == report.params_after
    assert "stored values" in report.table()
    summary = report.summary()
    assert summary["stored"] == report.stored_after and summary["params"] == report.params_after


def test_profile_rows_survive_save_and_load(tmp_path):
    from minibasis import models

    mb.manual_seed(5)
    compressed, _ = mb.compress(models.resnet_cifar(8), energy_threshold=0.8, input_shape=(1, 3, 16, 16))
    mb.save_model(compressed, tmp_path / "m.npz")
    loaded, _ = mb.load_model(tmp_path / "m.npz")
    assert measure.profile(loaded, (1, 3, 16, 16)).rows == measure.profile(compressed, (1, 3, 16, 16)).rows
