"""Training as a library: the epoch loop, the paper's fine-tuning, evaluation, checkpoints.

* :class:`Trainer` — epochs with evaluation, optional run folder, checkpoints, exact resume,
  the non-finite guard (:class:`NonFiniteError`, :class:`AnomalyDetector` on forward hooks);
* :func:`fine_tune` — the paper's two steps; :func:`recalibrate_batch_norm`;
* :func:`evaluate` — top-1 accuracy and loss on host arrays (:class:`EvalResult`);
* :func:`load_run` — a run folder's per-epoch history and results (:class:`RunHistory`);
* :func:`save_checkpoint` / :func:`load_checkpoint` (:class:`CheckpointError`), :class:`RunFolder`,
  :func:`write_json` / :func:`write_csv`, :class:`ProgressBar`.

Library exceptions only (``ValueError``, :class:`CheckpointError`, :class:`NonFiniteError`);
nothing here imports ``minibasis.experiments`` or ``minibasis.cli``.
"""
from minibasis.training.checkpoints import (CHECKPOINT_FORMAT, CheckpointError, capture_rng_state, load_checkpoint,
                                            load_state, restore_rng_state, save_checkpoint, seed_device_rng)
from minibasis.training.evaluation import EvalResult, evaluate, eval_metrics, to_device_batch
from minibasis.training.run_folder import RunFolder, read_json, write_csv, write_json
from minibasis.training.finetune import (DEFAULT_BASIS_LR_SCALE, basis_parameters, coefficient_parameters, conv_weight_parameters, fine_tune,
                                         freeze_all_but, learnable_bases, non_conv_parameters, recalibrate_batch_norm)
from minibasis.training.history import RunHistory, load_run
from minibasis.training.guard import AnomalyDetector, NonFiniteError
from minibasis.training.progress import ProgressBar, format_duration
from minibasis.training.distill import Distillation
from minibasis.training.trainer import Trainer, format_row

__all__ = ["Trainer", "fine_tune", "recalibrate_batch_norm", "evaluate", "eval_metrics", "EvalResult", "CheckpointError",
           "NonFiniteError", "AnomalyDetector", "save_checkpoint", "load_checkpoint", "load_state",
           "capture_rng_state", "restore_rng_state", "seed_device_rng", "CHECKPOINT_FORMAT", "RunFolder",
           "write_json", "write_csv", "read_json", "ProgressBar", "format_duration", "format_row",
           "coefficient_parameters", "conv_weight_parameters", "basis_parameters", "learnable_bases", "DEFAULT_BASIS_LR_SCALE",
           "non_conv_parameters", "freeze_all_but",
           "to_device_batch", "RunHistory", "load_run", "Distillation"]
