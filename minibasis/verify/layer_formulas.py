"""``verify formulas``: the paper's closed forms against what a Conv2d, a BasisConv2d and a Linear execute.

For each drawn layer geometry (:class:`LayerCase`: batch, C, M, groups dividing both,
odd and even kernels, stride, padding (numbers, "valid" or "same"), dilation, H ≠ W, Q,
which gradients are needed)
both layers run forward and backward under :func:`minibasis.count_mults`, and the
measured convolution multiplications are compared with the closed forms of
:mod:`minibasis.formulas`:

* Conv2d forward, per image: M·(C/g)·kh·kw·Ho·Wo (``formulas.conv_mults``), with Ho, Wo
  from ``formulas.conv_output_size`` ("valid" is padding 0; "same", stride 1, keeps H and W
  by definition); the output shape is checked too;
* Conv2d backward, per image: one product of the forward's size for each gradient that is
  needed, the weight gradient (Σ over positions of gy·x) and the input gradient (Σ over
  filters of gy·w): forward × (needs_weight + needs_input). The bias gradient is a sum;
* BasisConv2d forward, per image: Q·D·Ho·Wo + M·Q·Ho·Wo (``formulas.basisconv_mults``);
* BasisConv2d backward, per image: M·Q·Ho·Wo for the coefficient gradient when the
  coefficients are learned, M·Q·Ho·Wo for the gradient of the Q-channel intermediate when it
  needs one (the input does, or a learned basis bias sits before the 1×1 stage), and Q·D·Ho·Wo
  through the basis stage when the input needs a gradient. The basis is fixed: no gradient;
* parameters: learnable M·(C/g)·kh·kw (+M bias) for the conv, M·Q (+M bias, +Q basis bias)
  for BasisConv (``formulas.learnable_params``); stored values (parameters and buffers)
  Q·D + M·Q (+M, +Q);
* a Linear from the flattened input (C·H·W features) to M: C·H·W·M per image forward, one
  product of that size per gradient needed in backward (all its mults, not conv mults).

Every case runs three times: at batch 1 (compared with the closed forms above), and at its
batch N (2 to 4) both in one piece and in N chunks of one image on 2 engine threads
(:func:`minibasis.functions.smallest_chunks`), where the counts must be N times those at
batch 1, forward and backward: so the chunk loops every real batch takes are checked too.
The cases are drawn stratified by the conv path the engine takes (``STRATA``: each
:data:`~minibasis.functions.conv.CONV_PATHS` entry and grouped convs, in turn); the path
each case really took is recorded (:func:`minibasis.functions.conv.trace_paths`) and
reported per path, and a run that exercised no case of a path (or no BasisConv) fails.

With hypothesis installed the cases come from its search (``hypothesis.find``, seeded, no
example database), which stops at the first mismatch and shrinks it to a minimal
counterexample; without it a seeded NumPy generator draws the same space. A mismatch is
printed as a standalone Python snippet that reproduces it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from minibasis import formulas
from minibasis.formulas import basisconv_backward_mults, conv_backward_mults, stored_values_formula
from minibasis.autograd import tensor
from minibasis.checks import non_negative_int, positive_int
from minibasis.counting import count_mults
from minibasis.functions import conv as conv_module, smallest_chunks
from minibasis.functions.conv import CONV_PATHS, conv_path, trace_paths
from minibasis.parallel import set_num_threads
from minibasis.measure import learnable_values, stored_values as measured_stored_values
from minibasis.nn import BasisConv2d, Conv2d, Linear, Module
from minibasis.verify.report import VerifyResult, format_table

__all__ = ["LayerCase", "GeometrySpace", "CaseOutcome", "FormulaReport", "check_formulas", "run_case",
           "draw_case", "case_strategy", "snippet", "STRATA", "CHUNKED_THREADS"]

#: Which gradients a case needs: (input, weight); a case that needs neither has no backward pass.
GRADIENT_CHOICES = ((True, True), (False, True), (True, False))
#: How padding is given: numbers (drawn twice as often), or PyTorch's "valid" / "same".
PADDING_MODES = (None, None, "valid", "same")
#: The strata the cases are drawn from, in turn: each conv path, and grouped convs (groups > 1, not depthwise).
STRATA = ("im2col", "strided", "same-runs", "kn2row", "pointwise", "depthwise-same", "grouped")
#: Engine threads of the run in small chunks (the threaded chunk loops).
CHUNKED_THREADS = 2


def _explicit_padding(padding) -> tuple[int, int]:
    """The (ph, pw) of numeric padding or "valid" (zero); "same" has none to give."""
    return (0, 0) if padding == "valid" else padding


@dataclass(frozen=True)
class LayerCase:
    """One layer geometry, its Q and the gradients its backward pass needs.

    ``kernel_size``, ``stride``, ``dilation`` are (h, w) pairs, ``padding`` a pair or "valid" /
    "same" (then the stride is 1); ``groups`` divides ``in_channels`` and ``out_channels``.
    BasisConv2d is checked on the same geometry when ``groups`` is 1 (a grouped conv has no
    BasisConv form: :meth:`BasisConv2d.from_conv` refuses it), with ``num_basis`` = Q ≤ D = C·kh·kw.
    """

    batch: int
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    height: int
    width: int
    num_basis: int
    input_grad: bool
    weight_grad: bool
    bias: bool
    basis_bias: bool = False  # BasisConv only: a learned bias on the basis stage (the paper's Table 3 net)

    @property
    def basisconv_applies(self) -> bool:
        return self.groups == 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GeometrySpace:
    """Bounds of the drawn geometries (small, so hundreds of cases run in seconds).

    A case's batch N is drawn from 2 to ``max_batch``: it runs in N chunks of one image.
    """

    max_batch: int = 4
    max_channels_per_group: int = 6
    max_groups: int = 3
    max_kernel: int = 5
    max_stride: int = 3
    max_padding: int = 2
    max_dilation: int = 2
    max_extra_size: int = 6  # input rows/columns beyond the smallest that fits the dilated kernel

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check = non_negative_int if field.name in ("max_padding", "max_extra_size") else positive_int
            check(field.name, getattr(self, field.name))
        if self.max_batch < 2:
            raise ValueError(f"max_batch must be at least 2 (a batch in several chunks), got {self.max_batch}")


def _odd(draw, space: GeometrySpace) -> int:
    """An odd kernel size ≤ max(1, max_kernel)."""
    return 2 * draw(0, (space.max_kernel - 1) // 2) + 1


def _channels(draw, space: GeometrySpace, stratum: str) -> tuple[int, int, int]:
    """(groups, C, M) for ``stratum`` ("kn2row" needs M < KN2ROW_CHANNEL_RATIO·C, "same-runs" the rest)."""
    per_group = space.max_channels_per_group
    if stratum == "depthwise-same":
        channels = draw(2, max(2, per_group))
        return channels, channels, channels
    if stratum == "grouped":
        groups = draw(2, max(2, space.max_groups))
        c_per, m_per = draw(1, per_group), draw(1, per_group)
        if c_per == m_per == 1:  # g = C = M would be depthwise, a stratum of its own
            m_per = 2
        return groups, groups * c_per, groups * m_per
    ratio = conv_module.KN2ROW_CHANNEL_RATIO
    if stratum == "kn2row":
        c = draw(2, max(2, per_group))
        return 1, c, draw(1, max(1, math.ceil(ratio * c) - 1))
    c = draw(1, per_group)
    if stratum == "same-runs":
        low = max(2 if c == 1 else 1, math.ceil(ratio * c))  # C = M = 1 would be depthwise
        return 1, c, draw(low, max(low, per_group))
    return 1, c, draw(1, per_group)


def build_case(draw: Callable[[int, int], int], space: GeometrySpace, stratum: str | None = None) -> LayerCase:
    """A case of ``stratum`` (one of ``STRATA``; None: drawn too) from ``draw(low, high)`` (an int in
    [low, high]); the one description of the space.

    Both the NumPy generator and hypothesis's strategy call this, so they draw the same cases
    (hypothesis shrinks each draw toward ``low``: the minimal case is the smallest layer).
    """
    if stratum is None:
        stratum = STRATA[draw(0, len(STRATA) - 1)]
    elif stratum not in STRATA:
        raise ValueError(f"stratum must be one of {', '.join(STRATA)}, got {stratum!r}")
    groups, in_channels, out_channels = _channels(draw, space, stratum)
    dilation = (1, 1)
    if stratum in ("same-runs", "kn2row", "depthwise-same"):  # odd kernel, "same", stride 1, no dilation
        kernel = (_odd(draw, space), _odd(draw, space))
        if kernel == (1, 1):
            kernel = (1, 3)
        stride = (1, 1)
        padding = "same" if draw(0, 1) else ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
    elif stratum == "pointwise":
        kernel, stride, padding = (1, 1), (1, 1), "valid" if draw(0, 1) else (0, 0)
    else:
        kernel = (draw(1, space.max_kernel), draw(1, space.max_kernel))
        stride = (draw(1, space.max_stride), draw(1, space.max_stride))
        if stratum == "strided" and stride == (1, 1):
            stride = (2, 1)
        elif stratum == "im2col":
            stride = (1, 1)
        padding = (draw(0, space.max_padding), draw(0, space.max_padding))
        mode = PADDING_MODES[draw(0, len(PADDING_MODES) - 1)]
        if mode is not None and not (mode == "same" and stride != (1, 1)):  # "same" needs stride 1 (PyTorch)
            padding = mode
        dilation = (draw(1, space.max_dilation), draw(1, space.max_dilation))
        if stratum == "im2col" and conv_path(out_channels, in_channels, kernel, stride,
                                             _padding_pair(padding, kernel, dilation), dilation, groups) != "im2col":
            padding = ((kernel[0] - 1) // 2 + 1, padding[1] if isinstance(padding, tuple) else 0)
    sizes = []
    for axis in (0, 1):
        span = dilation[axis] * (kernel[axis] - 1) + 1  # the dilated kernel must fit the padded input
        smallest = 1 if padding == "same" else max(1, span - 2 * _explicit_padding(padding)[axis])
        sizes.append(smallest + draw(0, space.max_extra_size))
    filter_dim = in_channels * kernel[0] * kernel[1]
    input_grad, weight_grad = GRADIENT_CHOICES[draw(0, len(GRADIENT_CHOICES) - 1)]
    return LayerCase(batch=draw(2, space.max_batch), in_channels=in_channels, out_channels=out_channels,
                     groups=groups, kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                     height=sizes[0], width=sizes[1], num_basis=draw(1, filter_dim),
                     input_grad=input_grad, weight_grad=weight_grad, bias=bool(draw(0, 1)),
                     basis_bias=bool(draw(0, 1)))


def _padding_pair(padding, kernel, dilation) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a stride-1 case's padding."""
    return conv_module.resolve_padding(padding, kernel, (1, 1), dilation)


