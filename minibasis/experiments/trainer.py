"""The training loop behind ``minibasis train``, ``finetune`` and ``demo``.

What it gives every run:

* evaluation after every epoch, with a progress line (ETA, images/s);
* a **run folder**: ``config.json``, ``log.txt``, ``metrics.json`` / ``metrics.csv`` (one row
  per epoch), plots, and ``checkpoint-<stage>.npz`` written atomically after every epoch;
* **exact resume**: the checkpoint holds the model, the optimizer (momentum buffers), the
  scheduler, the epoch, the data loader's epoch and seed, and every random state a step can
  draw from (the host initialization generator ``backend.host_rng()``, NumPy's global
  generator, the device generator). With the loader's (seed, epoch)-derived order and
  augmentation, a run resumed from the checkpoint of epoch e ends with parameters equal, bit
  for bit, to those of the uninterrupted run;
* a **non-finite guard**: the loss is checked every step (cheap); when it is NaN or ±inf,
  the batch is run again under the anomaly detector to name the first module whose output
  went non-finite, and :class:`NonFiniteError` names the step, the loss and that module. With
  ``detect_anomaly=True`` every module's output is checked on every forward pass and the
  gradient arriving at every module's output on every backward pass.

The command-line options the verbs share live in :mod:`minibasis.experiments.options`.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io as _stdio
import json
import math
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from minibasis import backend
from minibasis import distributed as dist
from minibasis import functions as F
from minibasis.autograd import Function, Tensor, no_grad, tensor
from minibasis.experiments.errors import UserError, first_line
from minibasis.nn import Module

__all__ = [
    "NonFiniteError", "AnomalyDetector", "Trainer", "RunFolder", "prepare_run_folder", "default_output",
    "capture_rng_state", "restore_rng_state", "save_checkpoint", "load_checkpoint", "checkpoint_read_errors",
    "load_model_state",
    "to_device_batch", "write_json", "write_csv", "forward_taps", "output_shapes",
]


def default_output(verb: str) -> Path:
    """``runs/<verb>-<YYYYmmdd-HHMMSS>`` under the current directory."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{verb}-{stamp}"


def _atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`minibasis.io.atomic_write`."""
    from minibasis.io import atomic_write
    with atomic_write(path, "wb") as f:
        f.write(data)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path: Path, obj) -> None:
    """Pretty JSON, written atomically."""
    _atomic_bytes(Path(path), (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def write_csv(path: Path, rows: list[dict]) -> None:
    """One row per dict (columns: the union of keys, in first-seen order), written atomically."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    _atomic_bytes(Path(path), buffer.getvalue().encode())


def _csv_cell(value):
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=_json_default)
    return value


