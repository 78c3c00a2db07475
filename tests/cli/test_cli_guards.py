"""Nothing silently wrong: the model file decides what it can, contradictions and ignored
options are refused before anything is read or written, finished runs are not overwritten,
reports give stored values beside learnable parameters, sweeps keep what they measured."""
import json
from pathlib import Path

import numpy as np
import pytest

import minibasis
from minibasis.cli import main

SYNTH = ["--dataset", "synthetic"]


def _fails(capsys, argv, *fragments):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """model.npz of a one-epoch table3_cnn run of `minibasis train` (normalization cifar10, its default)."""
    out = tmp_path_factory.mktemp("guards") / "train"
    assert main(["train", *SYNTH, "--train-subset", "64", "--limit", "16", "--epochs", "1", "--batch-size", "32",
                 "--output", str(out), "--quiet"]) == 0
    return out / "model.npz"


# ---------------------------------------------------------------------------
# the model file decides
# ---------------------------------------------------------------------------
def test_eval_takes_architecture_and_normalization_from_the_model_file(trained, tmp_path, capsys):
    _, metadata = minibasis.load_model(trained)
    assert metadata.normalization == "cifar10" and metadata.architecture["name"] == "table3_cnn"
    # No --model, no --normalize: both from the file (today: "does not fit the model resnet20").
    assert main(["eval", "--checkpoint", str(trained), *SYNTH, "--limit", "32", "--output", str(tmp_path / "a"),
                 "--quiet"]) == 0
    implied = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert implied["normalize"] == "cifar10" and implied["model"] == "table3_cnn"
    assert main(["eval", "--checkpoint", str(trained), *SYNTH, "--limit", "32", "--normalize", "cifar10",
                 "--output", str(tmp_path / "b"), "--quiet"]) == 0
    explicit = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert implied["correct"] == explicit["correct"]


@pytest.mark.parametrize("option, fragments", [
    (["--normalize", "imagenet"], ["--normalize imagenet", "'cifar10'"]),
    (["--model", "resnet_cifar"], ["--model resnet_cifar was given", "table3_cnn"]),
    (["--num-classes", "100"], ["100", "10"]),
], ids=["normalize", "model", "num-classes"])
def test_an_option_that_contradicts_the_model_file_is_refused(trained, tmp_path, capsys, option, fragments):
    out = tmp_path / "e"
    _fails(capsys, ["eval", "--checkpoint", str(trained), *SYNTH, "--limit", "8", *option, "--output", str(out)],
           *fragments)
    assert not out.exists()


def test_akamaster_checkpoint_of_another_depth_suggests_the_right_depth(capsys, tmp_path, akamaster_dir):
    resnet20 = next(akamaster_dir.glob("resnet20-*.th"))
    _fails(capsys, ["compress", "--depth", "56", "--checkpoint", str(resnet20), "--output", str(tmp_path / "c")],
           "--depth 56", "pass --depth 20")
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------
# contradictions and ignored options
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["compress", "--model", "resnet56", "--depth", "20", "--checkpoint", "none"], "--model resnet56 is depth 56"),
    (["compress", "--model", "table3_cnn", "--depth", "20", "--checkpoint", "none"], "--depth does not apply"),
    (["compress", "--limit", "10", "--checkpoint", "none"], "--limit applies only with --evaluate"),
    (["compress", "--threshold", "0.8", "--num-basis", "3", "--checkpoint", "none"], "not both"),
    (["finetune", "--baseline", "--threshold", "0.8", "--checkpoint", "none"], "--threshold would be ignored"),
    (["finetune", "--threshold", "0.8", "--target-mult-ratio", "0.5", "--checkpoint", "none"], "not both"),
    (["finetune", "--thresholds", "0.9,0.8", "--checkpoint", "none"], "--thresholds is the grid"),
    (["finetune", "--threshold", "1.5", "--checkpoint", "none"], "--threshold must be in (0, 1]"),
    (["train", "--num-basis", "4"], "--num-basis applies only with --basis random"),
    (["train", "--basis", "random", "--num-basis", "4", "--basis-fraction", "0.5"], "not both"),
    (["train", "--resume", "--overwrite", "--output", "x"], "not both"),
], ids=lambda value: "-".join(value)[:40].replace(" ", "_") if isinstance(value, list) else "")
def test_contradicting_or_ignored_options_are_refused_and_leave_nothing(capsys, tmp_path, argv, fragment):
    out = tmp_path / "run"
    args = argv if "--output" in argv else argv + ["--output", str(out)]
    _fails(capsys, args + SYNTH, fragment)
    assert not out.exists() and not Path("x").exists()


def test_unreachable_target_is_refused_before_any_data_is_read(trained, tmp_path, capsys):
    out = tmp_path / "f"
    # --data points nowhere: the refusal must come from the threshold search, which needs no data.
    _fails(capsys, ["finetune", "--checkpoint", str(trained), "--target-mult-ratio", "0.001", "--thresholds", "1.0",
                    "--data", str(tmp_path / "no_data"), "--output", str(out), "--quiet"], "no threshold in [1.0]")
    assert not out.exists()


