"""A checkpoint writer killed with SIGKILL at random points never destroys the previous checkpoint.

A helper process imports minibasis once and then, on request, forks a writer child that
saves generation after generation of a ~4 MB training state to one path with
``minibasis.io.save``; the test kills each child with SIGKILL after a random delay
spanning a few writes, so the kill lands before, inside and between writes (the writer
prints ``begin g`` / ``done g`` around each save, which tells us where it was). After
every kill:

* the checkpoint loads with ``minibasis.io.load`` and equals *exactly* the last
  completed generation, or the one being written when the kill came (a kill after the
  rename but before ``done`` was printed);
* the only other files in the folder are atomic_write's temporaries, named
  ``.<checkpoint name>.<random>.tmp``: they never match the checkpoint's name, and
  loading one either raises ``CheckpointError`` (a torn write) or gives exactly the
  generation in flight (the write completed but the rename did not happen).

SIGKILL leaves such temporaries behind (no handler runs); they are harmless and a later
successful write does not disturb them nor get disturbed by them (checked at the end).
SIGKILL tests process death, not power loss: that is what the fsyncs in atomic_write are
for, and it cannot be simulated here.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from minibasis import io

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_KILLS = 30
CHECKPOINT = "checkpoint.npz"

# Shared by the test and the helper process: the state of generation g, exactly reproducible.
STATE_SOURCE = r'''
import numpy as np

_rng = np.random.default_rng(20240607)
# About 4 MB of float32 "weights" (conv-shaped), plus momentum buffers and an int64 array.
_BASE = {f"layer{i}.weight": _rng.standard_normal((64, 32 if i == 0 else 64, 3, 3)).astype(np.float32)
         for i in range(8)}
_BASE["fc.weight"] = _rng.standard_normal((10, 1024)).astype(np.float32)
_MOMENTUM = {name: (_rng.standard_normal(w.shape) * 0.1).astype(np.float32) for name, w in _BASE.items()}
_STEPS = np.arange(100_000, dtype=np.int64)


def make_state(gen):
    """Every array depends on ``gen``, so an old and a new checkpoint differ everywhere."""
    shift = np.float32(gen)
    return {
        "model": {name: w + shift for name, w in _BASE.items()},
        "optimizer": {"state": {i: {"momentum_buffer": m - shift} for i, m in enumerate(_MOMENTUM.values())},
                      "param_groups": [{"lr": 0.1 / (1 + gen), "momentum": 0.9}]},
        "epoch": gen,
        "steps": _STEPS * 3 + gen,
        "rng": {"bit_generator": "PCG64", "state": (2**100 + gen, 2**64 + 7)},
    }
'''

# The helper ("fork server"): one import of numpy and minibasis, one forked writer per kill.
SERVER_SOURCE = STATE_SOURCE + r'''
import os, sys, time
from minibasis import io


def say(text):
    # One os.write per line: lines of the server and its children never interleave mid-line,
    # and nothing sits in a stdio buffer that a fork would duplicate or a SIGKILL would lose.
    os.write(1, (text + "\n").encode())


def writer(path, gen):
    while True:
        state = make_state(gen)
        say(f"begin {gen}")
        io.save(state, path)
        say(f"done {gen}")
        gen += 1


def main(path):
    scratch = path + ".calibration"
    start = time.perf_counter()
    for gen in range(3):
        io.save(make_state(gen), scratch)
    os.unlink(scratch)
    say(f"ready {(time.perf_counter() - start) / 3:.6f}")
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        command, argument = line.split()
        if command == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    writer(path, int(argument))
                finally:
                    os._exit(1)
            say(f"pid {pid}")
        elif command == "reap":
            _, status = os.waitpid(int(argument), 0)
            say(f"status {os.waitstatus_to_exitcode(status)}")


main(sys.argv[1])
'''

state_namespace: dict = {}
exec(STATE_SOURCE, state_namespace)
make_state = state_namespace["make_state"]


def assert_state_equal(actual, expected, where="state"):
    """Exact equality of nested dicts/lists/tuples of arrays and plain values (dtype included)."""
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{where}: {type(actual).__name__} instead of an array"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
            f"{where}: {actual.dtype} {actual.shape} vs {expected.dtype} {expected.shape}"
        assert np.array_equal(actual, expected), f"{where}: values differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), f"{where}: keys differ"
        for key in expected:
            assert_state_equal(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{where}: sequence differs"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_state_equal(a, e, f"{where}/{i}")
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} vs {expected!r}"


class ForkServer:
    """The helper process and a line reader with timeouts (a hung helper fails the test, never hangs it)."""

    def __init__(self, path: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                   OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER_SOURCE, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env=env, cwd=REPO_ROOT)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def until(self, prefix: str, log: list[str], timeout: float = 30.0) -> str:
        """Read lines until one starts with ``prefix``; the writer's begin/done lines go to ``log``."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"helper process silent for {timeout} s while waiting for {prefix!r}") from None
            if line is None:
                raise AssertionError(f"helper process ended: {self.proc.stderr.read()[-2000:]}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()
            log.append(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def test_sigkill_during_checkpoint_writes_never_loses_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / CHECKPOINT
    temp_name = re.compile(r"^\." + re.escape(CHECKPOINT) + r"\..+\.tmp$")
    io.save(make_state(0), path)
    file_gen = 0
    rng = np.random.default_rng(12345)
    outcomes = {"killed before its first write": 0, "killed inside a write, old checkpoint kept": 0,
                "killed after the rename, new checkpoint": 0, "killed between writes": 0}
    temps_seen: dict[str, str] = {}  # leftover name -> "torn" or "complete"
    writes_completed = 0

    server = ForkServer(path)
    child = None
    try:
        write_seconds = float(server.until("ready", []))
        for _ in range(NUM_KILLS):
            log: list[str] = []
            server.send(f"fork {file_gen + 1}")
            child = int(server.until("pid", log))
            # Up to ~3 writes: the kill lands at every phase of a write, and sometimes before the first.
            threading.Event().wait(rng.uniform(0.0, 3.0 * write_seconds))
            os.kill(child, signal.SIGKILL)
            server.send(f"reap {child}")
            assert int(server.until("status", log)) == -signal.SIGKILL
            child = None

            begun = [int(line.split()[1]) for line in log if line.startswith("begin")]
            done = [int(line.split()[1]) for line in log if line.startswith("done")]
            assert begun == list(range(file_gen + 1, file_gen + 1 + len(begun))), log
            assert done in (begun, begun[:-1]), log
            writes_completed += len(done)
            last_done = done[-1] if done else file_gen
            in_flight = begun[-1] if len(begun) > len(done) else None

            # The checkpoint: loadable, and exactly the last completed or the in-flight generation.
            state = io.load(path)
            gen = state["epoch"]
            allowed = {last_done} | ({in_flight} if in_flight is not None else set())
            assert gen in allowed, f"checkpoint holds generation {gen}, expected one of {sorted(allowed)}; log {log}"
            assert_state_equal(state, make_state(gen))
            if not begun:
                outcomes["killed before its first write"] += 1
            elif in_flight is None:
                outcomes["killed between writes"] += 1
            elif gen == in_flight:
                outcomes["killed after the rename, new checkpoint"] += 1
            else:
                outcomes["killed inside a write, old checkpoint kept"] += 1
            file_gen = gen

            # Everything else in the folder is a recognisable temporary that never passes for a checkpoint.
            for name in sorted(os.listdir(folder)):
                if name == CHECKPOINT or name in temps_seen:
                    continue
                assert temp_name.match(name), f"unexpected file {name!r} beside the checkpoint"
                assert in_flight is not None, f"temporary {name!r} left by a writer that was not writing"
                try:
                    leftover = io.load(folder / name)
                except io.CheckpointError:
                    temps_seen[name] = "torn"
                else:  # killed between fsync and rename: a complete copy of the generation in flight
                    assert_state_equal(leftover, make_state(in_flight))
                    temps_seen[name] = "complete"
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
        server.close()

    # A later normal write is unaffected by the leftovers and leaves them alone.
    leftovers = sorted(temps_seen)
    io.save(make_state(file_gen + 1), path)
    assert_state_equal(io.load(path), make_state(file_gen + 1))
    assert sorted(n for n in os.listdir(folder) if n != CHECKPOINT) == leftovers

    summary = (f"{NUM_KILLS} kills, write ≈ {write_seconds * 1e3:.0f} ms, {writes_completed} writes completed: "
               f"{outcomes}; leftover temporaries: {sum(v == 'torn' for v in temps_seen.values())} torn, "
               f"{sum(v == 'complete' for v in temps_seen.values())} complete")
    print(summary)
    # The test must have exercised the dangerous window, and the checkpoint must have moved on.
    inside = outcomes["killed inside a write, old checkpoint kept"] + outcomes["killed after the rename, new checkpoint"]
    assert inside >= NUM_KILLS // 4, summary
    assert writes_completed >= 5, summary
