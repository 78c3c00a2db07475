"""Planted counting slips: the ways a measured count can go wrong that the verification must catch.

``SLIPS`` maps each slip's name to what it models and how to plant it. The engine is not edited:
each slip is planted by monkeypatching (``plant(patch)``, ``patch`` being a pytest
``MonkeyPatch.setattr``), in a process of its own. tests/measurement/test_verification_mutations.py plants
them one at a time and requires that the default ``minibasis verify formulas`` and the suite's
counting tests (``COUNTING_TESTS``) each fail on every one; run this file as a script
(``python3 tests/counting_mutations.py SLIP``) to see one slip's verdicts as JSON.

Most slips change what is *recorded*, not what is computed, as a forgotten or misplaced counted
primitive would: the engine's products report ``(primitive, mults)`` through
``minibasis.backend._report``, which is wrapped here so that, inside a scope, a product is
recorded 0 times (uncounted) or twice. The off-by-one output size and the dropped basis
vector change what is computed, quietly (no error).
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from minibasis import backend, parallel
from minibasis.functions import basic, conv
from minibasis.nn import BasisConv2d

#: The suite's counting tests that must fail on every slip (a fast subset, ~10 s).
COUNTING_TESTS = ("tests/engine/test_count_invariance.py", "tests/engine/test_counting.py")

_thread = threading.local()  # .rule: how products are recorded on this thread (set by a chunk-level slip)
_process = {"rule": None, "op": None, "basisconv_convs": None}  # op-level state (may span worker threads)


@dataclass(frozen=True)
class Slip:
    models: str
    plant: Callable[[Callable], None]


def _recording_rule(patch) -> None:
    """Wrap ``backend._report`` so a rule (thread's first, else the op's) may change what a product records."""
    original = backend._report

    def report(primitive, mults):
        rule = getattr(_thread, "rule", None) or _process["rule"]
        original(primitive, mults if rule is None else rule(mults))

    patch(backend, "_report", report)


@contextlib.contextmanager
def _on_this_thread(rule):
    previous = getattr(_thread, "rule", None)
    _thread.rule = rule
    try:
        yield
    finally:
        _thread.rule = previous


def _uncounted(mults):
    return 0


def _nth_records(keep: Callable[[int], bool]):
    """A rule that records the i-th product of its scope (i = 1, 2, ...) only where ``keep(i)``."""
    seen = [0]

    def rule(mults):
        seen[0] += 1
        return mults if keep(seen[0]) else 0
    return rule


def _wrap_scope(patch, owner, name: str, rule_for: Callable) -> None:
    """``owner.name`` runs under the thread rule ``rule_for(*args)`` (None: no rule)."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        rule = rule_for(*args)
        if rule is None:
            return original(*args, **kwargs)
        with _on_this_thread(rule):
            return original(*args, **kwargs)

    patch(owner, name, wrapped)


# -- a chunk after the first uncounted ------------------------------------------------------------
def _chunks_after_first_uncounted(op_class, method: str, applies: Callable) -> Callable:
    """While ``op_class.method`` runs with ``applies(self, *args)`` true, every chunk of its
    ``parallel.map_chunks`` loop but the first runs with its products uncounted."""

    def plant(patch):
        _recording_rule(patch)
        original_method, original_map = getattr(op_class, method), parallel.map_chunks

        def wrapped(self, *args):
            previous, _process["op"] = _process["op"], applies(self, *args)
            try:
                return original_method(self, *args)
            finally:
                _process["op"] = previous

        def map_chunks(work, chunks, workers):
            if not _process["op"]:
                return original_map(work, chunks, workers)

            def first_counted(start, *rest):
                if start == 0:
                    return work(start, *rest)
                with _on_this_thread(_uncounted):
                    return work(start, *rest)
            return original_map(first_counted, chunks, workers)

        patch(op_class, method, wrapped)
        patch(parallel, "map_chunks", map_chunks)
    return plant


def _forward_path(path: str):
    def applies(self, x, weight, *bias):
        m, c, kernel = weight.shape[0], x.shape[1], tuple(weight.shape[2:])
        return conv.conv_path(m, c, kernel, self.stride, self.padding, self.dilation, self.groups) == path
    return applies


def _backward_kind(*paths: str):
    return lambda self, gy: self.path in paths


COLUMN_PATHS = ("kn2row", "same-runs", "strided", "im2col")  # their backward works on im2col columns

SLIPS: dict[str, Slip] = {
    **{f"conv forward, {path}: chunks after the first uncounted": Slip(
        f"the {path} forward loop records only its first chunk's GEMMs",
        _chunks_after_first_uncounted(conv.Conv2dFunction, "forward", _forward_path(path)))
       for path in conv.CONV_PATHS},
    **{f"conv backward, {kind}: chunks after the first uncounted": Slip(
        f"the {kind} backward loop records only its first chunk's products",
        _chunks_after_first_uncounted(conv.Conv2dFunction, "backward", _backward_kind(*paths)))
       for kind, paths in (("pointwise", ("pointwise",)), ("depthwise-same", ("depthwise-same",)),
                           ("columns", COLUMN_PATHS))},
    "linear forward: blocks after the first uncounted": Slip(
        "a linear layer records only its first block of rows",
        _chunks_after_first_uncounted(basic.Linear, "forward", lambda self, *args: True)),
    "linear backward: blocks after the first uncounted": Slip(
        "a linear layer's backward records only its first block of rows",
        _chunks_after_first_uncounted(basic.Linear, "backward", lambda self, *args: True)),
}


