"""A run's folder and the JSON/CSV files written into it (atomically, through ``minibasis.serialization``).

Library code: errors are ``OSError`` (a folder that cannot be created or written) and
``ValueError`` (an unreadable ``config.json``); the command line translates them.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io as _stdio
import json
from pathlib import Path

import numpy as np

from minibasis import distributed as dist

__all__ = ["RunFolder", "write_json", "write_csv", "read_json"]


def _atomic_bytes(path: Path, data: bytes) -> None:
    from minibasis.serialization import atomic_write
    with atomic_write(path, "wb") as f:
        f.write(data)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path, obj) -> None:
    """Pretty JSON (indent 2, trailing newline), written atomically."""
    _atomic_bytes(Path(path), (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _csv_cell(value):
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=_json_default)
    return value


def write_csv(path, rows: list[dict]) -> None:
    """One row per dict (columns: the union of keys, in first-seen order), written atomically."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    _atomic_bytes(Path(path), buffer.getvalue().encode())


def read_json(path) -> object | None:
    """The JSON document at ``path``; None when there is no file; ValueError when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from None


class RunFolder:
    """A run's folder: ``config.json``, ``log.txt``, metrics, results, plots, checkpoints.

    ``log(message)`` prints and appends a line to ``log.txt`` (appended and flushed line by
    line, so that ``tail -f`` works; every other file is written atomically). Under mpirun
    only rank 0 prints and writes. Creating the folder raises ``OSError`` when it cannot.
    """

    def __init__(self, path, quiet: bool = False):
        self.path = Path(path)
        self.quiet = quiet
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def log(self, message: str) -> None:
        if not dist.is_main_process():
            return
        if not self.quiet:
            print(message, flush=True)
        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(self.path / "log.txt", "a", encoding="utf-8") as f:
                f.write(f"{stamp}  {message}\n")
        except OSError as exc:  # a write error names the log, not just "No space left on device"
            if exc.filename is not None or exc.errno is None:
                raise
            raise OSError(exc.errno, exc.strerror, str(self.path / "log.txt")) from exc

    def write_config(self, config: dict) -> None:
        self.write_json("config.json", config)

    def read_config(self) -> dict | None:
        return read_json(self.path / "config.json")

    def write_json(self, name: str, obj) -> Path:
        if dist.is_main_process():
            write_json(self.path / name, obj)
        return self.path / name

    def write_csv(self, name: str, rows: list[dict]) -> Path:
        if dist.is_main_process():
            write_csv(self.path / name, rows)
        return self.path / name
