"""``minibasis train`` under ``mpirun -n 2``: rank 0 alone checks and creates the run folder.

Each rank used to check ``--output`` for itself, so rank 1 could find the ``config.json`` that
rank 0 had just written, refuse the folder as "already holds a run" and abort both ranks,
leaving a half folder that blocked the rerun (3 of 9 runs). Here ten runs go into ten fresh
folders and must all succeed; a run into a finished folder must be refused by every rank with
one message, exit status 2 and nothing written. Skipped without an MPI launcher and mpi4py
(``pip install '.[mpi]'``; the ``launcher`` fixture of tests/conftest.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minibasis.distributed.launcher import launcher_env, mpirun_command

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tests" / "distributed" / "mpi_scripts" / "fresh_run_folders.py"
FRESH = 10
RUN_FILES = ("config.json", "log.txt", "checkpoint-train.npz", "metrics-train.json", "model.npz", "results.json")


def _env() -> dict:
    env = launcher_env(threads=1)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MINIBASIS_NUM_THREADS"] = "1"
    return env


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def ten_runs(launcher, tmp_path_factory):
    out = tmp_path_factory.mktemp("mpirun_folders")
    command = mpirun_command(2, [sys.executable, str(SCRIPT), str(out), str(FRESH)], launcher)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(),
                            stdin=subprocess.DEVNULL, cwd=out)
    assert result.returncode == 0, f"mpirun failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, ranks


def test_ten_runs_into_fresh_folders_all_succeed_on_every_rank(ten_runs):
    out, ranks = ten_runs
    for rank, outcomes in enumerate(ranks):
        fresh = outcomes[:FRESH]
        failed = [o for o in fresh if o["code"] != 0]
        assert not failed, f"rank {rank}: {len(failed)} of {FRESH} fresh folders failed: {failed}"
    for i in range(FRESH):
        folder = out / f"fresh-{i}"
        missing = [name for name in RUN_FILES if not (folder / name).is_file()]
        assert not missing, f"{folder.name} lacks {missing}"
        log = (folder / "log.txt").read_text()
        assert log.count("minibasis train:") == 1 and "final test accuracy" in log, log  # rank 0 wrote it, once
        config = json.loads((folder / "config.json").read_text())
        assert "output" not in config and str(folder) not in json.dumps(config), config


def test_a_finished_folder_is_refused_by_every_rank_with_one_message(ten_runs):
    out, ranks = ten_runs
    refused = [outcomes[FRESH] for outcomes in ranks]
    assert [o["code"] for o in refused] == [2, 2], refused
    assert "already holds a run" in refused[0]["stderr"] and refused[1]["stderr"] == "", refused
    assert (out / "fresh-0" / "log.txt").read_text().count("minibasis train:") == 1  # nothing appended


def test_mpirun_into_a_finished_folder_exits_2_and_writes_nothing(launcher, ten_runs):
    out, _ = ten_runs
    finished = out / "fresh-1"
    before = _snapshot(finished)
    argv = ["-m", "minibasis", "train", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "8",
            "--limit", "8", "--quiet", "--output", str(finished)]
    result = subprocess.run(mpirun_command(2, [sys.executable, *argv], launcher), capture_output=True, text=True,
                            timeout=120, env=_env(), stdin=subprocess.DEVNULL, cwd=out)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("already holds a run") == 1, result.stderr   # said once, by rank 0
    assert "MPI_ABORT" not in result.stdout + result.stderr                 # ended, not aborted
    assert _snapshot(finished) == before