class RunFolder:
    """A run's folder: ``config.json``, ``log.txt``, metrics, results, plots, checkpoints.

    ``log(message)`` prints and appends a line to ``log.txt`` (appended and flushed line by
    line, so that ``tail -f`` works; every other file is written atomically).
    """

    def __init__(self, path: Path, quiet: bool = False):
        self.path = Path(path)
        self.quiet = quiet
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the output folder {self.path}: {exc.strerror or exc}") from None

    def file(self, name: str) -> Path:
        return self.path / name

    def log(self, message: str) -> None:
        if not dist.is_main_process():  # under mpirun only rank 0 prints and writes
            return
        if not self.quiet:
            print(message, flush=True)
        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{stamp}  {message}\n")

    def write_config(self, config: dict) -> None:
        if not dist.is_main_process():
            return
        write_json(self.path / "config.json", config)

    def read_config(self) -> dict | None:
        return self.read_config_at(self.path)

    @staticmethod
    def read_config_at(folder: Path) -> dict | None:
        """The ``config.json`` of a run folder, or None where there is none."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is not readable JSON: {exc}") from None

    def write_json(self, name: str, obj) -> Path:
        if dist.is_main_process():
            write_json(self.path / name, obj)
        return self.path / name

    def write_csv(self, name: str, rows: list[dict]) -> Path:
        if dist.is_main_process():
            write_csv(self.path / name, rows)
        return self.path / name


def config_from_args(args, verb: str) -> dict:
    """The command line as a JSON-able dict (what ``config.json`` records)."""
    config = {"verb": verb}
    for key, value in sorted(vars(args).items()):
        if key.startswith("_"):
            continue
        config[key] = str(value) if isinstance(value, Path) else value
    return config


# Settings a resumed run may change: where the run lives, how chatty it is, how it is
# evaluated, anomaly checks, and (``train``) the number of epochs, to extend a run: the
# schedule does not depend on it, so the parameters still equal an uninterrupted run's. A
# different device continues the run too, equal to rounding rather than bit for bit.
_RESUME_MAY_DIFFER = frozenset({"resume", "output", "device", "quiet", "verb", "limit", "detect_anomaly", "epochs"})


def check_resume_config(saved: dict | None, current: dict, folder: Path) -> None:
    """A :class:`UserError` when ``--resume`` would continue a run started with other settings."""
    if saved is None:
        raise UserError(f"--resume: {folder} holds no config.json; it is not a run folder of this command")
    if saved.get("verb") != current.get("verb"):
        raise UserError(f"--resume: {folder} is a '{saved.get('verb')}' run, not a '{current.get('verb')}' run")
    differ = [k for k in sorted(set(saved) | set(current))
              if k not in _RESUME_MAY_DIFFER and saved.get(k) != current.get(k)]
    if differ:
        details = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} then, {current.get(k)!r} now" for k in differ[:4])
        raise UserError(f"--resume: the run in {folder} was started with other settings ({details}); "
                        "resume with the same options")


def check_resume(args, verb: str) -> None:
    """With ``--resume``: a :class:`UserError` unless ``--output`` holds a run of ``verb`` with these settings.

    Cheap, and free of side effects, so verbs call it before loading data.
    """
    if not getattr(args, "resume", False):
        return
    if args.output is None:
        raise UserError("--resume needs --output DIR: the folder of the run to continue")
    folder = Path(args.output)
    saved = RunFolder.read_config_at(folder)
    check_resume_config(saved, config_from_args(args, verb), folder)


def prepare_run_folder(args, verb: str) -> RunFolder:
    """Create (or, with ``--resume``, reopen) the run folder and record ``config.json``."""
    check_resume(args, verb)
    if args.output is None:
        args.output = default_output(verb)
    folder = RunFolder(args.output)
    if not getattr(args, "resume", False):
        folder.write_config(config_from_args(args, verb))
    return folder


# ---------------------------------------------------------------------------
# Random states
# ---------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """Every random state a training step may draw from, as a nested dict for ``io.save``.

    The bit-generator states hold 128-bit integers (PCG64); ``io.save`` keeps Python ints of
    any size exactly. On NumPy the device generator (dropout) *is* NumPy's global one;
    CuPy's cannot be read back, which is why :func:`seed_device_rng` re-derives it from
    (seed, stage, epoch) at the start of every epoch on either backend.
    """
    host = backend.host_rng().bit_generator.state
    legacy = np.random.get_state(legacy=False)
    return {"host_init": host, "numpy_global": legacy, "backend": backend.current()}


def restore_rng_state(state: dict) -> None:
    """Undo :func:`capture_rng_state`: put every generator back where it was."""
    backend.host_rng().bit_generator.state = state["host_init"]
    legacy = dict(state["numpy_global"])
    legacy["state"] = {**legacy["state"], "key": np.asarray(legacy["state"]["key"], dtype=np.uint32)}
    np.random.set_state(legacy)


def seed_device_rng(seed: int, stage: str, epoch: int) -> None:
    """Seed the device generator (dropout masks) from (seed, stage, epoch).

    Deriving it per epoch makes device randomness a function of the epoch, on CuPy as on
    NumPy, so a resumed epoch draws exactly the masks the uninterrupted run drew.
    """
    key = (7, zlib.crc32(stage.encode()), int(epoch))
    derived = np.random.SeedSequence(entropy=int(seed), spawn_key=key).generate_state(1)[0]
    backend.xp.random.seed(int(derived))


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
CHECKPOINT_FORMAT = "minibasis-train-checkpoint/1"


def save_checkpoint(path: Path, *, model: Module, optimizer=None, scheduler=None, meta: dict) -> None:
    """Write a training checkpoint atomically with :func:`minibasis.io.save`.

    Layout: ``format``, ``model`` (the ``state_dict``), ``optimizer`` (``Optimizer.state_dict()``:
    hyper-parameters and momentum buffers), ``scheduler`` and ``meta`` (epoch, loader state,
    RNG states, metrics history). Python floats and (128-bit) ints come back exactly.
    """
    from minibasis import io

    state = {"format": CHECKPOINT_FORMAT,
             "model": {k: backend.to_numpy(v) for k, v in model.state_dict().items()},
             "meta": dict(meta)}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    io.save(state, path)


@contextlib.contextmanager
def checkpoint_read_errors(path: Path):
    """Turn a missing (FileNotFoundError) or unreadable (OSError, ValueError) checkpoint at
    ``path``, raised inside the block, into a one-line :class:`UserError` naming the file."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {path} is not readable: {first_line(exc)}") from None


