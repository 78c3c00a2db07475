"""`minibasis compress|finetune --target-mult-ratio R --allocation uniform|greedy` and `finetune --distill`."""
from __future__ import annotations

import json

import numpy as np
import pytest

import minibasis
from minibasis.autograd import no_grad, tensor
from minibasis.cli import main
from test_cli_guards import _fails   # one line on stderr, exit code 2, every fragment in it

SYNTH = ["--dataset", "synthetic"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model file of the zoo's table3_cnn (seeded initial weights: their spectra are all compress needs)."""
    from minibasis.models import table3_cnn

    minibasis.manual_seed(0)
    path = tmp_path_factory.mktemp("budget") / "table3.npz"
    minibasis.save_model(table3_cnn(), path, normalization="cifar10", dataset="synthetic")
    return path


def _conv_mults(model) -> int:
    model.eval()
    with no_grad(), minibasis.count_mults() as counter:
        model(tensor(np.zeros((1, 3, 32, 32), dtype=np.float32)))
    return counter.conv


@pytest.mark.parametrize("allocation", ["uniform", "greedy", "sensitivity"])
def test_compress_under_a_budget_writes_the_allocation_and_meets_it_measured(trained, tmp_path, allocation):
    out = tmp_path / allocation
    extra = ["--calibration-images", "64"] if allocation == "sensitivity" else []
    assert main(["compress", "--checkpoint", str(trained), "--target-mult-ratio", "0.5", "--allocation", allocation,
                 *extra, "--output", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"] == allocation and report["target_mult_ratio"] == 0.5
    assert report["totals"]["mult_ratio"] <= 0.5
    assert all({"Q", "energy", "mults_after"} <= set(row) for row in report["layers"])
    # Counted again here, on the model file the verb wrote, against the original's.
    original, _ = minibasis.load_model(trained)
    compressed, _ = minibasis.load_model(out / "model.npz")
    assert _conv_mults(compressed) == report["totals"]["conv_mults_after"]
    assert _conv_mults(compressed) / _conv_mults(original) <= 0.5
    assert f"{allocation} allocation" in (out / "log.txt").read_text()


@pytest.mark.parametrize("allocation", ["greedy", "sensitivity"])
@pytest.mark.parametrize("verb", ["compress", "finetune"])
def test_an_unreachable_budget_is_refused_before_any_data_is_read(trained, tmp_path, capsys, verb, allocation):
    out = tmp_path / "run"
    extra = ["--evaluate"] if verb == "compress" else []
    # --data points nowhere: the refusal must come from the budget, which needs no data (the
    # sensitivity allocation's calibration images included).
    _fails(capsys, [verb, "--checkpoint", str(trained), "--target-mult-ratio", "0.001", "--allocation", allocation,
                    *extra, "--data", str(tmp_path / "no_data"), "--output", str(out), "--quiet"],
           "no allocation brings the conv multiplications to 0.001")
    assert not out.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["finetune", "--distill-weight", "0.3"], "--distill-weight applies only with --distill"),
    (["finetune", "--distill", "--distill-weight", "0"], "--distill-weight must be in (0, 1]"),
    (["finetune", "--distill", "--temperature", "-1"], "--temperature must be > 0"),
    (["finetune", "--allocation", "greedy"], "give --target-mult-ratio"),
    (["finetune", "--teacher", "model.npz"], "--teacher applies only with --distill"),
    (["finetune", "--target-mult-ratio", "0.5", "--allocation", "greedy", "--thresholds", "0.9"],
     "--thresholds is the grid of --allocation uniform"),
    (["finetune", "--baseline", "--allocation", "greedy"], "--allocation greedy would be ignored"),
    (["compress", "--allocation", "greedy"], "give --target-mult-ratio"),
    (["compress", "--target-mult-ratio", "0.5", "--calibration-images", "64"], "applies only with --allocation sensitivity"),
    (["finetune", "--target-mult-ratio", "0.5", "--allocation", "greedy", "--calibration-images", "64"],
     "applies only with --allocation sensitivity"),
    (["finetune", "--target-mult-ratio", "0.5", "--allocation", "sensitivity", "--thresholds", "0.9"],
     "sensitivity chooses Q per layer"),
    (["compress", "--threshold", "0.8", "--target-mult-ratio", "0.5"], "not both"),
    (["finetune", "--basis-lr-scale", "0.1"], "--basis-lr-scale applies only with --learn-basis"),
    (["finetune", "--learn-basis", "--basis-lr-scale", "0"], "--basis-lr-scale must be > 0"),
    (["finetune", "--baseline", "--learn-basis"], "--learn-basis would be ignored"),
])
def test_contradicting_budget_options_are_refused(capsys, tmp_path, argv, fragment):
    out = tmp_path / "run"
    _fails(capsys, argv + ["--checkpoint", "none", *SYNTH, "--output", str(out)], fragment)
    assert not out.exists()


