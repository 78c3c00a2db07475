"""Reverse-mode automatic differentiation: Tensor, Function, no_grad, gradcheck."""
from minibasis.autograd.tensor import (Function, Tensor, as_tensor, enable_grad, is_grad_enabled,
                                       no_grad, sum_to, tensor)
from minibasis.autograd.gradcheck import gradcheck, numerical_grad

__all__ = ["Tensor", "Function", "tensor", "as_tensor", "no_grad", "enable_grad", "is_grad_enabled",
           "sum_to", "gradcheck", "numerical_grad"]
