"""Knowledge distillation from a frozen teacher (Hinton, Vinyals & Dean, 2015).

The student's loss on a batch with labels y, student logits z and teacher logits t is

    loss = (1 − w) · CE(z, y) + w · T² · KL(softmax(t/T) ‖ softmax(z/T))

with w = ``weight`` in [0, 1] and T = ``temperature`` > 0; the KL divergence is averaged over
the batch (:func:`minibasis.functions.soft_target_kl`). The T² keeps the soft term's gradient,
T·(softmax(z/T) − softmax(t/T))/N, on the scale of the cross-entropy's as T grows (Hinton's
convention), and the cross-entropy is scaled by 1 − w so that w moves the loss between the
labels alone (w = 0) and the teacher alone (w = 1) without changing its overall size.

The teacher runs in evaluation mode under ``no_grad`` (its BatchNorm statistics, parameters
and buffers never change; its mode is restored after each batch), and its multiplications are
counted apart (:func:`minibasis.counting.count_apart`): they never reach a counter that is
counting the student, and :attr:`Distillation.teacher_mults` holds them.
"""
from __future__ import annotations

from minibasis import functions as F
from minibasis.autograd import Tensor, no_grad
from minibasis.checks import positive_number, probability
from minibasis.counting import count_apart
from minibasis.nn import Module

__all__ = ["Distillation"]


class Distillation:
    """The distillation loss ``loss(logits, labels, inputs)`` of a student against ``teacher``.

    ``teacher_mults``: every multiplication of the teacher's forward passes so far (measured).
    """

    def __init__(self, teacher: Module, weight: float, temperature: float = 4.0):
        if not isinstance(teacher, Module):
            raise TypeError(f"teacher must be a minibasis.nn.Module, got {type(teacher).__name__}")
        self.teacher = teacher
        self.weight = probability("distill_weight", weight)
        self.temperature = positive_number("temperature", temperature)
        self.teacher_mults = 0

    def teacher_logits(self, inputs: Tensor):
        """The teacher's logits (a constant array) for ``inputs``, in eval mode, counted apart."""
        modes = [(m, m.training) for m in self.teacher.modules()]
        self.teacher.eval()
        try:
            with no_grad(), count_apart() as counter:
                logits = self.teacher(inputs)
        finally:
            for m, mode in modes:
                object.__setattr__(m, "training", mode)  # each module's own mode, as before
        self.teacher_mults += counter.total
        return logits.data

    def __call__(self, logits: Tensor, labels, inputs: Tensor) -> Tensor:
        targets = self.teacher_logits(inputs)
        hard = F.cross_entropy(logits, labels)
        soft = F.soft_target_kl(logits, targets, self.temperature)
        return hard * (1.0 - self.weight) + soft * (self.weight * self.temperature ** 2)
