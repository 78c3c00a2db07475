"""minibasis.io: atomic writes, .npz state files, and PyTorch checkpoints read without torch
(compared tensor by tensor with ``torch.load``, which is the oracle here)."""
from __future__ import annotations

import collections
import io
import os
import pickle
import stat
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import given

import minibasis as mb
from minibasis import nn
from minibasis.io import CheckpointError, atomic_write, load, load_torch_checkpoint, load_torch_object, save
from minibasis.serialization import UnsafePickleError
from test_safe_pickle import FUZZ_SETTINGS, MUTATIONS, bounded, expect_documented_errors, mutate


# ---------------------------------------------------------------------------
# atomic_write
# ---------------------------------------------------------------------------
def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with atomic_write(path) as handle:
        handle.write(b"new")
        assert path.read_bytes() == b"old"        # not visible before the block ends
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_leaves_the_old_file_intact_when_the_writer_raises(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("precious")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(path, "w") as handle:
            handle.write("half of the new")
            raise RuntimeError("crash")
    assert path.read_text() == "precious"
    assert os.listdir(tmp_path) == ["results.json"]   # temp file removed


def test_atomic_write_text_mode_and_permissions(tmp_path):
    path = tmp_path / "table.csv"
    with atomic_write(path, "w", newline="") as handle:
        handle.write("a,b\r\nμ,2\r\n")
    assert path.read_bytes() == "a,b\r\nμ,2\r\n".encode("utf-8")
    os.chmod(path, 0o640)
    with atomic_write(path, "w") as handle:
        handle.write("x")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_atomic_write_rejects_read_and_append_modes(tmp_path):
    for mode in ("r", "ab", "r+b"):
        with pytest.raises(ValueError, match="mode"):
            with atomic_write(tmp_path / "x", mode):
                pass


# ---------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------
def _small_model():
    mb.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


def test_model_state_round_trips_through_save_and_load(tmp_path):
    model = _small_model()
    path = tmp_path / "model.npz"
    save(model, path)
    original = {k: np.array(v) for k, v in model.state_dict().items()}
    loaded = load(path)
    assert list(loaded) == list(original)
    for key, value in original.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
        np.testing.assert_array_equal(loaded[key], value)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    fresh.load_state_dict(loaded)
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(np.asarray(mb.to_numpy(value)), original[key])


def test_nested_training_state_round_trips_exactly(tmp_path):
    rng = np.random.RandomState(7)
    generator = np.random.default_rng(3)
    state = {
        "model": {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "a/b%c": np.zeros(0)},
        "optimizer": {"state": {0: {"momentum_buffer": mb.tensor(np.ones((2, 2), dtype=np.float32))}},
                      "param_groups": [{"lr": 0.1, "momentum": 0.9, "nesterov": False, "params": [0, 1]}]},
        "epoch": 12,
        "best": float("nan"),
        "rng": rng.get_state(),
        "generator": generator.bit_generator.state,      # 128-bit ints inside
        "note": "ünïcode", "nothing": None, "scalar": np.float16(1.5), "flags": (True, [False, 2]),
        "masks": [np.array([True, False]), np.arange(3, dtype=np.int8)],
    }
    path = tmp_path / "ckpt.npz"
    save(state, path)
    loaded = load(path)
    np.testing.assert_array_equal(loaded["model"]["conv.weight"], state["model"]["conv.weight"])
    assert loaded["model"]["a/b%c"].shape == (0,)
    buffer = loaded["optimizer"]["state"][0]["momentum_buffer"]
    assert isinstance(buffer, np.ndarray) and buffer.dtype == np.float32
    np.testing.assert_array_equal(buffer, np.ones((2, 2)))
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert loaded["epoch"] == 12 and np.isnan(loaded["best"])
    assert loaded["note"] == "ünïcode" and loaded["nothing"] is None
    assert type(loaded["scalar"]) is np.float16 and loaded["scalar"] == 1.5
    assert loaded["flags"] == (True, [False, 2]) and type(loaded["flags"]) is tuple
    assert [m.dtype for m in loaded["masks"]] == [np.bool_, np.int8]
    # The restored RNG states continue the same streams as the originals.
    restored = np.random.RandomState()
    restored.set_state(loaded["rng"])
    np.testing.assert_array_equal(restored.rand(5), rng.rand(5))
    other = np.random.default_rng()
    other.bit_generator.state = loaded["generator"]
    np.testing.assert_array_equal(other.random(5), generator.random(5))


def test_save_is_readable_by_plain_numpy_without_pickle(tmp_path):
    path = tmp_path / "s.npz"
    save({"w": np.arange(3.0)}, path)
    with np.load(path, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["w"], np.arange(3.0))


def test_plain_npz_loads_as_a_flat_dict(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, a=np.arange(4), b=np.eye(2, dtype=np.float32))
    loaded = load(path)
    assert sorted(loaded) == ["a", "b"]
    np.testing.assert_array_equal(loaded["b"], np.eye(2))


@pytest.mark.parametrize("value, match", [
    ({"x": object()}, "cannot store a object"),
    ({1.5: np.zeros(1)}, "dict keys must be str or int"),
    ({"x": np.array([None])}, "object arrays cannot be saved"),
])
def test_save_refuses_what_it_cannot_store(tmp_path, value, match):
    with pytest.raises(TypeError, match=match):
        save(value, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_save_refuses_cycles(tmp_path):
    cyclic = {"a": []}
    cyclic["a"].append(cyclic)
    with pytest.raises(ValueError, match="cycle"):
        save(cyclic, tmp_path / "x.npz")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    save({"epoch": 1}, path)
    with pytest.raises(TypeError):
        save({"epoch": 2, "bad": object()}, path)
    assert load(path) == {"epoch": 1}


def test_load_refuses_object_arrays(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))   # np.savez pickles object arrays
    with pytest.raises(CheckpointError, match="Python objects"):
        load(path)


def test_load_refuses_unsafe_member_names(tmp_path):
    path = tmp_path / "evil.npz"
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros(2))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../escape.npy", buffer.getvalue())
    with pytest.raises(CheckpointError, match=r"unsafe member name '\.\./escape\.npy'"):
        load(path)


