"""Measured multiplication counts: one registry, by op, by layer, forward and backward apart.

The counted primitives of :mod:`minibasis.backend` report ``(primitive, mults)``
each time they run. This module attaches the context in which they ran: the
differentiable op executing (``conv2d``, ``linear``, ``batch_norm``, ...), the
module path of the layer that called it (``layer1.0.conv1``), and the phase
(``forward`` or ``backward``). Counts are therefore measured where the
multiplications happen and are never derived from a closed-form formula.

Units are multiplications (``mults``). Additions, divisions, exponentials,
comparisons (max, ReLU), reductions and data movement are *not* counted; this is
the explicit list of what is left out, as in the paper, which counts products.

Usage::

    with minibasis.count_mults() as counter:
        model(x)
    counter.total, counter.conv, counter.by_op, counter.by_layer, counter.forward.conv
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from typing import Iterator

from minibasis import backend

__all__ = ["count_mults", "count_apart", "MultCounter", "UNCOUNTED", "time_ops", "OpTimer"]

#: What is deliberately not counted (documented, so a reader knows what "total" means).
UNCOUNTED = ("add", "subtract", "divide", "exp", "log", "sqrt", "maximum/comparison (relu, max-pool)",
             "sum/mean reductions", "copies, padding, im2col/col2im data movement")

_counters: list["MultCounter"] = []
_timers: list["OpTimer"] = []
_timed_depth = 0  # op scopes open while timing: only the outermost one is timed
_op_stack: list[tuple[str, bool]] = []  # (op name, is a convolution op)
_layer_stack: list[str] = []
_phase = "forward"


class MultTally:
    """Multiplications of one phase (or of both): ``total``, ``conv``, ``by_op``, ``by_layer``."""

    def __init__(self, records: dict, phases: tuple[str, ...]):
        self._records = records
        self._phases = phases

    def _select(self):
        return ((key, n) for key, n in self._records.items() if key[0] in self._phases)

    @property
    def total(self) -> int:
        """All recorded multiplications."""
        return sum(n for _, n in self._select())

    @property
    def conv(self) -> int:
        """Multiplications performed by convolution ops only (the paper's convention)."""
        return sum(n for key, n in self._select() if key[3])

    @property
    def by_op(self) -> dict[str, int]:
        """Op name (``conv2d``, ``linear``, ``mul`` ...) → multiplications."""
        out: dict[str, int] = defaultdict(int)
        for key, n in self._select():
            out[key[1]] += n
        return dict(out)

    @property
    def by_layer(self) -> dict[str, int]:
        """Module path (``""`` for ops called outside any module) → multiplications."""
        out: dict[str, int] = defaultdict(int)
        for key, n in self._select():
            out[key[2]] += n
        return dict(out)

    def conv_by_layer(self) -> dict[str, int]:
        """Module path → convolution multiplications."""
        out: dict[str, int] = defaultdict(int)
        for key, n in self._select():
            if key[3]:
                out[key[2]] += n
        return dict(out)

    def by_op_and_layer(self) -> dict[tuple[str, str], int]:
        """(op name, module path) → multiplications."""
        out: dict[tuple[str, str], int] = defaultdict(int)
        for key, n in self._select():
            out[(key[1], key[2])] += n
        return dict(out)

    def as_dict(self) -> dict:
        return {"total": self.total, "conv": self.conv, "by_op": self.by_op, "by_layer": self.by_layer}

    def _summary(self) -> str:
        ops = sorted(self.by_op.items(), key=lambda item: (-item[1], item[0]))
        by_op = ", ".join(f"{op}={n:,}" for op, n in ops)
        return f"total={self.total:,}, conv={self.conv:,}, by_op={{{by_op}}}"

    def __repr__(self) -> str:
        """One line: ``MultTally(forward: total=1,234, conv=1,000, by_op={conv2d=1,000, mul=234})``."""
        return f"MultTally({'+'.join(self._phases)}: {self._summary()})"


class MultCounter(MultTally):
    """Everything recorded while active; ``.forward`` and ``.backward`` give each phase alone."""

    def __init__(self):
        super().__init__(defaultdict(int), ("forward", "backward"))
        self.forward = MultTally(self._records, ("forward",))
        self.backward = MultTally(self._records, ("backward",))

    def record(self, primitive: str, mults: int) -> None:
        op, is_conv = _op_stack[-1] if _op_stack else (primitive, False)
        layer = _layer_stack[-1] if _layer_stack else ""
        self._records[(_phase, op, layer, is_conv)] += mults

    def reset(self) -> None:
        self._records.clear()

    def as_dict(self) -> dict:
        out = super().as_dict()
        out["forward"] = self.forward.as_dict()
        out["backward"] = self.backward.as_dict()
        return out

    def __repr__(self) -> str:
        """Totals on the first line, then one line per phase that recorded anything, by op."""
        lines = [f"MultCounter(total={self.total:,}, conv={self.conv:,}, "
                 f"forward={self.forward.total:,}, backward={self.backward.total:,})"]
        for phase, tally in (("forward", self.forward), ("backward", self.backward)):
            if tally.by_op:
                lines.append(f"  {phase}: {tally._summary()}")
        return "\n".join(lines)


_record_lock = threading.Lock()


def _dispatch(primitive: str, mults: int) -> None:
    # Worker threads (minibasis.parallel) record too: ``+=`` on the tallies is not atomic. The op,
    # layer and phase stacks are module-wide, not per thread, so a worker's products land on the
    # scope of the caller that waits for it.
    with _record_lock:
        for counter in _counters:
            counter.record(primitive, mults)


@contextlib.contextmanager
def count_mults() -> Iterator[MultCounter]:
    """Count every multiplication executed inside the block (nesting is allowed)."""
    counter = MultCounter()
    _counters.append(counter)
    backend.set_mult_recorder(_dispatch)
    try:
        yield counter
    finally:
        _counters.remove(counter)
        if not _counters:
            backend.set_mult_recorder(None)


@contextlib.contextmanager
def count_apart() -> Iterator[MultCounter]:
    """Count the block's multiplications in a counter of their own, hidden from every counter
    already active: e.g. a distillation teacher's forward pass inside a student's training step,
    whose products must not appear in the student's counts."""
    outer = list(_counters)
    _counters.clear()
    try:
        with count_mults() as counter:
            yield counter
    finally:
        _counters[:] = outer
        if outer:
            backend.set_mult_recorder(_dispatch)


def active() -> bool:
    """Whether any counter or timer is listening (callers skip bookkeeping otherwise)."""
    return bool(_counters) or bool(_timers)


class OpTimer:
    """Wall seconds spent inside ops, keyed like the counts: ``seconds[(phase, op, layer, is_conv)]``."""

    def __init__(self):
        self.seconds: dict[tuple, float] = defaultdict(float)


@contextlib.contextmanager
def time_ops() -> Iterator[OpTimer]:
    """Time every op executed inside the block (the outermost op scope; work on worker threads is inside it)."""
    timer = OpTimer()
    _timers.append(timer)
    try:
        yield timer
    finally:
        _timers.remove(timer)


@contextlib.contextmanager
def op_scope(name: str, is_conv: bool, phase: str, layer: str | None = None):
    """Attribute the multiplications inside to op ``name`` in ``phase`` (and ``layer`` if given)."""
    global _phase, _timed_depth
    previous = _phase
    _phase = phase
    _op_stack.append((name, is_conv))
    if layer is not None:
        _layer_stack.append(layer)
    timing = bool(_timers)
    timed = timing and _timed_depth == 0
    _timed_depth += timing
    start = time.perf_counter() if timed else 0.0
    try:
        yield
    finally:
        if timed:
            elapsed = time.perf_counter() - start
            key = (phase, name, _layer_stack[-1] if _layer_stack else "", is_conv)
            for timer in _timers:
                timer.seconds[key] += elapsed
        _timed_depth -= timing
        _op_stack.pop()
        if layer is not None:
            _layer_stack.pop()
        _phase = previous


@contextlib.contextmanager
def layer_scope(name: str):
    """Attribute the multiplications inside to the module path ``name``."""
    _layer_stack.append(name)
    try:
        yield
    finally:
        _layer_stack.pop()


def current_layer() -> str:
    return _layer_stack[-1] if _layer_stack else ""
