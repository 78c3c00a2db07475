"""The epoch loop: evaluation after every epoch, checkpoints, exact resume, the non-finite guard.

* **Run folder optional**: with ``folder`` (a :class:`~minibasis.training.RunFolder` or a path)
  the trainer writes ``checkpoint-<stage>.npz`` (atomically, every epoch), ``metrics-<stage>.json``
  / ``.csv`` and log lines; without one everything stays in memory.
* **Exact resume**: the checkpoint holds the model, the optimizer (momentum buffers), the
  scheduler, the epoch, the data loader's epoch and seed, and every random state a step can
  draw from; a run resumed from the checkpoint of epoch e ends with parameters equal, bit for
  bit, to those of the uninterrupted run.
* **Non-finite guard**: the loss is checked on the host every ``sync_every`` steps; when a
  checked loss is NaN or ±inf, the failing batch is run again under the
  :class:`~minibasis.training.AnomalyDetector` (forward hooks) to name the first module whose
  output went non-finite, and :class:`NonFiniteError` names the step, the loss and that module.
  With ``detect_anomaly=True`` every module's output and gradient is checked every step.
* **Device habits**: one host→device copy per batch; the epoch's loss and hit count are
  summed on the device and read back only when a number is shown (a progress line, a log
  line, a guard check), so on a GPU the host does not wait for the device between steps.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from minibasis import backend
from minibasis import distributed as dist
from minibasis import functions as F
from minibasis.autograd import no_grad
from minibasis.nn import Module
from minibasis.training.checkpoints import (CheckpointError, capture_rng_state, load_checkpoint, load_state,
                                            restore_rng_state, save_checkpoint, seed_device_rng)
from minibasis.training.evaluation import correct_and_loss_sums, to_device_batch
from minibasis.training.run_folder import RunFolder
from minibasis.training.guard import AnomalyDetector, NonFiniteError
from minibasis.training.progress import ProgressBar

__all__ = ["Trainer", "format_row"]


def _default_sync_every() -> int:
    # On NumPy a host read costs nothing, so the guard checks every step (and names the exact
    # step and module); on a device every read waits for the device, so read at log points.
    return 1 if backend.current() == "numpy" else 50


class Trainer:
    """Epoch loop with evaluation, checkpoints, exact resume and the non-finite guard.

    Args:
        model: the network (its ``parameters()`` with ``requires_grad`` are trained by ``optimizer``).
        optimizer: an ``optim`` optimizer over the parameters to train.
        train_loader: a ``data.DataLoader`` yielding batches (x (N, C, H, W) float, y (N,) int), as
            Tensors or arrays.
        epochs: number of epochs of this stage (≥ 0).
        scheduler: optional, stepped once per epoch (``optim.lr_scheduler``: StepLR, MultiStepLR,
            CosineAnnealingLR).
        eval_fn: optional ``eval_fn(model) -> dict`` (e.g. test accuracy), run after every epoch.
        folder: a :class:`RunFolder` or a path (checkpoints, metrics, log); None keeps
            everything in memory.
        stage: name of this stage ("train", "step1", ...): the checkpoint is
            ``checkpoint-<stage>.npz`` and metrics rows carry it.
        seed: seeds the device generator per epoch (dropout).
        detect_anomaly: check every module's output and gradient every step.
        progress: print a progress line while an epoch runs.
        on_epoch_end: optional ``callback(trainer, row)`` after the checkpoint of each epoch is
            written (tests use it to kill a run at a known point).
        extra_meta: JSON-able facts stored in every checkpoint's ``meta`` (e.g. the model's
            architecture and BasisConv layout, so the checkpoint can rebuild the model).
        distillation: optional :class:`~minibasis.training.distill.Distillation`; its loss
            (labels and a frozen teacher's soft targets) replaces ``loss_fn``, and each metrics
            row gets ``teacher_mults``, the teacher's measured multiplications of that epoch
            (counted apart: they never enter a counter active around the training).
        sync_every: read the loss on the host (guard check) every N steps; default 1 on the
            NumPy backend, 50 on a device. With N > 1 the guard still names the first
            non-finite step and its loss exactly; the module is then looked up with the
            parameters of the later steps (use ``detect_anomaly`` for an exact culprit).
    """

    def __init__(self, model: Module, optimizer, train_loader, *, epochs: int, scheduler=None,
                 eval_fn: Callable[[Module], dict] | None = None, folder=None,
                 stage: str = "train", seed: int = 0, detect_anomaly: bool = False, progress: bool = True,
                 on_epoch_end: Callable[["Trainer", dict], None] | None = None,
                 loss_fn: Callable = F.cross_entropy, extra_meta: dict | None = None,
                 sync_every: int | None = None, distillation=None):
        from minibasis.checks import non_negative_int, positive_int

        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.epochs, self.eval_fn = train_loader, non_negative_int("epochs", epochs), eval_fn
        self.folder = folder if folder is None or isinstance(folder, RunFolder) else RunFolder(folder, quiet=True)
        self.stage, self.seed = stage, int(seed)
        self.detect_anomaly, self.progress, self.on_epoch_end = detect_anomaly, progress, on_epoch_end
        self.loss_fn, self.distillation = loss_fn, distillation
        self.extra_meta = dict(extra_meta or {})
        self.sync_every = _default_sync_every() if sync_every is None else positive_int("sync_every", sync_every)
        self.epoch = 0          # completed epochs of this stage
        self.global_step = 0    # optimizer steps of this stage
        self.history: list[dict] = []
        # Under mpirun (minibasis.distributed): one replica per rank, each training on its slice
        # of every global batch, gradients averaged before each step; one process: no-ops.
        self.world = dist.init()
        if self.world.size > 1:
            if not isinstance(self.train_loader, dist.ShardedDataLoader):
                self.train_loader = dist.ShardedDataLoader.from_loader(self.train_loader)
            dist.broadcast_parameters(self.model)

    # -- checkpoints --------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.folder is None else self.folder.file(f"checkpoint-{self.stage}.npz")

    def save(self) -> None:
        if self.checkpoint_path is None or not dist.is_main_process():
            return
        meta = {**self.extra_meta, "stage": self.stage, "epoch": self.epoch, "epochs": self.epochs,
                "global_step": self.global_step, "loader": self.train_loader.state_dict(),
                "rng": capture_rng_state(), "history": self.history}
        save_checkpoint(self.checkpoint_path, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, meta=meta)

    def restore(self) -> bool:
        """Load this stage's checkpoint if there is one; True when something was restored.
        :class:`CheckpointError` when the file does not belong to this run."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        state = load_checkpoint(path)
        meta = state["meta"]
        if meta.get("stage") != self.stage:
            raise CheckpointError(f"{path} belongs to stage {meta.get('stage')!r}, not {self.stage!r}")
        load_state(self.model, state["model"], source=str(path))
        if "optimizer" in state:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise CheckpointError(f"{path}: optimizer state does not fit this run: {exc}") from None
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(meta["loader"])
        restore_rng_state(meta["rng"])
        self.epoch, self.global_step = int(meta["epoch"]), int(meta["global_step"])
        self.history = list(meta.get("history", []))
        return True

    # -- the loop -------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict]:
        """Run the remaining epochs (all of them, or those after the checkpoint with ``resume``)."""
        if resume and self.restore():
            self._log(f"[{self.stage}] resumed from {self.checkpoint_path} after epoch {self.epoch}/{self.epochs}")
        while self.epoch < self.epochs:
            try:
                row = self.train_epoch()
            except NonFiniteError as exc:
                last = f"; the last good state is {self.checkpoint_path}" if self.epoch and self.checkpoint_path else ""
                self._log(f"[{self.stage}] stopped: {exc}{last}")
                raise
            except KeyboardInterrupt:
                last = (f"; the checkpoint {self.checkpoint_path} holds epoch {self.epoch}"
                        if self.epoch and self.checkpoint_path else "; no checkpoint written yet")
                self._log(f"[{self.stage}] interrupted during epoch {self.epoch + 1}/{self.epochs}{last}")
                raise
            if self.eval_fn is not None:
                # A diverging run's evaluation overflows too; the guard reports it (next step) in one line.
                with np.errstate(all="ignore"):
                    row.update(self.eval_fn(self.model))
            self.epoch += 1
            if self.scheduler is not None:
                self.scheduler.step()
            self.history.append(row)
            self.save()
            self._write_metrics()
            self._log(format_row(row))
            if self.on_epoch_end is not None:
                self.on_epoch_end(self, row)
        return self.history

    def train_epoch(self) -> dict:
        """One pass over ``train_loader``; returns the epoch's metrics row."""
        model, epoch = self.model, self.epoch
        model.train()
        # The loader counts its own passes (its epoch is in the checkpoint), so a loader
        # shared by two stages gives the second stage fresh orders.
        seed_device_rng(self.seed, self.stage, epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum, correct, seen = 0, 0, 0   # loss_sum and correct: device scalars until read
        unchecked: list[tuple[int, np.ndarray, object]] = []   # (step, host batch, loss) since the last read
        teacher_mults = None if self.distillation is None else self.distillation.teacher_mults
        start = time.perf_counter()
        bar = ProgressBar(len(self.train_loader.dataset), desc=f"[{self.stage}] epoch {epoch + 1}/{self.epochs}",
                          enabled=self.progress and dist.is_main_process())
        detector = AnomalyDetector(model) if self.detect_anomaly else None
        # NumPy's overflow/invalid warnings would only repeat, less precisely, what the
        # non-finite guard reports (step, loss, module).
        with (detector if detector is not None else contextlib.nullcontext()), np.errstate(all="ignore"):
            for batch in self.train_loader:
                # The loader may yield Tensors (its default) or arrays; the batch is read on the host.
                x_host, y_host = (backend.to_numpy(part) for part in batch)
                x, y = to_device_batch(x_host, y_host)
                if detector is not None:
                    detector.reset()
                logits = model(x)
                loss = self.loss_fn(logits, y) if self.distillation is None else self.distillation(logits, y, x)
                unchecked.append((self.global_step + 1, x_host, loss.data))
                if detector is not None or len(unchecked) >= self.sync_every or bar.due():
                    self._check(unchecked, detector)
                self.optimizer.zero_grad()
                loss.backward()
                if detector is not None:
                    self._check_gradients(detector, float(loss.data))
                if self.world.size > 1:
                    dist.allreduce_gradients(model)
                self.optimizer.step()
                self.global_step += 1
                n = len(y_host)
                hits, _ = correct_and_loss_sums(logits.data, y)
                loss_sum, correct, seen = loss_sum + loss.data.astype(backend.xp.float64) * n, correct + hits, seen + n
                # Every rank takes the same share of each global batch: n × W images per step.
                if bar.due():
                    bar.update(n * self.world.size, loss=float(loss_sum) / seen, acc=int(correct) / seen)
                else:
                    bar.update(n * self.world.size)
            self._check(unchecked, detector)
        total_loss, correct = float(loss_sum), int(correct)
        bar.metrics.update(loss=total_loss / max(seen, 1), acc=correct / max(seen, 1))
        bar.close()
        elapsed = time.perf_counter() - start
        if self.world.size > 1:  # the epoch's figures over every rank's samples (global images/s)
            totals = dist.allreduce_metrics({"loss": total_loss, "correct": correct, "seen": seen})
            total_loss, correct, seen = totals["loss"], int(totals["correct"]), int(totals["seen"])
            elapsed = dist.allreduce_metrics({"elapsed": elapsed}, op="max")["elapsed"]
        row = {"stage": self.stage, "epoch": epoch + 1, "lr": lr, "train_loss": total_loss / max(seen, 1),
               "train_acc": correct / max(seen, 1), "seconds": round(elapsed, 3),
               "images_per_s": round(seen / elapsed, 1) if elapsed > 0 else None}
        if teacher_mults is not None:
            row["teacher_mults"] = self.distillation.teacher_mults - teacher_mults
        return row

    def _check(self, unchecked: list, detector) -> None:
        """Read the losses of the unchecked steps (one host read); raise at the first non-finite."""
        if not unchecked:
            return
        xp = backend.get_array_module(unchecked[0][2])
        losses = backend.to_numpy(xp.stack([xp.asarray(loss).reshape(()) for _, _, loss in unchecked]))
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size == 0:
            unchecked.clear()
            return
        step, x_host, _ = unchecked[int(bad[0])]
        if detector is not None and detector.first_bad_output is not None:
            module = detector.first_bad_output
        else:
            module = self._locate_non_finite_output(x_host)
        raise NonFiniteError(step=step, epoch=self.epoch, loss=float(losses[int(bad[0])]), module=module,
                             where="output" if module is not None else None)

    def _check_gradients(self, detector: AnomalyDetector, loss_value: float) -> None:
        if detector.first_bad_gradient is not None:
            module, where = detector.first_bad_gradient
        else:
            module, where = detector.bad_parameter_gradient(), "parameter gradient"
        if module is not None:
            raise NonFiniteError(step=self.global_step + 1, epoch=self.epoch, loss=loss_value, module=module,
                                 where=where)

    def _locate_non_finite_output(self, x_host) -> str | None:
        """Re-run the failing batch's forward pass under the detector to name the culprit.

        Only reached after a loss went non-finite. BatchNorm would update its running
        statistics a second time on this pass; they are saved and put back.
        """
        saved = {k: v.copy() for k, v in self.model.state_dict().items()}
        try:
            with AnomalyDetector(self.model, check_gradients=False) as detector, no_grad(), np.errstate(all="ignore"):
                x, _ = to_device_batch(x_host, np.zeros(len(x_host), dtype=np.int64))
                self.model(x)
            return detector.first_bad_output
        finally:
            self.model.load_state_dict(saved)

    # -- output ---------------------------------------------------------------
    def _write_metrics(self) -> None:
        if self.folder is None or not dist.is_main_process():
            return
        self.folder.write_json(f"metrics-{self.stage}.json", self.history)
        self.folder.write_csv(f"metrics-{self.stage}.csv", self.history)

    def _log(self, message: str) -> None:
        if not dist.is_main_process():
            return
        if self.folder is not None:
            self.folder.log(message)
        elif self.progress:
            print(message, flush=True)


def format_row(row: dict) -> str:
    """An epoch's metrics row as one log line."""
    parts = [f"[{row['stage']}] epoch {row['epoch']}", f"lr {row['lr']:.3g}",
             f"loss {row['train_loss']:.4f}", f"train acc {100 * row['train_acc']:.2f}%"]
    if "test_acc" in row:
        parts.append(f"test acc {100 * row['test_acc']:.2f}%")
    parts.append(f"{row['seconds']:.1f} s ({row['images_per_s']} img/s)")
    return ", ".join(parts)