def test_finetune_greedy_with_distillation_end_to_end(trained, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(trained), *SYNTH, "--target-mult-ratio", "0.6",
                 "--allocation", "greedy", "--distill", "--temperature", "2", "--train-subset", "32", "--limit", "16",
                 "--epochs1", "1", "--epochs2", "1", "--batch-size", "16", "--output", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["allocation"] == "greedy" and results["distill"] is True
    assert (results["distill_weight"], results["temperature"]) == (0.5, 2.0)
    assert results["compression"]["totals"]["mult_ratio"] <= 0.6
    per_epoch = [row["teacher_mults"] for row in results["history"]]
    assert len(per_epoch) == 2 and per_epoch[0] == per_epoch[1] > 0 and results["teacher_mults"] == sum(per_epoch)
    log = (out / "log.txt").read_text()
    assert "distillation from the original" in log and "greedy allocation" in log


def test_finetune_with_the_sensitivity_allocation_end_to_end(trained, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(trained), *SYNTH, "--target-mult-ratio", "0.6",
                 "--allocation", "sensitivity", "--calibration-images", "24", "--train-subset", "32", "--limit", "16",
                 "--epochs1", "1", "--epochs2", "1", "--batch-size", "16", "--output", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["allocation"] == "sensitivity" and results["compression"]["totals"]["mult_ratio"] <= 0.6
    assert json.loads((out / "config.json").read_text())["calibration_images"] == 24
    assert "over 24 calibration images" in (out / "log.txt").read_text()


def test_a_teacher_file_must_match_the_students_inputs(trained, tmp_path, capsys):
    from minibasis.models import table3_cnn

    other = tmp_path / "imagenet-normalized.npz"
    minibasis.save_model(table3_cnn(), other, normalization="imagenet", dataset="synthetic")
    out = tmp_path / "run"
    _fails(capsys, ["finetune", "--checkpoint", str(trained), *SYNTH, "--threshold", "0.8", "--distill",
                    "--teacher", str(other), "--data", str(tmp_path / "no_data"), "--output", str(out)],
           "expects imagenet input normalization, the student cifar10")
    _fails(capsys, ["finetune", "--checkpoint", str(trained), *SYNTH, "--threshold", "0.8", "--distill",
                    "--teacher", str(tmp_path / "missing.npz"), "--output", str(out)], "does not exist")
    assert not out.exists()
    # A matching file is taken, and recorded.
    assert main(["finetune", "--checkpoint", str(trained), *SYNTH, "--threshold", "0.8", "--distill",
                 "--teacher", str(trained), "--train-subset", "16", "--limit", "16", "--epochs1", "1",
                 "--epochs2", "0", "--batch-size", "16", "--output", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"] == str(trained) and results["history"][0]["teacher_mults"] > 0


def test_finetune_learn_basis_end_to_end(trained, tmp_path):
    """--learn-basis: the bases trained and counted as learnable, the multiplications those of the
    compressed network (measured on the saved model), the rate recorded."""
    common = ["finetune", "--checkpoint", str(trained), *SYNTH, "--target-mult-ratio", "0.6", "--allocation", "greedy",
              "--train-subset", "32", "--limit", "16", "--epochs1", "1", "--epochs2", "1", "--batch-size", "16",
              "--quiet"]
    assert main(common + ["--output", str(tmp_path / "fixed")]) == 0
    assert main(common + ["--learn-basis", "--output", str(tmp_path / "learned")]) == 0
    fixed, learned = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("fixed", "learned"))
    assert (fixed["learn_basis"], fixed["basis_lr_scale"]) == (False, None)
    assert (learned["learn_basis"], learned["basis_lr_scale"]) == (True, 0.03)
    assert learned["compression"] == fixed["compression"]
    bases = [layer for layer in learned["compression"]["layers"] if layer["replaced"]]
    assert bases
    extra = sum(layer["Q"] * layer["D"] for layer in bases)
    assert learned["learnable_params"] == fixed["learnable_params"] + extra
    assert learned["stored_values"] == fixed["stored_values"]
    models = {name: minibasis.load_model(tmp_path / name / "model.npz")[0] for name in ("fixed", "learned")}
    assert _conv_mults(models["learned"]) == _conv_mults(models["fixed"]) > 0
    basis_of = {name: [minibasis.to_numpy(m.basis) for m in model.modules() if isinstance(m, minibasis.nn.BasisConv2d)]
                for name, model in models.items()}
    assert all(not np.array_equal(a, b) for a, b in zip(basis_of["fixed"], basis_of["learned"]))
    assert "bases included, at 0.03 x the rate" in (tmp_path / "learned" / "log.txt").read_text()
