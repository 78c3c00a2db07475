"""Command-line errors a user can make: exit code 2 and one line on stderr, never a traceback."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minibasis.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]


def _fails_with_one_line(capsys, argv, *fragments):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"minibasis {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_unknown_model(capsys, tmp_path):
    for verb in ("sweep", "finetune", "compress"):
        _fails_with_one_line(capsys, [verb, "--model", "no_such_net", "--checkpoint", "none", "--dataset", "synthetic",
                                      "--output", str(tmp_path / verb)], "unknown model 'no_such_net'", "resnet_cifar")
    _fails_with_one_line(capsys, ["train", "--model", "no_such_net", "--output", str(tmp_path / "t")],
                         "unknown model 'no_such_net'")


def test_missing_data_folder(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    err = _fails_with_one_line(capsys, ["train", "--data", str(missing), "--epochs", "1", "--output", str(tmp_path / "t")],
                               "data folder", "does not exist")
    assert str(missing) in err
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails_with_one_line(capsys, ["sweep", "--depth", "20", "--checkpoint", "none", "--data", str(empty),
                                  "--output", str(tmp_path / "s")], "cifar10 files not found")
    assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()  # nothing written on failure


def test_checkpoint_for_another_architecture(capsys, tmp_path):
    from minibasis import io
    from minibasis.models import table3_cnn

    path = tmp_path / "table3.npz"
    io.save(table3_cnn(), path)
    _fails_with_one_line(capsys, ["sweep", "--model", "resnet_cifar", "--depth", "20", "--checkpoint", str(path),
                                  "--dataset", "synthetic", "--output", str(tmp_path / "s")],
                         "does not fit resnet_cifar (depth=20)", str(path))


def test_pretrained_checkpoint_for_another_depth(capsys, tmp_path, akamaster_dir):
    resnet20 = next(akamaster_dir.glob("resnet20-*.th"))
    _fails_with_one_line(capsys, ["finetune", "--depth", "56", "--checkpoint", str(resnet20), "--dataset", "synthetic",
                                  "--output", str(tmp_path / "f")], "--depth 56 was given", "depth 20", "pass --depth 20")


def test_unreadable_checkpoint(capsys, tmp_path):
    path = tmp_path / "broken.th"
    path.write_bytes(b"not a checkpoint at all")
    _fails_with_one_line(capsys, ["compress", "--depth", "20", "--checkpoint", str(path), "--output", str(tmp_path / "c")],
                         "cannot read the model file")
    _fails_with_one_line(capsys, ["compress", "--depth", "20", "--checkpoint", str(tmp_path / "absent.th"),
                                  "--output", str(tmp_path / "c")], "does not exist")


def test_bad_options(capsys, tmp_path):
    _fails_with_one_line(capsys, ["demo", "--thresholds", "1.0,1.5", "--output", str(tmp_path / "d")], "--thresholds")
    _fails_with_one_line(capsys, ["demo", "--epochs", "0", "--output", str(tmp_path / "d")], "--epochs must be a positive integer, got 0")
    _fails_with_one_line(capsys, ["train", "--batch-size", "0", "--output", str(tmp_path / "t")], "--batch-size")
    _fails_with_one_line(capsys, ["train", "--resume"], "--resume needs --output")
    _fails_with_one_line(capsys, ["train", "--resume", "--output", str(tmp_path / "never_ran")], "no config.json")


def _tiny_training_run(capsys, out):
    """Train for one epoch on 32 synthetic images into ``out``; the command line it used."""
    argv = ["train", "--dataset", "synthetic", "--train-subset", "32", "--limit", "16", "--epochs", "1",
            "--batch-size", "16", "--output", str(out), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    return argv


def test_resume_with_other_settings_is_refused(capsys, tmp_path):
    changed = _tiny_training_run(capsys, tmp_path / "run")
    changed[changed.index("--train-subset") + 1] = "48"
    _fails_with_one_line(capsys, changed + ["--resume"], "other settings", "train-subset")


def test_resume_from_a_truncated_checkpoint_is_refused(capsys, tmp_path):
    argv = _tiny_training_run(capsys, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-train.npz"
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    _fails_with_one_line(capsys, argv + ["--resume"], f"checkpoint {checkpoint} is not readable")


def test_training_that_diverges_stops_with_one_line(capsys, tmp_path):
    out = tmp_path / "run"
    _fails_with_one_line(capsys, ["train", "--dataset", "synthetic", "--train-subset", "64", "--limit", "16",
                                  "--epochs", "3", "--lr", "1e6", "--batch-size", "32", "--output", str(out), "--quiet"],
                         "non-finite training at step", "loss = ", "module '")
    assert "stopped: non-finite training" in (out / "log.txt").read_text()


def test_missing_cupy_or_gpu_is_one_line(capsys, tmp_path):
    try:
        import cupy  # noqa: F401
        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("CuPy and a GPU are available here")
    except Exception:
        pass
    _fails_with_one_line(capsys, ["demo", "--device", "cupy", "--output", str(tmp_path / "d")], "--device cupy")


def test_real_exit_code_and_stderr_from_a_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "minibasis", "sweep", "--model", "no_such_net", "--checkpoint",
                           "none", "--output", str(tmp_path / "s")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "Traceback" not in proc.stderr and "unknown model" in proc.stderr


def test_plots_are_written_atomically_and_skip_cleanly(tmp_path, monkeypatch):
    from minibasis.experiments import plots

    rows = [{"model": "m", "threshold": t, "retained_filters_pct": 100 * t, "mult_ratio_measured": t,
             "test_acc": t / 2} for t in (1.0, 0.9, 0.8)]
    pytest.importorskip("matplotlib")
    path = plots.plot_retained_filters(tmp_path / "r.png", rows)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]  # no temporary file left behind
    # Without matplotlib: no file, no exception, and a message to print.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plots.plot_accuracy_vs_retained(tmp_path / "a.png", rows) is None
    assert not (tmp_path / "a.png").exists()
    assert "pip install" in plots.MISSING_MESSAGE


def test_every_verb_takes_the_common_options():
    from minibasis.cli import _available_verbs, build_parser

    parser = build_parser(_available_verbs())
    for verb in ("demo", "sweep", "finetune", "train", "compress"):
        args = parser.parse_args([verb, "--device", "numpy", "--seed", "3", "--batch-size", "7", "--output", "x"])
        assert (args.device, args.seed, args.batch_size, str(args.output)) == ("numpy", 3, 7, "x")
    assert np.isclose(parser.parse_args(["finetune"]).lr2, 5e-4)
    defaults = parser.parse_args(["finetune"])
    assert (defaults.epochs1, defaults.lr1, defaults.lr1_step, defaults.epochs2) == (15, 0.1, 5, 10)
    assert parser.parse_args(["train"]).epochs == 40
    sweep = parser.parse_args(["sweep"])
    # --model/--depth default to None (the model file decides); the verb's own defaults apply without one.
    assert (sweep.model, sweep.depth) == (None, None)
    assert (sweep._model_defaults["model"], sweep._model_defaults["depth"], str(sweep.thresholds)) == (
        "resnet_cifar", 56, "1,0.99,0.95,0.9,0.85,0.8,0.75,0.7")


def test_first_line_of_an_exception_with_an_empty_message_is_its_type():
    from minibasis.cli import first_line

    assert first_line(ValueError("bad shape (3,)\nmore detail")) == "bad shape (3,)"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("   ")) == "RuntimeError"