def draw_case(rng: np.random.Generator, space: GeometrySpace | None = None, stratum: str | None = None) -> LayerCase:
    """One case from a NumPy generator (used when hypothesis is not installed)."""
    return build_case(lambda low, high: int(rng.integers(low, high + 1)), space or GeometrySpace(), stratum)


def case_strategy(space: GeometrySpace | None = None, stratum: str | None = None):
    """A hypothesis strategy of :class:`LayerCase` over ``space`` (of ``stratum`` when given; needs hypothesis)."""
    from hypothesis import strategies as st

    space = space or GeometrySpace()

    @st.composite
    def cases(draw):
        return build_case(lambda low, high: draw(st.integers(low, high)), space, stratum)

    return cases()


# -- running one case ------------------------------------------------------------------------------
@dataclass
class Comparison:
    """One measured quantity of one case beside its closed form."""

    check: str
    measured: object
    expected: object

    @property
    def passed(self) -> bool:
        return self.measured == self.expected

    def describe(self) -> str:
        if self.check.endswith(" runs"):
            return f"{self.check} raised {self.measured}"
        return f"{self.check}: measured {self.measured} != formula {self.expected}"


@dataclass
class CaseOutcome:
    """The comparisons of one case (an exception while running it is a failed ``runs`` check) and the
    conv path each layer kind took (``{"conv": "im2col", "basisconv": <its basis stage's path>}``)."""

    case: LayerCase
    comparisons: list[Comparison]
    paths: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]


