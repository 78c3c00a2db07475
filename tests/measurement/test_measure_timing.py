"""measure.profile(timing=True): per-layer wall time, the rest by kind, shares that add up; times measured."""
from __future__ import annotations

import time

import pytest

import minibasis as mb
from minibasis import models
from minibasis.deployment import InferenceError
from minibasis.measure import OUTSIDE_OPS, conv_layers, profile


def _resnet8(shortcut="A"):
    mb.manual_seed(0)
    return models.get_model("resnet_cifar", depth=8, shortcut=shortcut).eval()


def _shares(prof) -> float:
    return sum(r.share for r in prof.rows) + sum(g["share"] for g in prof.timing["groups"])


@pytest.mark.parametrize("backward", [False, True])
def test_rows_cover_every_layer_and_shares_sum_to_one(backward):
    model = _resnet8()
    prof = profile(model, (2, 3, 32, 32), timing=True, backward=backward)
    assert [r.path for r in prof.rows] == [path for path, _ in conv_layers(model)]
    for r in prof.rows:
        assert r.forward_seconds > 0 and r.mults_per_second > 0
        assert (r.backward_seconds > 0) if backward else r.backward_seconds is None
    kinds = {g["kind"]: g for g in prof.timing["groups"]}
    for kind in ("batch norm", "activations", "adds", "pooling", "linear", OUTSIDE_OPS):
        assert kind in kinds, kind
    assert kinds["batch norm"]["mults"] > 0 and kinds["linear"]["mults"] > 0
    assert _shares(prof) == pytest.approx(1.0, abs=1e-9)
    conv_share = sum(r.share for r in prof.rows)
    assert prof.timing["outside_conv_share"] == pytest.approx(1.0 - conv_share, abs=1e-9)
    text = prof.table()
    assert "outside the conv layers" in text and "layer2.0.conv2" in text
    assert prof.to_dict()["timing"]["groups"]


def test_a_slowed_layer_shows_in_its_own_row():
    model = _resnet8()
    slow = "layer2.0.conv1"
    with model.get_submodule(slow).register_forward_hook(lambda m, args, out: time.sleep(0.05)):
        prof = profile(model, (1, 3, 32, 32), timing=True)
    row = prof.row(slow)
    assert row.forward_seconds >= 0.05
    # the slowed row holds the largest share: compared with the other rows, not with a clock
    assert all(row.share > other.share for other in prof.rows if other.path != slow)
    assert row.share > max(g["share"] for g in prof.timing["groups"])


def test_a_slowed_batch_norm_shows_outside_the_conv_layers():
    model = _resnet8()
    with model.get_submodule("layer1.0.bn1").register_forward_hook(lambda m, args, out: time.sleep(0.05)):
        prof = profile(model, (1, 3, 32, 32), timing=True)
    outside = {g["kind"]: g for g in prof.timing["groups"]}[OUTSIDE_OPS]  # a hook runs outside every op
    assert outside["forward_seconds"] >= 0.05
    assert outside["share"] > max(r.share for r in prof.rows)
    assert prof.timing["outside_conv_share"] > 0.5


def test_deployed_model_rows_read_as_the_source_layers():
    model, _ = mb.compress(_resnet8("B"), energy_threshold=0.8)
    deployed = mb.deploy(model.eval())
    prof = profile(deployed, (2, 3, 32, 32), timing=True)
    source = profile(model, (2, 3, 32, 32))
    assert [r.path for r in prof.rows] == [r.path for r in source.rows]
    assert [r.kind for r in prof.rows] == [r.kind for r in source.rows]
    assert [r.mults for r in prof.rows] == [r.mults for r in source.rows] == [r.formula_mults for r in prof.rows]
    assert _shares(prof) == pytest.approx(1.0, abs=1e-9)
    assert "batch norm" not in {g["kind"] for g in prof.timing["groups"]}
    with pytest.raises(InferenceError, match="no backward pass"):
        profile(deployed, (2, 3, 32, 32), backward=True)


def test_timing_leaves_the_model_as_it_was():
    model = _resnet8()
    model.train()
    with model.get_submodule("conv1").register_forward_hook(lambda m, args, out: None) as handle:
        profile(model, (1, 3, 32, 32), timing=True, backward=True)
        assert list(model.get_submodule("conv1")._forward_hooks) == [handle.id]
    assert not model.get_submodule("conv1")._forward_pre_hooks
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_summary_with_timing_keeps_its_counts():
    model = models.get_model("table3_cnn")
    plain, timed = mb.summary(model, (2, 3, 32, 32)), mb.summary(model, (2, 3, 32, 32), timing=True)
    assert [r.mults for r in timed.rows] == [r.mults for r in plain.rows]
    assert plain.timing is None
    assert [r["path"] for r in timed.timing["conv_layers"]] == ["features.0", "features.3", "features.6"]
    assert "outside the conv layers" in timed.table()


def test_count_cli_timing(tmp_path, capsys):
    import json

    from minibasis.cli import main

    path = tmp_path / "count.json"
    assert main(["count", "table3_cnn", "--timing", "--batch", "2", "--json", str(path)]) == 0
    report = json.loads(path.read_text())["models"][0]
    assert report["timing"]["batch"] == 2
    assert [row["layer"] for row in report["timing"]["layers"]] == ["features.0", "features.3", "features.6"]
    shares = sum(r["share"] for r in report["timing"]["layers"]) + sum(g["share"] for g in report["timing"]["groups"])
    assert shares == pytest.approx(1.0, abs=1e-9)
    assert "outside the conv layers" in capsys.readouterr().out
    assert main(["count", "table3_cnn", "--timing", "--batch", "0"]) != 0
