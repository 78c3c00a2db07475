"""Where the shared material lives, and the process's peak memory.

* :func:`shared_dir`: the read-only shared folder (``$MINIBASIS_SHARED``, else
  ``../shared`` beside the repository or the current directory).
* :func:`find_model_file`: a model file's path, a bare file name looked up among the shared
  models (``resnet20-12fca82f.th``) as ``--checkpoint auto`` finds them.

``ProgressBar``, ``evaluate`` and ``format_duration`` moved to :mod:`minibasis.training`
and are re-exported here.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from minibasis.training import EvalResult, ProgressBar, evaluate, format_duration  # noqa: F401

__all__ = ["ProgressBar", "EvalResult", "evaluate", "shared_dir", "find_model_file", "format_duration",
           "peak_memory_mib"]


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
