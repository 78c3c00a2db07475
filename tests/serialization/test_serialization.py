"""minibasis.serialization: one package behind minibasis.io (its documented short name), and
read_weights, which sniffs npz / torch zip / torch legacy once. The readers' hostile-file and
fuzz tests are in test_safe_pickle.py, test_io.py and test_data_files.py (unchanged)."""
import zipfile

import numpy as np
import pytest

import minibasis
from minibasis import io, models, serialization
from minibasis.serialization import (
    NPZ, TORCH_LEGACY, TORCH_ZIP, CheckpointError, UnsafePickleError, read_weights, sniff_format,
)


def test_the_short_name_is_the_package():
    for name in io.__all__:
        assert getattr(io, name) is getattr(serialization, name), name


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "bn.running_mean": rng.standard_normal(4), "steps": np.array(7, dtype=np.int64)}


def _assert_same(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def test_read_weights_of_npz_files(tmp_path):
    state = _state()
    io.save(state, tmp_path / "plain.npz")
    assert sniff_format(tmp_path / "plain.npz") == NPZ
    _assert_same(read_weights(tmp_path / "plain.npz"), state)

    model = models.table3_cnn()
    minibasis.save_model(model, tmp_path / "model.npz")
    expected = {k: minibasis.to_numpy(v) for k, v in model.state_dict().items()}
    _assert_same(read_weights(tmp_path / "model.npz"), expected)

    io.save({"format": "other", "numbers": [1, 2]}, tmp_path / "no-state.npz")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_weights(tmp_path / "no-state.npz")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_read_weights_of_torch_checkpoints(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    state = _state(1)
    path = tmp_path / "net.pth"
    torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state.items()}, "epoch": 3}, path,
               _use_new_zipfile_serialization=zip_format)
    assert sniff_format(path) == (TORCH_ZIP if zip_format else TORCH_LEGACY)
    _assert_same(read_weights(path), state)


def test_sniffing_refuses_other_files_and_keeps_the_readers_messages(tmp_path):
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"GIF89a....")
    with pytest.raises(CheckpointError, match=r"neither an \.npz nor a PyTorch checkpoint.*b'GIF8'"):
        read_weights(garbage)
    with pytest.raises(FileNotFoundError):
        read_weights(tmp_path / "missing.npz")

    io.save(_state(), tmp_path / "good.npz")
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes((tmp_path / "good.npz").read_bytes()[:200])
    assert sniff_format(damaged) == NPZ  # unreadable zip: by its suffix, so the npz reader explains
    with pytest.raises(CheckpointError, match="corrupt or truncated npz file"):
        read_weights(damaged)

    no_pickle = tmp_path / "archive.th"
    with zipfile.ZipFile(no_pickle, "w") as zf:
        zf.writestr("archive/readme.txt", "hello")
    with pytest.raises(CheckpointError, match="unexpected member"):  # a zip without data.pkl is read as npz
        read_weights(no_pickle)


def test_read_weights_refuses_a_hostile_pickle(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.th"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
                     + pickle.dumps({"little_endian": True}, 2) + pickle.dumps(Evil(), 2))
    with pytest.raises(UnsafePickleError, match="refused global"):
        read_weights(path)
