"""Whole-model compression: replace trained ``Conv2d`` layers by their eigen-basis ``BasisConv2d``.

``compress(model, energy_threshold=t)`` returns a new model (the input is deep-copied
and never run or modified) and a :class:`CompressionReport`. Every multiplication
count in the report is *measured*: both models run one forward pass of an input of
``input_shape`` (default 32 images) under :func:`minibasis.count_mults` (in eval mode,
without a graph), and the counts are divided by the batch size, i.e. reported per image;
each conv's count per image must be the same at batch 1 (:func:`minibasis.measure.profile`
raises :class:`~minibasis.measure.BatchCountError` where it is not). The paper's
closed-form ratio Q/M + Q/D is reported beside the measured one, so the two can be
compared layer by layer.

Usage::

    new_model, report = minibasis.compress(model, energy_threshold=0.9)
    print(report.table())
    with minibasis.io.atomic_write("report.json", "w") as f:  # as every file minibasis writes
        f.write(report.to_json())

``minibasis.compress`` is this module, made callable, so it works both as the
function and as the module that holds :class:`CompressionReport` and friends.
"""
from __future__ import annotations

import copy
import json
import sys
import types
from dataclasses import dataclass, field
from fractions import Fraction

from minibasis import allocation as allocation_module, basis as basis_math, formulas
from minibasis.checks import energy_threshold as check_energy_threshold, positive_int
from minibasis.measure import REPORT_BATCH, batches_note, check_input_shape, profile
from minibasis.allocation import BudgetError
from minibasis.nn import BasisConv2d, Conv2d, Module

__all__ = ["compress", "compressible", "copy_module", "CompressionReport", "LayerReport", "BudgetError"]


def copy_module(module: Module) -> Module:
    """An independent deep copy of ``module``: its own parameter and buffer arrays, same structure.

    ``copy.deepcopy`` works with :class:`~minibasis.nn.Module` (the stores are plain
    dicts and arrays); a parameter or submodule shared by several paths stays shared
    within the copy. Gradients are dropped: the copy starts clean.
    """
    if not isinstance(module, Module):
        raise TypeError(f"copy_module needs a minibasis.nn.Module, got {type(module).__name__}")
    duplicate = copy.deepcopy(module)
    duplicate.zero_grad()
    return duplicate


@dataclass
class LayerReport:
    """One convolution layer of the model: its shape, its basis and what replacing it costs.

    ``mults_before``/``mults_after`` are measured conv multiplications per image of this
    layer's module path (0 if the forward pass never called it); ``formula_before``/
    ``formula_after`` the closed form for the same layer. ``formula_ratio`` is Q/M + Q/D
    (exact), ``measured_ratio`` is ``mults_after / mults_before``. ``params_*`` count
    learnable parameters, ``stored_*`` parameters plus persistent buffers (the fixed basis
    included). When the layer is kept, ``replaced`` is False, ``reason`` says why, and the
    "after" values equal the "before" ones (Q and energy still say what the basis would have
    been, where one was computed; None for a grouped conv or one outside ``layers=``).
    """

    name: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    filter_dim: int
    num_basis: int | None
    energy: float | None
    formula_ratio: Fraction | None
    params_before: int
    params_after: int
    replaced: bool
    reason: str | None = None
    mults_before: int = 0
    mults_after: int = 0
    stored_before: int = 0
    stored_after: int = 0
    formula_before: int = 0
    formula_after: int = 0
    groups: int = 1
    output: tuple[int, int] | None = None   # (Ho, Wo) the layer produced in the measuring pass

    @property
    def M(self) -> int:
        return self.out_channels

    @property
    def Q(self) -> int | None:
        return self.num_basis

    @property
    def D(self) -> int:
        return self.filter_dim

    @property
    def skip_reason(self) -> str | None:
        """The former name of :attr:`reason`."""
        return self.reason

    @property
    def measured_ratio(self) -> float | None:
        return self.mults_after / self.mults_before if self.mults_before else None

    def to_dict(self) -> dict:
        ratio = self.formula_ratio
        return {
            "name": self.name, "M": self.out_channels, "C": self.in_channels, "groups": self.groups,
            "kernel_size": list(self.kernel_size), "D": self.filter_dim, "Q": self.num_basis,
            "energy": self.energy, "mults_before": self.mults_before, "mults_after": self.mults_after,
            "measured_ratio": self.measured_ratio, "formula_mults_before": self.formula_before,
            "formula_mults_after": self.formula_after,
            "formula_ratio": None if ratio is None else float(ratio),
            "formula_ratio_exact": None if ratio is None else str(ratio),
            "params_before": self.params_before, "params_after": self.params_after,
            "stored_before": self.stored_before, "stored_after": self.stored_after,
            "replaced": self.replaced, "reason": self.reason,
        }


