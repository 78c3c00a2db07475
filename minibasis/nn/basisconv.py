"""BasisConv2d: a convolution as Q fixed basis filters followed by a learnable 1×1 convolution.

The paper's construct (Tayyab & Mahalanobis, section 2): every filter h_i of a
layer is a linear combination h_i = Σ_j w_ij e_j of Q basis filters e_j, and
convolution is linear, so y_i = Σ_j w_ij (x ∗ e_j). The Q maps g_j = x ∗ e_j are
computed once and shared by all M outputs, which are then a 1×1 convolution of g
with the M×Q coefficients:

    x (N, C, H, W) --basis conv, Q filters (Q, C, kh, kw), stride, padding, dilation--> g (N, Q, Ho, Wo)
      --[optional BatchNorm2d(Q)]--> --1×1 conv, coeffs (M, Q)--> y (N, M, Ho, Wo)

Both stages run through ``functions.conv2d`` and therefore count as convolution
multiplications (``counter.conv``): Q·D·Ho·Wo for the basis stage and M·Q·Ho·Wo
for the 1×1 stage per image (D = C·kh·kw). The 1×1 stage hits conv2d's pointwise
path, a batched GEMM on a view of g with no column buffer. The full M×C×kh×kw
kernel is never rebuilt in ``forward``: that would cost the original M·D·Ho·Wo
again and save nothing.

The basis is a persistent buffer: saved in ``state_dict``, moved by ``.to()``,
never returned by ``parameters()`` and therefore never updated by an optimizer.
Beyond the paper, :meth:`BasisConv2d.learnable_basis` turns it into a Parameter (the
same ``state_dict`` key), so that fine-tuning can train both factors of the low-rank
conv: the multiplications stay Q·D + M·Q per position, the learnable values grow from
M·Q to Q·D + M·Q, and the basis is no longer orthonormal once trained.

Grouped convolutions are not decomposed (``from_conv`` refuses them). A grouped
conv with g groups costs M·(C/g)·kh·kw·Ho·Wo; a shared basis over the full
C·kh·kw window would cost more than the conv itself, and per-group bases
(Q_g filters of dimension D_g = (C/g)·kh·kw for the M/g filters of each group)
save only when Q_g/(M/g) + Q_g/D_g < 1. For a depthwise conv (g = C = M) each
group has one filter, M/g = 1, so Q_g/(M/g) + Q_g/D_g ≥ 1 for every Q_g ≥ 1: it
can never save a multiplication. ``minibasis.compress`` therefore keeps grouped
convs as they are and says so in its report.
"""
from __future__ import annotations

import math

from minibasis import backend, parallel
from minibasis import functions as F
from minibasis.autograd import Tensor
from minibasis.checks import positive_int, positive_pair
from minibasis.functions.conv import resolve_padding
from minibasis.nn.layers import BatchNorm2d, Conv2d, conv_geometry
from minibasis.nn.module import Module, Parameter

__all__ = ["BasisConv2d"]


def _float_dtype(dtype):
    """``dtype`` resolved by the active array module, or a TypeError if it is not floating."""
    resolved = backend.xp.dtype(dtype)
    if resolved.kind != "f":
        raise TypeError(f"BasisConv2d needs a floating dtype, got {resolved}")
    return resolved


def _host_random_basis(in_channels: int, kernel: tuple[int, int], num_basis: int, seed):
    """(Q, C, kh, kw) float64 host filters from a random orthonormal D×Q matrix (im2col order).

    ``seed=None`` draws from minibasis's host generator, so ``manual_seed`` makes it reproducible.
    """
    # basis.py is host-side basis math (NumPy); imported here so that importing nn stays NumPy-free.
    from minibasis import basis as basis_math

    dim = in_channels * kernel[0] * kernel[1]
    E = basis_math.random_orthonormal_basis(dim, num_basis, seed=backend.host_rng() if seed is None else seed)
    return basis_math.basis_as_filters(E, in_channels, *kernel)


