"""minibasis.training as a library: a Trainer with a run folder given as a path, library
exceptions (CheckpointError, NonFiniteError), and a guard that reads the loss only every few steps."""
import math

import numpy as np
import pytest

import minibasis as mb
from minibasis import data, io, nn, optim
from minibasis.training import CheckpointError, NonFiniteError, Trainer, load_checkpoint


def _setup(images, labels, **kwargs):
    mb.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    loader = data.DataLoader((images, labels), batch_size=8, shuffle=False, seed=0)
    return model, Trainer(model, optim.SGD(model.parameters(), lr=0.1), loader, progress=False, **kwargs)


def test_trainer_with_a_folder_path_checkpoints_and_resumes(tmp_path):
    x = np.random.default_rng(0).random((16, 3, 6, 6), dtype=np.float32)
    y = np.arange(16) % 3
    _, trainer = _setup(x, y, epochs=2, folder=tmp_path / "run")
    trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoint-train.npz")["meta"]["epoch"] == 2
    assert (tmp_path / "run" / "metrics-train.csv").is_file()
    _, again = _setup(x, y, epochs=2, folder=tmp_path / "run")
    assert again.restore() and again.epoch == 2


def test_foreign_or_missing_checkpoints_raise_checkpoint_error(tmp_path):
    io.save({"format": "something else"}, tmp_path / "x.npz")
    with pytest.raises(CheckpointError, match="not a minibasis training checkpoint"):
        load_checkpoint(tmp_path / "x.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.npz")
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("sync_every", [1, 3])
def test_guard_names_the_first_non_finite_step_when_reading_every_few_steps(sync_every):
    x = np.random.default_rng(1).random((48, 3, 6, 6), dtype=np.float32)
    y = np.arange(48) % 3
    x[33, 0, 1, 1] = np.nan                   # batch 5 (of 8): step 5 goes non-finite
    _, trainer = _setup(x, y, epochs=1, sync_every=sync_every)
    with pytest.raises(NonFiniteError) as info:
        trainer.fit()
    assert info.value.step == 5 and math.isnan(info.value.loss)
    assert info.value.module == "0"           # the conv is the first module whose output is NaN
    assert not isinstance(info.value, ValueError)


def test_trainer_refuses_a_negative_epoch_count():
    x = np.zeros((8, 3, 6, 6), np.float32)
    with pytest.raises(ValueError, match="epochs"):
        _setup(x, np.zeros(8, np.int64), epochs=-1)
