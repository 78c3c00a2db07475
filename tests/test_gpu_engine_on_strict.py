"""The engine's tests again, on the strict stand-in device backend, as part of the default run.

Every test file marked ``pytest.mark.engine`` (autograd, functions, conv paths, pooling, batch
norm, nn, BasisConv, counting, optim, learning) runs in a child pytest with ``--backend strict``:
arrays that refuse to meet or become host NumPy arrays silently, as CuPy's do, compared with
float64 host references. A host/device mix-up anywhere in the engine fails here on a machine
without a GPU. ``python3 -m pytest --backend cupy -m engine`` is the same run on a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_engine_tests_pass_on_the_strict_backend(pytestconfig):
    if pytestconfig.engine_backend == "strict":
        pytest.skip("this run already has the engine tests on strict")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--backend", "strict",
               "-m", "engine", str(REPO_ROOT / "tests")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("MINIBASIS_TEST_BACKEND", None)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"\nengine tests on strict: {summary}")
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in summary and "failed" not in summary
