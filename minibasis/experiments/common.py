"""What the verbs share beyond their options: where the shared material lives, how a model is
named and saved, notes on stderr, and the process's peak memory.

* :func:`shared_dir`: the read-only shared folder (``$MINIBASIS_SHARED``, else
  ``../shared`` beside the repository or the current directory), its ``data`` folder and its
  pretrained akamaster ResNets.
* :func:`find_model_file`: a model file's path, a bare file name looked up among the shared
  models (``resnet20-12fca82f.th``) as ``--checkpoint auto`` finds them.
"""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

from minibasis.experiments.errors import UserError

__all__ = ["shared_dir", "default_data_dir", "pretrained_dir", "pretrained_checkpoint", "find_model_file", "data_note",
           "note", "save_model_file", "peak_memory_mib"]

#: Said once whenever a verb evaluates on the shared CIFAR-10 (docs/models.md has the details).
SHARED_CIFAR10_NOTE = ("note: the shared CIFAR-10 images are JPEG re-encodings of the originals; PyTorch gets "
                       "81.03 % with the shared ResNet-20 weights on them, 91.73 % on the original pixels")


def shared_dir() -> Path:
    """The shared material: ``$MINIBASIS_SHARED``, else the first existing of ``<repo>/../shared``,
    ``./shared`` and ``../shared`` (the repository-relative one returned when none exists)."""
    env = os.environ.get("MINIBASIS_SHARED")
    if env:
        return Path(env)
    repo_sibling = Path(__file__).resolve().parents[2].parent / "shared"
    for candidate in (repo_sibling, Path.cwd() / "shared", Path.cwd().parent / "shared"):
        if candidate.is_dir():
            return candidate
    return repo_sibling


def find_model_file(name) -> Path:
    """``name`` as a path; where no such file exists and ``name`` is a bare file name (no
    folder), the first ``<shared>/models/*/<name>``, so ``resnet20-12fca82f.th`` names the shared
    pretrained file as ``--checkpoint auto`` finds it. Existence is the caller's to check."""
    path = Path(name)
    if path.is_file() or path.name != str(name):
        return path
    matches = sorted((shared_dir() / "models").glob(f"*/{path.name}"))
    return matches[0] if matches else path


def peak_memory_mib() -> float | None:
    """This process's peak resident memory in MiB (Linux/macOS), or None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return peak / (2 ** 20 if sys.platform == "darwin" else 1024)


def default_data_dir() -> Path:
    """``<shared>/data``."""
    return shared_dir() / "data"


def pretrained_dir() -> Path:
    """``<shared>/models/akamaster``: akamaster's pretrained CIFAR ResNets."""
    return shared_dir() / "models" / "akamaster"


def pretrained_checkpoint(model: str, depth: int | None) -> Path | None:
    """The shared akamaster checkpoint for ``resnet_cifar`` of ``depth`` (``resnet<depth>-*.th``), if present."""
    name = model if depth is None or model != "resnet_cifar" else f"resnet{depth}"
    matches = sorted(glob.glob(str(pretrained_dir() / f"{name}-*.th")))
    return Path(matches[0]) if matches else None


def data_note(dataset: str, root) -> str | None:
    """:data:`SHARED_CIFAR10_NOTE` when ``dataset`` is read from the shared data folder, else None."""
    if dataset != "cifar10":
        return None
    try:
        shared = Path(root).resolve() == default_data_dir().resolve()
    except OSError:
        return None
    return SHARED_CIFAR10_NOTE if shared else None


def note(message: str) -> None:
    """A ``note: ...`` line on stderr (beside the results, never instead of them)."""
    print(f"note: {message}", file=sys.stderr)


def save_model_file(path: Path, model, normalize: str, dataset: str | None) -> None:
    """:func:`minibasis.save_model` with the normalization and dataset the model was used with."""
    from minibasis.experiments import runs
    from minibasis.model_files import save_model
    try:
        save_model(model, path, normalization=normalize, dataset=dataset)
    except OSError as exc:
        if exc.errno in runs.WRITE_ERRNOS:
            raise  # no room: the command line names the run's last complete checkpoint
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
