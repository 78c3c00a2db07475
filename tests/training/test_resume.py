"""Long runs are safe: a run killed with SIGKILL resumes to the same parameters, bit for bit.

(That a writer killed in the middle of a checkpoint never destroys the previous one is
tests/serialization/test_atomic_kill.py's subject: checkpoints are written with ``io.save``.)"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minibasis
from minibasis import io, nn, optim
from minibasis.cli import main
from minibasis.data import DataLoader, ToFloat, synthetic
from minibasis import training as trainer

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs the real command line, but SIGKILLs itself right after the checkpoint of epoch
# $KILL_AFTER_EPOCH has been written (no cleanup, no flush: as if the machine died).
KILLING_DRIVER = """
import os, signal, sys
from minibasis import training as trainer
save = trainer.Trainer.save
def save_then_die(self):
    save(self)
    if self.epoch == int(os.environ["KILL_AFTER_EPOCH"]):
        os.kill(os.getpid(), signal.SIGKILL)
trainer.Trainer.save = save_then_die
from minibasis.cli import main
sys.exit(main(sys.argv[1:]))
"""


#: Engine threads of every run here: the killed subprocess's and the in-process ones alike.
ENGINE_THREADS = 2


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OPENBLAS_NUM_THREADS": "1",
            "MINIBASIS_NUM_THREADS": str(ENGINE_THREADS)}


@pytest.fixture
def threads_as_in_the_subprocess():
    """The in-process runs under the thread settings the killed subprocess gets from _env(), whatever
    earlier tests left behind (the training's bits do not depend on them, tests/test_deterministic_training.py
    checks that; this test is about what a resume restores)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    previous = minibasis.set_num_threads(ENGINE_THREADS)
    try:
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            yield
    finally:
        minibasis.set_num_threads(previous)


def _arrays(path) -> dict:
    return io.load(path)["state_dict"]


@pytest.mark.slow
def test_sigkilled_training_resumes_bit_for_bit(tmp_path, threads_as_in_the_subprocess):
    # Random bases + BatchNorm on the intermediate + augmentation + momentum + a step schedule:
    # every piece of state a resume has to restore.
    args = ["train", "--basis", "random", "--dataset", "synthetic", "--train-subset", "96", "--limit", "16",
            "--epochs", "3", "--lr", "0.05", "--lr-step", "2", "--batch-size", "32", "--seed", "5", "--quiet"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(args + ["--output", str(straight)]) == 0

    proc = subprocess.run([sys.executable, "-c", KILLING_DRIVER, *args, "--output", str(interrupted)],
                          env={**_env(), "KILL_AFTER_EPOCH": "1"}, cwd=tmp_path, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (interrupted / "model.npz").exists()  # it really died mid-run
    assert io.load(interrupted / "checkpoint-train.npz")["meta"]["epoch"] == 1

    assert main(args + ["--output", str(interrupted), "--resume"]) == 0
    a, b = _arrays(straight / "model.npz"), _arrays(interrupted / "model.npz")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    history_a = json.loads((straight / "metrics-train.json").read_text())
    history_b = json.loads((interrupted / "metrics-train.json").read_text())
    assert [r["train_loss"] for r in history_a] == [r["train_loss"] for r in history_b]
    assert "resumed from" in (interrupted / "log.txt").read_text()


def _dropout_run(folder, stop_after=None, resume=False, model_only=False):
    """A run with dropout (device RNG) and an augmentation-free loader; returns final parameters."""
    minibasis.manual_seed(11)
    (x, y), _ = synthetic(num_train=48, num_test=0, image_size=16, seed=2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
                          nn.Linear(4, 10))
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    scheduler = optim.StepLR(optimizer, step_size=1, gamma=0.5)
    loader = DataLoader((x, y), batch_size=16, shuffle=True, seed=4, transform=ToFloat())

    class Stop(Exception):
        pass

    def stop(t, row):
        if t.epoch == stop_after:
            raise Stop

    run = trainer.Trainer(model, optimizer, loader, epochs=4, scheduler=scheduler, folder=trainer.RunFolder(folder),
                          seed=9, progress=False, on_epoch_end=stop)
    if model_only:  # a naive resume: the weights only (no momentum, schedule or random states)
        model.load_state_dict(trainer.load_checkpoint(run.checkpoint_path)["model"])
        run.epoch = 2
        loader.set_epoch(2)
    try:
        run.fit(resume=resume)
    except Stop:
        pass
    # Something unrelated draws from the global generators between the two halves.
    np.random.random(5)
    minibasis.backend.host_rng().random(5)
    return {k: minibasis.to_numpy(v).copy() for k, v in model.state_dict().items()}


def test_resume_restores_dropout_and_optimizer_state(tmp_path, capsys):
    straight = _dropout_run(tmp_path / "a")
    _dropout_run(tmp_path / "b", stop_after=2)
    resumed = _dropout_run(tmp_path / "b", resume=True)
    for key in straight:
        assert np.array_equal(straight[key], resumed[key]), key
    # Restoring the weights alone is not enough (so the comparison above can fail).
    _dropout_run(tmp_path / "c", stop_after=2)
    naive = _dropout_run(tmp_path / "c", model_only=True)
    assert not all(np.array_equal(straight[k], naive[k]) for k in straight)