# ---------------------------------------------------------------------------
# run folders
# ---------------------------------------------------------------------------
def test_a_finished_run_is_not_overwritten_without_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["compress", "--checkpoint", str(trained), "--threshold", "0.9", "--output", str(out), "--quiet"]
    assert main(argv) == 0
    before = (out / "report.json").read_bytes()
    _fails(capsys, argv, "already holds a run", "--overwrite")
    assert (out / "report.json").read_bytes() == before
    (out / "stale.png").write_bytes(b"old plot")
    assert main(argv + ["--overwrite"]) == 0
    assert not (out / "stale.png").exists() and (out / "report.json").is_file()
    assert len((out / "log.txt").read_text().splitlines()) == len(
        [line for line in (out / "log.txt").read_text().splitlines()])  # one run's log, not two appended
    assert (out / "log.txt").read_text().count("minibasis compress:") == 1


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["train", *SYNTH, "--train-subset", "32", "--limit", "16", "--epochs", "1", "--batch-size", "16",
            "--output", str(out), "--quiet"]
    assert main(argv) == 0
    (out / "checkpoint-train.npz").unlink()   # as if killed before the first epoch ended
    assert main(argv + ["--resume"]) == 0
    assert "holds no checkpoint yet; starting from the first epoch" in (out / "log.txt").read_text()


def test_config_records_argv_version_and_commit(trained, tmp_path):
    out = tmp_path / "e"
    argv = ["eval", "--checkpoint", str(trained), *SYNTH, "--limit", "8", "--output", str(out), "--quiet"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    # the command line less the run folder's own path: the folder may move (it is where config.json is)
    assert config["argv"] == [a for a in argv if a not in ("--output", str(out))] and "output" not in config
    assert config["minibasis_version"] == minibasis.__version__
    assert "git_commit" in config
    if (Path(minibasis.__file__).resolve().parents[1] / ".git").exists():
        assert config["git_commit"] and len(config["git_commit"]) == 40
    assert (out / "log.txt").is_file() and (out / "eval.json").is_file()


# ---------------------------------------------------------------------------
# stored values beside learnable parameters
# ---------------------------------------------------------------------------
def test_reports_give_stored_values_beside_learnable_parameters(trained, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compress", "--checkpoint", str(trained), "--threshold", "0.8", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stored values" in printed and "learnable parameters" in printed
    report = json.loads((out / "report.json").read_text())
    compressed, _ = minibasis.load_model(out / "model.npz")
    assert report["totals"]["stored_after"] == sum(v.size for v in compressed.state_dict().values())
    assert report["totals"]["params_after"] == sum(p.numel() for p in compressed.parameters())
    assert report["totals"]["stored_after"] > report["totals"]["params_after"]   # the bases are stored, not learned


# ---------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------
def test_sweep_labels_progress_writes_rows_as_measured_and_resumes(trained, tmp_path, capsys, monkeypatch):
    import minibasis.experiments.sweep as sweep_verb

    out = tmp_path / "s"
    argv = ["sweep", "--checkpoint", str(trained), *SYNTH, "--limit", "16", "--thresholds", "1.0,0.9,0.7",
            "--output", str(out)]
    calls, interrupt = [], [True]
    real = sweep_verb.evaluate

    def interrupted(model, *args, desc="", **kwargs):
        calls.append(desc.strip())
        if "(3/3)" in desc and interrupt.pop():   # Ctrl-C while the third threshold is evaluated
            raise KeyboardInterrupt
        return real(model, *args, desc=desc, **kwargs)

    monkeypatch.setattr(sweep_verb, "evaluate", interrupted)
    assert main(argv) == 130
    # t = 1.0 keeps every conv (Q/M + Q/D >= 1): its accuracy is the original's, not evaluated again.
    assert calls == ["original", "t=0.9 (2/3)", "t=0.7 (3/3)"]
    saved = json.loads((out / "sweep.json").read_text())
    assert [r["threshold"] for r in saved["thresholds"]] == [1.0, 0.9] and saved["complete"] is False
    assert saved["thresholds"][0]["test_acc_reused_from_original"] is True
    assert saved["thresholds"][0]["test_acc"] == saved["test_acc_original"]
    assert "stored" in (out / "sweep.csv").read_text().splitlines()[0].split(",")
    assert "sweep ETA" in (out / "log.txt").read_text()

    calls.clear()
    interrupt.append(False)
    assert main(argv + ["--resume"]) == 0
    assert calls == ["t=0.7 (3/3)"]          # only what was missing; the original's accuracy kept
    done = json.loads((out / "sweep.json").read_text())
    assert [r["threshold"] for r in done["thresholds"]] == [1.0, 0.9, 0.7] and done["complete"] is True
    assert done["thresholds"][:2] == saved["thresholds"]
