"""``verify exactness``: at t = 1 the eigen-basis BasisConv computes what the convolution computes.

Every conv of the model is replaced at energy threshold 1 (``compress(..., energy_threshold=1,
skip_unprofitable=False)``: all of them, profitable or not), then per layer

* the relative error of the reconstructed weights, ‖coeffs·basis − W‖_F / ‖W‖_F, and
* the relative error of the layer's output, ‖BasisConv(x) − conv(x)‖_F / ‖conv(x)‖_F, on
  the very input x that reaches the layer in the original model,

and end to end the largest logit difference between the two models, relative to the largest
logit, on real images when given, else on Gaussian inputs. Each error is compared with a
bound for the dtype (:data:`BOUNDS`), set from its unit roundoff u: t = 1 keeps the filters'
numerical rank, so what is left is rounding. Measured on the shared ResNet-20 (64 CIFAR-10
images): weights ≤ 18u, layer outputs ≤ 18u, logits ≈ 50u in float64 (float32: 0.7u, 6u,
9u); the bounds, 200u, 2,000u and 20,000u, leave room for wider layers and deeper nets.

The per-layer errors are the informative ones on a randomly initialized network whose
activations fade with depth (MobileNetV2 with PyTorch's default init): its logits are then
the head's bias, equal in both models.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from minibasis import backend
from minibasis.autograd import Tensor, no_grad
from minibasis.checks import positive_int
from minibasis.compress import compress, copy_module
from minibasis.nn import Module
from minibasis.verify.report import VerifyResult, format_table

__all__ = ["ExactnessBounds", "BOUNDS", "LayerExactness", "ExactnessReport", "check_exactness"]


@dataclass(frozen=True)
class ExactnessBounds:
    """Largest relative errors accepted: reconstructed weights, layer outputs, logits end to end."""

    weight: float
    output: float
    logits: float


def _bounds_for(unit_roundoff: float) -> ExactnessBounds:
    """200, 2,000 and 20,000 unit roundoffs: a layer's weights, its outputs, logits end to end."""
    return ExactnessBounds(weight=200 * unit_roundoff, output=2_000 * unit_roundoff, logits=20_000 * unit_roundoff)


#: Bounds per dtype, from the unit roundoff u (2⁻²⁴ ≈ 6.0e-8 for float32, 2⁻⁵³ ≈ 1.1e-16 for float64).
BOUNDS = {"float32": _bounds_for(2.0 ** -24), "float64": _bounds_for(2.0 ** -53)}


@dataclass
class LayerExactness:
    """One conv: its shape, Q at t = 1 and the two relative errors (None where it was not replaced)."""

    path: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    num_basis: int | None
    weight_error: float | None
    output_error: float | None
    kept: str | None = None  # why compress kept the conv, if it did

    def to_dict(self) -> dict:
        return {"path": self.path, "M": self.out_channels, "C": self.in_channels,
                "kernel_size": list(self.kernel_size), "Q": self.num_basis, "weight_error": self.weight_error,
                "output_error": self.output_error, "kept": self.kept}


@dataclass
class ExactnessReport(VerifyResult):
    """Result of :func:`check_exactness`: per-layer errors, the end-to-end logit difference, the bounds."""

    dtype: str
    bounds: ExactnessBounds
    layers: list[LayerExactness]
    inputs: str
    num_inputs: int
    max_logit_difference: float
    max_abs_logit: float
    check = "exactness"

    @property
    def logit_error(self) -> float:
        """Largest |logit difference| / largest |logit| of the original model."""
        return self.max_logit_difference / self.max_abs_logit if self.max_abs_logit else self.max_logit_difference

    @property
    def replaced(self) -> list[LayerExactness]:
        return [row for row in self.layers if row.kept is None]

    @property
    def worst_weight_error(self) -> float:
        return max((row.weight_error for row in self.replaced), default=0.0)

    @property
    def worst_output_error(self) -> float:
        return max((row.output_error for row in self.replaced), default=0.0)

    @property
    def passed(self) -> bool:
        return (bool(self.replaced) and self.worst_weight_error <= self.bounds.weight
                and self.worst_output_error <= self.bounds.output and self.logit_error <= self.bounds.logits)

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "bounds": dataclasses.asdict(self.bounds), "inputs": self.inputs,
                "num_inputs": self.num_inputs,
                "worst_weight_error": self.worst_weight_error, "worst_output_error": self.worst_output_error,
                "max_logit_difference": self.max_logit_difference, "max_abs_logit": self.max_abs_logit,
                "logit_error": self.logit_error, "layers": [row.to_dict() for row in self.layers]}

    def table(self) -> str:
        rows = []
        for r in self.layers:
            shape = (str(r.out_channels), str(r.in_channels), f"{r.kernel_size[0]}x{r.kernel_size[1]}")
            if r.kept is not None:
                rows.append((r.path, *shape, "-", "-", "-", f"kept: {r.kept}"))
                continue
            ok = r.weight_error <= self.bounds.weight and r.output_error <= self.bounds.output
            rows.append((r.path, *shape, str(r.num_basis), f"{r.weight_error:.2e}", f"{r.output_error:.2e}",
                         "ok" if ok else "ABOVE BOUND"))
        header = ("layer", "M", "C", "k", "Q (t=1)", "weight rel. error", "output rel. error", "status")
        lines = [f"verify exactness: every conv replaced at t = 1, {self.dtype}, {self.num_inputs} {self.inputs}",
                 f"bounds ({self.dtype}): weights {self.bounds.weight:.1e}, layer outputs {self.bounds.output:.1e}, "
                 f"logits {self.bounds.logits:.1e} (relative)", ""]
        lines += format_table(header, rows, left=(0, len(header) - 1))
        lines += ["",
                  f"worst weight error {self.worst_weight_error:.2e}, worst layer-output error "
                  f"{self.worst_output_error:.2e}",
                  f"end to end: largest |logit difference| {self.max_logit_difference:.2e} "
                  f"(largest |logit| {self.max_abs_logit:.3g}; relative {self.logit_error:.2e})",
                  "PASSED: t = 1 reproduces the network to rounding" if self.passed else
                  "FAILED: " + ("no conv was replaced" if not self.replaced else "an error exceeds its bound")]
        return "\n".join(lines)


