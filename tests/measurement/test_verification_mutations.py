"""The verification itself is tested: planted counting slips must make it fail.

Each slip of tests/counting_mutations.py (what it models is written there) is planted, one at a
time, in a fresh process, which then runs the default ``minibasis verify formulas`` and the
suite's counting tests (``COUNTING_TESTS``). Both must fail on every slip, and both must pass in
the same harness with nothing planted (else a broken harness would "catch" everything).
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from counting_mutations import COUNTING_TESTS, SLIPS

REPO_ROOT = Path(__file__).resolve().parents[2]


def verdicts(slip):
    """{"verify_exit": ..., "suite_exit": ...} of a child process with ``slip`` planted (None: nothing)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, str(REPO_ROOT / "tests" / "counting_mutations.py")] + ([slip] if slip else [])
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{slip}: the child failed:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_planted_slip_fails_verify_formulas_and_the_counting_tests():
    names = [None] + list(SLIPS)
    with ThreadPoolExecutor(max_workers=2) as pool:  # two children at a time: the suite runs on 2 cores
        results = dict(zip(names, pool.map(verdicts, names)))
    control = results.pop(None)
    assert (control["verify_exit"], control["suite_exit"]) == (0, 0), f"nothing planted, yet: {control}"
    rows = [f"{slip}: verify formulas {'caught' if r['verify_exit'] == 1 else 'MISSED'}, "
            f"{' + '.join(COUNTING_TESTS)} {'caught' if r['suite_exit'] == 1 else 'MISSED'}"
            for slip, r in results.items()]
    missed = [row for row in rows if "MISSED" in row]
    assert not missed, "\n".join(missed)


def test_the_slips_are_listed_with_what_they_model():
    required = ["depthwise 'same': 8 of 9 offsets uncounted", "batch-less GEMM count", "uncounted weight gradient",
                "off-by-one output size", "dropped basis vector", "BasisConv stage counted twice"]
    assert set(required) <= set(SLIPS)
    from minibasis.functions.conv import CONV_PATHS
    for path in CONV_PATHS:  # a chunk after the first uncounted, on every chunked path
        assert f"conv forward, {path}: chunks after the first uncounted" in SLIPS
    assert all(slip.models for slip in SLIPS.values())