def test_load_refuses_a_declared_shape_larger_than_the_member(tmp_path):
    path = tmp_path / "lie.npz"
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (4 * 10**9,)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", buffer.getvalue() + np.zeros(4, dtype=np.float32).tobytes())
    with bounded():
        with pytest.raises(CheckpointError, match=r"declares shape \(4000000000,\) of float32 \(16000000000 bytes\)"):
            load(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError):
        load_torch_checkpoint(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------
# PyTorch checkpoints
# ---------------------------------------------------------------------------
def _torch_tensors(torch):
    generator = torch.Generator().manual_seed(0)
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    return collections.OrderedDict([
        ("conv.weight", torch.randn(4, 3, 3, 3, generator=generator)),
        ("f64", torch.randn(2, 3, generator=generator, dtype=torch.float64)),
        ("f16", torch.randn(5, generator=generator).half()),
        ("bf16", torch.randn(4, generator=generator).bfloat16()),
        ("i64", torch.arange(-3, 7)),
        ("i32", torch.arange(5, dtype=torch.int32)),
        ("i16", torch.arange(-2, 2, dtype=torch.int16)),
        ("u8", torch.arange(250, 256, dtype=torch.uint8)),
        ("i8", torch.arange(-128, -120, dtype=torch.int8)),
        ("mask", torch.tensor([True, False, True])),
        ("c64", torch.randn(3, generator=generator, dtype=torch.complex64)),
        # Views sharing one storage: sliced, strided, transposed, a row, offsets.
        ("slice", base[1:4, 2:9:3]),
        ("transposed", base.t()),
        ("row", base[5]),
        ("whole", base),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.zeros(0, 3)),
        ("bn.num_batches_tracked", torch.tensor(7)),
    ])