def _relative_error(approx, exact) -> float:
    """‖approx − exact‖_F / ‖exact‖_F in float64 on the host (the plain difference norm if exact is 0)."""
    approx = backend.to_numpy(approx).astype(np.float64)
    exact = backend.to_numpy(exact).astype(np.float64)
    norm = float(np.linalg.norm(exact))
    difference = float(np.linalg.norm(approx - exact))
    return difference / norm if norm else difference


def _reconstructed_weight(layer) -> np.ndarray:
    """coeffs (M, Q) · basis (Q, C·kh·kw) → (M, C, kh, kw), in float64 from the stored arrays."""
    basis = backend.to_numpy(layer.basis_filters()).astype(np.float64)
    coeffs = backend.to_numpy(layer.coeffs.data).astype(np.float64)
    return (coeffs @ basis.reshape(basis.shape[0], -1)).reshape(coeffs.shape[0], *basis.shape[1:])


def check_exactness(model: Module, images=None, *, dtype: str = "float64", input_shape=(3, 32, 32),
                    num_inputs: int = 8, seed: int = 0, bounds: ExactnessBounds | None = None) -> ExactnessReport:
    """Replace every conv of ``model`` at t = 1 and measure how far the result is from the original.

    Args:
        model: left untouched (a copy is converted to ``dtype`` and compressed).
        images: (N, C, H, W) model inputs (already normalized), host or device array; None draws
            ``num_inputs`` standard-normal inputs of ``input_shape`` with ``seed``.
        dtype: "float32" or "float64"; selects :data:`BOUNDS` unless ``bounds`` is given.
    """
    if dtype not in BOUNDS:
        raise ValueError(f"dtype must be one of {', '.join(BOUNDS)}, got {dtype!r}")
    if not isinstance(model, Module):
        raise TypeError(f"check_exactness needs a minibasis.nn.Module, got {type(model).__name__}")
    bounds = bounds or BOUNDS[dtype]
    if images is None:
        shape = (positive_int("num_inputs", num_inputs),) + tuple(positive_int("input_shape", n) for n in input_shape)
        images = np.random.default_rng(seed).standard_normal(shape)
        described = "Gaussian inputs"
    else:
        described = "images"
    kind = getattr(getattr(images, "dtype", None), "kind", None)
    if getattr(images, "ndim", None) != 4 or kind not in ("f", "i", "u"):
        raise ValueError(f"images must be a numeric (N, C, H, W) array, got {getattr(images, 'shape', type(images))}")

    original = copy_module(model).to(dtype).eval()
    replaced, report = compress(original, energy_threshold=1.0, skip_unprofitable=False,
                                input_shape=(1,) + tuple(images.shape[1:]))
    replaced.eval()
    rows_by_path = {row.name: row for row in report.layers}
    convs = [path for path, module in original.named_modules() if path in rows_by_path]

    layer_inputs: dict[str, object] = {}

    def recorder(path: str):
        def record(module, args):
            layer_inputs.setdefault(path, args[0].data)  # returns None: the input is kept
        return record

    handles = [original.get_submodule(path).register_forward_pre_hook(recorder(path)) for path in convs]
    x = Tensor(backend.asarray(images, dtype=dtype))
    try:
        with no_grad():
            logits = original(x).data
            logits_replaced = replaced(x).data
    finally:
        for handle in handles:
            handle.remove()

    layers = []
    with no_grad():
        for path in convs:
            conv, row = original.get_submodule(path), rows_by_path[path]
            entry = LayerExactness(path, row.out_channels, row.in_channels, tuple(row.kernel_size), None, None, None)
            if not row.replaced:
                entry.kept = row.reason or "kept by compress"
            elif path not in layer_inputs:
                entry.kept = "did not run in the forward pass"
            else:
                basis_layer = replaced.get_submodule(path)
                inp = Tensor(layer_inputs[path])
                entry.num_basis = basis_layer.num_basis
                entry.weight_error = _relative_error(_reconstructed_weight(basis_layer), conv.weight.data)
                entry.output_error = _relative_error(basis_layer(inp).data, conv(inp).data)
            layers.append(entry)

    difference = backend.to_numpy(logits_replaced).astype(np.float64) - backend.to_numpy(logits).astype(np.float64)
    return ExactnessReport(dtype=dtype, bounds=bounds, layers=layers, inputs=described, num_inputs=int(images.shape[0]),
                           max_logit_difference=float(np.abs(difference).max()),
                           max_abs_logit=float(np.abs(backend.to_numpy(logits)).max()))
