"""What every check of :mod:`minibasis.verify` returns: a result with ``passed``, ``table()`` and ``to_json()``."""
from __future__ import annotations

import json
from typing import Sequence

__all__ = ["VerifyResult", "format_table"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> list[str]:
    """Fixed-width lines: the header, a rule, one line per row; columns in ``left`` are left-aligned."""
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]

    def line(cells):
        text = "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return text.rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(row) for row in rows]


class VerifyResult:
    """Base of the check results: subclasses give ``passed``, ``to_dict()`` and ``table()``."""

    check: str = ""

    @property
    def passed(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def table(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_json(self, indent: int | None = 2) -> str:
        """The result as JSON: ``{"check": ..., "passed": ..., ...}``."""
        return json.dumps({"check": self.check, "passed": self.passed, **self.to_dict()}, indent=indent)

    def __str__(self) -> str:
        return self.table()
