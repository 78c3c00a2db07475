"""examples/quick_tour.py (the README's quick tour) runs end to end on the shared data."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_tour_runs(akamaster_dir, cifar10_dir, shared_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINIBASIS_SHARED": str(shared_dir)}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "quick_tour.py")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    accuracies = [float(a) for a in re.findall(r": ([\d.]+)% on 500 test images", proc.stdout)]
    assert len(accuracies) == 2
    assert 75 < accuracies[0] < 86          # PyTorch: 81.03 % on all 10,000 shared (JPEG) test images
    assert "stored values" in proc.stdout and "layers replaced: 19 of 19" in proc.stdout


def test_readme_quick_tour_is_the_example():
    """The README shows the example's code (so the shown code is the tested code)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    code = (REPO / "examples" / "quick_tour.py").read_text(encoding="utf-8")
    body = code.split('"""', 2)[2].strip()
    assert body in readme
    assert len(body.splitlines()) <= 25
