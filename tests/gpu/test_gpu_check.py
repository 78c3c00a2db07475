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

REPO_ROOT = Path(__file__).resolve().parents[2]
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


def test_the_cupy_branches_call_cupys_documented_api(monkeypatch):
    """No GPU here, so a stand-in ``cupy`` module that has exactly the calls CuPy documents
    (cupy.cuda.runtime.runtimeGetVersion / driverGetVersion / getDeviceProperties / memGetInfo /
    getDeviceCount, cupy.cuda.Device().id, get_default_memory_pool().used_bytes / total_bytes /
    free_all_blocks) runs the environment and memory code paths: a misspelt name fails here."""
    import types

    freed = []
    pool = types.SimpleNamespace(used_bytes=lambda: 1024, total_bytes=lambda: 4096, free_all_blocks=lambda: freed.append(1))
    runtime = types.SimpleNamespace(
        runtimeGetVersion=lambda: 13000, driverGetVersion=lambda: 13010, getDeviceCount=lambda: 1,
        memGetInfo=lambda: (140 * 2 ** 30, 141 * 2 ** 30),
        getDeviceProperties=lambda device: {"name": b"NVIDIA H200", "totalGlobalMem": 141 * 2 ** 30, "major": 9,
                                            "minor": 0, "multiProcessorCount": 132})
    fake = types.SimpleNamespace(__version__="14.2.0", get_default_memory_pool=lambda: pool,
                                 cuda=types.SimpleNamespace(runtime=runtime, Device=lambda: types.SimpleNamespace(id=0)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    run = gpu.Run(args=gpu.parse_args(["--device", "cupy", "--no-torch"]), started=0.0)
    section = gpu.Section("environment", "environment")
    gpu.section_environment(run, section)
    info = section.details
    assert (info["cupy"], info["cuda_runtime"], info["cuda_driver"]) == ("14.2.0", "13.0", "13.1")
    assert info["device_name"] == "NVIDIA H200" and info["compute_capability"] == "9.0"
    assert info["device_memory_bytes"] == 141 * 2 ** 30 and section.message == "NVIDIA H200"
    assert gpu.memory_pool_bytes("cupy") == {"used_bytes": 1024, "total_bytes": 4096}
    gpu.fresh_memory_pool("cupy")
    assert freed == [1] and gpu.memory_pool_bytes("strict") is None