class BasisConv2d(Module):
    """Fixed basis filters, optional BatchNorm on the Q-channel intermediate, learnable 1×1 coefficients.

    Args:
        in_channels: C. out_channels: M. kernel_size: k or (kh, kw).
        num_basis: Q, the number of basis filters.
        stride, padding, dilation: of the basis stage (the 1×1 stage has stride 1, no padding);
            padding as for ``Conv2d`` (an int, a pair, "same" or "valid").
        bias: learnable ``.bias`` (M,) on the output (the 1×1 stage).
        basis: the fixed filters, an array or Tensor of shape (Q, C, kh, kw). None draws a
            random orthonormal basis (as :meth:`random`) from minibasis's host generator.
        bn: put ``.bn = BatchNorm2d(Q)`` on the intermediate tensor (the paper does when
            training from scratch). Its parameters are BatchNorm parameters, not conv ones.
        basis_bias: learnable ``.basis_bias`` (Q,) added by the basis stage (the paper's
            Table 3 network has biases on both stages).
        dtype: dtype of every array of the layer; default: the dtype of ``basis`` when one
            is given, else ``backend.default_dtype`` (float32).
        coeffs: (keyword only) initial coefficients (M, Q) instead of the random init; then
            nothing but a missing basis is drawn at random, and the biases start at zero.

    Attributes:
        basis: persistent buffer (Q, C, kh, kw), in ``state_dict`` but not in ``parameters()``
            (a Parameter after :meth:`learnable_basis`; :meth:`basis_filters` gives the array either way).
        coeffs: Parameter (M, Q). bias: Parameter (M,) or None. basis_bias: Parameter (Q,) or None.
        num_basis: Q. energy: retained energy fraction when built by :meth:`from_conv`, else None.

    Initialization (when not built from a trained conv): coeffs and bias ~ U(−1/√Q, 1/√Q),
    PyTorch's conv default with fan_in = Q, the fan-in of the 1×1 stage. With an
    orthonormal basis the equivalent filter Σ_j w_ij e_j then has expected squared norm
    Q·(1/(3Q)) = 1/3, exactly that of PyTorch's default conv init (D weights of variance
    1/(3D)), so outputs start at the scale a plain conv would. basis_bias ~ U(−1/√D, 1/√D),
    the default bias of a conv with the basis stage's fan-in D.

    Shapes: input (N, C, H, W) → output (N, M, Ho, Wo), Ho = (H + 2·ph − dh·(kh − 1) − 1) // sh + 1.
    """

    def __init__(self, in_channels, out_channels, kernel_size, num_basis, stride=1, padding=0, bias=True,
                 basis=None, bn=False, basis_bias=False, dtype=None, *, coeffs=None, dilation=1):
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(kernel_size, stride, padding, dilation)
        resolve_padding(self.padding, self.kernel_size, self.stride, self.dilation)  # "same" with stride > 1
        q = positive_int("num_basis", num_basis)
        self.num_basis = q
        self.energy = None
        kh, kw = self.kernel_size
        dim = self.in_channels * kh * kw

        if basis is None:
            if q > dim:
                raise ValueError(f"num_basis ({q}) exceeds the filter dimension D = C*kh*kw = "
                                 f"{self.in_channels}*{kh}*{kw} = {dim}: a random orthonormal basis has at most D vectors")
            dtype = _float_dtype(backend.default_dtype if dtype is None else dtype)
            basis_array = backend.asarray(_host_random_basis(self.in_channels, self.kernel_size, q, None), dtype=dtype)
        else:
            basis_array = basis.data if isinstance(basis, Tensor) else basis
            if not hasattr(basis_array, "shape"):
                basis_array = backend.asarray(basis_array)
            expected = (q, self.in_channels, kh, kw)
            if tuple(basis_array.shape) != expected:
                raise ValueError(f"basis must have shape (num_basis, in_channels, kh, kw) = {expected}, "
                                 f"got {tuple(basis_array.shape)}")
            if getattr(basis_array.dtype, "kind", None) != "f":
                raise TypeError(f"basis must be a floating array, got dtype {basis_array.dtype}")
            dtype = _float_dtype(basis_array.dtype if dtype is None else dtype)
            # A private copy on the active device: the layer must not alias the caller's array.
            basis_array = backend.asarray(basis_array).astype(dtype, copy=True)
        self.register_buffer("basis", basis_array)

        if coeffs is None:
            bound = 1.0 / math.sqrt(q)
            self.coeffs = Parameter(backend.random_uniform(-bound, bound, (self.out_channels, q), dtype=dtype))
            self.bias = Parameter(backend.random_uniform(-bound, bound, (self.out_channels,), dtype=dtype)) if bias else None
            bound = 1.0 / math.sqrt(dim)
            self.basis_bias = Parameter(backend.random_uniform(-bound, bound, (q,), dtype=dtype)) if basis_bias else None
        else:
            coeffs = coeffs.data if isinstance(coeffs, Tensor) else coeffs
            if tuple(getattr(coeffs, "shape", ())) != (self.out_channels, q):
                raise ValueError(f"coeffs must have shape (out_channels, num_basis) = {(self.out_channels, q)}, "
                                 f"got {tuple(getattr(coeffs, 'shape', ()))}")
            # Explicit values draw nothing from the host generator, so building a layer from a
            # trained conv does not shift the random stream of later initializations.
            self.coeffs = Parameter(backend.asarray(coeffs).astype(dtype, copy=True))
            self.bias = Parameter(backend.xp.zeros(self.out_channels, dtype=dtype)) if bias else None
            self.basis_bias = Parameter(backend.xp.zeros(q, dtype=dtype)) if basis_bias else None
        if bn:
            norm = BatchNorm2d(q)
            for name, p in norm._parameters.items():
                p.data = p.data.astype(dtype)
            for name, b in list(norm._buffers.items()):
                norm._buffers[name] = b.astype(dtype)
            self.bn = norm
        else:
            self.bn = None

    # -- constructors -------------------------------------------------------
    @classmethod
    def from_conv(cls, conv: Conv2d, energy_threshold=None, num_basis=None) -> "BasisConv2d":
        """The eigen-basis equivalent of a trained ``Conv2d`` (the paper's section 2.1).

        Exactly one of ``energy_threshold`` (t in (0, 1]; t = 1 keeps the numerical rank
        and reproduces the layer to rounding) and ``num_basis`` (Q in [1, min(D, M)]).
        The layer keeps the conv's stride, padding, dilation, dtype, device and a copy of its bias;
        the basis and coefficients come from :func:`minibasis.basis.eigen_basis`
        (computed in float64, then cast). ``.energy`` holds the retained energy fraction.
        No BatchNorm and no basis bias are added: the result computes the same function.

        A grouped conv (``groups`` > 1, depthwise included) raises ValueError: it is kept
        as an ordinary conv, since a depthwise conv can never save multiplications
        (Q/M + Q/D ≥ 1 per group; see the module docstring).
        """
        from minibasis import basis as basis_math  # host-side basis math (see _host_random_basis)

        if not isinstance(conv, Conv2d):
            raise TypeError(f"BasisConv2d.from_conv needs a minibasis.nn.Conv2d, got {type(conv).__name__}")
        groups = getattr(conv, "groups", 1)
        if groups != 1:
            raise ValueError(f"BasisConv2d.from_conv: grouped convs (groups={groups}) are not decomposed: each group "
                             f"has only M/g = {conv.out_channels // groups} filter(s) of dimension "
                             f"D/g = {conv.weight.shape[1] * conv.kernel_size[0] * conv.kernel_size[1]}, so a basis "
                             "saves little or nothing (a depthwise conv never: Q/M + Q/D ≥ 1); keep it as a Conv2d")
        weight = conv.weight.data
        if len(weight.shape) != 4:
            raise ValueError(f"conv weight must be 4-D (M, C, kh, kw), got shape {tuple(weight.shape)}")
        eigen = basis_math.eigen_basis(weight, energy_threshold=energy_threshold, num_basis=num_basis)
        m, c, kh, kw = weight.shape
        layer = cls(c, m, (kh, kw), eigen.num_basis, stride=conv.stride, padding=conv.padding,
                    bias=conv.bias is not None, basis=eigen.basis, dtype=weight.dtype, coeffs=eigen.coeffs,
                    dilation=getattr(conv, "dilation", 1))
        xp = backend.get_array_module(weight)
        # Put every array where the conv's weight lives (the constructor used the active backend).
        layer.basis = xp.asarray(eigen.basis, dtype=weight.dtype)   # a buffer stays a buffer
        layer.coeffs.data = xp.asarray(eigen.coeffs, dtype=weight.dtype)
        if conv.bias is not None:
            layer.bias.data = conv.bias.data.astype(weight.dtype, copy=True)
        layer.energy = float(eigen.energy)
        return layer

    @classmethod
    def random(cls, in_channels, out_channels, kernel_size, num_basis, stride=1, padding=0, bias=True,
               bn=True, basis_bias=False, seed=None, dtype=None, dilation=1) -> "BasisConv2d":
        """A fixed random orthonormal basis for training from scratch (the paper's section 2.2).

        The D×Q basis comes from :func:`minibasis.basis.random_orthonormal_basis` (Haar,
        Eᵀ E = I) with ``seed`` (an int gives the same basis every time; None draws from
        minibasis's host generator, seeded by ``manual_seed``), and is reshaped to
        (Q, C, kh, kw) in im2col order. ``bn`` defaults to True, as the paper trains from
        scratch with a BatchNorm on the intermediate tensor. Coefficients are initialized
        as described in the class docstring. Needs Q ≤ D.
        """
        kernel = positive_pair("kernel_size", kernel_size)
        c, q = positive_int("in_channels", in_channels), positive_int("num_basis", num_basis)
        dim = c * kernel[0] * kernel[1]
        if q > dim:
            raise ValueError(f"num_basis ({q}) exceeds the filter dimension D = C*kh*kw = {dim}: "
                             "a random orthonormal basis has at most D vectors")
        dtype = _float_dtype(backend.default_dtype if dtype is None else dtype)
        filters = _host_random_basis(c, kernel, q, seed)
        return cls(c, out_channels, kernel, q, stride=stride, padding=padding, bias=bias,
                   basis=backend.asarray(filters, dtype=dtype), bn=bn, basis_bias=basis_bias, dtype=dtype,
                   dilation=dilation)

    def to_conv(self) -> Conv2d:
        """One ``Conv2d`` computing what this layer computes (in eval mode, if it has a BatchNorm).

        Convolution is linear, so the stages fold: with the coefficients and bias of
        :meth:`folded_coefficients` (W·diag(a) and W·(a·basis_bias + c) + bias) the layer is one
        conv with weight Σ_j W_ij a_j e_j (M, C, kh, kw) and that bias. Same
        stride, padding, dilation, dtype and device; it costs the original M·D·Ho·Wo.
        """
        coeffs, bias = self.folded_coefficients()
        with parallel.single_threaded_blas():  # the same bits whatever the BLAS's thread count
            weight = backend.tensordot(coeffs, self.basis_filters(), axes=1)  # (M, C, kh, kw)
        xp = backend.get_array_module(coeffs)
        conv = Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
                      dilation=self.dilation, bias=bias is not None)
        conv.weight.data = xp.ascontiguousarray(weight).astype(coeffs.dtype, copy=False)
        if bias is not None:
            conv.bias.data = bias
        return conv

    def padded(self, multiple: int) -> "BasisConv2d":
        """This layer (eval mode) with Q rounded up to a multiple of ``multiple``; same function.

        Zero basis filters and zero coefficient columns are appended, so the extra channels of
        the intermediate are zero and contribute nothing. The BatchNorm between the stages and
        the basis bias are folded into the coefficients first (:meth:`folded_coefficients`),
        so the result has neither: an inference form. It costs (Q' − Q)·(D + M) more
        multiplications per output position; what it buys is a channel count that runtimes
        with blocked-channel kernels keep on their fast path (onnxruntime's NCHWc convs need
        channel counts divisible by 8 on AVX2, 16 on AVX-512). Q' = Q returns a new layer too.
        """
        multiple = positive_int("multiple", multiple)
        coeffs, bias = self.folded_coefficients()
        basis = self.basis_filters()
        xp = backend.get_array_module(basis)
        q = self.num_basis
        extra = -q % multiple
        basis = xp.concatenate([basis, xp.zeros((extra,) + tuple(basis.shape[1:]), dtype=basis.dtype)])
        coeffs = xp.concatenate([coeffs, xp.zeros((coeffs.shape[0], extra), dtype=coeffs.dtype)], axis=1)
        layer = BasisConv2d(self.in_channels, self.out_channels, self.kernel_size, q + extra, stride=self.stride,
                            padding=self.padding, bias=bias is not None, basis=basis, coeffs=coeffs,
                            dilation=self.dilation)
        if bias is not None:
            layer.bias.data = bias
        layer.energy = self.energy
        return layer

    def folded_coefficients(self):
        """(coeffs (M, Q), bias (M,) or None) of the 1×1 stage with the basis bias and the BatchNorm folded in.

        With the BatchNorm's inference affine map g ↦ a·g + c (a = γ/√(var + ε),
        c = β − a·mean; a = 1, c = 0 without one), y = W·(a·(x ∗ e + basis_bias) + c) + bias
        = (W·diag(a))·(x ∗ e) + W·(a·basis_bias + c) + bias: the basis stage keeps its fixed
        filters and loses its bias, the 1×1 stage takes everything else (eval mode). The bias is
        None when the layer has no bias, no basis bias and no BatchNorm.
        """
        xp = backend.get_array_module(self.coeffs.data)
        coeffs = self.coeffs.data
        m, q = coeffs.shape
        if self.bn is None and self.basis_bias is None:
            return coeffs.copy(), None if self.bias is None else self.bias.data.copy()
        scale = xp.ones(q, dtype=coeffs.dtype)
        shift = self.basis_bias.data if self.basis_bias is not None else xp.zeros(q, dtype=coeffs.dtype)
        if self.bn is not None:
            scale, offset = self.bn.inference_affine()
            shift = backend.mul(scale, shift) + offset
        with parallel.single_threaded_blas():
            bias = backend.matmul(coeffs, shift)
        if self.bias is not None:
            bias = bias + self.bias.data
        scaled = backend.mul(coeffs, scale.reshape(1, q))  # W·diag(a)
        return scaled.astype(coeffs.dtype, copy=False), bias.astype(coeffs.dtype, copy=False)

    # -- the basis: fixed (the paper) or learnable ----------------------------
    def basis_filters(self):
        """The basis filters (Q, C, kh, kw) as an array, whether the basis is a buffer or a Parameter."""
        basis = self._parameters.get("basis")
        return self._buffers["basis"] if basis is None else basis.data

    @property
    def basis_is_learnable(self) -> bool:
        """True after ``learnable_basis(True)``: the basis is a Parameter."""
        return "basis" in self._parameters

    def learnable_basis(self, flag: bool = True) -> "BasisConv2d":
        """Make the basis a Parameter (``flag`` True) or the paper's fixed buffer (False); returns self.

        The values and the ``state_dict`` key (``basis``) stay as they are, so a model file saved
        either way loads into either. As a Parameter the basis is returned by ``parameters()``
        after the coefficients and biases, gets a gradient in ``backward`` (the basis stage's
        weight gradient: n·Q·D·Ho·Wo more multiplications per step) and is counted among the
        learnable values; forward costs exactly what it did. Beyond the paper, whose bases stay
        fixed: :func:`minibasis.training.fine_tune` uses it with ``learn_basis=True``.
        """
        if flag and not self.basis_is_learnable:
            self.basis = Parameter(self._buffers["basis"])   # replaces the buffer
        elif not flag and self.basis_is_learnable:
            array = self._parameters.pop("basis").data
            self.register_buffer("basis", array)
        return self

    # -- computation --------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) → (N, M, Ho, Wo): basis stage, optional BN, 1×1 coefficient stage."""
        # A fixed basis is a raw array, so conv2d sees a weight that needs no gradient and
        # computes none for it; a learnable one is a Parameter and gets its gradient.
        g = F.conv2d(x, self.basis, self.basis_bias, self.stride, self.padding, self.dilation)
        if self.bn is not None:
            g = self.bn(g)
        m, q = self.coeffs.shape
        return F.conv2d(g, self.coeffs.reshape(m, q, 1, 1), self.bias)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_basis={self.num_basis}, stride={self.stride}, padding={self.padding!r}, "
                + (f"dilation={self.dilation}, " if self.dilation != (1, 1) else "") +
                f"bias={self.bias is not None}, basis_bias={self.basis_bias is not None}, "
                f"bn={self.bn is not None}" + (", learnable_basis=True" if self.basis_is_learnable else ""))
        if self.energy is not None:
            text += f", energy={self.energy:.4f}"
        return text