def _expected(torch, tensor):
    return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _assert_matches_torch(torch, ours, reference, prefix=""):
    assert list(ours) == [k[len(prefix):] for k in reference]
    for key, tensor in reference.items():
        array, expected = ours[key[len(prefix):]], _expected(torch, tensor)
        assert array.dtype == expected.dtype, key
        assert array.shape == expected.shape, key
        np.testing.assert_array_equal(array, expected, err_msg=key)
        assert array.flags.c_contiguous and array.flags.writeable


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("layout", ["bare", "nested_state_dict", "nested_model", "dataparallel"])
def test_torch_checkpoints_match_torch_load(tmp_path, zip_format, layout):
    torch = pytest.importorskip("torch")
    tensors = _torch_tensors(torch)
    prefix = "module." if layout == "dataparallel" else ""
    state = collections.OrderedDict((prefix + k, v) for k, v in tensors.items())
    obj = {"bare": state, "dataparallel": {"state_dict": state, "best_prec1": 91.5},
           "nested_state_dict": {"epoch": 3, "state_dict": state, "optimizer": {"lr": 0.1}},
           "nested_model": {"model": state, "step": 10}}[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_torch_checkpoint(path)
    assert any("bfloat16" in str(w.message) for w in caught)
    reference = torch.load(path, map_location="cpu", weights_only=True)
    reference = reference if layout == "bare" else reference["model" if layout == "nested_model" else "state_dict"]
    _assert_matches_torch(torch, ours, reference, prefix)


def test_torch_parameters_and_modules_state_dicts(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(4, 2))
    for zip_format in (True, False):
        path = tmp_path / f"m{zip_format}.pt"
        # Parameters (not detached tensors) exercise _rebuild_parameter.
        torch.save({"params": dict(module.named_parameters()), "state_dict": module.state_dict()}, path,
                   _use_new_zipfile_serialization=zip_format)
        whole = load_torch_object(path)
        reference = torch.load(path, weights_only=True)
        for key, parameter in reference["params"].items():
            np.testing.assert_array_equal(whole["params"][key], parameter.detach().numpy())
        _assert_matches_torch(torch, load_torch_checkpoint(path), reference["state_dict"])


@pytest.mark.parametrize("name, count", [("resnet20-12fca82f.th", 97), ("resnet56-4bfd9763.th", 277)])
def test_akamaster_checkpoints_match_torch_load(akamaster_dir, name, count):
    torch = pytest.importorskip("torch")
    path = akamaster_dir / name
    ours = load_torch_checkpoint(path)
    reference = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert len(ours) == count and all(k.startswith("module.") for k in reference)
    _assert_matches_torch(torch, ours, reference, prefix="module.")
    assert ours["conv1.weight"].shape == (16, 3, 3, 3) and ours["linear.weight"].shape == (10, 64)
    whole = load_torch_object(path)
    assert whole["best_prec1"] == pytest.approx(torch.load(path, map_location="cpu", weights_only=True)["best_prec1"])


def test_akamaster_checkpoints_without_torch(akamaster_dir):
    # Shapes from the checkpoint README, independent of torch.
    state = load_torch_checkpoint(akamaster_dir / "resnet20-12fca82f.th")
    assert len(state) == 97 and not any(k.startswith("module.") for k in state)
    assert state["layer3.2.conv2.weight"].shape == (64, 64, 3, 3)
    assert sum(v.size for v in state.values()) == 269_722 + 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)  # + BN running stats
    assert all(v.dtype == np.float32 for v in state.values())