def load_checkpoint(path: Path) -> dict:
    """The dict written by :func:`save_checkpoint`; :class:`UserError` for an unreadable or foreign file."""
    from minibasis import io

    path = Path(path)
    with checkpoint_read_errors(path):
        state = io.load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path} is not a minibasis training checkpoint (format {found!r}, "
                        f"expected {CHECKPOINT_FORMAT!r})")
    return state


# ---------------------------------------------------------------------------
# Non-finite guard
# ---------------------------------------------------------------------------
class NonFiniteError(RuntimeError):
    """Training produced NaN or ±inf: names the step, the loss and the first offending module.

    Attributes: ``step`` (the failing optimizer step, counted from 1 within the stage),
    ``epoch`` (0-based), ``loss`` (float), ``module`` (module
    path or None) and ``where`` (what went non-finite there: "output", "gradient produced by
    backward", "gradient arriving at the output" or "parameter gradient").
    """

    def __init__(self, *, step: int, epoch: int, loss: float, module: str | None, where: str | None):
        self.step, self.epoch, self.loss, self.module, self.where = step, epoch, loss, module, where
        culprit = (f"first non-finite {where} in module '{module}'" if module is not None
                   else "no module output was non-finite (check the loss function and the inputs)")
        super().__init__(f"non-finite training at step {step} (epoch {epoch + 1}): loss = {loss!r}; {culprit}")


def _is_finite(array) -> bool:
    xp = backend.get_array_module(array)
    return bool(xp.isfinite(array).all())


class _GradientProbe(Function):
    """Identity in forward; in backward reports a non-finite gradient passing through it."""

    name = "gradient_probe"

    def __init__(self, detector: "AnomalyDetector", path: str, where: str):
        self.detector, self.path, self.where = detector, path, where

    def forward(self, x):
        return x

    def backward(self, gy):
        if self.detector.first_bad_gradient is None and not _is_finite(gy):
            self.detector.first_bad_gradient = (self.path, self.where)
        return gy


