"""One measurement pass over a model: per conv layer, shapes, measured multiplications and sizes.

``profile(model, input_shape)`` runs one forward pass of a zero input (eval mode, no
graph; every module's mode is restored afterwards) under :func:`minibasis.count_mults`,
with forward hooks on each ``Conv2d`` / ``BasisConv2d`` recording the input and output
sizes that reached it.

Counts are per image, and they are measured where a real batch runs: at the batch N of
``input_shape`` (default :data:`REPORT_BATCH` images), whose convolutions go through the
engine's multi-chunk, threaded loops, and, when N > 1, once more at batch 1, which takes
one chunk. Every conv layer's measured conv multiplications (forward, and backward when
asked for) and the whole model's must be N times batch 1's; where they are not, a count
depends on how the batch was cut into chunks (a chunk counted twice or not at all) and
:class:`BatchCountError` names the layer, the two counts per image and the batches.
Only conv ops are compared: every other op's count is reported per image at batch N
(``model_mults``, :func:`minibasis.summary`'s rows), as a per-channel term outside the
convolutions (training-mode batch norm's statistics, say) is affine in N, not N times
batch 1's (the profile runs in eval mode, where the zoo's nets have none).
``Profile.batches`` says which batches were measured. Each row gives

* the layer's shape: M, C, groups, (kh, kw), stride, padding, dilation, D = (C/g)·kh·kw,
  input (H, W) and output (Ho, Wo); Q and the retained energy for a BasisConv2d;
* ``mults``: the conv multiplications the engine *measured* in that layer, per image;
* ``formula_mults``: the paper's closed form (:mod:`minibasis.formulas`: M·D·Ho·Wo for a
  conv, Q·D·Ho·Wo + M·Q·Ho·Wo for a BasisConv) for the output size that was reached;
* ``backward_mults`` (with ``backward=True``): measured conv multiplications of one
  backward pass of ``output.sum()`` per image (weight and input gradients; the input
  image itself needs no gradient, as in training);
* ``learnable``: the layer's parameters (what training can change; the paper's D/Q
  reduction speaks of these), and ``stored``: its parameters plus persistent buffers,
  i.e. what a deployment stores, the fixed basis included.

With ``timing=True`` a second, timed pass follows the counted one (which doubles as its
warm-up), and each row also gets ``forward_seconds`` (the layer module's wall time, its
hooks included), ``backward_seconds`` (with ``backward=True``: the wall time of the backward
ops the layer created), ``share`` of the whole pass and ``mults_per_second`` (measured).
The rest of the network is grouped by kind of op in ``Profile.timing["groups"]`` (batch
norm, activations, adds, pooling, linear, other ops, and the time outside any op: the
framework's own Python), each with its time, share and measured mults; the shares of rows
and groups sum to 1. ``Profile.timing["outside_conv_share"]`` is the part of the time spent
outside the conv layers. Times are wall clock on whatever else the machine is doing:
compare rows within one profile, not across machines.

Usage::

    prof = minibasis.measure.profile(model, (32, 3, 32, 32))  # at batch 32 and at batch 1
    print(prof.table()); prof.totals["mults"]; prof.rows[0].Q
"""
from __future__ import annotations

import json
import numbers
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from minibasis import backend, counting, formulas
from minibasis.autograd import no_grad, tensor
from minibasis.counting import count_mults
from minibasis.nn import BasisConv2d, Conv2d, Module
from minibasis.nn.inference import FusedConv2d, InferenceError, InferenceModule

#: Conv-like layers that get a row: a deployed model's fused convs read like their source layers.
CONV_LAYER_TYPES = (Conv2d, BasisConv2d, FusedConv2d)
#: Kinds of the ops outside the conv layers in the timing table, by op name (anything else: "other ops").
OP_KINDS = {"batch_norm": "batch norm", "relu": "activations", "add": "adds", "maxpool2d": "pooling",
            "avgpool2d": "pooling", "globalavgpool2d": "pooling", "linear": "linear"}
#: The timing table's group for time spent outside every op (module calls, Tensor bookkeeping).
OUTSIDE_OPS = "outside ops (framework)"