def _saved(torch, tmp_path, zip_format, obj=None):
    path = tmp_path / ("zip.pt" if zip_format else "legacy.pt")
    base = torch.arange(12, dtype=torch.float32)
    torch.save(obj if obj is not None else {"a": base[2:8], "b": torch.ones(3, dtype=torch.int64)}, path,
               _use_new_zipfile_serialization=zip_format)
    return path


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_checkpoints_raise_checkpoint_error(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    data = _saved(torch, tmp_path, zip_format).read_bytes()
    cut_path = tmp_path / "cut.pt"
    for cut in sorted({0, 1, 3, 4, 10, len(data) // 3, len(data) // 2, len(data) - 40, len(data) - 8, len(data) - 1}):
        cut_path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut.pt"):
            load_torch_checkpoint(cut_path)


def _rewrite_zip(source, target, replace=None, drop=(), add=None):
    """Copy a zip, replacing member bytes (name → bytes), dropping and adding members."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            if info.filename in drop:
                continue
            dst.writestr(info.filename, replace.get(info.filename, src.read(info.filename)))
        for name, data in add.items():
            dst.writestr(name, data)


def _member(path, suffix):
    with zipfile.ZipFile(path) as zf:
        return next(n for n in zf.namelist() if n.endswith(suffix))


def test_zip_member_climbing_out_of_the_archive_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    source = _saved(torch, tmp_path, True)
    for evil in ("archive/../../etc/passwd", "/etc/passwd", "archive/data/..\\..\\x"):
        target = tmp_path / "evil.pt"
        _rewrite_zip(source, target, add={evil: b"x"})
        with pytest.raises(CheckpointError, match="unsafe member name"):
            load_torch_checkpoint(target)


def test_persistent_id_pointing_outside_the_archive_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    source = _saved(torch, tmp_path, True)
    pkl = _member(source, "data.pkl")
    with zipfile.ZipFile(source) as zf:
        data = zf.read(pkl)
    key = b"X\x01\x00\x00\x000"          # BINUNICODE '0': the first storage key
    assert key in data
    evil_key = b"../../../etc/passwd"
    hostile = data.replace(key, b"X" + len(evil_key).to_bytes(4, "little") + evil_key, 1)
    target = tmp_path / "evil.pt"
    _rewrite_zip(source, target, replace={pkl: hostile})
    with pytest.raises(UnsafePickleError, match="could point outside the archive"):
        load_torch_checkpoint(target)


def test_storage_referenced_but_missing_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    source = _saved(torch, tmp_path, True)
    target = tmp_path / "missing.pt"
    _rewrite_zip(source, target, drop={_member(source, "data/0")})
    with pytest.raises(CheckpointError, match="storage '0' is referenced but .* is missing"):
        load_torch_checkpoint(target)


def test_zip_storage_larger_than_its_data_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    source = _saved(torch, tmp_path, True)
    member = _member(source, "data/0")
    with zipfile.ZipFile(source) as zf:
        data = zf.read(member)
    target = tmp_path / "short.pt"
    _rewrite_zip(source, target, replace={member: data[:-4]})
    with pytest.raises(CheckpointError, match=r"storage '0' declares 12 float32 elements \(48 bytes\)"):
        load_torch_checkpoint(target)


def test_legacy_storage_larger_than_its_data_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    data = _saved(torch, tmp_path, False).read_bytes()
    # The float storage (12 elements) is written as an 8-byte count then 48 bytes.
    header = (12).to_bytes(8, "little")
    position = data.index(header + np.arange(12, dtype=np.float32).tobytes())
    for count, match in ((11, "declares 12 float32 elements but its data holds 11"),
                         (10**12, "truncated")):
        path = tmp_path / "lie.pt"
        path.write_bytes(data[:position] + count.to_bytes(8, "little") + data[position + 8:])
        with pytest.raises(CheckpointError, match=match):
            load_torch_checkpoint(path)


def test_hostile_checkpoint_cannot_run_code(tmp_path):
    canary = tmp_path / "canary"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {canary}",)

    path = tmp_path / "evil.th"
    # A legacy-format file whose object pickle carries the payload.
    header = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    path.write_bytes(header + pickle.dumps({"state_dict": Payload()}, protocol=2) + pickle.dumps([], protocol=2))
    with bounded():
        with pytest.raises(UnsafePickleError, match=r"evil\.th.*refused global posix\.system"):
            load_torch_checkpoint(path)
    assert not canary.exists()


def test_non_checkpoint_dicts_are_reported(tmp_path):
    torch = pytest.importorskip("torch")
    path = _saved(torch, tmp_path, True, obj={"epoch": 3, "lr": 0.1})
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_torch_checkpoint(path)


# ---------------------------------------------------------------------------
# Fuzzing: truncations and bit flips raise only documented exceptions
# ---------------------------------------------------------------------------
def _fuzz_once(tmp_dir, data: bytes, cut, flips: list[int], reader):
    path = os.path.join(tmp_dir, "fuzzed")
    with open(path, "wb") as handle:
        handle.write(mutate(data, cut, flips))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # bfloat16 notes
        expect_documented_errors(reader, path)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def npz_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("npz") / "s.npz"
    save({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "meta": {"epoch": 2, "names": ["a", "b"]}}, path)
    return path.read_bytes()


@FUZZ_SETTINGS
@given(**MUTATIONS)
def test_fuzzed_npz_raises_only_documented_errors(fuzz_dir, npz_bytes, cut, flips):
    _fuzz_once(fuzz_dir, npz_bytes, cut, flips, load)


@pytest.fixture(scope="module")
def torch_checkpoints(tmp_path_factory):
    torch = pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("torch")
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    obj = {"state_dict": collections.OrderedDict([("module.w", base[1:3, ::2]), ("module.n", torch.tensor(3)),
                                                  ("module.h", torch.ones(2).half())])}
    result = {}
    for zip_format in (True, False):
        path = folder / f"{zip_format}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
        result["zip" if zip_format else "legacy"] = path.read_bytes()
    return result


@pytest.mark.parametrize("kind", ["zip", "legacy"])
@FUZZ_SETTINGS
@given(**MUTATIONS)
def test_fuzzed_torch_checkpoints_raise_only_documented_errors(fuzz_dir, torch_checkpoints, kind, cut, flips):
    _fuzz_once(fuzz_dir, torch_checkpoints[kind], cut, flips, load_torch_checkpoint)
