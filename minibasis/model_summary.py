"""``minibasis.summary(model, input_shape)``: per layer, output shape, values and measured multiplications.

One :func:`minibasis.measure.profile` (a zero input, eval mode, no graph) with forward hooks on
every layer for the output shapes; its counts of every op by module path give each row's
multiplications (BatchNorm and linear layers too, not only the convolutions profile reports). A
layer is a module without children, or a Conv2d / BasisConv2d as a whole (its basis stage,
optional BatchNorm and 1×1 stage are one row). Counts are per image, measured at the batch of
``input_shape`` (default 32 images) and, as profile does, checked against batch 1 for every conv.

Usage::

    print(minibasis.summary(model, (32, 3, 32, 32)))
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from minibasis.measure import (REPORT_BATCH, Profile, batches_note, check_input_shape, conv_layers,
                               learnable_values, profile, stored_values, timing_table)
from minibasis.nn import Module

__all__ = ["summary", "Summary", "SummaryRow"]


@dataclass(frozen=True)
class SummaryRow:
    """One layer: output shape (None if it never ran), parameters, stored values, measured mults per image."""

    path: str
    type: str
    output_shape: tuple[int, ...] | None
    learnable: int
    stored: int
    mults: int
    Q: int | None = None

    def to_dict(self) -> dict:
        row = asdict(self)
        row["output_shape"] = None if self.output_shape is None else list(self.output_shape)
        return row


@dataclass(frozen=True)
class Summary(Profile):
    """A profile of every layer: rows in module order (:class:`SummaryRow`) and whole-model totals
    (``learnable``, ``stored``, ``mults``, ``conv_mults``); ``to_dict``/``to_json`` as :class:`Profile`'s."""

    def table(self) -> str:
        from minibasis.verify.report import format_table

        cells = [(r.path or "(model)", r.type + ("" if r.Q is None else f"(Q={r.Q})"),
                  "-" if r.output_shape is None else "x".join(map(str, r.output_shape)),
                  f"{r.learnable:,}", f"{r.stored:,}", f"{r.mults:,}") for r in self.rows]
        t = self.totals
        lines = [f"summary on input {self.input_shape}; multiplications per image, {batches_note(self.batches)}", ""]
        lines += format_table(("layer", "type", "output", "learnable", "stored", "mults"), cells, left=(0, 1))
        lines += ["", f"learnable parameters: {t['learnable']:,}   stored values: {t['stored']:,}",
                  f"multiplications per image: {t['mults']:,} (convolutions {t['conv_mults']:,})"]
        unlisted = t["mults"] - sum(r.mults for r in self.rows)
        if unlisted:
            lines.append(f"  of which in no listed layer (ops in a parent's forward): {unlisted:,}")
        if self.timing is not None:
            lines += ["", timing_table(self.timing["conv_layers"], self.timing, self.input_shape[0])]
        return "\n".join(lines)

    __str__ = table


def _layers(model: Module) -> list[tuple[str, Module]]:
    """Leaf modules and conv layers (as units), in module order."""
    units = {id(module) for _, module in conv_layers(model)}
    found: list[tuple[str, Module]] = []
    for path, module in model.named_modules():
        if any(path.startswith(parent + ".") for parent, m in found if id(m) in units):
            continue  # inside a conv layer: part of its row
        if id(module) in units or not any(True for _ in module.children()):
            found.append((path, module))
    return found


def summary(model: Module, input_shape=(REPORT_BATCH, 3, 32, 32), timing: bool = False) -> Summary:
    """Per layer of ``model``: output shape for ``input_shape`` (N, C, H, W), learnable parameters,
    stored values (parameters + persistent buffers) and measured multiplications per image
    (at batch N and, for N > 1, at batch 1: see :func:`minibasis.measure.profile`).

    ``timing``: also where the time of a forward pass goes (:func:`minibasis.measure.profile`'s
    timing: per conv layer and the rest by kind of op), in ``.timing`` and at the end of the table."""
    if not isinstance(model, Module):
        raise TypeError(f"summary needs a minibasis.nn.Module, got {type(model).__name__}")
    shape = check_input_shape(input_shape)
    layers = _layers(model)
    outputs: dict[int, tuple] = {}

    def record(module, args, output):
        outputs.setdefault(id(module), tuple(getattr(output, "shape", ())))  # the first pass's: batch N

    handles = [module.register_forward_hook(record) for _, module in layers]
    try:
        prof = profile(model, shape, timing=bool(timing))
    finally:
        for handle in handles:
            handle.remove()
    num_basis = {r.path: r.Q for r in prof.rows}
    rows = [SummaryRow(path=path, type=type(module).__name__, output_shape=outputs.get(id(module)),
                       learnable=learnable_values(module), stored=stored_values(module),
                       mults=sum(n for key, n in prof.layer_mults.items() if key == path or key.startswith(path + ".")),
                       Q=num_basis.get(path))
            for path, module in layers]
    totals = {"learnable": prof.totals["model_learnable"], "stored": prof.totals["model_stored"],
              "mults": prof.totals["model_mults"], "conv_mults": prof.totals["model_conv_mults"]}
    timing_summary = None if prof.timing is None else {**prof.timing,
                                                       "conv_layers": [r.to_dict() for r in prof.rows]}
    return Summary(rows=rows, input_shape=shape, totals=totals, timing=timing_summary, batches=prof.batches)
