"""The one restricted unpickler that minibasis uses for every pickle it reads.

A pickle is a program: ``pickle.load`` on a file from outside can run any code.
Every loader in minibasis that meets a pickle (CIFAR batches, PyTorch
checkpoints) goes through :func:`safe_load` instead, which

1. reads the whole pickle into memory (at most ``limits.max_pickle_bytes``),
2. scans its opcodes with :mod:`pickletools` *before* anything is built:
   refuses opcodes that instantiate classes (INST, OBJ, NEWOBJ, NEWOBJ_EX),
   extension codes and out-of-band buffers, refuses GLOBALs outside the
   profile's allow-list, refuses persistent ids where the format has none,
   and bounds the opcode count and the memo indices (a huge ``LONG_BINPUT``
   index would make the C unpickler allocate a memo table of that size),
3. unpickles with a :class:`pickle.Unpickler` subclass whose ``find_class``
   returns *stand-ins implemented in this package* for the admitted globals (never the
   real numpy or torch callables; torch is never imported), so the pickle can
   only call functions that validate their arguments and build inert
   placeholder objects,
4. walks the result once (iteratively, no recursion) to replace the
   placeholders by NumPy arrays, refusing reference cycles, nesting deeper
   than ``limits.max_depth`` and structures whose size *with shared references
   counted every time they are reached* exceeds ``limits.max_nodes`` (a
   "billion laughs" DAG of lists referencing each other through the memo is
   tiny in memory but explodes in anything that walks it).

Profiles (what each format may name):

* :data:`CIFAR`: ``numpy.core.multiarray._reconstruct``,
  ``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``,
  ``collections.OrderedDict``. Arrays must have a numeric or bool dtype and
  carry exactly ``prod(shape) * itemsize`` bytes.
* :data:`TORCH`: ``torch._utils._rebuild_tensor_v2``,
  ``torch._utils._rebuild_tensor``, ``torch._utils._rebuild_parameter``,
  ``torch.<Type>Storage`` for the dtypes in :data:`TORCH_STORAGE_TYPES`,
  ``torch.UntypedStorage``, ``collections.OrderedDict``; persistent ids must
  be ``('storage', <storage type>, key, location, numel[, view])`` tuples (see
  :class:`TorchStorages`). Tensors become NumPy arrays only after their
  storages' bytes are attached (:func:`resolve`).
* :data:`PLAIN`: no globals at all (plain containers, numbers, strings).

Everything else raises :class:`UnsafePickleError` naming the global (or
opcode) and the file. Malformed or truncated pickles raise
:class:`PickleDataError`. Both are ``ValueError`` subclasses; nothing else
escapes :func:`safe_load`.
"""
from __future__ import annotations

import collections
import io
import pickle
import pickletools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from minibasis.serialization.errors import PickleDataError, UnsafePickleError

__all__ = ["Limits", "Profile", "PLAIN", "safe_load", "safe_load_prefix", "resolve", "Resolved"]


@dataclass(frozen=True)
class Limits:
    """Resource bounds applied to one pickle."""

    #: Largest pickle stream read into memory (bytes).
    max_pickle_bytes: int = 512 * 2**20
    #: Most opcodes in one pickle; each opcode builds at most one object.
    max_opcodes: int = 8_000_000
    #: Most nodes of the loaded structure, a shared object counted each time it is reached.
    max_nodes: int = 4_000_000
    #: Deepest nesting of containers.
    max_depth: int = 64
    #: Most dimensions of an array or tensor.
    max_ndim: int = 32
    #: Largest element count a storage may declare (the real bytes are checked too).
    max_storage_elements: int = 2**40


@dataclass(frozen=True)
class Profile:
    """What one file format may name: stand-ins keyed by ``"module.qualname"``."""

    name: str
    stand_ins: Mapping[str, "_Global"]
    #: How Python-2 ``str`` opcodes are decoded (CIFAR's official pickles need "bytes").
    encoding: str = "utf-8"
    limits: Limits = field(default_factory=Limits)

    def stand_in(self, module: str, qualname: str, source: str) -> "_Global":
        full_name = f"{module}.{qualname}"
        try:
            return self.stand_ins[full_name]
        except KeyError:
            raise UnsafePickleError(
                f"{source}: refused global {full_name!s:.200} (the {self.name!r} profile admits only "
                f"{sorted(self.stand_ins) or 'no globals'})") from None