@dataclass
class CompressionReport:
    """Per-layer rows and whole-model totals of one :func:`compress` call.

    ``layers``: the convs considered (all, or those of ``layers=``); ``excluded``: the other
    convs, kept with the reason "not in layers=". Totals: ``conv_mults_before``/``_after``
    are the whole model's measured conv multiplications per image (every conv op), and
    ``params_*`` its learnable parameters, ``stored_*`` its parameters plus persistent
    buffers (what a deployment stores: the bases count there, not among the learnable).
    """

    layers: list[LayerReport]
    energy_threshold: float | None
    num_basis: int | None
    input_shape: tuple[int, ...]
    conv_mults_before: int
    conv_mults_after: int
    params_before: int
    params_after: int
    skip_unprofitable: bool = True
    notes: list[str] = field(default_factory=list)
    stored_before: int = 0
    stored_after: int = 0
    formula_mults_before: int = 0
    formula_mults_after: int = 0
    excluded: list[LayerReport] = field(default_factory=list)
    target_mult_ratio: float | None = None   # the budget, when Q was chosen under one
    allocation: str | None = None            # "uniform" or "greedy" under a budget
    batches: tuple[int, ...] = ()            # the batches measured (Profile.batches): (N, 1), or (1,)
    basis_multiple: int | None = None        # Q rounded up to a multiple of this (a runtime's channel block)

    @property
    def energy_kept(self) -> float | None:
        """Mean over the layers considered of the energy fraction kept (1 for a conv kept as it is):
        the objective an allocation under a budget is judged by (:mod:`minibasis.allocation`)."""
        if not self.layers:
            return None
        return sum(row.energy if row.replaced else 1.0 for row in self.layers) / len(self.layers)

    @property
    def mult_ratio(self) -> float | None:
        """Whole-model conv multiplications after / before (measured)."""
        return self.conv_mults_after / self.conv_mults_before if self.conv_mults_before else None

    @property
    def param_ratio(self) -> float | None:
        return self.params_after / self.params_before if self.params_before else None

    @property
    def stored_ratio(self) -> float | None:
        return self.stored_after / self.stored_before if self.stored_before else None

    @property
    def replaced(self) -> list[LayerReport]:
        return [row for row in self.layers if row.replaced]

    @property
    def all_layers(self) -> list[LayerReport]:
        """Every conv of the model, considered or excluded, in module order."""
        rows = {row.name: row for row in self.layers + self.excluded}
        ordered = [rows[name] for name in self._order if name in rows]
        return ordered if len(ordered) == len(rows) else self.layers + self.excluded

    _order: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {
            "energy_threshold": self.energy_threshold, "num_basis": self.num_basis,
            "target_mult_ratio": self.target_mult_ratio, "allocation": self.allocation,
            "basis_multiple": self.basis_multiple, "energy_kept": self.energy_kept,
            "skip_unprofitable": self.skip_unprofitable, "input_shape": list(self.input_shape),
            "per_image": True, "batches": list(self.batches),
            "layers": [row.to_dict() for row in self.layers],
            "excluded_layers": [row.to_dict() for row in self.excluded],
            "totals": {
                "conv_mults_before": self.conv_mults_before, "conv_mults_after": self.conv_mults_after,
                "mult_ratio": self.mult_ratio,
                "formula_mults_before": self.formula_mults_before, "formula_mults_after": self.formula_mults_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "param_ratio": self.param_ratio,
                "stored_before": self.stored_before, "stored_after": self.stored_after,
                "stored_ratio": self.stored_ratio,
                "layers_replaced": len(self.replaced), "layers_considered": len(self.layers),
            },
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> dict:
        """One flat row for a sweep over thresholds (the paper's Figure 2): retained filters (Σ Q
        over replaced convs + Σ M over kept ones), measured and formula conv multiplications,
        learnable parameters and stored values, before and after, and ``per_layer`` rows."""
        def ratio(a, b):
            return a / b if b else None

        filters = sum(r.M for r in self.layers)
        retained = sum(r.Q if r.replaced else r.M for r in self.layers)
        per_layer = [{"name": r.name, "M": r.M, "C": r.in_channels, "k": list(r.kernel_size), "D": r.D, "Q": r.Q,
                      "Ho": None if r.output is None else r.output[0], "Wo": None if r.output is None else r.output[1],
                      "energy": r.energy, "replaced": r.replaced, "reason": r.reason,
                      "mults_measured": r.mults_after, "mults_formula": r.formula_after,
                      "ratio_Q_over_M_plus_Q_over_D": None if r.formula_ratio is None else float(r.formula_ratio),
                      "learnable": r.params_after, "stored": r.stored_after}
                     for r in self.layers]
        return {"threshold": self.energy_threshold, "layers_replaced": len(self.replaced),
                "layers": len(self.layers), "filters_original": filters, "retained_filters": retained,
                "retained_filters_pct": 100.0 * retained / filters if filters else 0.0,
                "basis_filters_all_layers": sum(r.Q or 0 for r in self.layers),
                "conv_mults_original": self.conv_mults_before, "conv_mults_measured": self.conv_mults_after,
                "mult_ratio_measured": self.mult_ratio,
                "conv_mults_formula_original": self.formula_mults_before,
                "conv_mults_formula": self.formula_mults_after,
                "mult_ratio_formula": ratio(self.formula_mults_after, self.formula_mults_before),
                "params_original": self.params_before, "params": self.params_after,
                "param_ratio": self.param_ratio,
                "stored_original": self.stored_before, "stored": self.stored_after,
                "stored_ratio": self.stored_ratio,
                "num_basis": [r.Q for r in self.layers], "per_layer": per_layer}

    def table(self) -> str:
        """A fixed-width text table: one row per conv layer, then the totals."""
        header = ("layer", "M", "C", "k", "D", "Q", "energy", "mults before", "mults after",
                  "measured", "Q/M+Q/D", "learnable before", "after", "stored after", "status")
        dash = "-"
        rows = []
        for r in self.all_layers:
            measured = r.measured_ratio
            rows.append((r.name, str(r.out_channels), str(r.in_channels), f"{r.kernel_size[0]}x{r.kernel_size[1]}",
                         str(r.filter_dim), dash if r.num_basis is None else str(r.num_basis),
                         dash if r.energy is None else f"{r.energy:.4f}", f"{r.mults_before:,}",
                         f"{r.mults_after:,}", dash if measured is None else f"{measured:.4f}",
                         dash if r.formula_ratio is None else f"{float(r.formula_ratio):.4f}",
                         f"{r.params_before:,}", f"{r.params_after:,}", f"{r.stored_after:,}",
                         "replaced" if r.replaced else f"kept: {r.reason}"))
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        left = {0, len(header) - 1}

        def fmt(cells):
            text = "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            return text.rstrip()

        def ratio(value):
            return dash if value is None else f"{value:.4f}"

        if self.allocation is not None:
            setting = (f"a measured budget of {self.target_mult_ratio:g} of the conv multiplications, "
                       f"{self.allocation} allocation"
                       + ("" if self.energy_threshold is None else f" (t = {self.energy_threshold:.6g})"))
        elif self.energy_threshold is not None:
            setting = f"energy threshold t = {self.energy_threshold}" + (
                "" if self.basis_multiple is None else f", Q rounded up to a multiple of {self.basis_multiple}")
        else:
            setting = f"num_basis Q = {self.num_basis}"
        lines = [f"compression at {setting}; multiplications per image on input {self.input_shape}, "
                 f"{batches_note(self.batches)}",
                 fmt(header), fmt(["-" * w for w in widths])]
        unprofitable = [r for r in self.layers if not r.replaced and (r.reason or "").startswith("unprofitable")]
        if not self.replaced and unprofitable:
            # Said first: at t = 1 (Q = min(M, D)) no conv saves multiplications, which surprises a
            # user who checks that t = 1 reproduces the original.
            n, total = len(unprofitable), len(self.layers)
            which = f"all {n}" if n == total else f"{n} of the {total}"
            lines.insert(0, f"nothing replaced: {which} convs would need as many multiplications or "
                            "more as BasisConv2d (unprofitable); pass skip_unprofitable=False (command line: "
                            "--replace-all) to replace them anyway")
        lines += [fmt(row) for row in rows]
        lines.append("")
        lines.append(f"layers replaced: {len(self.replaced)} of {len(self.layers)}; mean energy kept over "
                     f"the layers considered {ratio(self.energy_kept)}")
        lines.append(f"conv multiplications (whole model): {self.conv_mults_before:,} -> {self.conv_mults_after:,} "
                     f"(ratio {ratio(self.mult_ratio)}; formula {self.formula_mults_before:,} -> "
                     f"{self.formula_mults_after:,})")
        lines.append(f"learnable parameters (whole model): {self.params_before:,} -> {self.params_after:,} "
                     f"(ratio {ratio(self.param_ratio)})")
        lines.append(f"stored values, parameters + buffers incl. bases (whole model): {self.stored_before:,} -> "
                     f"{self.stored_after:,} (ratio {ratio(self.stored_ratio)})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = table


def compressible(model: Module) -> bool:
    """Whether ``model`` has an ordinary ``Conv2d`` for :func:`compress` to replace."""
    return any(isinstance(m, Conv2d) for m in model.modules())


def _check_settings(energy_threshold, num_basis, target_mult_ratio=None, allocation="uniform",
                    thresholds=None, basis_multiple=None) -> None:
    given = [name for name, value in (("energy_threshold", energy_threshold), ("num_basis", num_basis),
                                      ("target_mult_ratio", target_mult_ratio)) if value is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of energy_threshold, num_basis and target_mult_ratio, got "
                         f"energy_threshold={energy_threshold!r}, num_basis={num_basis!r}, "
                         f"target_mult_ratio={target_mult_ratio!r}")
    if energy_threshold is not None:
        check_energy_threshold(energy_threshold)
    if basis_multiple is not None:
        positive_int("basis_multiple", basis_multiple)
        if energy_threshold is None:
            raise ValueError("basis_multiple rounds the Q an energy_threshold chooses: it needs energy_threshold")
    if num_basis is not None:
        positive_int("num_basis", num_basis)
    if allocation not in allocation_module.ALLOCATIONS:
        raise ValueError(f"allocation must be one of {allocation_module.ALLOCATIONS}, got {allocation!r}")
    if target_mult_ratio is None and (allocation != "uniform" or thresholds is not None):
        raise ValueError("allocation and thresholds choose Q under a budget: they need target_mult_ratio")
    if target_mult_ratio is not None:
        check_energy_threshold(target_mult_ratio, name="target_mult_ratio")  # a fraction in (0, 1] too
    if thresholds is not None:
        if allocation != "uniform":
            raise ValueError("thresholds is the grid of the uniform allocation; greedy chooses Q per layer")
        if isinstance(thresholds, (str, bytes)) or not len(thresholds):
            raise ValueError(f"thresholds must be a non-empty sequence of t in (0, 1], got {thresholds!r}")
        for t in thresholds:
            check_energy_threshold(t, name="thresholds")


def _select_convs(model: Module, layers) -> list[tuple[str, Conv2d]]:
    convs = [(path, m) for path, m in model.named_modules() if isinstance(m, Conv2d)]
    if layers is None:
        return convs
    if isinstance(layers, str) or not all(isinstance(name, str) for name in layers):
        raise TypeError(f"layers must be a list of module paths (str), got {layers!r}")
    modules = dict(model.named_modules())
    wanted = set()
    for name in layers:
        if name not in modules:
            conv_names = [p for p, _ in convs]
            raise ValueError(f"layers: no module at path {name!r}; the Conv2d layers are {conv_names}")
        if not isinstance(modules[name], Conv2d):
            raise ValueError(f"layers: {name!r} is a {type(modules[name]).__name__}, not a Conv2d")
        wanted.add(name)
    return [(path, m) for path, m in convs if path in wanted]


def _replace_everywhere(model: Module, old: Module, new: Module) -> None:
    """Put ``new`` in place of ``old`` at every path that holds it (each keeps its position)."""
    # named_modules yields a shared module once, so walk the children of every parent.
    paths = [f"{parent_path}.{name}" if parent_path else name
             for parent_path, parent in model.named_modules()
             for name, child in parent.named_children() if child is old]
    for path in paths:
        model.set_submodule(path, new)


def _row(path: str, conv: Conv2d, candidate, reason: str | None) -> LayerReport:
    m, c, kh, kw = conv.weight.shape
    groups = int(getattr(conv, "groups", 1))
    q = None if candidate is None else candidate.num_basis
    return LayerReport(name=path, out_channels=m, in_channels=conv.in_channels, kernel_size=(kh, kw),
                       filter_dim=c * kh * kw, num_basis=q, energy=None if candidate is None else candidate.energy,
                       formula_ratio=None if q is None else formulas.mult_ratio(m, q, c, (kh, kw)),
                       params_before=0, params_after=0, replaced=False, reason=reason, groups=groups)


def _fill_measurements(row: LayerReport, before, after) -> None:
    row.mults_before, row.formula_before = before.mults, before.formula_mults
    row.params_before, row.stored_before = before.learnable, before.stored
    row.mults_after, row.formula_after = after.mults, after.formula_mults
    row.params_after, row.stored_after = after.learnable, after.stored
    row.output = before.output


def compress(model: Module, energy_threshold=None, skip_unprofitable: bool = True, layers=None,
             num_basis=None, input_shape=(REPORT_BATCH, 3, 32, 32), *, target_mult_ratio=None, allocation: str = "uniform",
             thresholds=None, basis_multiple=None, calibration=None):
    """Replace ``Conv2d`` layers by ``BasisConv2d.from_conv``; return ``(new_model, report)``.

    Args:
        model: a trained :class:`~minibasis.nn.Module`; it is deep-copied and left untouched
            (never run, so not even BatchNorm statistics change).
        energy_threshold: t in (0, 1] for every selected layer (t = 1 keeps each layer's
            numerical rank: the new model computes the same function to rounding).
        skip_unprofitable: keep a conv as it is when Q/M + Q/D ≥ 1 (BasisConv would need at
            least as many multiplications).
        layers: module paths (as in ``named_modules()``) of the convs to consider; default all.
        num_basis: Q for every selected layer instead of a threshold; it must not exceed
            min(D, M) of any selected layer.
        input_shape: (N, C, H, W) of the input used to measure multiplications (one
            :func:`minibasis.measure.profile` before and one after: at batch N and, for N > 1,
            at batch 1, where every conv's count per image must agree); counts are per image.
        target_mult_ratio: instead of a threshold or Q: a budget R in (0, 1]; the result's
            whole-model conv multiplications, *measured* on ``input_shape``, are at most R times
            the original's. Exactly one of ``energy_threshold``, ``num_basis`` and
            ``target_mult_ratio`` is given. A budget that even Q = 1 in every layer misses raises
            :class:`~minibasis.allocation.BudgetError` (also ``minibasis.compress.BudgetError``)
            from the cost measurements alone, before the compressed model is built; a budget the
            original already meets (R = 1) replaces nothing.
        allocation: how a budget is spent (:mod:`minibasis.allocation`). ``"uniform"``, the
            paper's: one threshold t for every layer, the largest whose measured ratio fits.
            ``"greedy"``: Q per layer, starting from the original and repeatedly dropping the
            basis vector whose normalized eigenvalue λ_q / Σλ (the layer's share of energy lost)
            per multiplication saved is smallest, until the measured budget is met; a layer stays
            a conv while that is cheaper, and its first drop takes it straight to the largest Q
            (at most its rank) whose BasisConv is cheaper than the conv, scored by the summed
            shares of the vectors dropped over the multiplications that saves.
            ``"sensitivity"``: greedy's moves scored by the cross-entropy increase each layer's
            basis causes on ``calibration`` images, measured layer by layer
            (:mod:`minibasis.allocation`): data-driven, where greedy uses the spectrum only.
        calibration: with ``allocation="sensitivity"``: ``(images, labels)``, host arrays
            (N, C, H, W) as the model takes them (normalized) and (N,) class indices, or a
            function returning them, called only once the budget is known to be reachable.
            Costs one pass over them per layer and grid point (about 12 per layer).
        thresholds: with ``allocation="uniform"``: the grid of t searched (default: every t at
            which some layer's Q changes, so the largest fitting t is exact).
        basis_multiple: with ``energy_threshold``: each layer's Q is rounded up to a multiple of
            this (at most min(D, M)), so every layer keeps at least the energy t asks for and its
            basis stage has a channel count a runtime's blocked kernels run without padding
            (onnxruntime's NCHWc: 16 on AVX-512, 8 on AVX2; measured in ``bench/onnx.py``). The
            counts stay measured: rounding up costs (Q' − Q)·(D + M) per output position.

    Returns:
        ``(new_model, report)``: the copy with the replacements, in the input's training
        mode, and a :class:`CompressionReport`; every conv kept has a ``reason``. Under a
        budget, ``report.allocation`` and ``report.target_mult_ratio`` say how Q was chosen
        (``report.energy_threshold`` is the t uniform chose), and ``report.mult_ratio`` is
        the final model's measured ratio.

    Costs under a budget: each layer's multiplications as a conv and as a BasisConv at Q = 1
    and Q = 2 are measured once (three profile passes), a BasisConv's cost being affine in Q;
    the chosen model is then built and measured, and if that measurement missed the budget,
    the next plan (the next smaller t, or one more greedy drop) is built and measured.

    A conv module shared by several paths is compressed once and replaced everywhere.
    Grouped convs (groups > 1) are kept: the eigen-basis is defined for dense filters.
    """
    if not isinstance(model, Module):
        raise TypeError(f"compress needs a minibasis.nn.Module, got {type(model).__name__}")
    _check_settings(energy_threshold, num_basis, target_mult_ratio, allocation, thresholds, basis_multiple)
    if (allocation == "sensitivity") != (calibration is not None):
        raise ValueError("allocation='sensitivity' measures each layer's loss on calibration=(images, labels): "
                         "give both or neither")
    shape = check_input_shape(input_shape)
    selected = _select_convs(model, layers)
    if target_mult_ratio is not None:
        return _compress_to_budget(model, selected, shape, float(target_mult_ratio), allocation, thresholds,
                                   bool(skip_unprofitable), calibration)

    decide = _same_for_all(energy_threshold, num_basis, skip_unprofitable, basis_multiple)
    new_model, report = _build(model, selected, shape, decide)
    report.energy_threshold = None if energy_threshold is None else float(energy_threshold)
    report.basis_multiple = None if basis_multiple is None else int(basis_multiple)
    report.num_basis = None if num_basis is None else int(num_basis)
    report.skip_unprofitable = bool(skip_unprofitable)
    return new_model, report


def _same_for_all(energy_threshold, num_basis, skip_unprofitable: bool, basis_multiple=None):
    """The ``decide`` of :func:`_build` for one threshold or one Q in every layer (Q rounded up
    to a multiple of ``basis_multiple``, at most min(D, M), when given)."""
    def decide(path, conv):
        try:
            candidate = BasisConv2d.from_conv(conv, energy_threshold=energy_threshold, num_basis=num_basis)
            if basis_multiple is not None:
                m, c, kh, kw = conv.weight.shape
                rounded = min(-(-candidate.num_basis // basis_multiple) * basis_multiple, m, c * kh * kw)
                if rounded != candidate.num_basis:
                    candidate = BasisConv2d.from_conv(conv, num_basis=rounded)
        except ValueError as exc:
            raise ValueError(f"layer {path!r} (weight {tuple(conv.weight.shape)}): {exc}") from exc
        return candidate, _unprofitable_reason(candidate) if skip_unprofitable else None
    return decide


def _unprofitable_reason(candidate: BasisConv2d) -> str | None:
    """Why a candidate is not worth it (Q/M + Q/D ≥ 1), or None when it saves multiplications."""
    q, m = candidate.num_basis, candidate.out_channels
    d = candidate.in_channels * candidate.kernel_size[0] * candidate.kernel_size[1]
    ratio = formulas.mult_ratio(m, q, candidate.in_channels, candidate.kernel_size)
    return None if ratio < 1 else f"unprofitable: Q/M + Q/D = {q}/{m} + {q}/{d} = {float(ratio):.4f} >= 1"


def _build(model: Module, selected, shape, decide) -> tuple[Module, "CompressionReport"]:
    """Copy ``model``, replace each selected dense conv as ``decide(path, conv)`` says, measure both.

    ``decide`` returns ``(candidate, reason)``: the conv is replaced by ``candidate`` when
    ``reason`` is None, kept with ``reason`` otherwise (``candidate`` None when no basis was built).
    """
    selected_paths = {path for path, _ in selected}
    new_model = copy_module(model)
    before = profile(new_model, shape)
    copies = dict(new_model.named_modules())

    rows, excluded, notes = [], [], []
    for path, _ in [(p, m) for p, m in new_model.named_modules() if isinstance(m, Conv2d)]:
        conv = copies[path]
        if path not in selected_paths:
            excluded.append(_row(path, conv, None, "not in layers="))
            continue
        groups = int(getattr(conv, "groups", 1))
        if groups > 1:
            rows.append(_row(path, conv, None, f"grouped conv (groups={groups}): the eigen-basis needs "
                                               "dense filters"))
            continue
        candidate, reason = decide(path, conv)
        row = _row(path, conv, candidate, reason)
        if reason is None:
            _replace_everywhere(new_model, conv, candidate)
            row.replaced = True
        rows.append(row)

    after = profile(new_model, shape)
    after_rows = {r.path: r for r in after.rows}
    for row in rows + excluded:
        _fill_measurements(row, before.row(row.name), after_rows[row.name])
        if row.mults_before == 0 and row.reason != "not in layers=":
            notes.append(f"{row.name} did not run in the forward pass of {shape} (no multiplications measured)")
    report = CompressionReport(
        layers=rows, energy_threshold=None, num_basis=None, input_shape=shape,
        conv_mults_before=before.totals["model_conv_mults"], conv_mults_after=after.totals["model_conv_mults"],
        params_before=before.totals["model_learnable"], params_after=after.totals["model_learnable"],
        stored_before=before.totals["model_stored"], stored_after=after.totals["model_stored"],
        formula_mults_before=before.totals["formula_mults"], formula_mults_after=after.totals["formula_mults"],
        notes=notes, excluded=excluded, _order=[r.path for r in before.rows], batches=after.batches)
    return new_model, report


def _dense(selected) -> list[tuple[str, Conv2d]]:
    return [(path, conv) for path, conv in selected if int(getattr(conv, "groups", 1)) == 1]


def _measure_costs(model: Module, selected, shape) -> tuple[list[allocation_module.LayerCosts], int, int]:
    """Each compressible conv's spectrum and measured costs; the other convs' mults; the original total.

    Three profile passes: the original, and copies with every compressible conv replaced by
    its eigen BasisConv at Q = 1 and at Q = 2 (where min(D, M) ≥ 2).
    """
    dense = _dense(selected)
    before = profile(copy_module(model), shape)  # a copy: the caller's model is never run
    probes = {}
    for q in (1, 2):
        probe = copy_module(model)
        modules = dict(probe.named_modules())
        for path, conv in dense:
            if q <= min(conv.out_channels, conv.weight.shape[1] * conv.kernel_size[0] * conv.kernel_size[1]):
                _replace_everywhere(probe, modules[path], BasisConv2d.from_conv(modules[path], num_basis=q))
        probes[q] = profile(probe, shape)
    layers = []
    for path, conv in dense:
        eigen = basis_math.eigen_basis(conv.weight, energy_threshold=1.0)
        shares = eigen.eigenvalues / eigen.eigenvalues.sum()
        m, c, kh, kw = conv.weight.shape
        one, two = probes[1].row(path), probes[2].row(path)
        per_vector = two.mults - one.mults if two.kind == "basisconv" else one.mults
        layers.append(allocation_module.LayerCosts(
            path=path, M=m, C=c, kernel=(kh, kw), ratios=basis_math.energy_ratios(eigen.eigenvalues),
            shares=shares, rank=eigen.rank, conv_mults=before.row(path).mults,
            basis_fixed=one.mults - per_vector, per_vector=per_vector))
    other = before.totals["model_conv_mults"] - sum(layer.conv_mults for layer in layers)
    return layers, other, before.totals["model_conv_mults"]


def _check_calibration(calibration):
    import numpy as np

    data = calibration() if callable(calibration) else calibration
    try:
        images, labels = data
    except (TypeError, ValueError):
        raise ValueError("calibration must be (images, labels) or a function returning them") from None
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.dtype.kind != "f" or labels.shape != (len(images),) or labels.dtype.kind not in "iu" \
            or not len(labels):
        raise ValueError(f"calibration: images must be a non-empty float array (N, C, H, W) and labels (N,) "
                         f"integers, got {images.dtype} {images.shape} and {labels.dtype} {labels.shape}")
    return images, labels


def _measure_sensitivity(model: Module, layers, calibration) -> tuple[list, int, int]:
    """``layers`` with their ``shares`` replaced by measured loss increases (see
    :func:`minibasis.allocation.sensitivity_shares`); also the number of passes and images."""
    import dataclasses

    from minibasis.training import evaluate  # the mean cross-entropy, summed in float64

    images, labels = _check_calibration(calibration)
    probe = copy_module(model).eval()
    modules = dict(probe.named_modules())

    def calibration_loss(net) -> float:
        return evaluate(net, images, labels, progress=False).loss

    reference = calibration_loss(probe)
    measured_layers, passes = [], 1
    for layer in layers:
        conv = modules[layer.path]
        losses = {}
        for q in allocation_module.sensitivity_grid(layer):
            candidate = BasisConv2d.from_conv(conv, num_basis=q)
            _replace_everywhere(probe, conv, candidate)
            losses[q] = calibration_loss(probe) - reference
            _replace_everywhere(probe, candidate, conv)
            passes += 1
        measured_layers.append(dataclasses.replace(layer, shares=allocation_module.sensitivity_shares(layer, losses)))
    return measured_layers, passes, len(labels)


def _compress_to_budget(model, selected, shape, target: float, allocation: str, thresholds,
                        skip_unprofitable: bool, calibration=None):
    """``compress(target_mult_ratio=...)``: choose a plan, build it, measure it, next plan if it missed."""
    def finish(new_model, report, threshold=None, notes=()):
        report.energy_threshold, report.target_mult_ratio, report.allocation = threshold, target, allocation
        report.skip_unprofitable = skip_unprofitable
        report.notes += list(notes)
        return new_model, report

    if target >= 1.0:
        new_model, report = _build(model, selected, shape,
                                   lambda path, conv: (None, "the original meets a budget of 1.0"))
        return finish(new_model, report)
    layers, other, before = _measure_costs(model, selected, shape)
    if before == 0:
        raise BudgetError("the model ran no conv multiplications on "
                                            f"input {shape}: there is no budget to meet")
    grid = None if thresholds is None else sorted((float(t) for t in thresholds), reverse=True)
    least = allocation_module.minimum_mults(layers, other, skip_unprofitable)
    if least / before > target:
        raise BudgetError(
            ("" if grid is None else f"no threshold in {grid}, and ")
            + f"no allocation brings the conv multiplications to {target:g} of the original or less: the "
            f"fewest reachable are {least:,} of {before:,} ({least / before:.4f}), every compressible conv "
            "at Q = 1")
    sensitivity_notes = []
    if allocation == "sensitivity":
        layers, passes, count = _measure_sensitivity(model, layers, calibration)
        sensitivity_notes = [f"sensitivity allocation: each layer's loss measured alone at its grid of Q, "
                             f"{passes} passes over {count} calibration images"]
    by_path = {layer.path: layer for layer in layers}
    if allocation == "uniform":
        plans = allocation_module.uniform_plans(layers, other, before, target, skip_unprofitable, thresholds)
    else:
        plans = ((None, plan) for plan in allocation_module.greedy_plans(layers, other, before, target,
                                                                          skip_unprofitable))
    missed = []
    for threshold, plan in plans:
        def decide(path, conv):
            q = plan[path]
            if q is None:
                reason = (f"kept as a conv: the {allocation} allocation met the budget without it"
                          if by_path[path].basis_mults(1) < by_path[path].conv_mults
                          else "unprofitable at every Q")
                return None, reason
            return BasisConv2d.from_conv(conv, num_basis=q), None

        # Uniform builds exactly what compress(energy_threshold=t) builds (the plan predicted it).
        decider = _same_for_all(threshold, None, skip_unprofitable) if allocation == "uniform" else decide
        new_model, report = _build(model, selected, shape, decider)
        expected = allocation_module.plan_mults(layers, plan, other)
        if report.mult_ratio <= target:
            notes = [f"{allocation} allocation under a budget of {target:g}: expected {expected:,} conv "
                     f"multiplications per image from the per-layer measurements, measured {report.conv_mults_after:,}"]
            return finish(new_model, report, threshold, sensitivity_notes + missed + notes)
        missed.append(f"a plan expected at {expected:,} measured {report.conv_mults_after:,} "
                      f"(ratio {report.mult_ratio:.4f} > {target:g}); the next one was tried")
    raise BudgetError(
        f"no threshold in {grid} brings the conv multiplications to {target:g} of the original or less; "
        "add smaller thresholds" if grid is not None else
        f"no {allocation} plan measured within a budget of {target:g}")


class _CallableModule(types.ModuleType):
    """Lets ``minibasis.compress(...)`` call :func:`compress` even after the submodule is imported.

    Importing ``minibasis.compress`` binds the *module* to the package attribute
    ``minibasis.compress``, shadowing the lazy function the package offers; making the
    module callable keeps the documented call working in every import order.
    """

    def __call__(self, *args, **kwargs):
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
