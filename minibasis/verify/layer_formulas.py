"""``verify formulas``: the paper's closed forms against what a Conv2d and a BasisConv2d execute.

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
  Q·D + M·Q (+M, +Q).

With hypothesis installed the cases come from its search (``hypothesis.find``, seeded, no
example database), which stops at the first mismatch and shrinks it to a minimal
counterexample; without it a seeded NumPy generator draws the same space. A mismatch is
printed as a standalone Python snippet that reproduces it.
"""
from __future__ import annotations

import dataclasses
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
from minibasis.measure import learnable_values, stored_values as measured_stored_values
from minibasis.nn import BasisConv2d, Conv2d, Module
from minibasis.verify.report import VerifyResult, format_table

__all__ = ["LayerCase", "GeometrySpace", "CaseOutcome", "FormulaReport", "check_formulas", "run_case",
           "draw_case", "case_strategy", "snippet"]

#: Which gradients a case needs: (input, weight); a case that needs neither has no backward pass.
GRADIENT_CHOICES = ((True, True), (False, True), (True, False))
#: How padding is given: numbers (drawn twice as often), or PyTorch's "valid" / "same".
PADDING_MODES = (None, None, "valid", "same")


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
    """Bounds of the drawn geometries (small, so thousands of cases run in seconds)."""

    max_batch: int = 3
    max_channels_per_group: int = 4
    max_groups: int = 3
    max_kernel: int = 4
    max_stride: int = 3
    max_padding: int = 2
    max_dilation: int = 2
    max_extra_size: int = 6  # input rows/columns beyond the smallest that fits the dilated kernel

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check = non_negative_int if field.name in ("max_padding", "max_extra_size") else positive_int
            check(field.name, getattr(self, field.name))


def build_case(draw: Callable[[int, int], int], space: GeometrySpace) -> LayerCase:
    """A case from ``draw(low, high)`` (an int in [low, high]); the one description of the space.

    Both the NumPy generator and hypothesis's strategy call this, so they draw the same cases
    (hypothesis shrinks each draw toward ``low``: the minimal case is the smallest layer).
    """
    groups = draw(1, space.max_groups)
    in_channels = groups * draw(1, space.max_channels_per_group)
    out_channels = groups * draw(1, space.max_channels_per_group)
    kernel = (draw(1, space.max_kernel), draw(1, space.max_kernel))
    stride = (draw(1, space.max_stride), draw(1, space.max_stride))
    padding = (draw(0, space.max_padding), draw(0, space.max_padding))
    mode = PADDING_MODES[draw(0, len(PADDING_MODES) - 1)]
    if mode is not None:
        padding = mode
        if mode == "same":
            stride = (1, 1)  # as in PyTorch, "same" is defined for stride 1 only
    dilation = (draw(1, space.max_dilation), draw(1, space.max_dilation))
    sizes = []
    for axis in (0, 1):
        span = dilation[axis] * (kernel[axis] - 1) + 1  # the dilated kernel must fit the padded input
        smallest = 1 if padding == "same" else max(1, span - 2 * _explicit_padding(padding)[axis])
        sizes.append(smallest + draw(0, space.max_extra_size))
    filter_dim = in_channels * kernel[0] * kernel[1]
    input_grad, weight_grad = GRADIENT_CHOICES[draw(0, len(GRADIENT_CHOICES) - 1)]
    return LayerCase(batch=draw(1, space.max_batch), in_channels=in_channels, out_channels=out_channels,
                     groups=groups, kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                     height=sizes[0], width=sizes[1], num_basis=draw(1, filter_dim),
                     input_grad=input_grad, weight_grad=weight_grad, bias=bool(draw(0, 1)),
                     basis_bias=bool(draw(0, 1)))


def draw_case(rng: np.random.Generator, space: GeometrySpace | None = None) -> LayerCase:
    """One case from a NumPy generator (used when hypothesis is not installed)."""
    return build_case(lambda low, high: int(rng.integers(low, high + 1)), space or GeometrySpace())


