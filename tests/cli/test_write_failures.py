"""A run that cannot write (a full disk, a quota, a file-size limit) ends in one line.

The line names the file and where the run's last complete checkpoint is; the exit status is
74 (README, "Exit status"); the line is appended to the run's ``log.txt``; no temporary file
stays behind and the checkpoint already there still loads. The runs happen in a subprocess
under ``RLIMIT_FSIZE`` (a write past the limit fails with EFBIG, "File too large", once
SIGXFSZ is ignored, as it would for ENOSPC on a full disk); the limit lets ``config.json``
and ``log.txt`` through and stops the ~1 MB checkpoint of the Table 3 network.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

resource = pytest.importorskip("resource")  # POSIX only

REPO_ROOT = Path(__file__).resolve().parents[2]
LIMIT_BYTES = 200_000
TRAIN = ["train", "--dataset", "synthetic", "--train-subset", "8", "--limit", "8", "--batch-size", "8", "--quiet"]

# Ignore SIGXFSZ (else the first write past the limit kills the process), set the limit, run
# the command line as ``python -m minibasis`` would.
LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["minibasis", *sys.argv[2:]]
runpy.run_module("minibasis", run_name="__main__")
"""


def _minibasis(*argv: str, limit: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", MINIBASIS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    program = ["-m", "minibasis"] if limit is None else ["-c", LIMITED, str(limit)]
    return subprocess.run([sys.executable, *program, *argv], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("epochs, unwritten", [("1", "checkpoint-train.npz"), ("0", "model.npz")])
def test_no_room_before_any_checkpoint_ends_in_one_line(tmp_path, epochs, unwritten):
    out = tmp_path / "run"
    result = _minibasis(*TRAIN, "--epochs", epochs, "--output", str(out), limit=LIMIT_BYTES)
    expected = (f"minibasis train: error: cannot write {out / unwritten}: "
                f"{os.strerror(errno.EFBIG)}; no checkpoint was completed")
    assert result.returncode == 74, result.stdout + result.stderr
    assert _error_lines(result) == [expected], result.stderr            # one line, no traceback
    assert expected.split("error: ", 1)[1] in (out / "log.txt").read_text()
    assert _temporaries(out) == [] and not (out / unwritten).exists()
    assert not list(out.glob("checkpoint-*.npz"))


def test_no_room_for_a_later_checkpoint_names_the_last_complete_one(tmp_path):
    from minibasis.training import load_checkpoint

    out = tmp_path / "run"
    first = _minibasis(*TRAIN, "--epochs", "1", "--output", str(out))
    assert first.returncode == 0, first.stderr
    checkpoint = out / "checkpoint-train.npz"
    before = checkpoint.read_bytes()
    result = _minibasis(*TRAIN, "--epochs", "2", "--output", str(out), "--resume", limit=LIMIT_BYTES)
    expected = (f"minibasis train: error: cannot write {checkpoint}: {os.strerror(errno.EFBIG)}; "
                f"the last complete checkpoint is {checkpoint}")
    assert result.returncode == 74, result.stdout + result.stderr
    assert _error_lines(result) == [expected], result.stderr
    assert expected.split("error: ", 1)[1] in (out / "log.txt").read_text()
    assert _temporaries(out) == []
    assert checkpoint.read_bytes() == before and load_checkpoint(checkpoint)["meta"]["epoch"] == 1


def test_a_read_error_is_not_reported_as_a_write_failure(tmp_path):
    """Only errors of a write that found no room (whose errno never comes from reading) and that
    name their file get the one-line treatment; a file outside a run folder gets no checkpoint clause."""
    from minibasis.experiments import runs

    assert runs.write_failure_message(PermissionError(errno.EACCES, "Permission denied", "x")) is None
    assert runs.write_failure_message(OSError(errno.ENOSPC, "No space left on device")) is None  # no file named
    message = runs.write_failure_message(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "f")))
    assert message == f"cannot write {tmp_path / 'f'}: {os.strerror(errno.ENOSPC)}"  # not a run folder
