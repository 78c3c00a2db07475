"""Former home of the training loop; kept so that ``minibasis.experiments.trainer`` imports work.

The loop, checkpoints, the non-finite guard and evaluation live in :mod:`minibasis.training`;
run folders of the verbs in :mod:`minibasis.experiments.runs`.
"""
from minibasis.experiments.runs import config_from_args, default_output, prepare_run_folder  # noqa: F401
from minibasis.training import (AnomalyDetector, CheckpointError, NonFiniteError, RunFolder, Trainer,  # noqa: F401
                                capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint,
                                to_device_batch, write_csv, write_json)
