"""bench/gpu.py, the one-command GPU check, dry-run on the strict stand-in (what CI can run).

The GPU machine runs ``python bench/gpu.py --output DIR`` (docs/gpu.md); here the same script runs
``--quick --device strict``: every section executes, the report is written as Markdown and JSON,
and a failing correctness check turns into exit status 1 while the other sections still run.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import gpu  # noqa: E402

EXPECTED_SECTIONS = [name for name, *_ in gpu.SECTIONS]


def test_quick_dry_run_on_strict_passes_and_writes_both_reports(tmp_path):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), "--quick", "--device", "strict",
                           "--output", str(tmp_path)], cwd=REPO_ROOT, env=gpu.child_environment(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    statuses = {s["name"]: s["status"] for s in report["sections"]}
    assert list(statuses) == EXPECTED_SECTIONS
    assert report["failed"] == [] and report["device"] == "strict" and report["quick"] is True
    for section in report["sections"]:
        expected = {"correctness": "pass"}.get(section["kind"], "info")
        assert section["status"] == expected, (section["name"], section["message"], section["details"].get("traceback"))
        assert section["tables"], f"{section['name']} reported no table"
    markdown = (tmp_path / "report.md").read_text()
    assert "all correctness checks passed" in markdown
    for name in EXPECTED_SECTIONS:
        assert f"## {name}" in markdown


def test_a_failing_check_exits_1_and_the_other_sections_still_run(tmp_path, monkeypatch):
    def wrong(run, out):
        out.status, out.message = "fail", "device result differs"

    def broken(run, out):
        raise RuntimeError("kernel launch failed")

    def fine(run, out):
        out.status, out.message = "pass", "fine"
        out.table("t", ["a"], [[1]])

    monkeypatch.setattr(gpu, "SECTIONS", [("environment", "environment", gpu.section_environment, 0),
                                          ("wrong", "correctness", wrong, 0), ("broken", "speed", broken, 0),
                                          ("fine", "correctness", fine, 0)])
    assert gpu.main(["--device", "strict", "--no-torch", "--output", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(s["name"], s["status"]) for s in report["sections"]] == [
        ("environment", "info"), ("wrong", "fail"), ("broken", "error"), ("fine", "pass")]
    assert report["failed"] == ["wrong"]  # a broken speed section is reported but fails nothing
    assert "kernel launch failed" in (tmp_path / "report.md").read_text()