def _output_hw(case: LayerCase) -> tuple[int, int]:
    """(Ho, Wo) by the closed form; "same" keeps the input size (its definition, stride 1)."""
    if case.padding == "same":
        return case.height, case.width
    padding = _explicit_padding(case.padding)
    return tuple(formulas.conv_output_size(size, case.kernel_size[axis], case.stride[axis], padding[axis],
                                           case.dilation[axis])
                 for axis, size in enumerate((case.height, case.width)))


@dataclass
class Measured:
    """One run of a layer: output shape, conv mults forward and backward, the paths its convs took."""

    shape: tuple
    forward: int
    backward: int
    paths: list[str]


def _measure(layer: Module, case: LayerCase, batch: int, chunked: bool = False) -> Measured:
    """``layer`` forward and backward on a batch of ``batch`` images of a case's input (flattened for a
    Linear; its weights frozen first when the case needs no weight gradient); ``chunked``: one image per
    chunk, on ``CHUNKED_THREADS`` engine threads. Counts: conv mults (all mults for a Linear)."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, case.in_channels, case.height, case.width)).astype(np.float32)
    flat = isinstance(layer, Linear)
    x = tensor(images.reshape(batch, -1) if flat else images, requires_grad=case.input_grad)
    if not case.weight_grad:
        layer.requires_grad_(False)
    with contextlib.ExitStack() as stack:
        if chunked:
            stack.enter_context(smallest_chunks())
            stack.callback(set_num_threads, set_num_threads(CHUNKED_THREADS))
        with trace_paths() as paths, count_mults() as counter:
            y = layer(x)
            y.backward(np.ones(y.shape, np.float32))
    if flat:
        return Measured(tuple(y.shape), counter.forward.total, counter.backward.total, paths)
    return Measured(tuple(y.shape), counter.forward.conv, counter.backward.conv, paths)


def _batch_comparisons(kind: str, layer: Module, case: LayerCase, forward_formula: int,
                       backward_formula: int) -> tuple[list[Comparison], str]:
    """Counts at batch 1 against the formulas, and at batch N (one piece, N chunks) against N × batch 1;
    also the path the layer's first conv took."""
    n = case.batch
    one, whole, chunked = _measure(layer, case, 1), _measure(layer, case, n), _measure(layer, case, n, chunked=True)
    per_image = (one.forward, one.backward)
    comparisons = [
        Comparison(f"{kind} output shape", whole.shape,
                   (n, case.out_channels) + (() if kind == "linear" else _output_hw(case))),
        Comparison(f"{kind} forward mults", one.forward, forward_formula),
        Comparison(f"{kind} backward mults", one.backward, backward_formula),
        Comparison(f"{kind} mults at batch N = N × batch 1", (whole.forward, whole.backward),
                   tuple(n * c for c in per_image)),
        Comparison(f"{kind} mults in N chunks = N × batch 1", (chunked.forward, chunked.backward),
                   tuple(n * c for c in per_image)),
    ]
    return comparisons, one.paths[0] if one.paths else "none"