#: The batch the reports built for users (profile, summary, compress, count, demo) measure at by
#: default, beside one image: a real batch takes the engine's multi-chunk, threaded loops (ResNet-56's
#: forward pass at batch 32 takes under a second on two cores).
REPORT_BATCH = 32

__all__ = ["profile", "Profile", "LayerProfile", "BatchCountError", "REPORT_BATCH", "batches_note", "timing_table",
           "conv_layers", "check_input_shape", "stored_values", "learnable_values", "input_channels"]


class BatchCountError(RuntimeError):
    """A measured count that is not per image: at batch N it is not N times the count at batch 1.

    ``layer``: the conv layer's module path (``"(whole model)"`` for every conv op of the model);
    ``phase``: "forward" or "backward"; ``batches``: (N, 1); ``per_image``: the count per image at
    each of them (at N possibly a fraction: the count divided by N).
    """

    def __init__(self, layer: str, phase: str, batches: tuple[int, int], per_image: tuple[float, float]):
        self.layer, self.phase, self.batches, self.per_image = layer, phase, tuple(batches), tuple(per_image)
        (n, one), (at_n, at_one) = self.batches, self.per_image
        shown = f"{int(at_n):,}" if float(at_n).is_integer() else f"{at_n:,.2f}"
        super().__init__(
            f"{phase} conv multiplications of {layer or '(root)'} are not per image: {shown} per image at "
            f"batch {n}, {int(at_one):,} at batch {one}; a count that depends on the batch comes from a "
            "chunk of the engine's batched loops counted wrongly")


def batches_note(batches) -> str:
    """The words a report's header line uses for the batches it was measured at (``Profile.batches``)."""
    batches = tuple(batches)
    if len(batches) < 2:
        return f"measured at batch {batches[0] if batches else 1} only"
    return f"measured at batch {batches[0]} and at batch {batches[1]}, the same per image"


