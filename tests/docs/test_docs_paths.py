"""Committed documents and run folders name no machine paths, and a run folder resumes wherever it is.

Nothing under docs/ (text files, and the members of .npz archives, decompressed) may contain an
absolute path into a home or work folder: a reader's checkout is elsewhere. A committed run
folder continues with ``--output <its folder> --resume`` from wherever the repository is (or
a copy of it is), because ``config.json`` records no path of the folder itself and ``--resume``
ignores one that an older ``config.json`` still records.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from minibasis.cli import main

REPO = Path(__file__).resolve().parents[2]
MACHINE_PATH = re.compile(rb"/(?:work|home)/")



def _docs_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "docs"], capture_output=True, text=True,
                                timeout=60, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):  # not a git checkout: every file there
        return sorted(p for p in (REPO / "docs").rglob("*") if p.is_file())
    return [REPO / name for name in listed]


def _contents(path: Path):
    """(where, bytes) of a file, or of each member of an .npz archive."""
    if path.suffix == ".npz" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                yield f"{path.name}:{name}", archive.read(name)
    else:
        yield path.name, path.read_bytes()


def test_no_committed_document_names_a_machine_path():
    found = []
    for path in _docs_files():
        for where, data in _contents(path):
            for match in MACHINE_PATH.finditer(data):
                line = data[data.rfind(b"\n", 0, match.start()) + 1:data.find(b"\n", match.end())]
                found.append(f"{path.relative_to(REPO).as_posix()} ({where}): {line[:160].decode('utf-8', 'replace')}")
    assert not found, "machine paths in committed files:\n" + "\n".join(found[:20])


def test_the_check_finds_a_planted_path(tmp_path):
    planted = tmp_path / "m.npz"
    with zipfile.ZipFile(planted, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("meta.json", json.dumps({"output": "/home/someone/runs/x"}))
    assert any(MACHINE_PATH.search(data) for _, data in _contents(planted))


SYNTH = ["train", "--dataset", "synthetic", "--train-subset", "16", "--limit", "16", "--batch-size", "8", "--quiet"]


def test_a_run_folder_resumes_wherever_it_is_moved(tmp_path, monkeypatch):
    """Started in one folder, moved, resumed by a relative --output from another working folder;
    an older config.json that records the old absolute path resumes too."""
    first = tmp_path / "a" / "run"
    assert main([*SYNTH, "--epochs", "1", "--output", str(first)]) == 0
    config = json.loads((first / "config.json").read_text())
    assert "output" not in config and str(first) not in json.dumps(config)
    moved = tmp_path / "b" / "run"
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    monkeypatch.chdir(moved.parent)
    assert main([*SYNTH, "--epochs", "2", "--output", "run", "--resume"]) == 0
    assert "resumed from run/checkpoint-train.npz after epoch 1/2" in (moved / "log.txt").read_text()

    older = json.loads((moved / "config.json").read_text())    # as configs recorded it before
    older["output"] = "/somewhere/else/run"
    older["argv"] += ["--output", "/somewhere/else/run"]
    (moved / "config.json").write_text(json.dumps(older, indent=2) + "\n")
    assert main([*SYNTH, "--epochs", "3", "--output", "run", "--resume"]) == 0
    assert "after epoch 2/3" in (moved / "log.txt").read_text()


def _unfinished_runs():
    """Committed run folders with a checkpoint but no final model: the ones a reader resumes."""
    return sorted(p.parent for p in (REPO / "docs" / "results").glob("*/config.json")
                  if list(p.parent.glob("checkpoint-*.npz")) and not (p.parent / "model.npz").exists())


@pytest.mark.parametrize("folder", _unfinished_runs(), ids=lambda p: p.name)
def test_every_unfinished_committed_run_passes_the_resume_check_with_its_recorded_command(folder, tmp_path):
    """Its recorded argv plus --output (a copy of the folder) --resume is accepted: the same settings
    under today's options, the ones added since it started taking the values it ran with."""
    from minibasis.cli import _available_verbs, build_parser
    from minibasis.experiments import options, runs

    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    argv = [*json.loads((folder / "config.json").read_text())["argv"], "--output", str(copy), "--resume"]
    args = build_parser(_available_verbs()).parse_args(argv, namespace=argparse.Namespace(_argv=argv))
    runs.check_run_folder(options.verb_spec(args, argv[0]).run)   # raises UserError when refused
