"""The README's shell commands, run as written, and the figures it quotes from them.

Every command of the README's ```bash blocks is listed below exactly once: in ``RUNS`` (run
here, as written, through ``bash`` in a fresh folder that sees the repository's ``docs/``, with
``minibasis`` and ``python`` meaning this checkout) or in ``SKIPPED`` with the reason. A README
command in neither list fails the test, so a new command gets a decision. Run here:

* ``minibasis verify formulas --cases 200``: its table must be the README's "Output of the first
  command" (the run time aside);
* ``minibasis verify exactness resnet20-12fca82f.th``: the bare file name and the data default
  resolve against the shared folder, and the three errors the README quotes are the printed ones;
* ``minibasis verify counts resnet20-12fca82f.th --thresholds 1,0.9``;
* ``minibasis compare docs/results/table3-conv docs/results/table3-basis ...`` (committed runs);
* the two ``minibasis train --dataset synthetic ... --output runs/t3`` lines (run, then resume);
* ``OMP_NUM_THREADS=1 mpirun -n 2 minibasis train ...`` (where mpirun and mpi4py are installed);
* ``minibasis demo`` (marked slow: about 17 s of CPU);
* the two ``minibasis compress --depth 20 --target-mult-ratio 0.4523 --allocation ...`` lines: the
  measured ratios, the energies kept (``report.json``) and the accuracies the README quotes are the
  printed ones.

The test command's extras (``pip install -e ".[...]"``) must be the ones ``.ci/run`` installs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")

FIGURES = "figures"  # marks a command whose output the README quotes

RUNS = {
    "minibasis verify formulas --cases 200": FIGURES,
    "minibasis verify exactness resnet20-12fca82f.th": FIGURES,
    "minibasis verify counts resnet20-12fca82f.th --thresholds 1,0.9": None,
    'minibasis compare docs/results/table3-conv docs/results/table3-basis --reference "paper ConvNet=74"': None,
    "minibasis train --dataset synthetic --train-subset 256 --limit 256 --epochs 4 --output runs/t3": None,
    "minibasis train --dataset synthetic --train-subset 256 --limit 256 --epochs 4 --output runs/t3 --resume": None,
    "OMP_NUM_THREADS=1 mpirun -n 2 minibasis train --dataset synthetic --train-subset 256 --limit 256 --epochs 2 "
    "--output runs/mpi": None,
    "minibasis demo": None,
    "minibasis compress --depth 20 --target-mult-ratio 0.4523 --allocation uniform --evaluate --limit 1000": FIGURES,
    "minibasis compress --depth 20 --target-mult-ratio 0.4523 --allocation greedy --evaluate --limit 1000": FIGURES,
}
SLOW = {"minibasis demo"}
# A command that continues the run of another one: that one runs first where it has not.
NEEDS = {"minibasis train --dataset synthetic --train-subset 256 --limit 256 --epochs 4 --output runs/t3 --resume":
         "minibasis train --dataset synthetic --train-subset 256 --limit 256 --epochs 4 --output runs/t3"}

_INSTALLS = "installs packages: the tests run in the environment .ci/run installs (its extras are checked below)"
_GPU = "needs a CUDA GPU and CuPy (bench/gpu.py --quick --device strict runs in tests/gpu/test_gpu_check.py)"
_HOURS = "trains for hours on all 50,000 CIFAR-10 images (its results are in docs/results.md)"
_TEN_THOUSAND = "evaluates every threshold on 10,000 test images (minutes); tests/cli/test_experiments.py runs sweep small"
SKIPPED = {
    'pip install -e ".[plot]" && minibasis demo': _INSTALLS + "; `minibasis demo` runs on its own below",
    'pip install -e ".[test,oracle,plot,mpi,onnx,safetensors]" && python3 -m pytest -q': "the whole suite: this is the suite",
    "minibasis count mynet.onnx --layers": "reads the file the README's Python block writes: tests/cli/test_onnx_cli.py runs "
                                            "that block and this command and checks the figure it quotes",
    "minibasis finetune --checkpoint mynet.onnx --dataset synthetic --threshold 0.9 --epochs1 1 --epochs2 1 "
    "--output runs/mynet": "fine-tunes on 10,000 synthetic images (about a minute of CPU); "
                           "tests/serialization/test_onnx_networks.py fine-tunes an imported network",
    "minibasis export runs/mynet/model.npz --format onnx --output mynet-compressed.onnx":
        "exports the fine-tuning run above; tests/cli/test_onnx_cli.py runs minibasis export",
    "minibasis sweep": _TEN_THOUSAND,
    "minibasis sweep --depth 20 --limit 2000": "ResNet-20 at eight thresholds on 2,000 images: about a minute of CPU",
    "minibasis compress --depth 20 --threshold 0.8 --evaluate": "evaluates on 10,000 test images (about 20 s of CPU)",
    "minibasis finetune --depth 20 --target-mult-ratio 0.5": _HOURS,
    "minibasis finetune --depth 20 --baseline": _HOURS,
    "minibasis train": _HOURS,
    "minibasis train --basis random": _HOURS,
    "minibasis eval --checkpoint docs/results/r20-ft-compressed/model.npz":
        "evaluates on 10,000 test images (about 20 s of CPU); tests/docs/test_committed_results.py re-evaluates it",
    'pip install -e ".[gpu]"': _INSTALLS,
    "minibasis demo --device cupy": _GPU,
    "minibasis finetune --depth 20 --target-mult-ratio 0.5 --device cupy": _GPU,
    "python3 -m pytest -q --backend cupy -m engine": _GPU,
    "pip install --no-deps --no-build-isolation -e . && python bench/gpu.py --output runs/gpu": _GPU,
}


def readme_commands(text: str = README) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, comments and spacing removed."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+", " ", re.sub(r"(^|\s)#.*$", "", line)).strip()
            if command:
                commands.append(command)
    return commands


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    commands = readme_commands()
    undecided = [c for c in commands if c not in RUNS and c not in SKIPPED]
    assert not undecided, f"README commands neither run nor skipped by this test: {undecided}"
    gone = [c for c in list(RUNS) + list(SKIPPED) if c not in commands]
    assert not gone, f"listed here but no longer in the README: {gone}"
    assert not set(RUNS) & set(SKIPPED)


def test_readme_test_command_installs_what_ci_installs():
    extras_readme = re.findall(r'pip install -e "\.\[([a-z,]+)\]" && python3 -m pytest -q', README)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    extras_ci = re.findall(r'pip install [^\n]*-e "\.\[([a-z,]+)\]"', ci)
    assert len(extras_readme) == 1 and len(extras_ci) == 1, (extras_readme, extras_ci)
    assert sorted(extras_readme[0].split(",")) == sorted(extras_ci[0].split(","))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shared_dir):
    """A fresh folder where ``docs`` is the repository's, and ``minibasis``/``python`` are this checkout's."""
    root = tmp_path_factory.mktemp("readme")
    (root / "docs").symlink_to(REPO / "docs")
    bin_dir = root / ".bin"
    bin_dir.mkdir()
    (bin_dir / "minibasis").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m minibasis "$@"\n')
    (bin_dir / "minibasis").chmod(0o755)
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(sys.executable)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, PATH=path, MINIBASIS_SHARED=str(shared_dir), OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return root, env


def _run(command: str, workspace) -> subprocess.CompletedProcess:
    root, env = workspace
    return subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def _params():
    for command in RUNS:
        marks = [pytest.mark.slow] if command in SLOW else []
        yield pytest.param(command, marks=marks, id=command[:60])


@pytest.mark.parametrize("command", list(_params()))
def test_readme_command_runs_as_written(command, workspace):
    if "mpirun" in command:
        if shutil.which("mpirun", path=workspace[1]["PATH"]) is None or importlib.util.find_spec("mpi4py") is None:
            pytest.skip("mpirun or mpi4py not installed: pip install '.[mpi]'")
        if (os.cpu_count() or 1) < 2:
            pytest.skip("mpirun -n 2 needs two cores (without --oversubscribe)")
    if command in NEEDS and not (workspace[0] / "runs" / "t3" / "config.json").exists():
        first = _run(NEEDS[command], workspace)
        assert first.returncode == 0, first.stderr
    result = _run(command, workspace)
    assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    if RUNS[command] == FIGURES:
        if command.startswith("minibasis compress"):
            _compress_figures_are_quoted(result.stdout, command, workspace[0])
        else:
            check = command.split()[2]
            {"formulas": _formulas_output_is_quoted, "exactness": _exactness_errors_are_quoted}[check](result.stdout)


def _without_time(text: str) -> str:
    return re.sub(r"; [\d.]+ s$", "; <time> s", text.strip(), flags=re.M)


def _formulas_output_is_quoted(stdout: str) -> None:
    quoted = re.search(r"Output of the first command:\n\n```\n(.*?)```", README, re.S)
    assert quoted, "the README's 'Output of the first command' block is missing"
    assert _without_time(stdout) == _without_time(quoted.group(1))


def _exactness_errors_are_quoted(stdout: str) -> None:
    worst = re.search(r"worst weight error (\S+), worst layer-output error (\S+)", stdout)
    logits = re.search(r"largest \|logit difference\| (\S+) ", stdout)
    assert worst and logits, stdout
    weight, output, logit = worst.group(1), worst.group(2), logits.group(1)
    quoted = (f"worst weight error at {weight}, the worst layer-output error at {output} and the largest logit "
              f"difference at {logit}")
    assert quoted in " ".join(README.split()), f"the README should quote what the command prints: {quoted}"


def _compress_figures_are_quoted(stdout: str, command: str, root: Path) -> None:
    allocation = re.search(r"--allocation (\w+)", command).group(1)
    ratio = re.search(r"\(ratio ([\d.]+);", stdout).group(1)
    original, compressed = re.search(r"original ([\d.]+)%, compressed ([\d.]+)%", stdout).groups()
    report = max((root / "runs").glob("compress-*/report.json"), key=lambda p: p.stat().st_mtime)
    energy = f"{json.loads(report.read_text())['energy_kept']:.4f}"
    if allocation == "uniform":
        t = re.search(r"uniform allocation \(t = ([\d.]+)\)", stdout).group(1)
        quoted = [f"uniform (t = {t}) measures {ratio} and {compressed} %", f"(uniform {energy})"]
    else:
        quoted = [f"greedy measures {ratio}", f"mean energy of {energy} per layer", f"scores {compressed} %"]
    quoted.append(f"(the original: {original} %)")
    text = " ".join(README.split())
    missing = [q for q in quoted if q not in text]
    assert not missing, f"the README should quote what {command!r} prints: {missing}"