def _depthwise_offsets(patch):
    _recording_rule(patch)
    _wrap_scope(patch, conv, "_depthwise_same", lambda *args: _nth_records(lambda i: i == 1))


def _batchless_gemm(patch):
    def mults(a_shape, b_shape):
        a_shape = (1,) + a_shape if len(a_shape) == 1 else a_shape
        b_shape = b_shape + (1,) if len(b_shape) == 1 else b_shape
        return a_shape[-2] * a_shape[-1] * b_shape[-1]
    patch(backend, "_matmul_mults", mults)


def _uncounted_weight_gradient(patch):
    _recording_rule(patch)  # the first product of a column chunk's backward is its weight-gradient GEMM
    _wrap_scope(patch, conv.Conv2dFunction, "_chunk_backward",
                lambda self, *args: _nth_records(lambda i: i > 1) if self.needs_input_grad[1] else None)


def _off_by_one_output(patch):
    original = conv.conv_output_shape

    def output_shape(h, w, kernel, stride, padding, dilation=(1, 1)):
        ho, wo = original(h, w, kernel, stride, padding, dilation)
        return (ho - 1 if stride[0] > 1 and ho > 1 else ho), wo
    patch(conv, "conv_output_shape", output_shape)


def _dropped_basis_vector(patch):
    original = BasisConv2d.__init__

    def init(self, in_channels, out_channels, kernel_size, num_basis, *args, **kwargs):
        basis = args[3] if len(args) > 3 else kwargs.get("basis")  # (stride, padding, bias, basis, ...)
        drop = num_basis > 1 and basis is None and kwargs.get("coeffs") is None
        original(self, in_channels, out_channels, kernel_size, num_basis - drop, *args, **kwargs)
        self.num_basis = num_basis  # reports Q, keeps Q − 1 filters
    patch(BasisConv2d, "__init__", init)


def _basisconv_stage_twice(patch):
    _recording_rule(patch)
    original_layer, original_conv = BasisConv2d.forward, conv.Conv2dFunction.forward

    def layer_forward(self, x):
        previous, _process["basisconv_convs"] = _process["basisconv_convs"], 0
        try:
            return original_layer(self, x)
        finally:
            _process["basisconv_convs"] = previous

    def conv_forward(self, *args):
        if _process["basisconv_convs"] is None:
            return original_conv(self, *args)
        _process["basisconv_convs"] += 1
        if _process["basisconv_convs"] != 2:
            return original_conv(self, *args)
        _process["rule"] = lambda mults: 2 * mults  # the 1×1 coefficient stage, recorded twice
        try:
            return original_conv(self, *args)
        finally:
            _process["rule"] = None

    patch(BasisConv2d, "forward", layer_forward)
    patch(conv.Conv2dFunction, "forward", conv_forward)


SLIPS.update({
    "depthwise 'same': 8 of 9 offsets uncounted": Slip(
        "a depthwise 'same' conv records only its first (centre) offset's products", _depthwise_offsets),
    "batch-less GEMM count": Slip(
        "a batched GEMM (over images or groups) recorded as one GEMM: batch dimensions dropped", _batchless_gemm),
    "uncounted weight gradient": Slip(
        "a conv's weight-gradient GEMM (column paths) computed outside the count", _uncounted_weight_gradient),
    "off-by-one output size": Slip(
        "a strided conv's output one row short (the last row silently dropped)", _off_by_one_output),
    "dropped basis vector": Slip(
        "a BasisConv that reports Q basis filters but builds and runs Q − 1", _dropped_basis_vector),
    "BasisConv stage counted twice": Slip(
        "a BasisConv's 1×1 coefficient stage recorded twice in forward", _basisconv_stage_twice),
})


def verdicts(slip: str | None) -> dict:
    """Plant ``slip`` (None: nothing) in this process, then run the default ``minibasis verify formulas``
    and ``COUNTING_TESTS``: {"verify_failed": bool, "suite_failed": bool}."""
    import pytest
    from hypothesis import Phase, settings

    from minibasis.cli import main

    # The suite's tests need only fail here, not shrink their counterexample (verify formulas still shrinks).
    settings.register_profile("mutations", phases=(Phase.explicit, Phase.generate), database=None)
    settings.load_profile("mutations")
    patcher = pytest.MonkeyPatch()
    if slip is not None:
        SLIPS[slip].plant(patcher.setattr)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        verify_code = main(["verify", "formulas"])
        suite_code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", *COUNTING_TESTS])
    return {"slip": slip, "verify_exit": verify_code, "suite_exit": int(suite_code)}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference.py, for the suite's tests
    print(json.dumps(verdicts(sys.argv[1] if len(sys.argv) > 1 else None)))
