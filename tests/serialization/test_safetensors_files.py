"""``.safetensors`` model files: the .npz record in safetensors' string map, and plain state dicts."""
from __future__ import annotations

import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

import minibasis as mb  # noqa: E402
from minibasis import models  # noqa: E402
from minibasis.serialization import CheckpointError  # noqa: E402


def logits(model, x):
    with mb.no_grad():
        return model(mb.tensor(x)).numpy()


def test_a_compressed_model_round_trips_with_its_metadata(tmp_path):
    mb.manual_seed(0)
    model = models.resnet_cifar(20).eval()
    compressed, _ = mb.compress(model, 0.9, layers=["layer1.0.conv1", "layer2.0.conv2"])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    mb.save_model(compressed, tmp_path / "m.safetensors", normalization="cifar10", dataset="cifar10", note="hi")
    mb.save_model(compressed, tmp_path / "m.npz", normalization="cifar10", dataset="cifar10", note="hi")
    back, meta = mb.load_model(tmp_path / "m.safetensors")
    twin, twin_meta = mb.load_model(tmp_path / "m.npz")
    np.testing.assert_array_equal(logits(back, x), logits(compressed, x))
    assert meta == twin_meta and meta.format == "minibasis-model-1" and meta.extra == {"note": "hi"}
    assert isinstance(back.get_submodule("layer1.0.conv1"), mb.nn.BasisConv2d)
    tensors = safetensors_numpy.load_file(str(tmp_path / "m.safetensors"))  # any safetensors reader sees the weights
    assert set(tensors) == set(compressed.state_dict())


def test_a_plain_state_dict_needs_its_architecture(tmp_path):
    mb.manual_seed(1)
    model = models.table3_cnn().eval()
    state = {k: mb.to_numpy(v) for k, v in model.state_dict().items()}
    safetensors_numpy.save_file(state, str(tmp_path / "plain.safetensors"))
    with pytest.raises(mb.ModelFileError):
        mb.load_model(tmp_path / "plain.safetensors")
    back, meta = mb.load_model(tmp_path / "plain.safetensors", architecture="table3_cnn")
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(logits(back, x), logits(model, x))
    assert meta.format == "legacy"


def test_damaged_safetensors_files_are_refused(tmp_path):
    model = models.table3_cnn().eval()
    mb.save_model(model, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "huge.safetensors").write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    for name in ("cut.safetensors", "huge.safetensors"):
        with pytest.raises(CheckpointError):
            mb.load_model(tmp_path / name)
    with pytest.raises(ValueError):
        mb.save_model(model, tmp_path / "bad.safetensors", weights=np.ones(3))  # metadata must be JSON text
    assert not (tmp_path / "bad.safetensors").exists()
