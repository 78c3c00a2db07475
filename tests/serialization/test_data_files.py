"""Dataset file readers on small files written here in the official layouts (CIFAR pickles as
Python 2 wrote them, SVHN via scipy.io.savemat), plus a smoke test on the shared CIFAR-10."""
from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
import scipy.io
from hypothesis import given

from minibasis.data import DatasetError, load_cifar10, load_cifar100, load_svhn
from minibasis.serialization import UnsafePickleError
from test_safe_pickle import FUZZ_SETTINGS, MUTATIONS, bounded, expect_documented_errors, mutate, py2_dumps

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _images(rng, count):
    """Images as the official rows: (count, 3072) uint8, R then G then B planes, row-major."""
    return rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)


def _expected_chw(rows):
    """CHW images from official rows, pixel by pixel (independent of any reshape in the loader)."""
    out = np.empty((len(rows), 3, 32, 32), dtype=np.uint8)
    for n, row in enumerate(rows):
        for c in range(3):
            for y in range(32):
                out[n, c, y, :] = row[c * 1024 + y * 32: c * 1024 + y * 32 + 32]
    return out


def write_cifar10(folder, per_batch=4, seed=0):
    """An official-layout cifar-10-batches-py folder; returns the rows and labels written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = _images(rng, per_batch)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(py2_dumps(batch))
        written[name] = (rows, labels)
    (folder / "batches.meta").write_bytes(py2_dumps({b"label_names": CIFAR10_NAMES, b"num_cases_per_batch": per_batch,
                                                     b"num_vis": 3072}))
    return written


def write_cifar100(folder, count=6, seed=1):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in ("train", "test"):
        rows = _images(rng, count)
        fine = [int(v) for v in rng.integers(0, 100, count)]
        record = {b"filenames": [b"x.png"] * count, b"batch_label": name.encode(), b"fine_labels": fine,
                  b"coarse_labels": [f // 5 for f in fine], b"data": rows}
        (folder / name).write_bytes(py2_dumps(record))
        written[name] = (rows, fine)
    (folder / "meta").write_bytes(py2_dumps({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                                             b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}))
    return written


def write_svhn(folder, counts=(5, 3), seed=2, compress=True):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, count in zip(("train_32x32.mat", "test_32x32.mat"), counts):
        x = rng.integers(0, 256, size=(32, 32, 3, count), dtype=np.uint8)
        y = rng.integers(1, 11, size=(count, 1)).astype(np.uint8)
        y[0, 0] = 10                                     # digit 0, stored as 10
        scipy.io.savemat(folder / name, {"X": x, "y": y}, do_compression=compress)
        written[name] = (x, y)
    return written


# ---------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("give_parent", [True, False])
def test_cifar10_official_layout(tmp_path, give_parent):
    written = write_cifar10(tmp_path / "cifar-10-batches-py")
    root = tmp_path if give_parent else tmp_path / "cifar-10-batches-py"
    splits = load_cifar10(root)
    (x_train, y_train), (x_test, y_test) = splits
    train_rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert x_train.shape == (20, 3, 32, 32) and x_train.dtype == np.uint8
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    np.testing.assert_array_equal(x_train, _expected_chw(train_rows))
    np.testing.assert_array_equal(y_train, train_labels)
    np.testing.assert_array_equal(x_test, _expected_chw(written["test_batch"][0]))
    np.testing.assert_array_equal(y_test, written["test_batch"][1])
    assert splits.label_names == tuple(n.decode() for n in CIFAR10_NAMES)
    assert splits.train[0] is x_train and splits.test[1] is y_test


def test_cifar10_agrees_with_the_stock_unpickler(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    reference = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    (_, _), (x_test, y_test) = load_cifar10(folder)
    np.testing.assert_array_equal(x_test.reshape(len(x_test), -1), reference[b"data"])
    np.testing.assert_array_equal(y_test, reference[b"labels"])


def test_cifar100_official_layout(tmp_path):
    written = write_cifar100(tmp_path / "cifar-100-python")
    splits = load_cifar100(tmp_path)
    (x_train, y_train), (x_test, y_test) = splits
    np.testing.assert_array_equal(x_train, _expected_chw(written["train"][0]))
    np.testing.assert_array_equal(y_train, written["train"][1])
    np.testing.assert_array_equal(x_test, _expected_chw(written["test"][0]))
    assert y_test.dtype == np.int64 and list(y_test) == written["test"][1]
    assert splits.label_names[:2] == ("class0", "class1") and len(splits.label_names) == 100


def test_missing_cifar_files_name_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*data_batch_1"):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar100(tmp_path / "does-not-exist")
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="lacks \\['data_batch_3'\\]"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("change, match", [
    (lambda b: b.pop(b"labels"), r"test_batch: key 'labels' missing"),
    (lambda b: b.update({b"labels": b[b"labels"][:-1]}), r"'labels' has shape \(3,\), expected \(4,\)"),
    (lambda b: b.update({b"labels": [0, 1, 2, 10]}), r"'labels' has values in \[0, 10\], expected 0..9"),
    (lambda b: b.update({b"labels": [0, 1, 2, b"x"]}), "'labels'"),
    (lambda b: b.update({b"labels": 7}), "'labels' must be a list of ints"),
    (lambda b: b.update({b"data": b[b"data"].astype(np.int16)}), r"'data' must be a uint8 array .* got int16"),
    (lambda b: b.update({b"data": b[b"data"][:, :100]}), r"'data' must be a uint8 array of shape \(N, 3072\)"),
    (lambda b: b.update({b"data": b"raw"}), "'data' must be a uint8 array"),
])
def test_malformed_cifar_batches_raise_dataset_error(tmp_path, change, match):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    batch = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    change(batch)
    (folder / "test_batch").write_bytes(py2_dumps(batch))
    with pytest.raises(DatasetError, match=match):
        load_cifar10(tmp_path)


def test_non_dict_and_truncated_batches_raise_dataset_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "test_batch").write_bytes(py2_dumps([1, 2]))
    with pytest.raises(DatasetError, match="test_batch: expected a pickled dict, got list"):
        load_cifar10(folder)
    write_cifar10(folder)
    data = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="data_batch_2: malformed or truncated pickle"):
        load_cifar10(folder)


def test_hostile_cifar_batch_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    canary = tmp_path / "canary"
    hostile = b"\x80\x02}(U\x04datacposix\nsystem\nX" + len(f"touch {canary}").to_bytes(4, "little") \
        + f"touch {canary}".encode() + b"\x85Ru."
    (folder / "data_batch_1").write_bytes(hostile)
    with pytest.raises(UnsafePickleError, match=r"data_batch_1: refused global posix\.system"):
        load_cifar10(folder)
    assert not canary.exists()


def test_real_cifar10_smoke(cifar10_dir):
    start = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = splits = load_cifar10(cifar10_dir.parent)
    elapsed = time.perf_counter() - start
    assert x_train.shape == (50000, 3, 32, 32) and x_test.shape == (10000, 3, 32, 32)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64 and y_test.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), [1000] * 10)
    np.testing.assert_array_equal(np.bincount(y_train, minlength=10), [5000] * 10)
    assert splits.label_names[0] == "airplane" and splits.label_names[9] == "truck"
    # Channel means quoted in the data README (train mean / 255 = 0.4913, 0.4821, 0.4465).
    means = x_train.mean(axis=(0, 2, 3)) / 255
    np.testing.assert_allclose(means, [0.4913, 0.4821, 0.4465], atol=6e-4)
    # One image checked against the stock unpickler, pixel by pixel.
    reference = pickle.loads((cifar10_dir / "test_batch").read_bytes(), encoding="bytes")
    np.testing.assert_array_equal(x_test[123], _expected_chw(reference[b"data"][123:124])[0])
    assert elapsed < 15.0, f"loading CIFAR-10 took {elapsed:.1f} s"


# ---------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [True, False])
def test_svhn_official_layout(tmp_path, compress):
    written = write_svhn(tmp_path, compress=compress)
    (x_train, y_train), (x_test, y_test) = load_svhn(tmp_path)
    for (x, y), name in (((x_train, y_train), "train_32x32.mat"), ((x_test, y_test), "test_32x32.mat")):
        source_x, source_y = written[name]
        assert x.shape == (source_x.shape[3], 3, 32, 32) and x.dtype == np.uint8 and x.flags.c_contiguous
        for n in range(source_x.shape[3]):        # X[h, w, c, n] is image n, channel c, row h, column w
            for c in range(3):
                np.testing.assert_array_equal(x[n, c], source_x[:, :, c, n])
        expected = [0 if v == 10 else int(v) for v in source_y[:, 0]]
        assert y.dtype == np.int64 and list(y) == expected and y[0] == 0


def test_svhn_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        load_svhn(tmp_path)
    write_svhn(tmp_path)
    x = np.zeros((32, 32, 3, 2), dtype=np.float64)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.ones((2, 1))})
    with pytest.raises(DatasetError, match=r"test_32x32.mat: 'X' must be a uint8 array .* got float64"):
        load_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x.astype(np.uint8), "y": np.full((2, 1), 11)})
    with pytest.raises(DatasetError, match="'y' must hold integer labels"):
        load_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x.astype(np.uint8)})
    with pytest.raises(DatasetError, match="variable 'y' missing"):
        load_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(DatasetError, match=r"'X' has shape \(28, 28, 3, 2\)"):
        load_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DatasetError, match="test_32x32.mat"):
        load_svhn(tmp_path)


def test_svhn_decompression_bomb_is_refused(tmp_path):
    write_svhn(tmp_path)
    big = np.zeros((32, 32, 3, 20000), dtype=np.uint8)       # 61 MB of zeros compress to ~60 KB
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": big, "y": np.ones((20000, 1), np.uint8)},
                     do_compression=True)
    assert (tmp_path / "test_32x32.mat").stat().st_size < 2**20
    with bounded(seconds=10, megabytes=16):
        with pytest.raises(DatasetError, match="decompression bomb"):
            load_svhn(tmp_path)


# ---------------------------------------------------------------------------
# Fuzzing: truncations and bit flips raise only documented exceptions
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar100_fuzz_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("c100")
    write_cifar100(folder, count=3)
    return folder, (folder / "train").read_bytes()


@FUZZ_SETTINGS
@given(**MUTATIONS)
def test_fuzzed_cifar_batch_raises_only_documented_errors(cifar100_fuzz_dir, cut, flips):
    folder, original = cifar100_fuzz_dir
    (folder / "train").write_bytes(mutate(original, cut, flips))
    expect_documented_errors(load_cifar100, folder)


@pytest.fixture(scope="module")
def svhn_fuzz_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("svhn")
    write_svhn(folder, counts=(2, 1))
    return folder, (folder / "train_32x32.mat").read_bytes()


@FUZZ_SETTINGS
@given(**MUTATIONS)
def test_fuzzed_svhn_mat_raises_only_documented_errors(svhn_fuzz_dir, cut, flips):
    folder, original = svhn_fuzz_dir
    (folder / "train_32x32.mat").write_bytes(mutate(original, cut, flips))
    expect_documented_errors(load_svhn, folder)
