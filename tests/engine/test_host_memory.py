"""minibasis.host_memory: freed host memory kept for reuse (glibc), measured as page faults.

Each claim runs in a fresh interpreter, since the setting is process-wide: the
retention minibasis applies at import, and with it a steady loop of allocations
faults no pages in (without it, every large array is mapped and faulted in
afresh); $MINIBASIS_RETAIN_MEMORY=0 leaves glibc alone, a bad value is named in
the error; and a training step in steady state makes no page faults.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import minibasis
from minibasis import host_memory

pytestmark = pytest.mark.skipif(not host_memory.memory_retention_supported(),
                                reason="memory retention needs glibc's malloc")

FAULTS_PER_ROUND = """
import json, resource, sys
import numpy as np
import minibasis
if sys.argv[1] != "default":
    minibasis.set_memory_retention(sys.argv[1] == "on")

def allocate_and_free():
    arrays = [np.ones(2 * 2 ** 20, dtype=np.float32) for _ in range(8)]  # 8 MiB each, every page written
    del arrays

allocate_and_free()  # the first round maps the memory
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    allocate_and_free()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"retaining": minibasis.get_memory_retention(), "faults_per_round": (after - before) / 5}))
"""


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment,
                          timeout=120)


def faults(setting: str, env: dict | None = None) -> dict:
    done = run_python(FAULTS_PER_ROUND, setting, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_import_turns_retention_on_and_freed_arrays_are_reused_without_page_faults():
    on = faults("default", env={host_memory.ENV_VARIABLE: ""})
    assert on["retaining"] is True
    assert on["faults_per_round"] < 100  # 64 MiB, 16,384 pages, allocated and freed per round


@pytest.mark.parametrize("setting, env", [("default", {host_memory.ENV_VARIABLE: "0"}), ("off", {})])
def test_without_retention_the_freed_arrays_are_faulted_in_again(setting, env):
    """The control: glibc's own behaviour (the variable at 0) and set_memory_retention(False) hand the
    freed 64 MiB back to the system, and the next round faults thousands of pages in again."""
    off = faults(setting, env)
    assert off["retaining"] is False
    assert off["faults_per_round"] > 2000


def test_the_environment_variable_zero_leaves_glibc_alone():
    done = run_python("import minibasis; print(minibasis.get_memory_retention())",
                      env={host_memory.ENV_VARIABLE: "0"})
    assert done.returncode == 0 and done.stdout.strip() == "False"


def test_a_bad_environment_variable_is_named_when_minibasis_is_imported():
    done = run_python("import minibasis", env={host_memory.ENV_VARIABLE: "maybe"})
    assert done.returncode != 0
    assert host_memory.ENV_VARIABLE in done.stderr and "'maybe'" in done.stderr


TRAINING_STEPS = """
import json, resource
import numpy as np
import minibasis as mb
from minibasis import functions as F, optim
from minibasis.models import resnet_cifar
mb.manual_seed(0)
model = resnet_cifar(20)
opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
rng = np.random.default_rng(0)
x = mb.tensor(rng.standard_normal((64, 3, 32, 32), dtype=np.float32))
labels = mb.tensor(rng.integers(0, 10, size=64))
def step():
    opt.zero_grad()
    F.cross_entropy(model(x), labels).backward()
    opt.step()
step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps((after - before) / 2))
"""


def test_a_resnet_training_step_in_steady_state_faults_no_pages_in():
    """ResNet-20 at batch 64: with retention (the default), no page faults after the first two steps; glibc's
    own behaviour faulted about 4,000 pages in per step here (bench/README.md: 23,000 at batch 128)."""
    done = run_python(TRAINING_STEPS, env={host_memory.ENV_VARIABLE: "1", "MINIBASIS_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    per_step = json.loads(done.stdout)
    assert per_step < 50, f"{per_step} page faults per step"


ARENAS = """
import ctypes, os, sys, threading
import numpy as np
import minibasis

both_alive = threading.Barrier(2)

def work():
    np.ones(2 ** 20, dtype=np.float32).sum()  # 4 MiB blocks from this thread's arena
    both_alive.wait()  # neither thread exits before the other has its arena (an exited thread's is reused)
    for _ in range(3):
        np.ones(2 ** 20, dtype=np.float32).sum()

threads = [threading.Thread(target=work) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.parametrize("setting, arenas", [("1", 1), ("0", 3)])
def test_threads_allocate_from_one_arena(setting, arenas):
    """With retention the engine's helper threads reuse the main thread's freed blocks (one arena);
    glibc's default (the control) gives each new thread an arena of its own."""
    done = run_python(ARENAS, env={host_memory.ENV_VARIABLE: setting})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Arena ") == arenas, done.stderr


def test_set_memory_retention_returns_the_previous_state_and_checks_its_argument():
    previous = minibasis.set_memory_retention(True)
    try:
        assert minibasis.set_memory_retention(False) is True
        assert minibasis.get_memory_retention() is False
        assert minibasis.set_memory_retention(True) is False
        with pytest.raises(TypeError, match="True or False"):
            minibasis.set_memory_retention("yes")
    finally:
        minibasis.set_memory_retention(previous)


def test_without_glibc_turning_it_on_is_an_error_and_the_default_does_nothing(monkeypatch):
    monkeypatch.setattr(host_memory, "_libc", False)  # as found on a C library that is not glibc
    monkeypatch.setattr(host_memory, "_retaining", False)
    monkeypatch.delenv(host_memory.ENV_VARIABLE, raising=False)
    assert host_memory.memory_retention_supported() is False
    assert host_memory.apply_default() is False
    assert host_memory.set_memory_retention(False) is False
    with pytest.raises(RuntimeError, match="not glibc"):
        host_memory.set_memory_retention(True)