def case_strategy(space: GeometrySpace | None = None):
    """A hypothesis strategy of :class:`LayerCase` over ``space`` (needs hypothesis)."""
    from hypothesis import strategies as st

    space = space or GeometrySpace()

    @st.composite
    def cases(draw):
        return build_case(lambda low, high: draw(st.integers(low, high)), space)

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
    """The comparisons of one case (an exception while running it is a failed ``runs`` check)."""

    case: LayerCase
    comparisons: list[Comparison]

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


def _measure(layer: Module, case: LayerCase):
    """(output shape, forward conv mults, backward conv mults) of ``layer`` on a case's input
    (its weights frozen first when the case needs no weight gradient)."""
    rng = np.random.default_rng(0)
    x = tensor(rng.standard_normal((case.batch, case.in_channels, case.height, case.width)).astype(np.float32),
               requires_grad=case.input_grad)
    if not case.weight_grad:
        layer.requires_grad_(False)
    with count_mults() as counter:
        y = layer(x)
        y.backward(np.ones(y.shape, np.float32))
    return tuple(y.shape), counter.forward.conv, counter.backward.conv


def _conv_comparisons(case: LayerCase) -> list[Comparison]:
    m, c, g, k = case.out_channels, case.in_channels, case.groups, case.kernel_size
    layer = Conv2d(c, m, k, stride=case.stride, padding=case.padding, dilation=case.dilation, groups=g,
                   bias=case.bias)
    learnable, stored = learnable_values(layer), measured_stored_values(layer)
    ho, wo = _output_hw(case)
    per_image = formulas.conv_mults(m, c, k, ho, wo, groups=g)
    shape, forward, backward = _measure(layer, case)
    return [
        Comparison("conv output shape", shape, (case.batch, m, ho, wo)),
        Comparison("conv forward mults", forward, case.batch * per_image),
        Comparison("conv backward mults", backward,
                   case.batch * conv_backward_mults(per_image, case.input_grad, case.weight_grad)),
        Comparison("conv learnable params", learnable,
                   formulas.learnable_params(m, c // g, k, bias=case.bias)),
        Comparison("conv stored values", stored, stored_values_formula(m, c // g, k, bias=case.bias)),
    ]


def _basisconv_comparisons(case: LayerCase) -> list[Comparison]:
    m, c, q, k = case.out_channels, case.in_channels, case.num_basis, case.kernel_size
    layer = BasisConv2d(c, m, k, q, stride=case.stride, padding=case.padding, dilation=case.dilation, bias=case.bias,
                        basis_bias=case.basis_bias)
    learnable, stored = learnable_values(layer), measured_stored_values(layer)
    ho, wo = _output_hw(case)
    dim = formulas.filter_dim(c, k)
    shape, forward, backward = _measure(layer, case)
    return [
        Comparison("basisconv output shape", shape, (case.batch, m, ho, wo)),
        Comparison("basisconv forward mults", forward, case.batch * formulas.basisconv_mults(m, q, c, k, ho, wo)),
        Comparison("basisconv backward mults", backward,
                   case.batch * basisconv_backward_mults(m, q, dim, ho * wo, case.input_grad, case.weight_grad,
                                                         case.input_grad or (case.basis_bias and case.weight_grad))),
        Comparison("basisconv learnable params", learnable,
                   formulas.learnable_params(m, c, k, num_basis=q, bias=case.bias, basis_bias=case.basis_bias)),
        Comparison("basisconv stored values", stored,
                   stored_values_formula(m, c, k, num_basis=q, bias=case.bias, basis_bias=case.basis_bias)),
    ]


def run_case(case: LayerCase) -> CaseOutcome:
    """Run a case's Conv2d (and BasisConv2d where it applies); compare every count with its formula."""
    comparisons: list[Comparison] = []
    kinds = [("conv", _conv_comparisons)] + ([("basisconv", _basisconv_comparisons)] if case.basisconv_applies else [])
    for kind, compare in kinds:
        try:
            comparisons += compare(case)
        except Exception as exc:  # an engine error on a valid geometry is a finding, not a crash of verify
            comparisons.append(Comparison(f"{kind} runs", f"{type(exc).__name__}: {exc}", "no error"))
    return CaseOutcome(case, comparisons)


# -- the counterexample as a program ---------------------------------------------------------------
_SNIPPET_HEAD = '''\
# minibasis verify formulas: counterexample{why}
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
'''

_SNIPPET_TAIL = '''
learnable = sum(p.numel() for p in layer.parameters())
stored = sum(v.size for v in layer.state_dict().values())  # parameters and persistent buffers
if not weight_grad:
    layer.requires_grad_(False)
x = mb.tensor(np.random.default_rng(0).standard_normal((N, C, H, W)).astype(np.float32), requires_grad=input_grad)
with mb.count_mults() as counter:
    y = layer(x)
    y.backward(np.ones(y.shape, np.float32))
checks = {{
    "output shape": (tuple(y.shape), (N, M, Ho, Wo)),
    "forward mults": (counter.forward.conv, N * per_image),
    "backward mults": (counter.backward.conv, N * expected_backward),
    "learnable params": (learnable, expected_learnable),
    "stored values": (stored, expected_stored),
}}
wrong = {{name: pair for name, pair in checks.items() if pair[0] != pair[1]}}
assert not wrong, f"{kind}: measured != formula: {{wrong}}"
print("{kind}: every measured count equals its formula")
'''


def snippet(case: LayerCase, kind: str = "conv", why: str = "") -> str:
    """A standalone Python program that runs ``case`` for ``kind`` ("conv" or "basisconv") and asserts
    every count against its closed form (it raises AssertionError where they differ)."""
    if kind not in ("conv", "basisconv"):
        raise ValueError(f"kind must be 'conv' or 'basisconv', got {kind!r}")
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
    body = _SNIPPET_CONV if kind == "conv" else _SNIPPET_BASISCONV
    return _SNIPPET_HEAD.format(**fields) + body + _SNIPPET_TAIL.format(kind=kind)


# -- the whole check -------------------------------------------------------------------------------
@dataclass
class FormulaReport(VerifyResult):
    """Result of :func:`check_formulas`.

    ``outcomes``: every case run while searching (up to and including the first failure when
    hypothesis searches, all N otherwise). ``counterexample``: the minimal failing case
    (shrunk by hypothesis, else the first failing draw) or None; ``counterexample_outcome`` its
    comparisons; ``snippet``: a program reproducing it.
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
        return self.counterexample is None and all(o.passed for o in self.outcomes)

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
            "checks": self.tally(),
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
                 f"space: batch ≤ {self.space.max_batch}, C/g and M/g ≤ {self.space.max_channels_per_group}, "
                 f"groups ≤ {self.space.max_groups}, k ≤ {self.space.max_kernel}, "
                 f"stride ≤ {self.space.max_stride}, "
                 f"padding ≤ {self.space.max_padding} or 'valid' / 'same', dilation ≤ {self.space.max_dilation}; "
                 "BasisConv where groups = 1", ""]
        lines += format_table(("check", "cases", "passed", "failed"), rows)
        lines.append("")
        if self.passed:
            lines.append("PASSED: every measured count equals its closed form")
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
        cases: how many geometries to try (hypothesis may stop sooner: at the first mismatch,
            or when the space holds fewer distinct cases).
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
    if use_hypothesis:
        counterexample = _search_with_hypothesis(cases, seed, space, outcomes)
        engine = "hypothesis"
    else:
        rng = np.random.default_rng(seed)
        for _ in range(cases):
            outcomes.append(run_case(draw_case(rng, space)))
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


def _search_with_hypothesis(cases: int, seed: int, space: GeometrySpace, outcomes: list) -> LayerCase | None:
    """hypothesis.find over the space: None when no case fails, else the shrunk failing case.

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
        return find(case_strategy(space), fails, settings=config, random=random.Random(seed))
    except NoSuchExample:
        return None
