"""Run folders read back (`minibasis.training.load_run`) and `minibasis compare`: the table holds
what the folders hold, unfinished runs are read from their per-epoch metrics in training order,
and bad input is refused before anything is written."""
import json

import pytest

from minibasis.cli import main
from minibasis.training import load_run, write_json


def _rows(stage, accuracies, seconds=10.0, speed=100.0):
    return [{"stage": stage, "epoch": i + 1, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "seconds": seconds,
             "images_per_s": speed, "test_acc": acc, "test_loss": 1.0} for i, acc in enumerate(accuracies)]


@pytest.fixture
def finished(tmp_path):
    """A finished train run: results.json with its history (40 s, accuracies rising then one dip)."""
    folder = tmp_path / "conv"
    folder.mkdir()
    history = _rows("train", [0.30, 0.50, 0.55, 0.54])
    write_json(folder / "results.json", {"history": history, "learnable_params": 1234, "stored_values": 2345})
    write_json(folder / "config.json", {"verb": "train"})
    return folder


@pytest.fixture
def unfinished(tmp_path):
    """A fine-tuning run cut in step 2: only metrics-step1/2.json, written out of order on disk."""
    folder = tmp_path / "ft"
    folder.mkdir()
    write_json(folder / "metrics-step2.json", _rows("step2", [0.71], seconds=30.0, speed=50.0))
    write_json(folder / "metrics-step1.json", _rows("step1", [0.60, 0.70], seconds=20.0, speed=80.0))
    return folder


def test_load_run_reads_finished_and_unfinished_runs(finished, unfinished):
    done = load_run(finished)
    assert done.finished and done.epochs == 4 and done.stages == (("train", 4),)
    assert done.final_test_acc == 0.54 and done.best_test_acc == (3, 0.55)
    assert done.seconds == pytest.approx(40.0) and done.stage_boundaries() == []
    going = load_run(unfinished)
    assert not going.finished and going.results is None
    assert [(r["stage"], r["epoch"]) for r in going.rows] == [("step1", 1), ("step1", 2), ("step2", 1)]
    assert going.test_curve() == [(1, 0.60), (2, 0.70), (3, 0.71)]
    assert going.stage_boundaries() == [2.5] and going.seconds == pytest.approx(70.0)


def test_best_epoch_is_the_first_on_ties(tmp_path):
    folder = tmp_path / "tie"
    folder.mkdir()
    write_json(folder / "metrics-train.json", _rows("train", [0.4, 0.6, 0.6, 0.5]))
    assert load_run(folder).best_test_acc == (2, 0.6)


@pytest.mark.parametrize("content, fragment", [
    (None, "holds no per-epoch metrics"),
    ({"metrics-train.json": {"not": "a list"}}, "does not hold a list"),
    ({"metrics-train.json": [{"epoch": 1}]}, "needs 'stage' and 'epoch'"),
    ({"metrics-train.json": [{"stage": "train", "epoch": 1, "test_acc": "high"}]}, "non-numeric test_acc"),
])
def test_load_run_refuses_what_is_not_a_run(tmp_path, content, fragment):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name, obj in (content or {}).items():
        write_json(folder / name, obj)
    with pytest.raises(ValueError, match=fragment):
        load_run(folder)
    with pytest.raises(ValueError, match="is not a folder"):
        load_run(tmp_path / "missing")


def test_compare_writes_the_table_and_the_figure(finished, unfinished, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(finished), str(unfinished), "--label", "ConvNet", "--label", "tuned",
                 "--reference", "paper=74", "--reference", "target = 69.5%", "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ConvNet" in printed and "54.00%" in printed and "55.00% (3)" in printed and "71.00%" in printed
    table = json.loads((out / "compare.json").read_text())
    conv, tuned = table["runs"]
    assert (conv["run"], conv["final_test_acc"], conv["best_epoch"], conv["learnable_params"]) == ("ConvNet", 0.54, 3, 1234)
    assert conv["finished"] and not tuned["finished"]
    assert tuned["stages"] == "step1 2 + step2 1" and tuned["hours"] == pytest.approx(70 / 3600, abs=1e-3)
    assert tuned["median_images_per_s"] == 80.0
    assert table["references"] == {"paper": 0.74, "target": pytest.approx(0.695)}
    pytest.importorskip("matplotlib")
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, fragment", [
    (["--label", "only-one"], "1 --label given for 2 run folders"),
    (["--reference", "74"], "expected LABEL=PERCENT"),
    (["--reference", "paper=high"], "is not a number"),
    (["--reference", "paper=0.74x"], "is not a number"),
    (["--reference", "paper=740"], "percentage in [0, 100]"),
])
def test_compare_refuses_bad_options_before_writing(finished, unfinished, tmp_path, capsys, extra, fragment):
    out = tmp_path / "never"
    assert main(["compare", str(finished), str(unfinished), *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()


def test_compare_refuses_a_folder_without_metrics(finished, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(finished), str(empty), "--output", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "holds no per-epoch metrics" in err and str(empty) in err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("draw, kwargs, width", [
    ("_accuracy_curves", dict(curves={"a": [(1, 0.5), (2, 0.6)]}, references={}, xlabel="epoch", boundaries=()), None),
    ("_curves", dict(history=[{"train_loss": 1.0, "train_acc": 0.5}], references=None), (10, 4.2)),
])
def test_a_long_title_is_wrapped_inside_the_figure(draw, kwargs, width):
    """The figures' titles (run names, budgets) are often longer than a line: none is cut off."""
    plots = pytest.importorskip("minibasis.experiments.plots")
    plt = plots.matplotlib_pyplot()
    title = "ResNet-20, two-step fine-tuning at the paper's budget (15 + 10 epochs, 50,000 images), run 3 of 3"
    fig = plt.figure(figsize=width) if width else plt.figure()
    try:
        getattr(plots, draw)(fig, title=title, **kwargs)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        texts = [t for t in fig.findobj(lambda o: hasattr(o, "get_text") and o.get_text().startswith("ResNet-20"))]
        assert texts, "the title was not drawn"
        figure_box = fig.bbox
        for text in texts:
            box = text.get_window_extent(renderer)
            assert box.x0 >= figure_box.x0 and box.x1 <= figure_box.x1, (box, figure_box)
            assert text.get_text().replace("\n", " ") == title
    finally:
        plt.close(fig)
