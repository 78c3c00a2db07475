"""``minibasis export`` (checked in onnxruntime, nothing written on failure) and ``count model.onnx``."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import minibasis as mb  # noqa: E402
from minibasis import models  # noqa: E402
from minibasis.cli import main  # noqa: E402


@pytest.fixture
def model_file(tmp_path):
    mb.manual_seed(0)
    model = models.resnet_cifar(20).eval()
    compressed, _ = mb.compress(model, 0.8, layers=["layer1.0.conv1", "layer3.2.conv2"])
    mb.save_model(compressed, tmp_path / "model.npz")
    return tmp_path / "model.npz", compressed.eval()


@pytest.mark.parametrize("fold", [False, True])
def test_export_writes_a_graph_onnxruntime_runs_with_the_same_logits(tmp_path, model_file, capsys, fold):
    path, compressed = model_file
    out = tmp_path / "model.onnx"
    assert main(["export", str(path), "--format", "onnx", "--output", str(out)] + ["--fold-batch-norm"] * fold) == 0
    assert "onnxruntime's logits equal" in capsys.readouterr().out
    x = np.random.default_rng(5).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with mb.no_grad():
        expected = compressed(mb.tensor(x)).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_export_refuses_and_leaves_nothing_when_onnxruntime_disagrees(tmp_path, model_file, monkeypatch, capsys):
    from minibasis.onnx import exporter
    monkeypatch.setattr(exporter, "CHECK_TOLERANCE", -1.0)  # any difference at all is too much
    out = tmp_path / "model.onnx"
    assert main(["export", str(model_file[0]), "--format", "onnx", "--output", str(out)]) == 2
    assert "differ" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def test_export_checks_its_arguments_before_reading_anything(tmp_path, model_file, capsys):
    path = str(model_file[0])
    for argv, message in ((["--format", "onnx", "--output", str(tmp_path / "m.safetensors")], "should end in"),
                          (["--format", "safetensors", "--output", str(tmp_path / "m.safetensors"),
                            "--fold-batch-norm"], "apply to --format onnx"),
                          (["--format", "onnx", "--output", str(tmp_path / "no" / "m.onnx")], "does not exist")):
        assert main(["export", path] + argv) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def test_safetensors_export_and_count_of_an_onnx_file(tmp_path, model_file, capsys):
    path, compressed = model_file
    assert main(["export", str(path), "--format", "safetensors", "--output", str(tmp_path / "m.safetensors")]) == 0
    back, _ = mb.load_model(tmp_path / "m.safetensors")
    assert isinstance(back.get_submodule("layer1.0.conv1"), mb.nn.BasisConv2d)
    assert main(["export", str(path), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    assert main(["count", str(tmp_path / "m.onnx"), str(path), "--layers"]) == 0
    out = capsys.readouterr().out
    totals = [line.split() for line in out.splitlines()
              if line.split() and line.split()[0].endswith(("/m.onnx", "/model.npz"))]
    # the ONNX graph (two plain convs per BasisConv) multiplies exactly as the minibasis model does
    assert len(totals) == 2 and totals[0][-5:-3] == totals[1][-5:-3]
    assert "layer3.2.conv2.basis" in out and "layer3.2.conv2.coeffs" in out


def test_readme_your_own_network_runs_and_prints_what_it_says(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own network", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    commands = section.split("```bash\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    count = next(line for line in commands.splitlines() if line.startswith("minibasis count"))
    claimed = count.split("measured conv mults ", 1)[1].split()[0]
    capsys.readouterr()
    assert main(count.split("#")[0].split()[1:]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("mynet.onnx"))
    assert row[-4:-2] == [claimed, claimed]  # measured conv mults, formula