# ---------------------------------------------------------------------------
# Stand-ins: what the pickle gets instead of the real globals
# ---------------------------------------------------------------------------
class _Global:
    """Stand-in for one admitted global: callable with positional arguments only.

    Instances have no ``__dict__`` and refuse BUILD, so a pickle cannot rewrite
    them (a plain function would let BUILD's slot-state set ``__defaults__``).
    """

    __slots__ = ("full_name", "_build")

    def __init__(self, full_name: str, build: Callable[..., Any]):
        self.full_name = full_name
        self._build = build

    def __call__(self, *args):
        return self._build(*args)

    def __setstate__(self, state):
        raise UnsafePickleError(f"BUILD applied to the global {self.full_name}")

    def __repr__(self):
        return f"<stand-in for {self.full_name}>"


class _Stub:
    """Placeholder built while unpickling; :func:`resolve` turns it into its final value."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafePickleError(f"BUILD applied to a {type(self).__name__.strip('_')}")

    def _finish(self, ctx: "_ResolveContext") -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def _is_int(value) -> bool:
    return type(value) is int  # bool excluded on purpose


def _check_shape(shape, what: str, limits: Limits) -> tuple[int, ...]:
    if type(shape) is not tuple or not all(_is_int(d) and d >= 0 for d in shape):
        raise UnsafePickleError(f"{what}: shape must be a tuple of non-negative ints, got {_describe(shape)}")
    if len(shape) > limits.max_ndim:
        raise UnsafePickleError(f"{what}: {len(shape)} dimensions exceed the limit of {limits.max_ndim}")
    return shape


def _describe(value) -> str:
    """A short, safe description of an untrusted value for error messages."""
    if isinstance(value, (int, float, bool, type(None))):
        return repr(value)
    if isinstance(value, (str, bytes)):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, tuple) and len(value) <= 8 and all(isinstance(v, (int, str, bytes, type(None))) for v in value):
        return repr(value)
    return f"<{type(value).__name__}>"


def _text(value, what: str) -> str:
    """A str from a str or ASCII bytes (Python-2 pickles give bytes)."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise UnsafePickleError(f"{what} must be ASCII, got {_describe(value)}") from None
    if isinstance(value, str):
        return value
    raise UnsafePickleError(f"{what} must be a string, got {_describe(value)}")


# -- OrderedDict -------------------------------------------------------------
class _OrderedDictStub(collections.OrderedDict):
    """``collections.OrderedDict``; BUILD may only set torch's ``_metadata`` (dropped)."""

    def __setstate__(self, state):
        if type(state) is not dict or not set(state) <= {"_metadata"}:
            raise UnsafePickleError(
                f"OrderedDict BUILD may only set '_metadata', got {_describe(state) if type(state) is not dict else sorted(map(_describe, state))}")

    def __reduce__(self):  # pragma: no cover - never pickled by minibasis
        return (collections.OrderedDict, (list(self.items()),))


def _ordered_dict(*args):
    if len(args) > 1:
        raise UnsafePickleError(f"OrderedDict takes at most one argument, got {len(args)}")
    if args and type(args[0]) not in (list, tuple):
        raise UnsafePickleError(f"OrderedDict argument must be a list of pairs, got {_describe(args[0])}")
    return _OrderedDictStub(*args)


def _globals(*pairs) -> dict[str, _Global]:
    return {g.full_name: g for g in pairs}


#: Plain data only: containers, numbers, strings, bytes, bools, None.
PLAIN = Profile(name="plain", stand_ins={}, encoding="utf-8", limits=Limits(max_pickle_bytes=64 * 2**20))


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
_REFUSED_OPCODES = {
    "INST": "instantiates a class", "OBJ": "instantiates a class",
    "NEWOBJ": "instantiates a class", "NEWOBJ_EX": "instantiates a class",
    "EXT1": "names a global through the copyreg extension registry",
    "EXT2": "names a global through the copyreg extension registry",
    "EXT4": "names a global through the copyreg extension registry",
    "NEXT_BUFFER": "needs out-of-band buffers", "READONLY_BUFFER": "needs out-of-band buffers",
}
_PERSISTENT_OPCODES = {"PERSID", "BINPERSID"}
_MEMO_PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}


