"""Differentiable ops (``minibasis.functions``, also ``minibasis.nn.functional``).

Each op is one :class:`~minibasis.autograd.Function` with its forward on raw
arrays and its backward beside it; products go through the counted primitives.
"""
from minibasis.autograd.ops import add, div, matmul, mul, sub
from minibasis.functions.activations import clip, hard_sigmoid, hard_swish, leaky_relu, sigmoid
from minibasis.functions.basic import concat, dropout, dropout2d, flatten, linear, pad, relu
from minibasis.functions.conv import conv2d, set_im2col_budget
from minibasis.functions.chunking import chunk_sizes, smallest_chunks
from minibasis.functions.loss import cross_entropy, log_softmax, soft_target_kl, softmax, softmax_cross_entropy
from minibasis.functions.normalization import batch_norm
from minibasis.functions.pooling import adaptive_avg_pool2d, avg_pool2d, global_avg_pool2d, max_pool2d

__all__ = ["add", "sub", "mul", "div", "matmul", "relu", "linear", "flatten", "concat", "pad", "dropout", "dropout2d",
           "conv2d", "set_im2col_budget", "softmax_cross_entropy", "cross_entropy", "log_softmax", "softmax",
           "soft_target_kl", "sigmoid", "clip", "leaky_relu", "hard_sigmoid", "hard_swish",
           "batch_norm", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "global_avg_pool2d"]
__all__ += ["chunk_sizes", "smallest_chunks"]
