"""Training checkpoints and the random states that make a resumed run exact.

A checkpoint (``minibasis.serialization.save``, atomic) holds ``format``, ``model`` (the state dict),
``optimizer`` (hyper-parameters and per-parameter state: SGD's momentum buffers, Adam's step
count and moments), ``scheduler`` (settings and epoch) and ``meta`` (epoch, loader state,
every random state a step draws from, metrics history, and what the caller adds, e.g. the
model record). Problems raise :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from minibasis import backend
from minibasis.serialization import CheckpointError  # one error type for unreadable, foreign or unfitting files
from minibasis.nn import Module

__all__ = ["CheckpointError", "CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "load_state",
           "capture_rng_state", "restore_rng_state", "seed_device_rng"]

CHECKPOINT_FORMAT = "minibasis-train-checkpoint/1"


def capture_rng_state() -> dict:
    """Every random state a training step may draw from, as a nested dict for ``serialization.save``.

    The bit-generator states hold 128-bit integers (PCG64); ``serialization.save`` keeps Python ints of
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


def save_checkpoint(path, *, model: Module, optimizer=None, scheduler=None, meta: dict) -> None:
    """Write a training checkpoint atomically with :func:`minibasis.serialization.save`."""
    from minibasis import serialization

    state = {"format": CHECKPOINT_FORMAT,
             "model": {k: backend.to_numpy(v) for k, v in model.state_dict().items()},
             "meta": dict(meta)}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    serialization.save(state, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(path) -> dict:
    """The dict written by :func:`save_checkpoint`; :class:`CheckpointError` for a missing,
    unreadable or foreign file."""
    from minibasis import serialization

    path = Path(path)
    try:
        state = serialization.load(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not readable: {_first_line(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a minibasis training checkpoint (format {found!r}, "
                              f"expected {CHECKPOINT_FORMAT!r})")
    return state


def load_state(model: Module, state: dict, source: str, model_name: str | None = None) -> None:
    """``model.load_state_dict(state)``; :class:`CheckpointError` naming ``source`` when it does not fit."""
    name = model_name or type(model).__name__
    try:
        model.load_state_dict(state)
    except KeyError as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise CheckpointError(f"{source} does not fit the model {name} (another architecture?): {message}") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source} does not fit the model {name} (another architecture?): {exc}") from None
