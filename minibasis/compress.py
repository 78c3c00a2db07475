"""Whole-model compression: replace trained ``Conv2d`` layers by their eigen-basis ``BasisConv2d``.

``compress(model, energy_threshold=t)`` returns a new model (the input is deep-copied
and never run or modified) and a :class:`CompressionReport`. Every multiplication
count in the report is *measured*: both models run one forward pass of an input of
``input_shape`` under :func:`minibasis.count_mults` (in eval mode, without a graph),
and the counts are divided by the batch size, i.e. reported per image. The paper's
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
import numbers
import sys
import types
from dataclasses import dataclass, field
from fractions import Fraction

from minibasis import backend, formulas
from minibasis.checks import energy_threshold as check_energy_threshold, positive_int
from minibasis.autograd import no_grad, tensor
from minibasis.counting import count_mults
from minibasis.nn import BasisConv2d, Conv2d, Module

__all__ = ["compress", "copy_module", "CompressionReport", "LayerReport", "measure_conv_mults",
           "learnable_parameter_count"]


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


def learnable_parameter_count(module: Module) -> int:
    """Number of scalars in ``module.parameters()`` that require a gradient."""
    return sum(p.size for p in module.parameters() if p.requires_grad)


def _model_array_module_and_dtype(model: Module):
    for p in model.parameters():
        return backend.get_array_module(p.data), p.data.dtype
    for _, b in model.named_buffers():
        return backend.get_array_module(b), b.dtype
    return backend.xp, backend.xp.dtype(backend.default_dtype)


def _check_input_shape(input_shape) -> tuple[int, ...]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if not shape or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints such as (1, 3, 32, 32), got {input_shape!r}")
    return tuple(int(n) for n in shape)


def measure_conv_mults(model: Module, input_shape=(1, 3, 32, 32)) -> tuple[int, dict[str, int]]:
    """(whole-model conv multiplications, module path → conv multiplications), per image.

    Runs one forward pass of a zero input of ``input_shape`` (on the model's device and
    dtype) in eval mode without building a graph; the modes of all submodules are
    restored afterwards. Eval mode matters: a training-mode pass would update BatchNorm
    running statistics. The counts do not depend on the input values.
    """
    shape = _check_input_shape(input_shape)
    xp, dtype = _model_array_module_and_dtype(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with no_grad(), count_mults() as counter:
            model(tensor(xp.zeros(shape, dtype=dtype)))
    finally:
        for m, mode in modes:
            object.__setattr__(m, "training", mode)
    batch = shape[0]
    per_layer = counter.forward.conv_by_layer()
    for name, n in list(per_layer.items()) + [("(whole model)", counter.forward.conv)]:
        if n % batch:
            raise RuntimeError(f"conv multiplications of {name or '(root)'} ({n}) are not a multiple of "
                               f"the batch size {batch}: the model's work is not per image")
    return counter.forward.conv // batch, {name: n // batch for name, n in per_layer.items()}


@dataclass
class LayerReport:
    """One convolution layer of the model: its shape, its basis and what replacing it costs.

    ``mults_before``/``mults_after`` are measured conv multiplications per image of this
    layer's module path (0 if the forward pass never called it). ``formula_ratio`` is
    Q/M + Q/D (exact), ``measured_ratio`` is ``mults_after / mults_before``. When the layer
    is skipped, ``replaced`` is False, ``skip_reason`` says why, and the "after" values
    equal the "before" ones (Q and energy still say what the basis would have been).
    """

    name: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    filter_dim: int
    num_basis: int
    energy: float
    formula_ratio: Fraction
    params_before: int
    params_after: int
    replaced: bool
    skip_reason: str | None = None
    mults_before: int = 0
    mults_after: int = 0

    @property
    def measured_ratio(self) -> float | None:
        return self.mults_after / self.mults_before if self.mults_before else None

    def to_dict(self) -> dict:
        return {
            "name": self.name, "M": self.out_channels, "C": self.in_channels,
            "kernel_size": list(self.kernel_size), "D": self.filter_dim, "Q": self.num_basis,
            "energy": self.energy, "mults_before": self.mults_before, "mults_after": self.mults_after,
            "measured_ratio": self.measured_ratio, "formula_ratio": float(self.formula_ratio),
            "formula_ratio_exact": str(self.formula_ratio),
            "params_before": self.params_before, "params_after": self.params_after,
            "replaced": self.replaced, "skip_reason": self.skip_reason,
        }


@dataclass
class CompressionReport:
    """Per-layer rows and whole-model totals of one :func:`compress` call.

    Totals: ``conv_mults_before``/``_after`` are the whole model's measured conv
    multiplications per image (every conv op, compressed or not), and
    ``params_before``/``_after`` its learnable parameters (from ``parameters()``).
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

    @property
    def mult_ratio(self) -> float | None:
        """Whole-model conv multiplications after / before (measured)."""
        return self.conv_mults_after / self.conv_mults_before if self.conv_mults_before else None

    @property
    def param_ratio(self) -> float | None:
        return self.params_after / self.params_before if self.params_before else None

    @property
    def replaced(self) -> list[LayerReport]:
        return [row for row in self.layers if row.replaced]

    def to_dict(self) -> dict:
        return {
            "energy_threshold": self.energy_threshold, "num_basis": self.num_basis,
            "skip_unprofitable": self.skip_unprofitable, "input_shape": list(self.input_shape),
            "per_image": True,
            "layers": [row.to_dict() for row in self.layers],
            "totals": {
                "conv_mults_before": self.conv_mults_before, "conv_mults_after": self.conv_mults_after,
                "mult_ratio": self.mult_ratio,
                "params_before": self.params_before, "params_after": self.params_after,
                "param_ratio": self.param_ratio,
                "layers_replaced": len(self.replaced), "layers_considered": len(self.layers),
            },
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """A fixed-width text table: one row per layer, then the totals."""
        header = ("layer", "M", "C", "k", "D", "Q", "energy", "mults before", "mults after",
                  "measured", "Q/M+Q/D", "params before", "params after", "status")
        rows = []
        for r in self.layers:
            measured = r.measured_ratio
            rows.append((r.name, str(r.out_channels), str(r.in_channels), f"{r.kernel_size[0]}x{r.kernel_size[1]}",
                         str(r.filter_dim), str(r.num_basis), f"{r.energy:.4f}", f"{r.mults_before:,}",
                         f"{r.mults_after:,}", "-" if measured is None else f"{measured:.4f}",
                         f"{float(r.formula_ratio):.4f}", f"{r.params_before:,}", f"{r.params_after:,}",
                         "replaced" if r.replaced else f"kept: {r.skip_reason}"))
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        left = {0, len(header) - 1}

        def fmt(cells):
            text = "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            return text.rstrip()

        setting = (f"energy threshold t = {self.energy_threshold}" if self.energy_threshold is not None
                   else f"num_basis Q = {self.num_basis}")
        lines = [f"compression at {setting}; multiplications per image, measured on input {self.input_shape}",
                 fmt(header), fmt(["-" * w for w in widths])]
        lines += [fmt(row) for row in rows]
        mult_ratio = "-" if self.mult_ratio is None else f"{self.mult_ratio:.4f}"
        param_ratio = "-" if self.param_ratio is None else f"{self.param_ratio:.4f}"
        lines.append("")
        lines.append(f"layers replaced: {len(self.replaced)} of {len(self.layers)}")
        lines.append(f"conv multiplications (whole model): {self.conv_mults_before:,} -> {self.conv_mults_after:,} "
                     f"(ratio {mult_ratio})")
        lines.append(f"learnable parameters (whole model): {self.params_before:,} -> {self.params_after:,} "
                     f"(ratio {param_ratio})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = table


def _check_settings(energy_threshold, num_basis) -> None:
    if (energy_threshold is None) == (num_basis is None):
        raise ValueError("give exactly one of energy_threshold and num_basis, got "
                         f"energy_threshold={energy_threshold!r}, num_basis={num_basis!r}")
    if energy_threshold is not None:
        check_energy_threshold(energy_threshold)
    if num_basis is not None:
        positive_int("num_basis", num_basis)


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
    """Put ``new`` in place of ``old`` in every parent that holds it, keeping child order."""
    for _, parent in list(model.named_modules()):
        for name, child in parent._modules.items():
            if child is old:
                # Assigning into the ordered store directly keeps the child's position, which a
                # Sequential's forward order depends on (setattr would move it to the end).
                parent._modules[name] = new


def compress(model: Module, energy_threshold=None, skip_unprofitable: bool = True, layers=None,
             num_basis=None, input_shape=(1, 3, 32, 32)):
    """Replace ``Conv2d`` layers by ``BasisConv2d.from_conv``; return ``(new_model, report)``.

    Args:
        model: a trained :class:`~minibasis.nn.Module`; it is deep-copied and left untouched
            (never run, so not even BatchNorm statistics change).
        energy_threshold: t in (0, 1] for every selected layer (t = 1 keeps each layer's
            numerical rank: the new model computes the same function to rounding).
        skip_unprofitable: keep a conv as it is when Q/M + Q/D ≥ 1 (BasisConv would need at
            least as many multiplications).
        layers: module paths (as in ``named_modules()``) of the convs to consider; default all.
        num_basis: Q for every selected layer instead of a threshold (exactly one of the two);
            it must not exceed min(D, M) of any selected layer.
        input_shape: (N, C, H, W) of the input used to measure multiplications; counts are
            divided by N.

    Returns:
        ``(new_model, report)``: the copy with the replacements, in the input's training
        mode, and a :class:`CompressionReport`.

    A conv module shared by several paths is compressed once and replaced everywhere.
    """
    if not isinstance(model, Module):
        raise TypeError(f"compress needs a minibasis.nn.Module, got {type(model).__name__}")
    _check_settings(energy_threshold, num_basis)
    shape = _check_input_shape(input_shape)
    selected = _select_convs(model, layers)

    new_model = copy_module(model)
    total_before, layer_before = measure_conv_mults(new_model, shape)
    copies = dict(new_model.named_modules())
    params_before = learnable_parameter_count(new_model)

    rows, notes = [], []
    for path, _ in selected:
        conv = copies[path]
        m, c, kh, kw = conv.weight.shape
        try:
            candidate = BasisConv2d.from_conv(conv, energy_threshold=energy_threshold, num_basis=num_basis)
        except ValueError as exc:
            raise ValueError(f"layer {path!r} (weight {tuple(conv.weight.shape)}): {exc}") from exc
        q = candidate.num_basis
        ratio = formulas.mult_ratio(m, q, c, (kh, kw))
        conv_params = learnable_parameter_count(conv)
        row = LayerReport(name=path, out_channels=m, in_channels=c, kernel_size=(kh, kw), filter_dim=c * kh * kw,
                          num_basis=q, energy=candidate.energy, formula_ratio=ratio,
                          params_before=conv_params, params_after=conv_params, replaced=False)
        if skip_unprofitable and ratio >= 1:
            row.skip_reason = f"Q/M + Q/D = {q}/{m} + {q}/{c * kh * kw} = {float(ratio):.4f} >= 1"
        else:
            _replace_everywhere(new_model, conv, candidate)
            row.replaced = True
            row.params_after = learnable_parameter_count(candidate)
        rows.append(row)

    total_after, layer_after = measure_conv_mults(new_model, shape)
    for row in rows:
        row.mults_before = layer_before.get(row.name, 0)
        row.mults_after = layer_after.get(row.name, 0)
        if row.mults_before == 0:
            notes.append(f"{row.name} did not run in the forward pass of {shape} (no multiplications measured)")
    report = CompressionReport(
        layers=rows, energy_threshold=None if energy_threshold is None else float(energy_threshold),
        num_basis=None if num_basis is None else int(num_basis), input_shape=shape,
        conv_mults_before=total_before, conv_mults_after=total_after,
        params_before=params_before, params_after=learnable_parameter_count(new_model),
        skip_unprofitable=bool(skip_unprofitable), notes=notes)
    return new_model, report


class _CallableModule(types.ModuleType):
    """Lets ``minibasis.compress(...)`` call :func:`compress` even after the submodule is imported.

    Importing ``minibasis.compress`` binds the *module* to the package attribute
    ``minibasis.compress``, shadowing the lazy function the package offers; making the
    module callable keeps the documented call working in every import order.
    """

    def __call__(self, *args, **kwargs):
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