def _conv_comparisons(case: LayerCase) -> tuple[list[Comparison], str]:
    m, c, g, k = case.out_channels, case.in_channels, case.groups, case.kernel_size
    layer = Conv2d(c, m, k, stride=case.stride, padding=case.padding, dilation=case.dilation, groups=g,
                   bias=case.bias)
    learnable, stored = learnable_values(layer), measured_stored_values(layer)
    ho, wo = _output_hw(case)
    per_image = formulas.conv_mults(m, c, k, ho, wo, groups=g)
    comparisons, path = _batch_comparisons("conv", layer, case, per_image,
                                           conv_backward_mults(per_image, case.input_grad, case.weight_grad))
    return comparisons + [
        Comparison("conv learnable params", learnable, formulas.learnable_params(m, c // g, k, bias=case.bias)),
        Comparison("conv stored values", stored, stored_values_formula(m, c // g, k, bias=case.bias)),
    ], path


def _basisconv_comparisons(case: LayerCase) -> tuple[list[Comparison], str]:
    m, c, q, k = case.out_channels, case.in_channels, case.num_basis, case.kernel_size
    layer = BasisConv2d(c, m, k, q, stride=case.stride, padding=case.padding, dilation=case.dilation, bias=case.bias,
                        basis_bias=case.basis_bias)
    learnable, stored = learnable_values(layer), measured_stored_values(layer)
    ho, wo = _output_hw(case)
    dim = formulas.filter_dim(c, k)
    backward = basisconv_backward_mults(m, q, dim, ho * wo, case.input_grad, case.weight_grad,
                                        case.input_grad or (case.basis_bias and case.weight_grad))
    comparisons, path = _batch_comparisons("basisconv", layer, case, formulas.basisconv_mults(m, q, c, k, ho, wo),
                                           backward)
    return comparisons + [
        Comparison("basisconv learnable params", learnable,
                   formulas.learnable_params(m, c, k, num_basis=q, bias=case.bias, basis_bias=case.basis_bias)),
        Comparison("basisconv stored values", stored,
                   stored_values_formula(m, c, k, num_basis=q, bias=case.bias, basis_bias=case.basis_bias)),
    ], path


def _linear_comparisons(case: LayerCase) -> tuple[list[Comparison], str]:
    """A Linear from the case's flattened input (C·H·W features) to M: in·out mults per row, one product
    of that size per gradient needed in backward; in·out (+out bias) parameters."""
    fan_in = case.in_channels * case.height * case.width
    layer = Linear(fan_in, case.out_channels, bias=case.bias)
    per_row = fan_in * case.out_channels
    comparisons, _ = _batch_comparisons("linear", layer, case, per_row,
                                        conv_backward_mults(per_row, case.input_grad, case.weight_grad))
    params = per_row + (case.out_channels if case.bias else 0)
    return comparisons + [Comparison("linear learnable params", learnable_values(layer), params)], "linear"


def run_case(case: LayerCase) -> CaseOutcome:
    """Run a case's Conv2d (and BasisConv2d where it applies); compare every count with its formula and the
    counts at batch N (in one piece and in N chunks) with N × those at batch 1."""
    comparisons: list[Comparison] = []
    paths: dict[str, str] = {}
    kinds = ([("conv", _conv_comparisons)] + ([("basisconv", _basisconv_comparisons)] if case.basisconv_applies else [])
             + [("linear", _linear_comparisons)])
    for kind, compare in kinds:
        try:
            found, path = compare(case)
            comparisons += found
            if kind != "linear":
                paths[kind] = path
        except Exception as exc:  # an engine error on a valid geometry is a finding, not a crash of verify
            comparisons.append(Comparison(f"{kind} runs", f"{type(exc).__name__}: {exc}", "no error"))
    return CaseOutcome(case, comparisons, paths)


# -- the counterexample as a program ---------------------------------------------------------------
_SNIPPET_HEAD = '''\
# minibasis verify formulas: counterexample{why}
import contextlib

import numpy as np
import minibasis as mb
from minibasis import formulas, nn

N, C, M, groups, Q = {batch}, {in_channels}, {out_channels}, {groups}, {num_basis}
kernel, stride, padding, dilation = {kernel_size}, {stride}, {padding}, {dilation}
H, W, bias, basis_bias = {height}, {width}, {bias}, {basis_bias}
input_grad, weight_grad = {input_grad}, {weight_grad}
{output_size}
'''

_SNIPPET_CONV = '''
layer = nn.Conv2d(C, M, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
per_image = formulas.conv_mults(M, C, kernel, Ho, Wo, groups=groups)  # M·(C/g)·kh·kw·Ho·Wo
expected_backward = per_image * (int(input_grad) + int(weight_grad))  # weight grad, input grad
expected_learnable = formulas.learnable_params(M, C // groups, kernel, bias=bias)
expected_stored = expected_learnable
flat, out_shape = False, (N, M, Ho, Wo)
'''

_SNIPPET_LINEAR = '''
layer = nn.Linear(C * H * W, M, bias=bias)  # on the flattened input
per_image = C * H * W * M
expected_backward = per_image * (int(input_grad) + int(weight_grad))  # weight grad, input grad
expected_learnable = expected_stored = per_image + (M if bias else 0)
flat, out_shape = True, (N, M)
'''

_SNIPPET_BASISCONV = '''
layer = nn.BasisConv2d(C, M, kernel, Q, stride=stride, padding=padding, dilation=dilation, bias=bias,
                       basis_bias=basis_bias)
D, P = formulas.filter_dim(C, kernel), Ho * Wo
per_image = formulas.basisconv_mults(M, Q, C, kernel, Ho, Wo)      # Q·D·P + M·Q·P
# coefficient grad M·Q·P; intermediate grad M·Q·P when the input or a learned basis bias needs one;
# input grad through the basis stage Q·D·P; the basis is fixed
intermediate_grad = input_grad or (basis_bias and weight_grad)
expected_backward = (M * Q * P * (int(weight_grad) + int(intermediate_grad))
                     + (Q * D * P if input_grad else 0))
expected_learnable = formulas.learnable_params(M, C, kernel, num_basis=Q, bias=bias,
                                               basis_bias=basis_bias)   # M·Q (+M, +Q)
expected_stored = Q * D + M * Q + (M if bias else 0) + (Q if basis_bias else 0)
flat, out_shape = False, (N, M, Ho, Wo)
'''

_SNIPPET_TAIL = '''
learnable = sum(p.numel() for p in layer.parameters())
stored = sum(v.size for v in layer.state_dict().values())  # parameters and persistent buffers
if not weight_grad:
    layer.requires_grad_(False)


def measure(batch, chunked=False):
    """(output shape, forward mults, backward mults) (conv mults but for a Linear); chunked: one image per
    chunk, on 2 threads."""
    images = np.random.default_rng(0).standard_normal((batch, C, H, W)).astype(np.float32)
    x = mb.tensor(images.reshape(batch, -1) if flat else images, requires_grad=input_grad)
    threads = mb.set_num_threads({threads}) if chunked else None
    try:
        with contextlib.ExitStack() as stack:
            if chunked:
                stack.enter_context(mb.functions.smallest_chunks())
            with mb.count_mults() as counter:
                y = layer(x)
                y.backward(np.ones(y.shape, np.float32))
    finally:
        if threads is not None:
            mb.set_num_threads(threads)
    if flat:
        return tuple(y.shape), counter.forward.total, counter.backward.total
    return tuple(y.shape), counter.forward.conv, counter.backward.conv


_, forward_1, backward_1 = measure(1)
shape, forward_n, backward_n = measure(N)
_, forward_chunks, backward_chunks = measure(N, chunked=True)
checks = {{
    "output shape": (shape, out_shape),
    "forward mults": (forward_1, per_image),
    "backward mults": (backward_1, expected_backward),
    "mults at batch N = N × batch 1": ((forward_n, backward_n), (N * forward_1, N * backward_1)),
    "mults in N chunks = N × batch 1": ((forward_chunks, backward_chunks), (N * forward_1, N * backward_1)),
    "learnable params": (learnable, expected_learnable),
    "stored values": (stored, expected_stored),
}}
wrong = {{name: pair for name, pair in checks.items() if pair[0] != pair[1]}}
assert not wrong, f"{kind}: measured != expected: {{wrong}}"
print("{kind}: every measured count equals its formula, and N × its batch-1 count at batch N")
'''


def snippet(case: LayerCase, kind: str = "conv", why: str = "") -> str:
    """A standalone Python program that runs ``case`` for ``kind`` ("conv", "basisconv" or "linear") and
    asserts every count against its closed form (it raises AssertionError where they differ)."""
    bodies = {"conv": _SNIPPET_CONV, "basisconv": _SNIPPET_BASISCONV, "linear": _SNIPPET_LINEAR}
    if kind not in bodies:
        raise ValueError(f"kind must be one of {', '.join(bodies)}, got {kind!r}")
    fields = case.to_dict()
    if case.padding == "same":
        output_size = "Ho, Wo = H, W  # padding='same' (stride 1) keeps the input size, by definition"
    else:
        numbers = "0" if case.padding == "valid" else "padding[{axis}]"
        output_size = "\n".join(
            f"{out} = formulas.conv_output_size({size}, kernel[{axis}], stride[{axis}], "
            f"{numbers.format(axis=axis)}, dilation[{axis}])"
            for axis, (out, size) in enumerate((("Ho", "H"), ("Wo", "W"))))
    fields.update(kernel_size=tuple(case.kernel_size), stride=tuple(case.stride), dilation=tuple(case.dilation),
                  padding=repr(case.padding if isinstance(case.padding, str) else tuple(case.padding)),
                  why=f": {why}" if why else "", output_size=output_size)
    return _SNIPPET_HEAD.format(**fields) + bodies[kind] + _SNIPPET_TAIL.format(kind=kind, threads=CHUNKED_THREADS)


# -- the whole check -------------------------------------------------------------------------------
@dataclass
class FormulaReport(VerifyResult):
    """Result of :func:`check_formulas`.

    ``outcomes``: every case run while searching (up to and including the first failure when
    hypothesis searches, all N otherwise). ``counterexample``: the minimal failing case
    (shrunk by hypothesis, else the first failing draw) or None; ``counterexample_outcome`` its
    comparisons; ``snippet``: a program reproducing it. :meth:`path_tally` counts the cases
    per conv path; :meth:`missing_paths` names the paths (and "grouped", "basisconv") that no
    case exercised: such a run has not checked them, and fails.
    """

    cases_requested: int
    seed: int
    engine: str
    space: GeometrySpace
    outcomes: list[CaseOutcome]
    counterexample: LayerCase | None = None
    counterexample_outcome: CaseOutcome | None = None
    snippet: str | None = None
    seconds: float = 0.0
    check = "formulas"

    @property
    def passed(self) -> bool:
        return self.counterexample is None and all(o.passed for o in self.outcomes) and not self.missing_paths()

    def path_tally(self) -> dict[str, dict[str, int]]:
        """Path → {"conv": cases whose Conv2d took it, "basisconv": cases whose BasisConv's basis stage
        took it}, for every path of ``CONV_PATHS`` and "grouped" (groups > 1, not depthwise)."""
        out = {path: {"conv": 0, "basisconv": 0} for path in CONV_PATHS + ("grouped",)}
        for outcome in self.outcomes:
            for kind, path in outcome.paths.items():
                out.setdefault(path, {"conv": 0, "basisconv": 0})[kind] += 1
            if outcome.case.groups > 1 and outcome.paths.get("conv") != "depthwise-same":
                out["grouped"]["conv"] += 1
        return out

    def missing_paths(self) -> list[str]:
        """The paths (and "grouped", "basisconv") no case ran: none when the run stopped at a failure."""
        if self.counterexample is not None or not all(o.passed for o in self.outcomes):
            return []
        tally = self.path_tally()
        missing = [path for path in CONV_PATHS + ("grouped",) if not tally[path]["conv"]]
        return missing + ([] if any(row["basisconv"] for row in tally.values()) else ["basisconv"])

    def tally(self) -> dict[str, dict[str, int]]:
        """Check name → {"cases": n, "failed": n} over :attr:`outcomes`."""
        out: dict[str, dict[str, int]] = {}
        for outcome in self.outcomes:
            for comparison in outcome.comparisons:
                row = out.setdefault(comparison.check, {"cases": 0, "failed": 0})
                row["cases"] += 1
                row["failed"] += not comparison.passed
        return out

    def to_dict(self) -> dict:
        failing = self.counterexample_outcome
        return {
            "cases_requested": self.cases_requested, "cases_run": len(self.outcomes), "seed": self.seed,
            "engine": self.engine, "space": dataclasses.asdict(self.space), "seconds": round(self.seconds, 3),
            "checks": self.tally(), "paths": self.path_tally(), "missing_paths": self.missing_paths(),
            "counterexample": None if self.counterexample is None else self.counterexample.to_dict(),
            "mismatches": [] if failing is None else [
                {"check": c.check, "measured": _jsonable(c.measured), "formula": _jsonable(c.expected)}
                for c in failing.failures],
            "snippet": self.snippet,
        }

    def table(self) -> str:
        tally = self.tally()
        rows = [(name, f"{row['cases']:,}", f"{row['cases'] - row['failed']:,}", f"{row['failed']:,}")
                for name, row in tally.items()]
        search = ("hypothesis search (stops at the first mismatch, then shrinks it)" if self.engine == "hypothesis"
                  else "NumPy draws")
        lines = [f"verify formulas: {len(self.outcomes):,} of {self.cases_requested:,} cases run, seed {self.seed}, "
                 f"{search}; {self.seconds:.1f} s",
                 f"space: batch 1 and N = 2 to {self.space.max_batch} (in one piece and in N chunks on "
                 f"{CHUNKED_THREADS} threads), C/g and M/g ≤ {self.space.max_channels_per_group}, "
                 f"groups ≤ {self.space.max_groups}, k ≤ {self.space.max_kernel}, "
                 f"stride ≤ {self.space.max_stride}, "
                 f"padding ≤ {self.space.max_padding} or 'valid' / 'same', dilation ≤ {self.space.max_dilation}; "
                 "BasisConv where groups = 1; a Linear on the flattened input", ""]
        lines += format_table(("check", "cases", "passed", "failed"), rows)
        lines.append("")
        paths = [(path, f"{row['conv']:,}", "-" if path == "grouped" else f"{row['basisconv']:,}")
                 for path, row in self.path_tally().items()]
        lines += format_table(("conv path taken", "conv cases", "basisconv cases"), paths)
        lines.append("")
        missing = self.missing_paths()
        if missing:
            lines.append(f"FAILED: no case ran {', '.join(missing)}: those paths are not checked (draw more cases: "
                         f"the {len(STRATA)} strata take turns)")
        elif self.passed:
            lines.append("PASSED: every measured count equals its closed form, and N × its batch-1 count at batch N")
        elif self.snippet is None:
            lines.append(f"FAILED: {self.counterexample} failed during the search but passed when run again "
                         "(the engine is not deterministic)")
        else:
            lines.append("FAILED: " + "; ".join(c.describe() for c in self.counterexample_outcome.failures))
            shrunk = "shrunk by hypothesis" if self.engine == "hypothesis" else "first failing draw, not shrunk"
            lines.append(f"counterexample ({shrunk}): {self.counterexample}")
            lines.append("reproduce it with:\n")
            lines.append(self.snippet)
        return "\n".join(lines)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _hypothesis_available() -> bool:
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        return False
    return True


def _failing_kind(outcome: CaseOutcome) -> str:
    return outcome.failures[0].check.split()[0]


def check_formulas(cases: int = 200, seed: int = 0, *, space: GeometrySpace | None = None,
                   use_hypothesis: bool | None = None) -> FormulaReport:
    """Draw ``cases`` layer geometries and compare every measured count with its formula.

    Args:
        cases: how many geometries to try, shared out over ``STRATA`` in turn (hypothesis may stop
            sooner: at the first mismatch, or when a stratum holds fewer distinct cases).
        seed: makes the search (or the NumPy draws) reproducible.
        space: the bounds of the drawn geometries (default :class:`GeometrySpace`).
        use_hypothesis: None uses hypothesis when it is installed; False forces NumPy draws.

    Returns a :class:`FormulaReport` (``.passed``, ``.table()``, ``.to_json()``).
    """
    cases = positive_int("cases", cases)
    seed = non_negative_int("seed", seed)
    space = space or GeometrySpace()
    if use_hypothesis is None:
        use_hypothesis = _hypothesis_available()
    start = time.perf_counter()
    outcomes: list[CaseOutcome] = []
    counterexample = None
    shares = [cases // len(STRATA) + (i < cases % len(STRATA)) for i in range(len(STRATA))]
    if use_hypothesis:
        for stratum, share in zip(STRATA, shares):
            if share:
                counterexample = _search_with_hypothesis(share, f"{seed}:{stratum}", space, stratum, outcomes)
            if counterexample is not None:
                break
        engine = "hypothesis"
    else:
        rng = np.random.default_rng(seed)
        for i in range(cases):
            outcomes.append(run_case(draw_case(rng, space, STRATA[i % len(STRATA)])))
        counterexample = next((o.case for o in outcomes if not o.passed), None)
        engine = "numpy"
    report = FormulaReport(cases_requested=cases, seed=seed, engine=engine, space=space, outcomes=outcomes)
    if counterexample is not None:
        failing = run_case(counterexample)
        report.counterexample, report.counterexample_outcome = counterexample, failing
        if not failing.passed:
            report.snippet = snippet(counterexample, _failing_kind(failing), failing.failures[0].describe())
    report.seconds = time.perf_counter() - start
    return report


def _search_with_hypothesis(cases: int, seed: str, space: GeometrySpace, stratum: str,
                            outcomes: list) -> LayerCase | None:
    """hypothesis.find over the stratum's space: None when no case fails, else the shrunk failing case.

    ``outcomes`` receives every case run before (and including) the first failure; the
    shrinking runs after it are not tallied.
    """
    from hypothesis import HealthCheck, Phase, find, settings
    from hypothesis.errors import NoSuchExample

    failed = []

    def fails(case: LayerCase) -> bool:
        outcome = run_case(case)
        if not failed:
            outcomes.append(outcome)
            if not outcome.passed:
                failed.append(outcome)
        return not outcome.passed

    config = settings(max_examples=cases, database=None, deadline=None, phases=(Phase.generate, Phase.shrink),
                      suppress_health_check=list(HealthCheck))
    try:
        return find(case_strategy(space, stratum), fails, settings=config, random=random.Random(seed))
    except NoSuchExample:
        return None
