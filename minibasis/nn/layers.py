"""Standard layers with PyTorch's constructor arguments, key names and default initialization."""
from __future__ import annotations

import math
from collections import OrderedDict

from minibasis import backend
from minibasis.checks import is_int as _is_int, non_negative_pair, positive_int, positive_pair
from minibasis import functions as F
from minibasis.autograd import Tensor
from minibasis.functions.basic import check_dropout_probability
from minibasis.functions.conv import check_padding, resolve_padding
from minibasis.functions.pooling import check_flag
from minibasis.functions.loss import check_loss_settings
from minibasis.functions.normalization import check_batch_norm_settings
from minibasis.nn.module import Module, Parameter

__all__ = ["Conv2d", "Linear", "BatchNorm2d", "BatchNorm1d", "ReLU", "Softmax", "LogSoftmax", "CrossEntropyLoss",
           "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Dropout", "Dropout2d", "Flatten", "Sequential", "Identity"]


def uniform_parameter(shape: tuple, bound: float) -> Parameter:
    """U(−bound, bound): PyTorch's default for conv and linear layers with bound 1/√fan_in."""
    return Parameter(backend.random_uniform(-bound, bound, shape))


def conv_geometry(kernel_size, stride, padding, dilation) -> tuple:
    """The checked (kernel_size, stride, padding, dilation) of a conv layer (Conv2d and BasisConv2d alike):
    pairs of ints, padding a pair or "same"/"valid" as given."""
    return (positive_pair("kernel_size", kernel_size), positive_pair("stride", stride), check_padding(padding),
            positive_pair("dilation", dilation))


class Conv2d(Module):
    """weight (out_channels, in_channels / groups, kh, kw), bias (out_channels,).

    ``padding`` is an int, a pair, "valid" or "same" (stride 1 only), kept as given
    (as PyTorch keeps it); ``dilation`` a positive int or pair (stored as a pair,
    like ``stride``); ``groups`` must divide both channel counts (groups =
    in_channels = out_channels: a depthwise conv).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(kernel_size, stride, padding, dilation)
        self.groups = positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: groups={groups} must divide in_channels ({in_channels}) and "
                             f"out_channels ({out_channels})")
        resolve_padding(self.padding, self.kernel_size, self.stride, self.dilation)  # "same" with stride > 1
        fan_in = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5), PyTorch's default
        self.weight = uniform_parameter((out_channels, in_channels // groups, *self.kernel_size), bound)
        self.bias = uniform_parameter((out_channels,), bound) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        text += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + f", bias={self.bias is not None}"


class Linear(Module):
    """weight (out_features, in_features), bias (out_features,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = uniform_parameter((out_features, in_features), bound)
        self.bias = uniform_parameter((out_features,), bound) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear({self.in_features}, {self.out_features}) expects input of shape "
                             f"(N, in_features) = (N, {self.in_features}), got {tuple(x.shape)}")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _BatchNorm(Module):
    expected_ndim = 4

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True):
        super().__init__()
        self.num_features = positive_int("num_features", num_features)
        check_batch_norm_settings(momentum, eps, type(self).__name__)
        self.eps, self.momentum = eps, momentum
        xp, dtype = backend.xp, backend.default_dtype
        self.weight = Parameter(xp.ones(num_features, dtype=dtype), requires_grad=affine)
        self.bias = Parameter(xp.zeros(num_features, dtype=dtype), requires_grad=affine)
        if track_running_stats:
            self.register_buffer("running_mean", xp.zeros(num_features, dtype=dtype))
            self.register_buffer("running_var", xp.ones(num_features, dtype=dtype))
        self.track_running_stats = track_running_stats

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != self.expected_ndim:
            raise ValueError(f"{type(self).__name__} expects a {self.expected_ndim}-D input, got shape {x.shape}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels, "
                             f"got input of shape {tuple(x.shape)}")
        stats = (self._buffers["running_mean"], self._buffers["running_var"]) if self.track_running_stats else (None, None)
        training = self.training or not self.track_running_stats
        return F.batch_norm(x, stats[0], stats[1], self.weight, self.bias, training, self.momentum, self.eps)

    def inference_affine(self):
        """(scale, shift), each (num_features,): eval mode computes x ↦ scale·x + shift per channel.

        scale = γ/√(running_var + ε), shift = β − scale·running_mean (γ = 1, β = 0 without
        affine). Used to fold the layer into a neighbouring conv (``to_conv``, ``fuse_batch_norm``).
        """
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__} without running statistics normalizes by batch statistics "
                             "in eval mode too: it has no fixed affine map to fold")
        xp = backend.get_array_module(self.weight.data)
        scale = self.weight.data / xp.sqrt(self._buffers["running_var"] + self.eps)
        return scale, self.bias.data - backend.mul(scale, self._buffers["running_mean"])

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm2d(_BatchNorm):
    """Per-channel normalization of (N, C, H, W)."""