# Length-prefixed payloads (strings, bytes): the scan skips them instead of decoding
# (a CIFAR batch is one 30 MB string); value = (prefix size, signed).
_SKIPPED_PAYLOADS = {
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}


def _opcodes(stream: io.BytesIO, size: int):
    """Like ``pickletools.genops`` but skips long payloads: yields (opcode, arg, pos)."""
    while True:
        pos = stream.tell()
        code = stream.read(1)
        opcode = pickletools.code2op.get(code.decode("latin-1"))
        if opcode is None:
            if not code:
                raise ValueError("pickle exhausted before seeing STOP")
            raise ValueError(f"unknown opcode {code!r} at byte {pos}")
        arg = None
        if opcode.arg is not None:
            skipped = _SKIPPED_PAYLOADS.get(opcode.arg.n)
            if skipped is None:
                arg = opcode.arg.reader(stream)
            else:
                width, signed = skipped
                prefix = stream.read(width)
                if len(prefix) != width:
                    raise ValueError(f"truncated length of {opcode.name} at byte {pos}")
                length = int.from_bytes(prefix, "little", signed=signed)
                if length < 0 or stream.tell() + length > size:
                    raise ValueError(f"{opcode.name} at byte {pos} declares {length} bytes, "
                                     f"{size - stream.tell()} remain")
                stream.seek(length, io.SEEK_CUR)
        yield opcode, arg, pos
        if opcode.name == "STOP":
            return


def _prescan(stream: io.BytesIO, start: int, profile: Profile, persistent: bool, source: str) -> int:
    """Check every opcode of the pickle starting at ``start``; returns the offset after STOP."""
    limits = profile.limits
    size = stream.seek(0, io.SEEK_END)
    stream.seek(start)
    count = 0
    try:
        for opcode, arg, pos in _opcodes(stream, size):
            count += 1
            if count > limits.max_opcodes:
                raise UnsafePickleError(f"{source}: more than {limits.max_opcodes} opcodes (limit)")
            if pos - start > limits.max_pickle_bytes:
                raise UnsafePickleError(f"{source}: pickle longer than {limits.max_pickle_bytes} bytes (limit)")
            name = opcode.name
            if name in _REFUSED_OPCODES:
                detail = f" naming {str(arg).replace(' ', '.')!s:.200}" if name in ("INST",) else ""
                raise UnsafePickleError(
                    f"{source}: refused opcode {name}{detail} at byte {pos} (it {_REFUSED_OPCODES[name]})")
            if name == "PROTO" and not 0 <= arg <= pickle.HIGHEST_PROTOCOL:
                raise PickleDataError(f"{source}: unsupported pickle protocol {arg} at byte {pos}")
            if name == "GLOBAL":
                module, _, qualname = str(arg).partition(" ")
                profile.stand_in(module, qualname, source)  # raises with the global's name
            elif name in _PERSISTENT_OPCODES and not persistent:
                raise UnsafePickleError(f"{source}: persistent id at byte {pos}, but this format has none")
            elif name in _MEMO_PUT_OPCODES and not 0 <= arg <= count:
                # The pickler numbers memo entries 0, 1, 2, ...; a larger index would
                # make the C unpickler allocate a memo table of that size.
                raise UnsafePickleError(f"{source}: memo index {arg} at byte {pos} out of range (limit {count})")
    except PickleDataError:
        raise
    except Exception as exc:  # pickletools raises ValueError on truncation, others on garbage
        raise PickleDataError(f"{source}: malformed or truncated pickle: {exc}") from exc
    return stream.tell()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, stream, profile: Profile, source: str, persistent_load):
        super().__init__(stream, encoding=profile.encoding, errors="strict")
        self._profile = profile
        self._source = source
        self._persistent = persistent_load

    def find_class(self, module, name):
        return self._profile.stand_in(module, name, self._source)

    def persistent_load(self, pid):
        if self._persistent is None:
            raise UnsafePickleError(f"{self._source}: persistent id, but this format has none")
        return self._persistent(pid)


