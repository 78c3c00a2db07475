"""Messages a user reads: each names the real problem and, where there is one, the way out."""
import json

import numpy as np
import pytest

import minibasis
from minibasis import models, nn
from minibasis.cli import main

SYNTH = ["--dataset", "synthetic"]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_folder_given_as_checkpoint_is_called_a_folder(tmp_path, capsys):
    err = _error(capsys, ["eval", "--checkpoint", str(tmp_path), *SYNTH, "--output", str(tmp_path / "e.json")])
    assert f"--checkpoint {tmp_path} is a folder" in err and "model.npz" in err and "does not exist" not in err


def test_a_file_given_as_data_is_called_a_file(tmp_path, capsys):
    not_a_folder = tmp_path / "cifar.tar"
    not_a_folder.write_bytes(b"x")
    err = _error(capsys, ["eval", "--checkpoint", "none", "--data", str(not_a_folder),
                          "--output", str(tmp_path / "e.json")])
    assert f"data folder {not_a_folder} is a file, not a folder" in err


def test_train_for_zero_epochs_says_why_there_is_no_plot(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", *SYNTH, "--epochs", "0", "--train-subset", "8", "--limit", "8", "--output", str(out),
                 "--quiet"]) == 0
    log = (out / "log.txt").read_text()
    assert "no epoch was trained" in log and "matplotlib" not in log


def test_device_choices_name_only_the_public_backends(tmp_path, capsys):
    err = _error(capsys, ["eval", "--device", "gpu", "--output", str(tmp_path / "e.json")])
    assert "--device must be numpy or cupy, got 'gpu'" in err and "strict" not in err
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "{numpy,cupy}" in capsys.readouterr().out


def test_ctrl_c_during_training_is_logged_and_names_resume(tmp_path, capsys, monkeypatch):
    from minibasis.training import Trainer

    def interrupted_second_epoch(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self)

    original = Trainer.train_epoch
    monkeypatch.setattr(Trainer, "train_epoch", interrupted_second_epoch)
    out = tmp_path / "t"
    argv = ["train", *SYNTH, "--epochs", "3", "--train-subset", "8", "--limit", "8", "--output", str(out), "--quiet"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().endswith(
        "interrupted; continue with the same command plus --resume")
    assert "interrupted during epoch 2/3; the checkpoint" in (out / "log.txt").read_text()
    assert main(argv + ["--resume"]) == 130   # already resuming: no "plus --resume"
    assert capsys.readouterr().err.strip().endswith("interrupted; continue with the same command")


def test_a_bad_threshold_item_is_named(tmp_path, capsys):
    err = _error(capsys, ["sweep", "--thresholds", "0.9,nan", "--output", str(tmp_path / "s")])
    assert "'nan' is not a number in (0, 1]" in err and "0.9,nan" in err


def test_linear_blames_the_input_width():
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"Linear\(4, 3\) expects input of shape \(N, in_features\) = \(N, 4\), got \(2, 5\)"):
        layer(minibasis.tensor(np.zeros((2, 5), np.float32)))
    from minibasis import functions as F
    with pytest.raises(ValueError, match=r"the input has 5 features .* the weight \(3, 4\) expects 4"):
        F.linear(minibasis.tensor(np.zeros((2, 5), np.float32)), layer.weight)


def test_save_model_into_a_missing_folder_names_the_folder(tmp_path):
    target = tmp_path / "missing" / "model.npz"
    with pytest.raises(FileNotFoundError, match=f"the folder {tmp_path / 'missing'} does not exist") as info:
        minibasis.save_model(models.table3_cnn(), target)
    assert ".tmp" not in str(info.value)


@pytest.mark.parametrize("verb", [["verify", "formulas", "--cases", "1"], ["count", "table3_cnn"]])
def test_an_unwritable_json_report_is_refused_before_the_work(verb, tmp_path, capsys, monkeypatch):
    from minibasis import verify
    from minibasis.experiments import count

    def must_not_run(*args, **kwargs):
        raise AssertionError("the check ran although its report could not be written")

    monkeypatch.setattr(verify, "check_formulas", must_not_run)
    monkeypatch.setattr(count, "count_model", must_not_run)
    err = _error(capsys, [*verb, "--json", str(tmp_path)])
    assert f"--json {tmp_path} is a folder" in err
    err = _error(capsys, [*verb, "--json", str(tmp_path / "no" / "r.json")])
    assert f"its folder {tmp_path / 'no'} does not exist" in err


def test_eval_says_the_model_is_compressed(tmp_path, capsys):
    minibasis.manual_seed(0)
    compressed, report = minibasis.compress(models.resnet_cifar(8), energy_threshold=0.8)
    minibasis.save_model(compressed, tmp_path / "m.npz", normalization="none")
    assert main(["eval", "--checkpoint", str(tmp_path / "m.npz"), *SYNTH, "--limit", "8",
                 "--output", str(tmp_path / "e.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    q = [r.num_basis for r in report.layers if r.replaced]
    assert (f"the model is compressed: {len(q)} of {len(report.layers)} convs are BasisConv2d (Q per layer {q}); "
            f"conv multiplications per 32x32 image: {report.conv_mults_after:,} (measured)") in out


def test_top_level_help_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"minibasis {minibasis.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "BasisConv" in text and "minibasis demo" in text and "``" not in text


def test_compress_at_t1_says_first_that_nothing_was_replaced():
    _, report = minibasis.compress(models.resnet_cifar(8), energy_threshold=1.0)
    assert not report.replaced
    first = report.table().splitlines()[0]
    assert first.startswith(f"nothing replaced: all {len(report.layers)} convs") and "skip_unprofitable=False" in first
    assert "--replace-all" in first
    _, report = minibasis.compress(models.resnet_cifar(8), energy_threshold=1.0, skip_unprofitable=False)
    assert report.table().startswith("compression at energy threshold t = 1.0")


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------
def _figure():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    return Figure()


def test_a_one_epoch_training_plot_draws_labelled_bars():
    from minibasis.experiments import plots

    fig = _figure()
    plots._curves(fig, [{"train_loss": 2.25, "train_acc": 0.5, "test_acc": 0.25}], "training", None)
    loss_ax, acc_ax = fig.axes
    assert len(loss_ax.patches) == 1 and len(acc_ax.patches) == 2
    assert [t.get_text() for t in acc_ax.texts] == ["50.00 %", "25.00 %"]


def test_reference_lines_and_stage_lines_carry_their_labels():
    from minibasis.experiments import plots

    fig = _figure()
    history = [{"stage": "step1", "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.4},
               {"stage": "step2", "train_loss": 0.9, "train_acc": 0.6, "test_acc": 0.5}]
    plots._curves(fig, history, "fine-tuning", {"original": 0.8125, "compressed, before fine-tuning": 0.125})
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "original (81.25 %)" in legend and "compressed, before fine-tuning (12.50 %)" in legend
    assert any(t.get_text() == "step2 →" for t in fig.axes[0].texts)
    fig = _figure()
    plots._accuracy_curves(fig, {"run": [(1, 0.5)]}, {"paper": 0.9}, "t", "epoch", ())
    assert "paper (90.00 %)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_compare_reads_the_conv_mults_of_a_finetune_run():
    from types import SimpleNamespace

    from minibasis.experiments.compare import summary_row

    history = SimpleNamespace(results={"compression": {"totals": {"conv_mults_after": 1234}}}, best_test_acc=None,
                              rows=[], path="run", finished=True, stages=[("step1", 1)], epochs=1,
                              final_test_acc=0.5, seconds=3600)
    assert summary_row("ft", history)["conv_mults"] == 1234
