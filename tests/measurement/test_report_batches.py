"""The reports built for users measure at a real batch (32 images by default) beside batch 1.

A slip that leaves every chunk after the first of a batched conv loop uncounted (planted from
tests/counting_mutations.py) is invisible at batch 1, where a batch is one chunk; at the
reports' default batch the conv runs in several chunks, and profile, summary, compress and
``minibasis count`` refuse the counts (BatchCountError naming the layer, both counts per
image and the batches) instead of printing them.
"""
import pytest

import minibasis as mb
from minibasis import formulas, measure, models, nn
from minibasis.cli import main
from minibasis.functions import conv
from minibasis.measure import BatchCountError

from counting_mutations import SLIPS

ONE = (1, 3, 32, 32)


def _first_conv_path() -> str:
    """The engine's path for ResNet-20's 16 → 16 3×3 "same" convs (stage 1, 32×32)."""
    return conv.conv_path(16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1)


def _plant(monkeypatch, slip: str) -> None:
    SLIPS[slip].plant(monkeypatch.setattr)


def _forward_slip() -> str:
    return f"conv forward, {_first_conv_path()}: chunks after the first uncounted"


def _stage1_conv_mults() -> int:
    return formulas.conv_mults(16, 16, (3, 3), 32, 32)


def test_reports_measure_at_32_and_1_and_say_so_in_their_header():
    model = models.get_model("resnet20")
    prof = measure.profile(model)
    assert prof.input_shape == (32, 3, 32, 32) and prof.batches == (32, 1)
    assert prof.row("layer1.0.conv1").mults == _stage1_conv_mults()  # per image, from the closed form
    assert prof.table().splitlines()[0].endswith("measured at batch 32 and at batch 1, the same per image")
    assert measure.profile(model, ONE).table().splitlines()[0].endswith("measured at batch 1 only")

    s = mb.summary(model)
    assert s.batches == (32, 1) and "measured at batch 32 and at batch 1" in s.table().splitlines()[0]
    assert s.totals == mb.summary(model, ONE).totals  # per image: the same numbers as one image gives
    _, report = mb.compress(model, energy_threshold=0.9)
    assert report.batches == (32, 1) and "measured at batch 32 and at batch 1" in report.table().splitlines()[0]
    _, alone = mb.compress(model, energy_threshold=0.9, input_shape=ONE)
    assert (report.conv_mults_before, report.conv_mults_after) == (alone.conv_mults_before, alone.conv_mults_after)
    assert report.to_dict()["batches"] == [32, 1] and alone.to_dict()["batches"] == [1]


def test_a_chunk_slip_passes_at_batch_1_and_is_refused_at_the_default_batch(monkeypatch):
    model = models.get_model("resnet20")
    _plant(monkeypatch, _forward_slip())
    alone = measure.profile(model, ONE)  # one image is one chunk: the slip does not show
    assert alone.row("layer1.0.conv1").mults == _stage1_conv_mults()
    assert alone.totals["model_conv_mults"] == alone.totals["formula_mults"]

    with pytest.raises(BatchCountError) as caught:
        measure.profile(model)
    error = caught.value
    assert error.phase == "forward" and error.batches == (32, 1)
    at_batch, at_one = error.per_image
    assert at_one == alone.row(error.layer).formula_mults and at_batch < at_one  # the first conv the slip hits
    assert f"of {error.layer} are not per image" in str(error)
    assert f"{int(at_batch):,} per image at batch 32, {at_one:,} at batch 1" in str(error)
    assert isinstance(error, RuntimeError)

    with pytest.raises(BatchCountError):
        mb.summary(model)
    with pytest.raises(BatchCountError):
        mb.compress(model, energy_threshold=0.9)
    mb.compress(model, energy_threshold=0.9, input_shape=ONE)  # batch 1 alone would print the report


def test_a_backward_chunk_slip_is_refused_by_a_backward_profile(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    _plant(monkeypatch, "conv backward, columns: chunks after the first uncounted")
    measure.profile(model, ONE, backward=True)
    measure.profile(model, backward=False)  # the slip is in the backward loop only
    with pytest.raises(BatchCountError) as caught:
        measure.profile(model, backward=True)
    assert caught.value.phase == "backward" and caught.value.layer in ("0", "2")


def test_count_verb_refuses_in_one_line(monkeypatch, capsys):
    _plant(monkeypatch, _forward_slip())
    assert main(["count", "resnet20", "--batch", "1"]) == 0
    capsys.readouterr()
    assert main(["count", "resnet20"]) == 1  # the default --batch, 32
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not per image" in err and "batch 32" in err