def safe_load_prefix(data: bytes, offset: int = 0, *, profile: Profile,
                     persistent_load: Callable[[Any], Any] | None = None,
                     name: str = "<pickle>", resolve: bool = True) -> tuple[Any, int]:
    """Load the pickle that starts at ``data[offset]``; returns ``(object, offset after it)``.

    Used for files that hold several pickles back to back (legacy torch checkpoints).
    With ``resolve=False`` the result still holds placeholders (tensors whose storage
    bytes come later) and must be passed through :func:`resolve`.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if not 0 <= offset <= len(data):
        raise PickleDataError(f"{name}: offset {offset} outside the {len(data)}-byte buffer")
    stream = io.BytesIO(data)  # shares the bytes object, no copy
    end = _prescan(stream, offset, profile, persistent_load is not None, name)
    stream.seek(offset)
    try:
        obj = _RestrictedUnpickler(stream, profile, name, persistent_load).load()
    except PickleDataError as exc:
        raise _naming(exc, name) from exc.__cause__
    except Exception as exc:  # UnpicklingError, TypeError from a bad REDUCE, ...
        raise PickleDataError(f"{name}: malformed pickle: {type(exc).__name__}: {exc}"[:2000]) from exc
    if stream.tell() != end:
        raise PickleDataError(f"{name}: unpickler stopped at byte {stream.tell()}, scan at byte {end}")
    if resolve:
        obj = _resolve(obj, name=name, limits=profile.limits)
    return obj, end


def _naming(exc: PickleDataError, name: str) -> PickleDataError:
    """``exc`` with the file name in front (stand-ins raise without knowing the file)."""
    message = str(exc)
    return exc if message.startswith(f"{name}:") else type(exc)(f"{name}: {message}")


def _read_bounded(source, limit: int, name: str) -> tuple[bytes, int | None]:
    """Up to ``limit`` bytes from the current position, allocating only what is there
    (``read(n)`` on a buffered file allocates n bytes up front)."""
    if source.seekable():
        start = source.tell()
        remaining = source.seek(0, io.SEEK_END) - start
        source.seek(start)
        data = source.read(max(0, min(limit, remaining)))
    else:
        start, chunks, total = None, [], 0
        while total < limit:
            chunk = source.read(min(2**20, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        data = b"".join(chunks) if chunks else source.read(0)
    if not isinstance(data, bytes):
        raise TypeError(f"{name}: safe_load needs a binary file, read gave {type(data).__name__}")
    return data, start


def safe_load(source, *, profile: Profile, persistent_load: Callable[[Any], Any] | None = None,
              name: str | None = None, resolve: bool = True) -> Any:
    """Load one pickle from ``source`` (bytes-like or a binary file) through the allow-list
    of ``profile``. A file is read from its current position; a seekable file is left just
    after the pickle. Raises :class:`UnsafePickleError` / :class:`PickleDataError` only.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        obj, _ = safe_load_prefix(bytes(source), 0, profile=profile, persistent_load=persistent_load,
                                  name=name or "<bytes>", resolve=resolve)
        return obj
    name = name or str(getattr(source, "name", "<file>"))
    data, start = _read_bounded(source, profile.limits.max_pickle_bytes + 1, name)
    obj, end = safe_load_prefix(data, 0, profile=profile, persistent_load=persistent_load,
                                name=name, resolve=resolve)
    if start is not None:
        source.seek(start + end)
    return obj


# ---------------------------------------------------------------------------
# Resolving placeholders
# ---------------------------------------------------------------------------
class _ResolveContext:
    def __init__(self, source: str, byteorder: str, output_budget: int | None):
        self.source = source
        self.byteorder = byteorder
        self.budget = output_budget
        self.bfloat16_count = 0

    def spend(self, nbytes: int, what: str) -> None:
        if self.budget is None:
            return
        self.budget -= nbytes
        if self.budget < 0:
            raise UnsafePickleError(f"{self.source}: {what} exceeds the output budget "
                                    "(more bytes than the file can justify)")

    def note_bfloat16(self) -> None:
        self.bfloat16_count += 1