class BatchNorm1d(_BatchNorm):
    """Per-feature normalization of (N, C)."""

    expected_ndim = 2


class ReLU(Module):
    """max(x, 0).

    ``inplace`` is accepted so PyTorch code runs unchanged, and recorded, but the output is
    always a new array: a layer's input may be saved by the op that made it (a conv keeps
    its input for the weight gradient, an addition's operands are shared with a residual
    branch), and overwriting it would silently change their gradients. Memory use is that
    of ``inplace=False``.
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = check_flag("inplace", inplace)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class Softmax(Module):
    """Softmax along axis ``dim`` (required: the class axis, 1 for (N, K) logits)."""

    def __init__(self, dim: int):
        super().__init__()
        if not _is_int(dim):
            raise TypeError(f"{type(self).__name__}: dim must be an int (1 for (N, K) logits), got {dim!r}")
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    """Log-softmax along axis ``dim``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(x, self.dim)


class CrossEntropyLoss(Module):
    """``loss(logits (N, K), labels (N,))``: softmax cross-entropy, PyTorch's definition.

    ``reduction`` "mean" (default), "sum" or "none" (one loss per row);
    ``label_smoothing`` ε in [0, 1] mixes the one-hot target with ε/K on every class.
    Class weights and ``ignore_index`` are not supported.
    """

    def __init__(self, *, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        check_loss_settings(reduction, label_smoothing)
        self.reduction, self.label_smoothing = reduction, label_smoothing

    def forward(self, logits: Tensor, labels) -> Tensor:
        return F.cross_entropy(logits, labels, self.reduction, self.label_smoothing)

    def extra_repr(self) -> str:
        text = f"reduction={self.reduction!r}"
        return text + (f", label_smoothing={self.label_smoothing}" if self.label_smoothing else "")


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False):
        super().__init__()
        kernel, pad = positive_pair("kernel_size", kernel_size), non_negative_pair("padding", padding)
        if stride is not None:
            positive_pair("stride", stride)
        if pad[0] > kernel[0] // 2 or pad[1] > kernel[1] // 2:
            raise ValueError(f"{type(self).__name__}: padding {pad} must be at most half the kernel {kernel}")
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode = check_flag("ceil_mode", ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)

    def extra_repr(self) -> str:
        text = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        return text + (", ceil_mode=True" if self.ceil_mode else "")


class AvgPool2d(MaxPool2d):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = check_flag("count_include_pad", count_include_pad)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.count_include_pad else ", count_include_pad=False")


class AdaptiveAvgPool2d(Module):
    """Global average pooling (output_size 1), as the CIFAR ResNets and DenseNets use."""

    def __init__(self, output_size=1):
        super().__init__()
        if positive_pair("output_size", output_size) != (1, 1):
            raise ValueError(f"AdaptiveAvgPool2d supports output_size=1 (global pooling) only, got {output_size!r}")
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size)


class Dropout(Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        check_dropout_probability(p)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Dropout2d(Dropout):
    """Channel dropout: each (sample, channel) map of an (N, C, H, W) input is zeroed whole
    with probability ``p`` (the rest scaled by 1/(1 − p)) in training; identity in evaluation."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout2d(x, self.p, self.training)


class Flatten(Module):
    def __init__(self, start_dim: int = 1):
        super().__init__()
        if not _is_int(start_dim):
            raise TypeError(f"Flatten: start_dim must be an int, got {start_dim!r}")
        self.start_dim = start_dim

    def forward(self, x: Tensor) -> Tensor:
        return F.flatten(x, self.start_dim)


class Identity(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ... (or by an OrderedDict)."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(modules):
                if not isinstance(m, Module):
                    raise TypeError(f"Sequential takes Modules, argument {i} is {type(m).__name__}")
                self.add_module(str(i), m)

    def __getitem__(self, index):
        items = list(self._modules.values())
        if isinstance(index, slice):
            return Sequential(*items[index])
        return items[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module: Module) -> "Sequential":
        self.add_module(str(len(self)), module)
        return self

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x
