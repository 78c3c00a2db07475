"""Every model committed under docs/results/ reproduces the test accuracy its run reported.

docs/results.md promises that ``minibasis eval --checkpoint docs/results/<run>/model.npz``
gives each reported figure exactly; this runs that command on every run folder that holds
a final model (``model.npz`` beside ``results.json``) and compares the number of correctly
classified test images with the run's own record. Unfinished runs (a checkpoint, no
model.npz yet) are not collected.
"""
import json
from pathlib import Path

import pytest

from minibasis.cli import main

# The key under which each verb's results.json records the final test accuracy.
FINAL_ACCURACY_KEY = {"train": "test_acc", "finetune": "test_acc_after"}

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
FINISHED = sorted(p.parent for p in RESULTS.glob("*/model.npz") if (p.parent / "results.json").is_file())


def test_the_committed_runs_are_found():
    # the Table 3 pair and the ResNet-20 fine-tuning pair at the paper's budgets, at least:
    # a moved folder must not silently empty this file
    assert {"table3-conv", "table3-basis", "r20-ft-compressed", "r20-ft-baseline"} <= {p.name for p in FINISHED}


@pytest.mark.slow
@pytest.mark.parametrize("run", FINISHED, ids=[p.name for p in FINISHED])
def test_committed_model_reproduces_its_reported_accuracy(run, cifar10_dir, tmp_path):
    reported = json.loads((run / "results.json").read_text())
    verb = json.loads((run / "config.json").read_text())["verb"]
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run / "model.npz"), "--data", str(cifar10_dir.parent),
                 "--output", str(out), "--quiet"]) == 0
    measured = json.loads(out.read_text())
    assert measured["total"] == reported["test_images"] == 10000
    assert measured["correct"] == round(reported[FINAL_ACCURACY_KEY[verb]] * measured["total"])