_SCALAR_TYPES = (str, bytes, bytearray, int, float, bool, type(None))
_SEQUENCE_TYPES = (list, tuple, set, frozenset)


class Resolved:
    """Notes from :func:`resolve` about conversions made (bfloat16 → float32)."""

    def __init__(self):
        self.bfloat16_tensors = 0


def resolve(obj, *, name: str = "<pickle>", limits: Limits | None = None, byteorder: str = "little",
            output_budget: int | None = None, notes: Resolved | None = None) -> Any:
    """Replace placeholders by their values (NumPy arrays, OrderedDicts) and check the shape
    of the whole structure: no cycles, depth ≤ ``limits.max_depth``, and at most
    ``limits.max_nodes`` nodes counting shared references every time (billion laughs).

    ``output_budget`` bounds the bytes of tensors materialized from storages (a tensor
    with zero strides could otherwise expand a tiny storage to any size).
    Shared containers stay shared in the result.
    """
    limits = limits or Limits()
    if byteorder not in ("little", "big"):
        raise PickleDataError(f"{name}: byte order must be 'little' or 'big', got {byteorder!r}")
    ctx = _ResolveContext(name, byteorder, output_budget)
    done: dict[int, tuple[Any, int]] = {}
    on_path: set[int] = set()
    stack: list[list] = []  # frames: [obj, children, next index, values, size, depth]

    def visit(item, depth):
        """(value, size) of a finished node, or None when a frame was pushed for it."""
        kind = type(item)
        if kind in _SCALAR_TYPES:
            return item, 1
        key = id(item)
        if key in done:
            return done[key]
        if key in on_path:
            raise UnsafePickleError(f"{name}: reference cycle through a {kind.__name__}")
        if depth > limits.max_depth:
            raise UnsafePickleError(f"{name}: containers nested deeper than {limits.max_depth} (limit)")
        if kind in (dict, _OrderedDictStub):
            children = [x for pair in item.items() for x in pair]
        elif kind in _SEQUENCE_TYPES:
            if kind in (list, tuple) and all(type(x) in _SCALAR_TYPES for x in item):
                result = (item, len(item) + 1)  # nothing to replace: keep the object
                _account(result[1])
                done[key] = result
                return result
            children = list(item)
        elif isinstance(item, _Stub):
            result = (item._finish(ctx), 1)
            done[key] = result
            return result
        elif isinstance(item, _Global):
            raise UnsafePickleError(f"{name}: the global {item.full_name} appears as a value")
        else:
            raise UnsafePickleError(f"{name}: unexpected object of type {kind.__name__} in the pickle")
        on_path.add(key)
        stack.append([item, children, 0, [], 1, depth])
        return None

    def _account(size):
        if size > limits.max_nodes:
            raise UnsafePickleError(f"{name}: structure has more than {limits.max_nodes} nodes counting "
                                    "shared references (limit; a 'billion laughs' pickle?)")

    def build(item, values):
        kind = type(item)
        try:
            if kind is dict:
                return dict(zip(values[0::2], values[1::2]))
            if kind is _OrderedDictStub:
                return collections.OrderedDict(zip(values[0::2], values[1::2]))
            return kind(values)
        except TypeError as exc:  # e.g. an array used as a dict key
            raise PickleDataError(f"{name}: cannot rebuild a {kind.__name__}: {exc}") from exc

    first = visit(obj, 0)
    if first is not None:
        value = first[0]
    else:
        value = None
        while stack:
            frame = stack[-1]
            item, children, index, values, size, depth = frame
            if index < len(children):
                frame[2] = index + 1
                child = visit(children[index], depth + 1)
                if child is not None:
                    values.append(child[0])
                    frame[4] = size + child[1]
                    _account(frame[4])
                continue
            stack.pop()
            on_path.discard(id(item))
            result = (build(item, values), size)
            done[id(item)] = result
            if stack:
                parent = stack[-1]
                parent[3].append(result[0])
                parent[4] += size
                _account(parent[4])
            else:
                value = result[0]
    if notes is not None:
        notes.bfloat16_tensors += ctx.bfloat16_count
    return value


_resolve = resolve  # safe_load's ``resolve`` flag shadows the function's name there
