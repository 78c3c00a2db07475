"""The non-finite guard: name the step, the loss and the first module where NaN or ±inf appears.

:class:`AnomalyDetector` observes a model through forward pre-hooks and forward hooks
(``Module.register_forward_pre_hook`` / ``register_forward_hook``, removed on exit); it never
replaces a module's ``forward``.
"""
from __future__ import annotations

from minibasis import backend
from minibasis.autograd import Function, Tensor
from minibasis.nn import Module

__all__ = ["NonFiniteError", "AnomalyDetector", "is_finite"]


class NonFiniteError(RuntimeError):
    """Training produced NaN or ±inf: names the step, the loss and the first offending module.

    Attributes: ``step`` (the failing optimizer step, counted from 1 within the stage),
    ``epoch`` (0-based), ``loss`` (float), ``module`` (module path or None) and ``where``
    (what went non-finite there: "output", "gradient produced by backward", "gradient
    arriving at the output" or "parameter gradient").
    """

    def __init__(self, *, step: int, epoch: int, loss: float, module: str | None, where: str | None):
        self.step, self.epoch, self.loss, self.module, self.where = step, epoch, loss, module, where
        culprit = (f"first non-finite {where} in module '{module}'" if module is not None
                   else "no module output was non-finite (check the loss function and the inputs)")
        super().__init__(f"non-finite training at step {step} (epoch {epoch + 1}): loss = {loss!r}; {culprit}")


def is_finite(array) -> bool:
    """True when every entry of the (host or device) ``array`` is finite (one host read)."""
    xp = backend.get_array_module(array)
    return bool(xp.isfinite(array).all())


class _GradientProbe(Function):
    """Identity in forward; in backward reports a non-finite gradient passing through it."""

    name = "gradient_probe"

    def __init__(self, detector: "AnomalyDetector", path: str, where: str):
        self.detector, self.path, self.where = detector, path, where

    def forward(self, x):
        return x

    def backward(self, gy):
        if self.detector.first_bad_gradient is None and not is_finite(gy):
            self.detector.first_bad_gradient = (self.path, self.where)
        return gy


class AnomalyDetector:
    """Find the first module where NaN or ±inf appears, forward or backward.

    A context manager around a model:

    * ``first_bad_output``: the first module, in execution order, whose output is non-finite;
    * ``first_bad_gradient``: ``(module path, where)`` for the first non-finite gradient in
      backward order — "gradient produced by backward" when the module's own backward turned
      a finite gradient at its output into a non-finite one at its input, "gradient arriving
      at the output" when it came from further down the graph (e.g. the loss);
    * :meth:`bad_parameter_gradient`: the first module holding a non-finite parameter
      gradient after ``backward()`` (for a layer whose input needs no gradient).

    Costs one ``isfinite`` reduction (and one host read) per module output and per gradient
    through a module: a debugging mode.
    """

    def __init__(self, model: Module, check_gradients: bool = True):
        self.model = model
        self.check_gradients = check_gradients
        self.first_bad_output: str | None = None
        self.first_bad_gradient: tuple[str, str] | None = None
        self._handles: list = []

    def reset(self) -> None:
        self.first_bad_output = self.first_bad_gradient = None

    def _pre_hook(self, path: str):
        def probe_inputs(module, args):
            if not self.check_gradients:
                return None
            return tuple(_GradientProbe(self, path, "gradient produced by backward")(a)
                         if isinstance(a, Tensor) and a.requires_grad else a for a in args)
        return probe_inputs

    def _hook(self, path: str):
        def check_output(module, args, out):
            if not isinstance(out, Tensor):
                return None
            if self.first_bad_output is None and not is_finite(out.data):
                self.first_bad_output = path
            if self.check_gradients and out.requires_grad:
                return _GradientProbe(self, path, "gradient arriving at the output")(out)
            return None
        return check_output

    def bad_parameter_gradient(self) -> str | None:
        for path, module in self.model.named_modules():
            for p in module.parameters(recurse=False):
                if p.grad is not None and not is_finite(p.grad.data):
                    return path or type(module).__name__
        return None

    def __enter__(self) -> "AnomalyDetector":
        for path, module in self.model.named_modules():
            name = path or type(module).__name__
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
