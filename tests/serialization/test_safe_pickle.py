"""The restricted unpickler: hostile pickles are refused (by name, quickly, in little memory),
and honest pickles load exactly as the stock unpickler loads them.

Pickles here are written by the standard library, by hand (opcode by opcode), or by
``py2_dumps``: an independent emitter of Python-2-style protocol-2 pickles (BINSTRING
opcodes, ``numpy.core.multiarray._reconstruct``), the format of the official CIFAR files.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import subprocess
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from minibasis import serialization as sp
from minibasis.serialization import PickleDataError, UnsafePickleError, safe_load


# ---------------------------------------------------------------------------
# Helpers shared with test_io.py and test_data_files.py
# ---------------------------------------------------------------------------
def py2_dumps(obj) -> bytes:
    """Protocol-2 pickle as Python 2's cPickle wrote it (bytes as BINSTRING, arrays via
    ``numpy.core.multiarray._reconstruct``). Written from the pickle opcode table, it shares
    no code with minibasis. Supports None, bool, int, float, bytes, str, tuple, list, dict, ndarray."""
    out = [b"\x80\x02"]

    def emit(o):
        if o is None:
            out.append(b"N")
        elif o is True or o is False:
            out.append(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.append(b"K" + bytes([o]))
            elif 0 <= o < 65536:
                out.append(b"M" + struct.pack("<H", o))
            else:
                out.append(b"J" + struct.pack("<i", o))
        elif isinstance(o, float):
            out.append(b"G" + struct.pack(">d", o))
        elif isinstance(o, bytes):
            out.append(b"U" + bytes([len(o)]) + o if len(o) < 256 else b"T" + struct.pack("<i", len(o)) + o)
        elif isinstance(o, str):
            data = o.encode("utf-8")
            out.append(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(o, tuple):
            out.append(b"(")
            for item in o:
                emit(item)
            out.append(b"t")
        elif isinstance(o, list):
            out.append(b"](")
            for item in o:
                emit(item)
            out.append(b"e")
        elif isinstance(o, dict):
            out.append(b"}(")
            for key, value in o.items():
                emit(key)
                emit(value)
            out.append(b"u")
        elif isinstance(o, np.ndarray):
            # Byte order as stored ("|" for one-byte types); Fortran layout when only F-contiguous.
            order = "|" if o.dtype.itemsize == 1 else (">" if o.dtype.byteorder == ">" else "<")
            fortran = o.flags.f_contiguous and not o.flags.c_contiguous
            out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R")
            out.append(b"(K\x01")
            emit(tuple(o.shape))
            out.append(b"cnumpy\ndtype\n")
            emit(f"{o.dtype.kind}{o.dtype.itemsize}".encode())
            out.append(b"K\x00K\x01\x87R(K\x03")
            emit(order.encode())
            out.append(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
            out.append(b"\x88" if fortran else b"\x89")
            emit(o.tobytes(order="F" if fortran else "C"))
            out.append(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.append(b".")
    return b"".join(out)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def bounded(seconds: float = 5.0, megabytes: float = 64.0):
    """Fail if the block runs longer than ``seconds`` (SIGALRM) or its traced allocations
    (Python objects and NumPy buffers) peak above ``megabytes``."""
    def on_alarm(signum, frame):
        raise _Timeout(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    tracemalloc.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < megabytes * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"


#: Hypothesis arguments for :func:`mutate`: an optional truncation point and up to 3 bit flips.
MUTATIONS = dict(cut=st.none() | st.integers(0, 10**6), flips=st.lists(st.integers(0, 10**9), max_size=3))
#: Fuzz tests stay small: ~50 examples each, no per-example deadline.
FUZZ_SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mutate(data: bytes, cut, flips) -> bytes:
    """``data`` truncated at ``cut`` (None: whole; taken modulo length + 1) with bits flipped."""
    mutated = bytearray(data if cut is None else data[:cut % (len(data) + 1)])
    for flip in flips:
        if mutated:
            mutated[(flip // 8) % len(mutated)] ^= 1 << (flip % 8)
    return bytes(mutated)


def expect_documented_errors(read, *args, seconds: float = 10, megabytes: float = 256):
    """``read(*args)`` succeeds or raises a documented error (ValueError, FileNotFoundError),
    within bounded time and memory; any other exception fails the test."""
    try:
        with bounded(seconds=seconds, megabytes=megabytes):
            read(*args)
    except (ValueError, FileNotFoundError):
        pass


def refused(data: bytes, profile=sp.CIFAR, match: str | None = None, error=UnsafePickleError, **kwargs):
    """safe_load(data) raises ``error`` (matching ``match``) within bounded time and memory."""
    with bounded():
        with pytest.raises(error, match=match) as info:
            safe_load(data, profile=profile, name="hostile.pkl", **kwargs)
    assert "hostile.pkl" in str(info.value)
    return info.value


# ---------------------------------------------------------------------------
# Code execution attempts
# ---------------------------------------------------------------------------
class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("how", ["os.system", "subprocess.call", "subprocess.Popen"])
def test_reduce_that_runs_a_command_is_refused_and_creates_nothing(tmp_path, protocol, how):
    canary = tmp_path / "canary"
    command = ["touch", str(canary)]
    func = {"os.system": os.system, "subprocess.call": subprocess.call, "subprocess.Popen": subprocess.Popen}[how]
    payload = _Payload(func, " ".join(command) if how == "os.system" else command)
    data = pickle.dumps({"data": payload}, protocol=protocol)
    for profile in (sp.CIFAR, sp.TORCH, sp.PLAIN):
        error = refused(data, profile=profile, match="refused global")
        # Module spelled posix/os, or commands for Python-2 compatible protocols.
        assert f".{how.split('.')[1]} " in str(error)
    assert not canary.exists()
    # The stock unpickler does run it: the payload is live.
    result = pickle.loads(data)["data"]
    if hasattr(result, "wait"):
        result.wait()
    assert canary.exists(), "the payload is not live, so the test proves nothing"


@pytest.mark.parametrize("global_name", ["builtins eval", "builtins exec", "builtins getattr",
                                         "__builtin__ eval", "builtins __import__", "copyreg _reconstructor",
                                         "numpy load", "numpy.lib.npyio load", "torch load",
                                         "collections defaultdict", "numpy.core.multiarray scalar"])
def test_globals_outside_the_allow_list_are_refused_by_name(global_name):
    module, name = global_name.split()
    data = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x04\x00\x00\x001+1\x85R."
    error = refused(data, match="refused global")
    assert f"{module}.{name}" in str(error)


def test_getattr_chain_is_refused_and_creates_nothing(tmp_path):
    # getattr(__import__('os'), 'system')('touch canary'), protocol 0, written by hand.
    canary = tmp_path / "canary"
    data = (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR"
            b"(V" + f"touch {canary}".encode() + b"\ntR.")
    error = refused(data, match="refused global")
    assert "builtins.getattr" in str(error)
    assert not canary.exists()
    pickle.loads(data)
    assert canary.exists(), "the payload is not live, so the test proves nothing"


def test_stack_global_crafted_by_hand_is_refused_at_find_class():
    # STACK_GLOBAL takes module and name from the stack: the scan cannot see them, find_class must.
    data = (b"\x80\x04\x8c\x02os\x8c\x06system\x93"          # os.system via STACK_GLOBAL
            b"\x8c\x04true\x85R.")
    refused(data, match=r"refused global os\.system")


def test_inst_opcode_is_refused_naming_its_global():
    data = b"(S'touch /tmp/never'\nios\nsystem\n."            # protocol 0: INST os system
    refused(data, match=r"INST naming os\.system")


@pytest.mark.parametrize("data, opcode", [
    (b"(ccollections\nOrderedDict\no.", "OBJ"),                       # admitted class, forbidden opcode
    (b"\x80\x02ccollections\nOrderedDict\n)\x81.", "NEWOBJ"),
    (b"\x80\x04ccollections\nOrderedDict\n)}\x92.", "NEWOBJ_EX"),
    (b"\x80\x02\x82\x01.", "EXT1"),
    (b"\x80\x05\x97.", "NEXT_BUFFER"),
])
def test_instantiating_and_registry_opcodes_are_refused(data, opcode):
    refused(data, match=f"refused opcode {opcode}")


def test_build_cannot_rewrite_an_admitted_global():
    # BUILD with slot-state on a plain function would set its __defaults__ for every later load.
    data = (b"\x80\x02ctorch._utils\n_rebuild_parameter\n"
            b"N}X\x0c\x00\x00\x00__defaults__(K\x01ts\x86b.")
    refused(data, profile=sp.TORCH, match="BUILD applied to the global torch._utils._rebuild_parameter")


def test_ordered_dict_build_may_only_set_torch_metadata():
    data = b"\x80\x02ccollections\nOrderedDict\n)R}X\x04\x00\x00\x00keysK\x01sb."
    refused(data, match="OrderedDict BUILD may only set '_metadata'")


def test_ndarray_global_cannot_be_called_to_allocate():
    data = b"\x80\x02cnumpy\nndarray\nJ\x00\xca\x9a;\x85\x85R."   # numpy.ndarray((10**9,))
    refused(data, match="numpy.ndarray may only appear")


def test_object_and_structured_dtypes_are_refused():
    refused(b"\x80\x02cnumpy\ndtype\nU\x02O8K\x00K\x01\x87R.", match="numpy dtype 'O8' is not admitted")
    refused(b"\x80\x02cnumpy\ndtype\nU\x02V8K\x00K\x01\x87R.", match="'V8' is not admitted")


def test_object_array_data_is_refused():
    honest = py2_dumps(np.zeros(2, dtype=np.uint8))
    # Replace the raw bytes (SHORT_BINSTRING of 2 bytes) by a list, as an object array pickles.
    hostile = honest.replace(b"U\x02\x00\x00tb", b"](K\x01K\x02etb")
    assert hostile != honest
    refused(hostile, match="object arrays are refused")


# ---------------------------------------------------------------------------
# Resource bombs
# ---------------------------------------------------------------------------
def _memo_doubling_bomb(levels: int) -> bytes:
    """list_i = [list_(i-1), list_(i-1)] through the memo: 2**levels nodes, ~10 bytes per level."""
    out = [b"\x80\x02]r" + struct.pack("<I", 0)]
    for i in range(1, levels + 1):
        get = b"j" + struct.pack("<I", i - 1)
        out.append(b"0]r" + struct.pack("<I", i) + b"(" + get + get + b"e")
    out.append(b".")
    return b"".join(out)


def test_billion_laughs_of_shared_lists_is_refused_fast():
    data = _memo_doubling_bomb(60)   # 2**61 nodes, depth 60 (within the depth limit)
    assert len(data) < 2000
    refused(data, profile=sp.PLAIN, match="billion laughs")


def test_huge_memo_index_is_refused_before_allocation():
    # LONG_BINPUT 2**31-1 would make the C unpickler allocate and zero a 16 GiB memo table.
    data = b"\x80\x02]r\xff\xff\xff\x7f."
    refused(data, match="memo index 2147483647")


def test_deep_nesting_is_refused():
    # 10,000 nested lists built with constant stack depth by overwriting memo slot 0.
    body = b"".join(b"]h\x00aq\x000" for _ in range(10_000))
    data = b"\x80\x02]q\x000" + body + b"h\x00."
    refused(data, profile=sp.PLAIN, match="nested deeper than")


def test_reference_cycle_is_refused():
    data = b"\x80\x02]q\x00h\x00a."          # a list that contains itself
    refused(data, profile=sp.PLAIN, match="reference cycle")


def test_declared_length_beyond_the_data_is_refused():
    data = b"\x80\x02T\xff\xff\xff\x7fabc."   # BINSTRING claiming 2 GiB
    refused(data, error=PickleDataError, match="declares 2147483647 bytes")


def test_array_declaring_more_bytes_than_it_carries_is_refused():
    honest = py2_dumps(np.arange(6, dtype=np.uint8).reshape(2, 3))
    hostile = honest.replace(b"(K\x02K\x03t", b"(J\x00\xca\x9a;J\x00\xca\x9a;t")   # shape (1e9, 1e9)
    assert hostile != honest
    refused(hostile, match=r"declares shape \(1000000000, 1000000000\)")


def test_opcode_limit_is_enforced():
    profile = sp.Profile("tiny", {}, limits=sp.Limits(max_opcodes=100))
    data = b"\x80\x02](" + b"K\x01" * 200 + b"e."
    refused(data, profile=profile, match="more than 100 opcodes")


def test_persistent_id_in_a_format_without_them_is_refused():
    data = b"\x80\x02X\x01\x00\x00\x00xQ."
    refused(data, profile=sp.PLAIN, match="persistent id")


@pytest.mark.parametrize("key", ["../../etc/passwd", "/etc/passwd", "data/0", "a.b", "", "x" * 200])
def test_storage_key_that_could_name_a_path_is_refused(key):
    registry = sp.TorchStorages("model.pt", legacy=False)
    float_storage = sp.TORCH.stand_ins["torch.FloatStorage"]
    with pytest.raises(UnsafePickleError, match="storage key"):
        registry(("storage", float_storage, key, "cpu", 4))


@pytest.mark.parametrize("pid, match", [
    (("module", None, "0", "cpu", 4), "kind must be 'storage'"),
    (("storage", "FloatStorage", "0", "cpu", 4), "storage type must be a torch storage class"),
    (("storage", "T", "0", "cpu", -1), "invalid element count"),
    (("storage", "T", "0", "cpu", 4, None), "must be a 5-tuple"),
    ("storage", "must be a 5-tuple"),
])
def test_malformed_persistent_ids_are_refused(pid, match):
    float_storage = sp.TORCH.stand_ins["torch.FloatStorage"]
    pid = tuple(float_storage if part == "T" else part for part in pid) if isinstance(pid, tuple) else pid
    with pytest.raises(UnsafePickleError, match=match):
        sp.TorchStorages("model.pt", legacy=False)(pid)


def test_tensor_view_beyond_its_storage_is_refused():
    registry = sp.TorchStorages("model.pt", legacy=False)
    storage = registry(("storage", sp.TORCH.stand_ins["torch.FloatStorage"], "0", "cpu", 6))
    rebuild = sp.TORCH.stand_ins["torch._utils._rebuild_tensor_v2"]
    rebuild(storage, 0, (2, 3), (3, 1), False, None)           # fits exactly
    with pytest.raises(UnsafePickleError, match="reaches element 6"):
        rebuild(storage, 1, (2, 3), (3, 1), False, None)


def test_zero_stride_expansion_is_bounded_by_the_output_budget():
    registry = sp.TorchStorages("model.pt", legacy=False)
    storage = registry(("storage", sp.TORCH.stand_ins["torch.FloatStorage"], "0", "cpu", 1))
    storage.data = b"\x00\x00\x80\x3f"
    tensor = sp.TORCH.stand_ins["torch._utils._rebuild_tensor_v2"](storage, 0, (10**6, 10**6), (0, 0), False, None)
    with bounded():
        with pytest.raises(UnsafePickleError, match="output budget"):
            sp.resolve({"w": tensor}, name="model.pt", output_budget=2**20)


def test_truncated_pickle_is_a_data_error():
    data = pickle.dumps({"a": [1, 2, 3]}, protocol=2)
    for cut in range(len(data)):
        with pytest.raises(PickleDataError):
            safe_load(data[:cut], profile=sp.PLAIN)


# ---------------------------------------------------------------------------
# Honest pickles
# ---------------------------------------------------------------------------
def test_py2_emitter_agrees_with_the_stock_unpickler():
    # The emitter is itself checked against CPython's unpickler (trusted input here).
    obj = {b"batch_label": b"x", b"labels": [0, 9, 300, 70000], b"f": 1.5, b"n": None,
           b"data": np.arange(24, dtype=np.uint8).reshape(4, 6), b"t": (True, False)}
    loaded = pickle.loads(py2_dumps(obj), encoding="bytes")
    assert loaded.keys() == obj.keys()
    np.testing.assert_array_equal(loaded[b"data"], obj[b"data"])
    assert loaded[b"labels"] == obj[b"labels"] and loaded[b"t"] == obj[b"t"]


@pytest.mark.parametrize("dtype", ["u1", "i1", "<i2", "<i4", "<i8", "<f2", "<f4", "<f8", "<c8", "b1", "<u4"])
def test_arrays_of_every_admitted_kind_round_trip(dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 5)) * 50).astype(dtype)
    data = py2_dumps({b"data": array})
    ours = safe_load(data, profile=sp.CIFAR)[b"data"]
    reference = pickle.loads(data, encoding="bytes")[b"data"]
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)
    assert ours.flags.writeable and ours.flags.c_contiguous


@pytest.mark.parametrize("array", [np.arange(12, dtype=">i4").reshape(3, 4),
                                   np.asfortranarray(np.arange(24.0).reshape(2, 3, 4))])
def test_big_endian_and_fortran_arrays_load_like_the_stock_unpickler(array):
    data = py2_dumps({b"data": array})
    ours = safe_load(data, profile=sp.CIFAR)[b"data"]
    reference = pickle.loads(data, encoding="bytes")[b"data"]
    np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(ours, array)
    assert ours.dtype.isnative and ours.flags.c_contiguous


def test_python3_bytes_at_protocol_2_need_codecs_and_are_refused():
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, 'latin1'): not admitted.
    refused(pickle.dumps({b"data": b"xyz"}, protocol=2), match=r"refused global _codecs\.encode")


def test_shared_references_stay_shared_and_ordered_dicts_stay_ordered():
    inner = [1, 2]
    data = pickle.dumps({"a": inner, "b": inner, "od": __import__("collections").OrderedDict([("z", 1), ("a", 2)])},
                        protocol=2)
    loaded = safe_load(data, profile=sp.CIFAR)
    assert loaded["a"] is loaded["b"] and loaded["a"] == [1, 2]
    assert list(loaded["od"]) == ["z", "a"] and type(loaded["od"]).__name__ == "OrderedDict"


def test_safe_load_leaves_a_file_just_after_the_pickle(tmp_path):
    path = tmp_path / "two.pkl"
    path.write_bytes(pickle.dumps([1, 2], protocol=2) + pickle.dumps("second", protocol=2))
    with open(path, "rb") as handle:
        assert safe_load(handle, profile=sp.PLAIN) == [1, 2]
        assert safe_load(handle, profile=sp.PLAIN) == "second"


def test_real_cifar_test_batch_loads_like_the_stock_unpickler(cifar10_dir):
    data = (cifar10_dir / "test_batch").read_bytes()
    start = time.perf_counter()
    ours = safe_load(data, profile=sp.CIFAR, name="test_batch")
    elapsed = time.perf_counter() - start
    reference = pickle.loads(data, encoding="bytes")
    assert ours.keys() == reference.keys()
    np.testing.assert_array_equal(ours[b"data"], reference[b"data"])
    assert ours[b"labels"] == reference[b"labels"] and ours[b"filenames"] == reference[b"filenames"]
    assert elapsed < 5.0
