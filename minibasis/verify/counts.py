"""``verify counts``: per layer of a real network, measured multiplications against the closed forms.

The model is profiled (:func:`minibasis.measure.profile` with ``backward=True``: one forward
pass and one backward pass of ``output.sum()``, the input image needing no gradient) as it
is and after ``compress`` at each energy threshold. For every conv / BasisConv row the
measured forward count is compared with ``formula_mults`` and the measured backward count
with the backward convention of :mod:`minibasis.verify.layer_formulas`, evaluated with the
gradients that layer really needed in that pass (recorded by forward pre-hooks): the first
layer computes no input gradient, frozen weights no weight gradient.

A real batch goes through the engine's multi-chunk, threaded loops and a single image does
not, so every model is profiled twice: at batch 1 and at the batch the caller names (default
128, a training batch), where each layer's count per image must be the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from minibasis.checks import positive_int
from minibasis.compress import compress
from minibasis.measure import conv_layers, profile
from minibasis.nn import BasisConv2d, Module
from minibasis.formulas import basisconv_backward_mults, conv_backward_mults
from minibasis.verify.report import VerifyResult, format_table

__all__ = ["CountRow", "CountsReport", "check_counts"]


@dataclass
class CountRow:
    """One conv layer of one model variant ("original" or "t=0.9"): measured and formula counts per image."""

    variant: str
    path: str
    kind: str
    Q: int | None
    mults: int
    formula_mults: int
    backward_mults: int
    backward_formula: int
    ran: bool
    batch_mults: int | None = None  # per image at the report's batch (None: the profile there failed)
    batch_backward_mults: int | None = None

    @property
    def passed(self) -> bool:
        return (self.mults == self.formula_mults == self.batch_mults
                and self.backward_mults == self.backward_formula == self.batch_backward_mults)

    def to_dict(self) -> dict:
        return {**vars(self), "passed": self.passed}


@dataclass
class CountsReport(VerifyResult):
    """Result of :func:`check_counts`: one :class:`CountRow` per conv layer and model variant."""

    input_shape: tuple[int, ...]
    thresholds: list[float]
    rows: list[CountRow]
    batch: int = 1
    batch_errors: list[str] = field(default_factory=list)  # a profile at the batch that raised
    check = "counts"

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "per_image": True, "batch": self.batch,
                "batch_errors": list(self.batch_errors), "thresholds": list(self.thresholds),
                "rows": [row.to_dict() for row in self.rows],
                "failed": sum(not row.passed for row in self.rows)}

    def table(self) -> str:
        def number(n):
            return "failed" if n is None else f"{n:,}"

        cells = [(r.variant, r.path, r.kind, "-" if r.Q is None else str(r.Q), f"{r.mults:,}", number(r.batch_mults),
                  f"{r.formula_mults:,}", f"{r.backward_mults:,}", number(r.batch_backward_mults),
                  f"{r.backward_formula:,}", ("ok" if r.passed else "MISMATCH") + ("" if r.ran else " (did not run)"))
                 for r in self.rows]
        header = ("model", "layer", "kind", "Q", "forward", f"at {self.batch}", "formula", "backward",
                  f"at {self.batch}", "formula", "status")
        failed = sum(not row.passed for row in self.rows)
        variants = ", ".join(dict.fromkeys(row.variant for row in self.rows))
        lines = [f"verify counts: conv multiplications per image on input {self.input_shape}, measured at batch 1 "
                 f"and per image at batch {self.batch} vs closed form, forward and backward; models: {variants}", ""]
        lines += format_table(header, cells, left=(0, 1, 2, len(header) - 1))
        lines += [f"at batch {self.batch}: {error}" for error in self.batch_errors]
        lines += ["", f"PASSED: all {len(self.rows)} rows agree" if self.passed
                  else f"FAILED: {failed} of {len(self.rows)} rows differ" if self.rows else "FAILED: no conv layers"]
        return "\n".join(lines)


def _needs_gradient(module: Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _backward_formula(module: Module, row, input_grad: bool) -> int:
    if row.output is None:
        return 0
    positions = row.output[0] * row.output[1]
    if isinstance(module, BasisConv2d):
        coeffs_grad = module.coeffs.requires_grad
        # The 1×1 stage's input needs a gradient when anything before it does: the layer's input,
        # a learned basis bias, or the BatchNorm on the intermediate.
        intermediate_grad = (input_grad or (module.basis_bias is not None and module.basis_bias.requires_grad)
                             or (module.bn is not None and _needs_gradient(module.bn)))
        return basisconv_backward_mults(row.M, row.Q, row.D, positions, input_grad, coeffs_grad, intermediate_grad)
    return conv_backward_mults(row.formula_mults, input_grad, module.weight.requires_grad)


def _variant_rows(variant: str, model: Module, input_shape, batch: int, errors: list[str]) -> list[CountRow]:
    """The rows of one model at batch 1 (``input_shape``), with the per-image counts at ``batch`` beside
    them (a profile there that raises leaves them None and its message in ``errors``)."""
    rows = _batch_one_rows(variant, model, input_shape)
    try:
        at_batch = profile(model, (batch,) + tuple(input_shape[1:]), backward=True, against_batch_one=False).rows
    except RuntimeError as exc:  # its per-layer count is not a multiple of the batch
        errors.append(f"{variant}: {exc}")
        return rows
    for row, measured in zip(rows, at_batch):
        row.batch_mults, row.batch_backward_mults = measured.mults, measured.backward_mults
    return rows


def _batch_one_rows(variant: str, model: Module, input_shape) -> list[CountRow]:
    layers = conv_layers(model)
    input_grads: dict[str, bool] = {}

    def recorder(path: str):
        def record(module, args):
            input_grads.setdefault(path, bool(args[0].requires_grad))  # returns None: the input is kept
        return record

    handles = [module.register_forward_pre_hook(recorder(path)) for path, module in layers]
    try:
        prof = profile(model, input_shape, backward=True)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(layers)
    return [CountRow(variant=variant, path=r.path, kind=r.kind, Q=r.Q, mults=r.mults, formula_mults=r.formula_mults,
                     backward_mults=r.backward_mults,
                     backward_formula=_backward_formula(modules[r.path], r, input_grads.get(r.path, False)),
                     ran=r.ran)
            for r in prof.rows]


def check_counts(model: Module, thresholds=(1.0, 0.9), *, input_shape=(1, 3, 32, 32), batch: int = 128) -> CountsReport:
    """Measured vs formula, forward and backward, per conv layer of ``model`` and of its
    compressed versions (``compress(model, energy_threshold=t)``) at each of ``thresholds``.

    Each model is measured on one image of ``input_shape``'s (C, H, W) and on ``batch`` of them:
    the per-image counts must agree with each other and with the closed forms.
    ``model`` is not changed (compress copies it; profiling restores modes and clears gradients).
    """
    if not isinstance(model, Module):
        raise TypeError(f"check_counts needs a minibasis.nn.Module, got {type(model).__name__}")
    batch = positive_int("batch", batch)
    input_shape = (1,) + tuple(input_shape[1:])
    thresholds = [float(t) for t in thresholds]
    errors: list[str] = []
    rows = _variant_rows("original", model, input_shape, batch, errors)
    for t in thresholds:
        compressed, _ = compress(model, energy_threshold=t, input_shape=input_shape)
        rows += _variant_rows(f"t={t:g}", compressed, input_shape, batch, errors)
    return CountsReport(input_shape=input_shape, thresholds=thresholds, rows=rows, batch=batch, batch_errors=errors)
