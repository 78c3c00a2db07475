"""A checkpoint writer killed with SIGKILL at random points never destroys the previous checkpoint.

A helper process imports minibasis once and then, on request, forks a writer child that
saves generation after generation of a ~4 MB training state to one path with
``minibasis.io.save``; the test kills each child with SIGKILL at a random point: right
after it starts, or a random fraction of one write's duration after it began its first,
second or third write (the writer prints ``begin g`` / ``done g`` around each save, which
tells us where it was, and the durations seen so far are the time scale, so a loaded
machine stretches the delays with the writes). It goes on killing until the kills have
landed inside writes often enough and the checkpoint has moved on, with a cap on the
number of kills. After every kill:

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
import time
from pathlib import Path

import numpy as np
import pytest

from minibasis import io

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

REPO_ROOT = Path(__file__).resolve().parents[2]
MIN_KILLS = 30           # at least this many kills ...
MAX_KILLS = 200          # ... and more until the coverage below is reached, but never more than this
MIN_INSIDE_WRITES = 8    # kills that landed inside a write (old checkpoint kept, or new one renamed)
MIN_WRITES_COMPLETED = 5
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
            self.lines.put((time.monotonic(), line.strip()))
        self.lines.put((time.monotonic(), None))

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def until(self, prefix: str, log: list[str], timeout: float = 30.0, times: list[float] | None = None) -> str:
        """Read lines until one starts with ``prefix``; the lines before it (the writer's begin/done
        lines) go to ``log``, and the moments they arrived to ``times`` when given. A line that
        starts with ``begin``/``done`` is also logged when it is the one waited for."""
        while True:
            try:
                arrived, line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"helper process silent for {timeout} s while waiting for {prefix!r}") from None
            if line is None:
                raise AssertionError(f"helper process ended: {self.proc.stderr.read()[-2000:]}")
            if line.startswith(prefix) and not line.startswith(("begin", "done")):
                return line[len(prefix):].strip()
            log.append(line)
            if times is not None:
                times.append(arrived)
            if line.startswith(prefix):
                return line[len(prefix):].strip()

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
    durations: list[float] = []  # seconds from "begin g" to "done g" as seen here: the load included
    kills = 0

    def inside() -> int:
        return outcomes["killed inside a write, old checkpoint kept"] + outcomes["killed after the rename, new checkpoint"]

    try:
        durations.append(float(server.until("ready", [])))
        while kills < MIN_KILLS or inside() < MIN_INSIDE_WRITES or writes_completed < MIN_WRITES_COMPLETED:
            assert kills < MAX_KILLS, (f"{kills} kills and still not enough coverage: {writes_completed} writes "
                                       f"completed, {outcomes}")
            kills += 1
            log: list[str] = []
            times: list[float] = []
            server.send(f"fork {file_gen + 1}")
            child = int(server.until("pid", log, times=times))
            write_seconds = float(np.median(durations[-10:]))
            if rng.uniform() < 0.1:  # right away: before (or at the very start of) the first write
                threading.Event().wait(rng.uniform(0.0, 0.2 * write_seconds))
            else:  # somewhere in or just after the 1st, 2nd or 3rd write
                server.until(f"begin {file_gen + 1 + rng.integers(0, 3)}", log, times=times)
                threading.Event().wait(rng.uniform(0.0, 1.2 * write_seconds))
            os.kill(child, signal.SIGKILL)
            server.send(f"reap {child}")
            assert int(server.until("status", log, times=times)) == -signal.SIGKILL
            child = None
            durations.extend(times[i + 1] - times[i] for i in range(len(log) - 1)
                             if log[i].startswith("begin") and log[i + 1].startswith("done"))

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

    summary = (f"{kills} kills, write ≈ {np.median(durations) * 1e3:.0f} ms, {writes_completed} writes completed: "
               f"{outcomes}; leftover temporaries: {sum(v == 'torn' for v in temps_seen.values())} torn, "
               f"{sum(v == 'complete' for v in temps_seen.values())} complete")
    print(summary)
    # The loop above ran until the dangerous window was exercised and the checkpoint moved on.
    assert inside() >= MIN_INSIDE_WRITES and writes_completed >= MIN_WRITES_COMPLETED, summary
