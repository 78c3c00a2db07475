"""Zip members, shared by ``.npz`` files and torch zip checkpoints: safe names, bounded
reads, and one translation of whatever a corrupt archive raises into :class:`CheckpointError`."""
from __future__ import annotations

import contextlib
import re
import zipfile

from minibasis.serialization.errors import CheckpointError, PickleDataError, UnsafePickleError


#: The first four bytes of every zip archive (``.npz`` files and torch's zip checkpoints alike).
ZIP_MAGIC = b"PK\x03\x04"
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


def _check_member_names(zf: zipfile.ZipFile, source: str) -> dict[str, zipfile.ZipInfo]:
    """Refuse member names that are absolute or climb out (``..``); returns name → info."""
    infos = {}
    for info in zf.infolist():
        member = info.filename
        parts = member.replace("\\", "/").split("/")
        if (member.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(member) or ".." in parts
                or "\x00" in member):
            raise CheckpointError(f"{source}: unsafe member name {member!r:.200} in the archive "
                                  "(absolute or containing '..')")
        if member in infos:
            raise CheckpointError(f"{source}: member {member!r:.200} appears twice in the archive")
        infos[member] = info
    return infos


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int, source: str) -> bytes:
    """The first ``nbytes`` bytes of a member (CRC-checked when that is the whole member)."""
    if info.file_size < nbytes:
        raise CheckpointError(f"{source}: member {info.filename!r} holds {info.file_size} bytes, "
                              f"{nbytes} are needed")
    with zf.open(info) as handle:
        data = handle.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"{source}: member {info.filename!r} is truncated "
                              f"({len(data)} of {nbytes} bytes)")
    return data


@contextlib.contextmanager
def _archive_errors(source: str, what: str):
    """Turn whatever a corrupt archive makes zipfile/zlib/numpy raise into CheckpointError."""
    try:
        yield
    except (CheckpointError, UnsafePickleError):
        raise
    except PickleDataError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    except Exception as exc:  # BadZipFile, zlib.error, EOFError, struct.error, ...
        raise CheckpointError(f"{source}: corrupt or truncated {what}: {type(exc).__name__}: {exc}"[:2000]) from exc