def check_input_shape(input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints, or a ValueError naming it."""
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if not shape or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints such as (1, 3, 32, 32), got {input_shape!r}")
    return tuple(int(n) for n in shape)


def conv_layers(model: Module) -> list[tuple[str, Module]]:
    """(path, layer) for every Conv2d, BasisConv2d (and deployed FusedConv2d) of ``model``, outermost only, in
    module order."""
    found: list[tuple[str, Module]] = []
    for path, module in model.named_modules():
        if isinstance(module, CONV_LAYER_TYPES):
            if any(path.startswith(parent + ".") for parent, _ in found):
                continue  # a conv inside a conv-like layer belongs to that layer
            found.append((path, module))
    return found


def input_channels(model: Module, default: int = 3) -> int:
    """``in_channels`` of the first conv layer in module order, ``default`` when there is none.

    Module order is registration order, which is execution order for the zoo's nets and any
    model built front to back; pass an explicit input shape where it is not.
    """
    layers = conv_layers(model)
    return int(layers[0][1].in_channels) if layers else int(default)


def learnable_values(module: Module) -> int:
    """Scalars in ``module.parameters()`` (what training can change; the fixed basis is a buffer)."""
    return sum(p.numel() for p in module.parameters())


def stored_values(module: Module) -> int:
    """Scalars in ``module.state_dict()``: parameters plus persistent buffers (bases, BN statistics)."""
    return sum(int(v.size) for v in module.state_dict().values())


@dataclass(frozen=True)
class LayerProfile:
    """One Conv2d or BasisConv2d as it ran: shape, measured and formula mults (per image), sizes.

    ``input``/``output`` are None (and the mults 0) when the forward pass never called the layer.
    """

    path: str
    kind: str                   # "conv" or "basisconv"
    M: int
    C: int
    groups: int
    k: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple | str
    dilation: tuple[int, int]
    input: tuple[int, int] | None
    output: tuple[int, int] | None
    Q: int | None
    energy: float | None
    mults: int
    formula_mults: int
    backward_mults: int | None
    learnable: int
    stored: int
    forward_seconds: float | None = None   # with timing=True
    backward_seconds: float | None = None  # with timing=True and backward=True
    share: float | None = None             # of the whole timed pass (forward + backward)
    mults_per_second: float | None = None  # measured mults of the batch over the timed seconds

    @property
    def D(self) -> int:
        """Filter dimension (C/groups)·kh·kw."""
        return (self.C // self.groups) * self.k[0] * self.k[1]

    @property
    def ran(self) -> bool:
        return self.output is not None

    def to_dict(self) -> dict:
        row = asdict(self)
        row["D"] = self.D
        for key in ("k", "stride", "dilation", "input", "output"):
            if row[key] is not None:
                row[key] = list(row[key])
        if not isinstance(row["padding"], str):
            row["padding"] = list(row["padding"])
        return row


@dataclass(frozen=True)
class Profile:
    """Rows (one :class:`LayerProfile` per conv layer, module order) and whole-model totals.

    ``totals``: ``mults``, ``formula_mults``, ``backward_mults`` (None unless asked for),
    ``learnable`` and ``stored`` summed over the rows, plus ``model_conv_mults`` (every conv op
    of the model, measured), ``model_mults`` (every counted product of the forward pass),
    ``model_learnable`` and ``model_stored`` (the whole model, BatchNorm and linear layers too).
    """

    rows: list[LayerProfile]
    input_shape: tuple[int, ...]
    totals: dict = field(default_factory=dict)
    timing: dict | None = None  # with timing=True: see the module docstring
    batches: tuple[int, ...] = ()  # the batches measured: (N, 1), or (N,) alone (N = 1, against_batch_one=False)
    layer_mults: dict = field(default_factory=dict, repr=False)  # module path → every op's forward mults per image

    def row(self, path: str) -> LayerProfile:
        for r in self.rows:
            if r.path == path:
                return r
        raise KeyError(f"no conv layer at {path!r}; the conv layers are {[r.path for r in self.rows]}")

    def to_dict(self) -> dict:
        out = {"input_shape": list(self.input_shape), "per_image": True, "batches": list(self.batches),
               "rows": [r.to_dict() for r in self.rows], "totals": dict(self.totals)}
        if self.timing is not None:
            out["timing"] = self.timing
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """Fixed-width text: one line per conv layer, then the totals."""
        header = ("layer", "kind", "M", "C", "g", "k", "s", "in", "out", "D", "Q", "energy",
                  "mults", "formula", "learnable", "stored")
        hw = (lambda p: "-" if p is None else f"{p[0]}x{p[1]}")
        lines = []
        for r in self.rows:
            lines.append((r.path, r.kind, str(r.M), str(r.C), str(r.groups), hw(r.k), hw(r.stride), hw(r.input),
                          hw(r.output), str(r.D), "-" if r.Q is None else str(r.Q),
                          "-" if r.energy is None else f"{r.energy:.4f}", f"{r.mults:,}", f"{r.formula_mults:,}",
                          f"{r.learnable:,}", f"{r.stored:,}"))
        widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]

        def fmt(cells):
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        t = self.totals
        out = [f"conv layers measured on input {self.input_shape}; multiplications per image, "
               f"{batches_note(self.batches)}",
               fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
        out.append(f"conv multiplications: measured {t['mults']:,}, formula {t['formula_mults']:,}"
                   + ("" if t.get("backward_mults") is None else f", backward measured {t['backward_mults']:,}"))
        out.append(f"conv layers: {t['learnable']:,} learnable parameters, {t['stored']:,} stored values; "
                   f"whole model: {t['model_learnable']:,} learnable, {t['model_stored']:,} stored")
        if self.timing is not None:
            out.append(self.timing_table())
        return "\n".join(out)

    def timing_table(self) -> str:
        """Where the time went: one line per conv layer, then the rest of the network by kind of op."""
        return timing_table([r.to_dict() for r in self.rows], self.timing, self.input_shape[0])

    __str__ = table


def timing_table(rows: list[dict], timing: dict, batch: int) -> str:
    """The text of a profile's timing (``rows``: :meth:`LayerProfile.to_dict` of its timed rows)."""
    t = timing
    backward = t["backward_seconds"] is not None
    header = ("layer", "kind", "forward ms") + (("backward ms",) if backward else ()) + ("share", "Gmults/s")
    ms = (lambda s: "-" if s is None else f"{1e3 * s:.2f}")
    rate = (lambda r: "-" if not r else f"{r / 1e9:.2f}")
    lines = [(r["path"], r["kind"], ms(r["forward_seconds"])) + ((ms(r["backward_seconds"]),) if backward else ())
             + (f"{100 * r['share']:.1f} %", rate(r["mults_per_second"])) for r in rows]
    lines += [(g["kind"], "rest", ms(g["forward_seconds"])) + ((ms(g["backward_seconds"]),) if backward else ())
              + (f"{100 * g['share']:.1f} %", rate(g["mults_per_second"])) for g in t["groups"]]
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    total = t["forward_seconds"] + (t["backward_seconds"] or 0.0)
    out = [f"wall time of one {'forward + backward' if backward else 'forward'} pass of batch {batch} "
           "(noisy on a busy machine)", fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    out.append(f"total {1e3 * total:.2f} ms; conv layers {1e3 * t['conv_seconds']:.2f} ms; "
               f"outside the conv layers {1e3 * (total - t['conv_seconds']):.2f} ms "
               f"({100 * t['outside_conv_share']:.1f} % of the time)")
    return "\n".join(out)


def _array_module_and_dtype(model: Module):
    for p in model.parameters():
        return backend.get_array_module(p.data), p.data.dtype
    for _, b in model.named_buffers():
        return backend.get_array_module(b), b.dtype
    return backend.xp, backend.xp.dtype(backend.default_dtype)


def _per_image(name: str, n: int, batch: int) -> int:
    if n % batch:
        raise RuntimeError(f"conv multiplications of {name or '(root)'} ({n}) are not a multiple of "
                           f"the batch size {batch}: the model's work is not per image")
    return n // batch


def _is_basis(module: Module) -> bool:
    return getattr(module, "num_basis", None) is not None  # a BasisConv2d, or a FusedConv2d made from one


def _formula_mults(module: Module, output) -> int:
    if output is None:
        return 0
    ho, wo = output
    if _is_basis(module):
        return formulas.basisconv_mults(module.out_channels, module.num_basis, module.in_channels,
                                        module.kernel_size, ho, wo)
    groups = getattr(module, "groups", 1)
    extra = {"groups": groups} if groups != 1 else {}
    return formulas.conv_mults(module.out_channels, module.in_channels, module.kernel_size, ho, wo, **extra)


def _layer_sum(by_layer: dict[str, int], path: str) -> int:
    return sum(n for key, n in by_layer.items() if key == path or key.startswith(path + "."))


def _inside(layer: str, path: str) -> bool:
    return layer == path or layer.startswith(path + ".")


def _timed_pass(model: Module, x, layers, backward: bool) -> tuple[dict, dict, float, float | None]:
    """One pass of ``model(x)`` (and its backward): (conv path → forward seconds, op seconds by key,
    forward seconds, backward seconds or None). The conv layers' forward time is their module call's
    wall time (their hooks included); everything else is timed per op (counting.time_ops)."""
    forward_seconds: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}

    def start(module, args):
        started[id(module)] = time.perf_counter()

    def stop(module, args, output):
        forward_seconds[paths[id(module)]] += time.perf_counter() - started.pop(id(module))

    paths = {id(module): path for path, module in layers}
    # the pre-hook first and the post-hook last, so the layer's own hooks fall inside its time
    handles = []
    for _, module in layers:
        hooks = module.__dict__.get("_forward_pre_hooks")
        handles.append(module.register_forward_pre_hook(start))
        if hooks:
            hooks.move_to_end(handles[-1].id, last=False)
        handles.append(module.register_forward_hook(stop))
    try:
        with counting.time_ops() as timer:
            begin = time.perf_counter()
            if backward:
                out = model(x)
                middle = time.perf_counter()
                out.sum().backward()
                end = time.perf_counter()
            else:
                with no_grad():
                    model(x)
                middle = end = time.perf_counter()
    finally:
        for handle in handles:
            handle.remove()
    return dict(forward_seconds), dict(timer.seconds), middle - begin, (end - middle) if backward else None


def _timing(rows: list, layers, timed_pass: tuple, batch: int, backward: bool, counter) -> tuple[list, dict]:
    """Rows with their times and the timing summary (see the module docstring)."""
    conv_forward, op_seconds, forward_total, backward_total = timed_pass
    total = forward_total + (backward_total or 0.0)
    conv_paths = [path for path, _ in layers]
    conv_backward: dict[str, float] = defaultdict(float)
    groups: dict[str, dict] = {}

    def group(kind: str) -> dict:
        return groups.setdefault(kind, {"kind": kind, "forward_seconds": 0.0,
                                        "backward_seconds": 0.0 if backward else None, "mults": 0})

    for (phase, op, layer, _), seconds in op_seconds.items():
        owner = next((path for path in conv_paths if _inside(layer, path)), None)
        if owner is not None:
            if phase == "backward":
                conv_backward[owner] += seconds
            continue  # a conv layer's forward ops are inside its module's time
        group(OP_KINDS.get(op, "other ops"))[f"{phase}_seconds"] += seconds
    for phase, tally in (("forward", counter.forward), ("backward", counter.backward)):
        for (op, layer), n in tally.by_op_and_layer().items():
            if not any(_inside(layer, path) for path in conv_paths):
                group(OP_KINDS.get(op, "other ops"))["mults"] += n
    timed = sum(conv_forward.values()) + sum(conv_backward.values()) + sum(
        g["forward_seconds"] + (g["backward_seconds"] or 0.0) for g in groups.values())
    outside = group(OUTSIDE_OPS)
    outside["forward_seconds"] = max(0.0, forward_total - sum(conv_forward.values()) - sum(
        g["forward_seconds"] for g in groups.values() if g is not outside))
    if backward:
        outside["backward_seconds"] = max(0.0, total - timed - outside["forward_seconds"])
    for g in groups.values():
        seconds = g["forward_seconds"] + (g["backward_seconds"] or 0.0)
        g["share"] = seconds / total if total else 0.0
        g["mults_per_second"] = g["mults"] / seconds if seconds else None
    timed_rows = []
    for r in rows:
        seconds = conv_forward.get(r.path, 0.0) + conv_backward.get(r.path, 0.0)
        mults = batch * (r.mults + (r.backward_mults or 0))
        timed_rows.append(LayerProfile(**{
            **{f: getattr(r, f) for f in r.__dataclass_fields__},
            "forward_seconds": conv_forward.get(r.path, 0.0),
            "backward_seconds": conv_backward.get(r.path, 0.0) if backward else None,
            "share": seconds / total if total else 0.0,
            "mults_per_second": mults / seconds if seconds else None}))
    conv_seconds = sum(conv_forward.values()) + sum(conv_backward.values())
    order = list(dict.fromkeys(list(OP_KINDS.values()) + ["other ops", OUTSIDE_OPS]))
    summary = {"forward_seconds": forward_total, "backward_seconds": backward_total, "conv_seconds": conv_seconds,
               "outside_conv_share": 1.0 - conv_seconds / total if total else 0.0,
               "groups": sorted(groups.values(), key=lambda g: order.index(g["kind"]))}
    return timed_rows, summary


def _counted_pass(model: Module, shape: tuple[int, ...], layers, backward: bool, xp, dtype):
    """One pass of a zero input of ``shape`` under a counter: (counter, layer id → (input HW, output HW))."""
    sizes: dict[int, tuple] = {}

    def record(module, args, output):
        sizes.setdefault(id(module), (tuple(args[0].shape[-2:]), tuple(output.shape[-2:])))

    handles = [module.register_forward_hook(record) for _, module in layers]
    try:
        x = tensor(xp.zeros(shape, dtype=dtype))
        with count_mults() as counter:
            if backward:
                model(x).sum().backward()
            else:
                with no_grad():
                    model(x)
    finally:
        for handle in handles:
            handle.remove()
        if backward:
            model.zero_grad()
    return counter, sizes


def _check_per_image(layers, at_batch, at_one, batch: int, backward: bool) -> None:
    """Raise :class:`BatchCountError` where a conv count at ``batch`` is not ``batch`` times batch 1's."""
    for phase in ("forward", "backward") if backward else ("forward",):
        many, one = getattr(at_batch, phase), getattr(at_one, phase)
        many_by_layer, one_by_layer = many.conv_by_layer(), one.conv_by_layer()
        counts = [(path, _layer_sum(many_by_layer, path), _layer_sum(one_by_layer, path)) for path, _ in layers]
        for path, n, single in counts + [("(whole model)", many.conv, one.conv)]:
            if n != batch * single:
                raise BatchCountError(path, phase, (batch, 1), (n / batch, single))


def profile(model: Module, input_shape=(REPORT_BATCH, 3, 32, 32), *, backward: bool = False,
            timing: bool = False, against_batch_one: bool = True) -> Profile:
    """Measure ``model`` on a zero input of ``input_shape`` (N, C, H, W); counts are per image.

    With N > 1 the conv counts are measured at batch N and at batch 1 and must agree per image
    (else :class:`BatchCountError`; see the module docstring); ``Profile.batches`` is (N, 1).
    ``against_batch_one=False`` measures at batch N only, for a caller that sets the two
    batches side by side itself (``verify counts`` shows both in every row).
    ``timing``: also time one more pass (see the module docstring); the batch size of
    ``input_shape`` then matters (a batch of 1 times mostly the framework's own overhead).
    The model's modes are restored afterwards and its parameters are not changed; with
    ``backward=True`` the gradients the backward pass leaves are cleared again.
    """
    if not isinstance(model, Module):
        raise TypeError(f"profile needs a minibasis.nn.Module, got {type(model).__name__}")
    shape = check_input_shape(input_shape)
    if backward and isinstance(model, InferenceModule):
        raise InferenceError("profile(backward=True): a deployed model is inference-only and has no backward pass "
                             "(profile the source model's backward)")
    batch = shape[0]
    layers = conv_layers(model)
    xp, dtype = _array_module_and_dtype(model)
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        object.__setattr__(m, "training", False)  # eval mode, without Module.train (a deployed model refuses it)
    timed = None
    try:
        counter, sizes = _counted_pass(model, shape, layers, backward, xp, dtype)
        if batch > 1 and against_batch_one:
            single, _ = _counted_pass(model, (1,) + shape[1:], layers, backward, xp, dtype)
            _check_per_image(layers, counter, single, batch, backward)
        if timing:
            timed = _timed_pass(model, tensor(xp.zeros(shape, dtype=dtype)), layers, backward)
    finally:
        for m, mode in modes:
            object.__setattr__(m, "training", mode)
        if backward:
            model.zero_grad()

    forward_by_layer = counter.forward.conv_by_layer()
    backward_by_layer = counter.backward.conv_by_layer() if backward else None
    rows = []
    for path, module in layers:
        in_hw, out_hw = sizes.get(id(module), (None, None))
        basis = _is_basis(module)
        rows.append(LayerProfile(
            path=path, kind="basisconv" if basis else "conv", M=module.out_channels, C=module.in_channels,
            groups=int(getattr(module, "groups", 1)), k=tuple(module.kernel_size), stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(getattr(module, "dilation", (1, 1))), input=in_hw, output=out_hw,
            Q=module.num_basis if basis else None, energy=module.energy if basis else None,
            mults=_per_image(path, _layer_sum(forward_by_layer, path), batch),
            formula_mults=_formula_mults(module, out_hw),
            backward_mults=None if backward_by_layer is None
            else _per_image(path, _layer_sum(backward_by_layer, path), batch),
            learnable=learnable_values(module), stored=stored_values(module)))
    totals = {
        "mults": sum(r.mults for r in rows), "formula_mults": sum(r.formula_mults for r in rows),
        "backward_mults": None if not backward else sum(r.backward_mults for r in rows),
        "learnable": sum(r.learnable for r in rows), "stored": sum(r.stored for r in rows),
        "model_conv_mults": _per_image("(whole model)", counter.forward.conv, batch),
        "model_mults": _per_image("(whole model, all ops)", counter.forward.total, batch),
        "model_learnable": learnable_values(model), "model_stored": stored_values(model),
        "layers": len(rows), "basisconv_layers": sum(r.kind == "basisconv" for r in rows),
    }
    summary = None
    if timed is not None:
        rows, summary = _timing(rows, layers, timed, batch, backward, counter)
    # every op's count per image by module path; a per-channel term outside the convs may leave a remainder
    layer_mults = {path: n // batch for path, n in counter.forward.by_layer.items()}
    return Profile(rows=rows, input_shape=shape, totals=totals, timing=summary,
                   batches=(batch, 1) if batch > 1 and against_batch_one else (batch,), layer_mults=layer_mults)