@contextlib.contextmanager
def forward_taps(model: Module, tap: Callable[[str, Module, Any], Any],
                 before: Callable[[str, Module, tuple], tuple] | None = None):
    """Inside the block, every module's output passes through ``tap(path, module, output)``.

    ``tap`` returns the output to use (usually the same object); ``before(path, module,
    args)``, if given, returns the positional arguments to call the module with. Each
    module's ``forward`` is wrapped by an instance attribute that shadows the class method
    (``Module.__call__`` looks ``forward`` up per call) and is removed on exit, so nothing
    changes outside the block.
    """
    wrapped: list[Module] = []

    def wrap(module: Module, path: str) -> None:
        original = module.forward

        def tapped_forward(*args, **kwargs):
            if before is not None:
                args = before(path, module, args)
            return tap(path, module, original(*args, **kwargs))

        object.__setattr__(module, "forward", tapped_forward)
        wrapped.append(module)

    try:
        for path, module in model.named_modules():
            wrap(module, path or type(module).__name__)
        yield
    finally:
        for module in wrapped:
            module.__dict__.pop("forward", None)


def output_shapes(model: Module, input_shape: tuple) -> dict[str, tuple]:
    """Module path → output shape for one forward pass of zeros (eval mode, no graph)."""
    shapes: dict[str, tuple] = {}

    def record(path, module, out):
        if isinstance(out, Tensor):
            shapes.setdefault(path, tuple(out.shape))
        return out

    was_training = model.training
    model.eval()
    try:
        with forward_taps(model, record), no_grad():
            model(tensor(backend.xp.zeros(input_shape, dtype=backend.default_dtype)))
    finally:
        model.train(was_training)
    return shapes


class AnomalyDetector:
    """Find the first module where NaN or ±inf appears, forward or backward.

    A context manager around a model (see :func:`forward_taps`):

    * ``first_bad_output``: the first module, in execution order, whose output is non-finite;
    * ``first_bad_gradient``: ``(module path, where)`` for the first non-finite gradient in
      backward order — "gradient produced by backward" when the module's own backward turned
      a finite gradient at its output into a non-finite one at its input, "gradient arriving
      at the output" when it came from further down the graph (e.g. the loss);
    * :meth:`bad_parameter_gradient`: the first module holding a non-finite parameter
      gradient after ``backward()`` (for a layer whose input needs no gradient).

    Costs one ``isfinite`` reduction per module output and per gradient through a module.
    """

    def __init__(self, model: Module, check_gradients: bool = True):
        self.model = model
        self.check_gradients = check_gradients
        self.first_bad_output: str | None = None
        self.first_bad_gradient: tuple[str, str] | None = None
        self._taps = None

    def reset(self) -> None:
        self.first_bad_output = self.first_bad_gradient = None

    def _inputs(self, path: str, module: Module, args: tuple) -> tuple:
        if not self.check_gradients:
            return args
        return tuple(_GradientProbe(self, path, "gradient produced by backward")(a)
                     if isinstance(a, Tensor) and a.requires_grad else a for a in args)

    def _output(self, path: str, module: Module, out):
        if isinstance(out, Tensor):
            if self.first_bad_output is None and not _is_finite(out.data):
                self.first_bad_output = path
            if self.check_gradients and out.requires_grad:
                out = _GradientProbe(self, path, "gradient arriving at the output")(out)
        return out

    def bad_parameter_gradient(self) -> str | None:
        for path, module in self.model.named_modules():
            for p in module.parameters(recurse=False):
                if p.grad is not None and not _is_finite(p.grad.data):
                    return path or type(module).__name__
        return None

    def __enter__(self) -> "AnomalyDetector":
        self._taps = forward_taps(self.model, self._output, before=self._inputs)
        self._taps.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._taps.__exit__(*exc)
        self._taps = None


# ---------------------------------------------------------------------------
# Batches and evaluation
# ---------------------------------------------------------------------------
def to_device_batch(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Any]:
    """Host batch → (input Tensor float32, labels on the active device)."""
    if x.dtype != backend.default_dtype:
        x = x.astype(backend.default_dtype)
    return tensor(x), backend.asarray(np.asarray(y, dtype=np.int64))


