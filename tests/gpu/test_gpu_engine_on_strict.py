"""The engine's tests again, on the strict stand-in device backend, as part of the default run.

Every test file marked ``pytest.mark.engine`` (autograd, functions, conv paths, pooling, batch
norm, nn, BasisConv, counting, optim, learning) runs in a child pytest with ``--backend strict``:
arrays that refuse to meet or become host NumPy arrays silently, as CuPy's do, compared with
float64 host references. A host/device mix-up anywhere in the engine fails here on a machine
without a GPU. ``python3 -m pytest --backend cupy -m engine`` is the same run on a GPU (and
bench/gpu.py runs it there, through the same command).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from bench import gpu  # noqa: E402


def test_engine_tests_pass_on_the_strict_backend(pytestconfig):
    if pytestconfig.engine_backend == "strict":
        pytest.skip("this run already has the engine tests on strict")
    files = gpu.engine_test_files()
    assert len(files) >= 9, files  # autograd, functions, conv, conv_paths, nn, basisconv, counting, optim, learning
    command = gpu.engine_test_command("strict", files)
    result = subprocess.run(command, cwd=REPO_ROOT, env=gpu.child_environment(), capture_output=True, text=True,
                            timeout=900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"\nengine tests on strict: {summary}")
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in summary and "failed" not in summary