# ---------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------
class Trainer:
    """Epoch loop with evaluation, checkpoints, exact resume and the non-finite guard.

    Args:
        model: the network (its ``parameters()`` with ``requires_grad`` are trained by ``optimizer``).
        optimizer: an ``optim`` optimizer over the parameters to train.
        train_loader: a ``data.DataLoader`` yielding host batches (x (N, C, H, W) float, y (N,) int).
        epochs: number of epochs of this stage.
        scheduler: optional, stepped once per epoch (``StepLR``).
        eval_fn: optional ``eval_fn(model) -> dict`` (e.g. test accuracy), run after every epoch.
        folder: the run folder (checkpoints, metrics, log); None keeps everything in memory.
        stage: name of this stage ("train", "step1", ...): the checkpoint is
            ``checkpoint-<stage>.npz`` and metrics rows carry it.
        seed: seeds the device generator per epoch (dropout).
        detect_anomaly: check every module's output and gradient every step.
        progress: print a progress line while an epoch runs.
        on_epoch_end: optional ``callback(trainer, row)`` after the checkpoint of each epoch is
            written (tests use it to kill a run at a known point).
        extra_meta: JSON-able facts stored in every checkpoint's ``meta`` (e.g. the model's
            architecture and BasisConv layout, so the checkpoint can rebuild the model).
    """

    def __init__(self, model: Module, optimizer, train_loader, *, epochs: int, scheduler=None,
                 eval_fn: Callable[[Module], dict] | None = None, folder: RunFolder | None = None,
                 stage: str = "train", seed: int = 0, detect_anomaly: bool = False, progress: bool = True,
                 on_epoch_end: Callable[["Trainer", dict], None] | None = None,
                 loss_fn: Callable = F.cross_entropy, extra_meta: dict | None = None):
        if epochs < 0:
            raise ValueError(f"epochs must be ≥ 0, got {epochs}")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.epochs, self.eval_fn = train_loader, int(epochs), eval_fn
        self.folder, self.stage, self.seed = folder, stage, int(seed)
        self.detect_anomaly, self.progress, self.on_epoch_end = detect_anomaly, progress, on_epoch_end
        self.loss_fn = loss_fn
        self.extra_meta = dict(extra_meta or {})
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
        meta = {**self.extra_meta, "stage": self.stage, "epoch": self.epoch, "epochs": self.epochs, "global_step": self.global_step,
                "loader": self.train_loader.state_dict(), "rng": capture_rng_state(), "history": self.history}
        save_checkpoint(self.checkpoint_path, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, meta=meta)

    def restore(self) -> bool:
        """Load this stage's checkpoint if there is one; True when something was restored."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        state = load_checkpoint(path)
        meta = state["meta"]
        if meta.get("stage") != self.stage:
            raise UserError(f"{path} belongs to stage {meta.get('stage')!r}, not {self.stage!r}")
        load_model_state(self.model, state["model"], source=str(path))
        if "optimizer" in state:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise UserError(f"{path}: optimizer state does not fit this run: {exc}") from None
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
            if self.eval_fn is not None:
                row.update(self.eval_fn(self.model))
            self.epoch += 1
            if self.scheduler is not None:
                self.scheduler.step()
            self.history.append(row)
            self.save()
            self._write_metrics()
            self._log(_format_row(row))
            if self.on_epoch_end is not None:
                self.on_epoch_end(self, row)
        return self.history

    def train_epoch(self) -> dict:
        """One pass over ``train_loader``; returns the epoch's metrics row."""
        from minibasis.experiments.common import ProgressBar

        model, epoch = self.model, self.epoch
        model.train()
        # The loader counts its own passes (its epoch is in the checkpoint), so a loader
        # shared by two stages gives the second stage fresh orders.
        seed_device_rng(self.seed, self.stage, epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        total_loss, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        bar = ProgressBar(len(self.train_loader.dataset), desc=f"[{self.stage}] epoch {epoch + 1}/{self.epochs}",
                          enabled=self.progress and dist.is_main_process())
        detector = AnomalyDetector(model) if self.detect_anomaly else None
        # NumPy's overflow/invalid warnings would only repeat, less precisely, what the
        # non-finite guard reports (step, loss, module).
        with (detector if detector is not None else contextlib.nullcontext()), np.errstate(all="ignore"):
            for x_host, y_host in self.train_loader:
                x, y = to_device_batch(x_host, y_host)
                if detector is not None:
                    detector.reset()
                logits = model(x)
                loss = self.loss_fn(logits, y)
                loss_value = float(loss.item())
                self._check(loss_value, x_host, detector)
                self.optimizer.zero_grad()
                loss.backward()
                if detector is not None:
                    self._check_gradients(detector, loss_value)
                if self.world.size > 1:
                    dist.allreduce_gradients(model)
                self.optimizer.step()
                self.global_step += 1
                n = len(y_host)
                total_loss += loss_value * n
                correct += int(backend.to_numpy(logits.data.argmax(axis=1) == y).sum())
                seen += n
                # Every rank takes the same share of each global batch: n × W images per step.
                bar.update(n * self.world.size, loss=total_loss / seen, acc=correct / seen)
        bar.close()
        elapsed = time.perf_counter() - start
        if self.world.size > 1:  # the epoch's figures over every rank's samples (global images/s)
            totals = dist.allreduce_metrics({"loss": total_loss, "correct": correct, "seen": seen})
            total_loss, correct, seen = totals["loss"], int(totals["correct"]), int(totals["seen"])
            elapsed = dist.allreduce_metrics({"elapsed": elapsed}, op="max")["elapsed"]
        return {"stage": self.stage, "epoch": epoch + 1, "lr": lr, "train_loss": total_loss / max(seen, 1),
                "train_acc": correct / max(seen, 1), "seconds": round(elapsed, 3),
                "images_per_s": round(seen / elapsed, 1) if elapsed > 0 else None}

    def _check(self, loss_value: float, x_host, detector) -> None:
        if math.isfinite(loss_value):
            return
        if detector is not None and detector.first_bad_output is not None:
            module = detector.first_bad_output
        else:
            module = self._locate_non_finite_output(x_host)
        raise NonFiniteError(step=self.global_step + 1, epoch=self.epoch, loss=loss_value, module=module,
                             where="output" if module is not None else None)

    def _check_gradients(self, detector: "AnomalyDetector", loss_value: float) -> None:
        if detector.first_bad_gradient is not None:
            module, where = detector.first_bad_gradient
        else:
            module, where = detector.bad_parameter_gradient(), "parameter gradient"
        if module is not None:
            raise NonFiniteError(step=self.global_step + 1, epoch=self.epoch, loss=loss_value, module=module,
                                 where=where)

    def _locate_non_finite_output(self, x_host) -> str | None:
        """Re-run the failing batch's forward pass under the detector to name the culprit.

        Only reached after the loss went non-finite, so the default path pays for one
        ``isfinite`` of a scalar per step and nothing else. BatchNorm would update its running
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


def _format_row(row: dict) -> str:
    parts = [f"[{row['stage']}] epoch {row['epoch']}", f"lr {row['lr']:.3g}",
             f"loss {row['train_loss']:.4f}", f"train acc {100 * row['train_acc']:.2f}%"]
    if "test_acc" in row:
        parts.append(f"test acc {100 * row['test_acc']:.2f}%")
    parts.append(f"{row['seconds']:.1f} s ({row['images_per_s']} img/s)")
    return ", ".join(parts)


def load_model_state(model: Module, state: dict, source: str, model_name: str | None = None) -> None:
    """``model.load_state_dict(state)`` with a one-line :class:`UserError` when it does not fit."""
    name = model_name or type(model).__name__
    try:
        model.load_state_dict(state)
    except KeyError as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise UserError(f"{source} does not fit the model {name} (another architecture?): {message}") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"{source} does not fit the model {name} (another architecture?): {exc}") from None


def trainable_parameters(model: Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]
