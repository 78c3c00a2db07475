"""Deployment: a trained (or compressed) model rewritten into an inference-only model of the same function.

``deployed = minibasis.deploy(model)`` returns a :class:`DeployedModel` that computes what
``model.eval()`` computes (to float32 rounding), faster:

1. Every BatchNorm that directly follows a conv (or a BasisConv) is folded into it, by
   :func:`minibasis.fuse_batch_norm` (the conv's filters and bias, or the BasisConv's
   coefficient stage, absorb the affine map); a BasisConv's own intermediate BatchNorm and
   basis bias fold into its coefficient stage (:meth:`BasisConv2d.folded_coefficients`).
   Their products are gone from the count.
2. Each conv is fused with what follows it — the ReLU, the residual add and the ReLU after
   it — into one chunked pass (:func:`minibasis.functions.fused.fused_conv2d`): the chunk's
   conv result gets its bias, residual and ReLU while it is still in cache, on the engine
   threads. A BasisConv's two stages run on the same chunk. The global pooling and the
   classifier run chunked on the engine threads too; max pools run through the engine's
   chunked op.

Which modules follow which is read from the model's structure by one explicit rewrite per
block or architecture of the zoo (below, :data:`REWRITES`):

* ``Sequential``: conv → [folded BN] → [ReLU] fused; Linear → [ReLU] fused; an unfolded
  BatchNorm → ReLU as the BN followed by an in-place ReLU; Identity and (eval-mode) Dropout
  dropped; pools and anything else kept.
* ResNet ``BasicBlock``: conv1 + ReLU; conv2 + shortcut + ReLU, the shortcut being the block's
  input (identity), its subsampled channels added at an offset (option A: the zero-padded
  copy is never built) or a fused 1×1 conv (option B).
* MobileNetV2 ``InvertedResidual``: expand + ReLU, depthwise + ReLU, project (+ shortcut).
* DenseNet ``DenseBottleneck``: BN → ReLU, conv1 + ReLU (its BN folded), conv2 written
  straight into its slice of the concatenation; ``DenseTransition``: BN → ReLU, conv, pool.
* The models ResNetCIFAR, VGG, AlexNet, Table3CNN, MobileNetV2, DenseNetBC: their stems,
  stages and heads, each in the order their ``forward`` runs them.

A module the rewrite does not know is kept as it is (BatchNorms folded) and runs through
its own forward without a graph: correct, not fused. ``deployed.report`` lists what was
fused and what was kept, and why.

No autograd graph: the deployed modules compute on raw arrays (:mod:`minibasis.nn.inference`),
hold their weights as buffers (no Parameters: an optimizer finds nothing), run kept modules
under ``no_grad``, and return an output whose ``backward()`` raises; ``train()`` raises too.
So nothing can ever read an activation except the step that follows it, which is what makes
the in-place epilogue (bias, residual, ReLU written into the conv's own fresh output) safe:
inputs and residual sources are only read. The source model is not changed (it is copied).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from minibasis import backend
from minibasis.autograd import Tensor, no_grad
from minibasis.compress import copy_module
from minibasis.fusion import fuse_batch_norm
from minibasis.models.densenet import DenseBottleneck, DenseNetBC, DenseTransition
from minibasis.models.mobilenet import InvertedResidual, MobileNetV2
from minibasis.models.resnet import BasicBlock, ResNetCIFAR, ZeroPadShortcut
from minibasis.models.table3 import Table3CNN
from minibasis.models.alexnet import AlexNet
from minibasis.models.vgg import VGG
from minibasis.nn import (BasisConv2d, BatchNorm2d, Conv2d, Dropout, Flatten, Identity, Linear, Module,
                          ReLU, Sequential)
from minibasis.nn import inference as inf

__all__ = ["deploy", "DeployedModel", "DeployReport", "InferenceError", "InferenceOutput", "REWRITES"]

InferenceError = inf.InferenceError
_CONVS = (Conv2d, BasisConv2d)


class InferenceOutput(Tensor):
    """The output of a deployed model: a Tensor without a graph whose ``backward()`` says why."""

    __slots__ = ()

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        raise InferenceError("this is the output of a deployed, inference-only model: it has no graph to "
                             "differentiate (compute gradients with the source model)")


@dataclass
class DeployReport:
    """What :func:`deploy` did, as (module path, description) pairs: ``fused`` convs with what they absorbed,
    ``kept_batch_norms`` (BatchNorms with no conv before them to fold into: run as they are, their ReLU in
    place), ``unfused`` (modules deploy does not know: run through their own forward, BatchNorms folded);
    and the number of BatchNorms folded."""

    fused: list = field(default_factory=list)
    kept_batch_norms: list = field(default_factory=list)
    unfused: list = field(default_factory=list)
    folded_batch_norms: int = 0

    def __str__(self) -> str:
        lines = [f"deployed: {len(self.fused)} fused convs, {self.folded_batch_norms} BatchNorms folded, "
                 f"{len(self.kept_batch_norms)} BatchNorms kept, {len(self.unfused)} modules run unfused"]
        lines += [f"  fused    {path}: {what}" for path, what in self.fused]
        lines += [f"  kept     {path}: {why}" for path, why in self.kept_batch_norms]
        lines += [f"  unfused  {path or '(the whole model)'}: {why}" for path, why in self.unfused]
        return "\n".join(lines)


class DeployedModel(inf.InferenceSequence):
    """An inference-only model (see the module docstring): x (Tensor or array) → :class:`InferenceOutput`.

    ``report``: a :class:`DeployReport`. Children keep the source model's names and paths.
    """

    def __init__(self, steps, report: DeployReport):
        super().__init__(steps)
        self.report = report

    def forward(self, x):
        data = x.data if isinstance(x, Tensor) else x
        if getattr(data, "ndim", 0) < 2:
            raise ValueError(f"a deployed model takes a batch (N, ...), got shape {tuple(getattr(data, 'shape', ()))}")
        with no_grad():
            out = super().forward(data)
        return InferenceOutput(out)


def _is_dropped(module: Module) -> bool:
    """Modules an eval-mode forward passes through unchanged (a folded BatchNorm is an Identity)."""
    return isinstance(module, (Identity, Dropout)) or (isinstance(module, Sequential) and len(module) == 0)


class _Rewriter:
    """Builds the deployed steps of one (BatchNorm-folded) model, recording what it did in ``report``."""

    def __init__(self, report: DeployReport):
        self.report = report

    @staticmethod
    def join(path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

    def fused_conv(self, layer, path: str, relu: bool, extra: str = "") -> inf.FusedConv2d:
        kind = "basisconv" if isinstance(layer, BasisConv2d) else "conv"
        self.report.fused.append((path, kind + extra + (" + ReLU" if relu else "")))
        return inf.FusedConv2d(layer, relu=relu)

    def keep(self, module: Module, path: str, reason: str) -> Module:
        kept = self.report.kept_batch_norms if isinstance(module, BatchNorm2d) else self.report.unfused
        kept.append((path, f"{type(module).__name__} {reason}"))
        module.requires_grad_(False)
        return module

    # -- generic containers ----------------------------------------------------
    def module(self, module: Module, path: str) -> Module:
        """The deployed step for ``module`` at ``path``."""
        rewrite = REWRITES.get(type(module))
        if rewrite is not None:
            return rewrite(self, module, path)
        if isinstance(module, _CONVS):
            return self.fused_conv(module, path, relu=False)
        if isinstance(module, Linear):
            return inf.InferenceLinear(module)
        if isinstance(module, ReLU):
            return inf.ReLUStep()
        if isinstance(module, Flatten) and module.start_dim == 1:
            return inf.Flatten()
        if _is_dropped(module):
            return inf.InferenceSequence([])
        if isinstance(module, BatchNorm2d):
            return self.keep(module, path, "does not directly follow a conv")
        if not module._modules and not module._parameters:
            return module  # a parameter-free op (a pool): runs through the engine's op without a graph
        return self.keep(module, path, "not known to deploy: runs unfused (BatchNorms folded)")

    def sequence(self, children, path: str) -> inf.InferenceSequence:
        """Steps for modules applied in order (name, module): conv/linear → ReLU and BN → ReLU fused."""
        children = [(name, m) for name, m in children if not _is_dropped(m)]
        steps, i = [], 0
        while i < len(children):
            name, module = children[i]
            relu_next = i + 1 < len(children) and isinstance(children[i + 1][1], ReLU)
            here = self.join(path, name)
            if isinstance(module, _CONVS):
                steps.append((name, self.fused_conv(module, here, relu=relu_next)))
            elif isinstance(module, Linear):
                steps.append((name, inf.InferenceLinear(module, relu=relu_next)))
            elif isinstance(module, BatchNorm2d) and relu_next:
                kept = self.keep(module, here, "does not follow a conv; its ReLU in place")
                steps.append((name, inf.ReLUAfter(kept)))
            else:
                steps.append((name, self.module(module, here)))
                relu_next = False
            i += 2 if relu_next else 1
        return inf.InferenceSequence(steps)

    @staticmethod
    def folded(block: Module, *names: str) -> bool:
        """Whether the BatchNorms ``names`` of ``block`` were folded (are Identities); else the block is kept."""
        return all(isinstance(block._modules.get(name), Identity) for name in names)


def _sequential(rw: _Rewriter, module: Sequential, path: str):
    return rw.sequence(list(module._modules.items()), path)


class _DeployedBasicBlock(inf.InferenceModule):
    """conv1 + ReLU, then conv2 + shortcut + ReLU (see the module docstring)."""

    def __init__(self, conv1, conv2, shortcut_name, shortcut, zero_pad):
        super().__init__()
        self.conv1, self.conv2 = conv1, conv2
        self.shortcut_name, self.zero_pad = shortcut_name, zero_pad  # zero_pad: (channel offset, stride)
        if shortcut is not None:
            setattr(self, shortcut_name, shortcut)

    def forward(self, x):
        out = self.conv1(x)
        if self.zero_pad is not None:
            residual = inf.Residual(x, *self.zero_pad)
        elif self.shortcut_name is None:
            residual = inf.Residual(x)
        else:
            residual = inf.Residual(getattr(self, self.shortcut_name)(x))
        return self.conv2(out, residual=residual)


def _basic_block(rw: _Rewriter, block: BasicBlock, path: str):
    shortcut = None if block.shortcut_name is None else getattr(block, block.shortcut_name)
    downsample_ok = not isinstance(shortcut, Sequential) or (
        len(shortcut) == 2 and isinstance(shortcut[0], _CONVS) and isinstance(shortcut[1], Identity))
    if not (rw.folded(block, "bn1", "bn2") and downsample_ok):
        return rw.keep(block, path, "has a BatchNorm that could not be folded (no running statistics): runs unfused")
    zero_pad, step = None, None
    if isinstance(shortcut, ZeroPadShortcut):
        zero_pad, what = (shortcut.pad_before, shortcut.stride), "option-A shortcut (subsampled, channel offset)"
    elif shortcut is not None:
        step = rw.fused_conv(shortcut[0], rw.join(path, f"{block.shortcut_name}.0"), relu=False)
        what = "1x1 conv shortcut"
    else:
        what = "identity shortcut"
    conv1 = rw.fused_conv(block.conv1, rw.join(path, "conv1"), relu=True)
    conv2 = rw.fused_conv(block.conv2, rw.join(path, "conv2"), relu=True, extra=f" + {what} add")
    if step is not None:
        step = inf.InferenceSequence([("0", step)])  # keeps the source path "<block>.downsample.0"
    return _DeployedBasicBlock(conv1, conv2, block.shortcut_name, step, zero_pad)


class _DeployedInvertedResidual(inf.InferenceModule):
    """expand + ReLU, depthwise + ReLU, project (+ the shortcut's output or the input)."""

    def __init__(self, conv1, conv2, conv3, shortcut, residual: bool):
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.residual = conv1, conv2, conv3, residual
        if shortcut is not None:
            self.shortcut = shortcut

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        if not self.residual:
            return self.conv3(out)
        shortcut = self._modules.get("shortcut")
        return self.conv3(out, residual=inf.Residual(x if shortcut is None else shortcut(x)))


def _inverted_residual(rw: _Rewriter, block: InvertedResidual, path: str):
    shortcut = block.shortcut
    conv_shortcut = len(shortcut) > 0
    if not rw.folded(block, "bn1", "bn2", "bn3") or (
            conv_shortcut and not (len(shortcut) == 2 and isinstance(shortcut[1], Identity))):
        return rw.keep(block, path, "has a BatchNorm that could not be folded (no running statistics): runs unfused")
    residual = block.stride == 1
    conv1 = rw.fused_conv(block.conv1, rw.join(path, "conv1"), relu=True)
    conv2 = rw.fused_conv(block.conv2, rw.join(path, "conv2"), relu=True)
    conv3 = rw.fused_conv(block.conv3, rw.join(path, "conv3"), relu=False,
                          extra=" + shortcut add" if residual else "")
    step = None
    if residual and conv_shortcut:
        step = inf.InferenceSequence([("0", rw.fused_conv(shortcut[0], rw.join(path, "shortcut.0"), relu=False))])
    return _DeployedInvertedResidual(conv1, conv2, conv3, step, residual)


class _DeployedDenseBottleneck(inf.InferenceModule):
    """BN → ReLU, conv1 + ReLU, conv2 into the new channels of the concatenation buffer."""

    def __init__(self, bn1, conv1, conv2):
        super().__init__()
        self.bn1, self.conv1, self.conv2 = bn1, conv1, conv2

    def forward(self, x):
        inner = self.conv1(self.bn1(x))
        n, c, h, w = x.shape
        out = backend.get_array_module(x).empty((n, c + self.conv2.out_channels, h, w), dtype=x.dtype)
        out[:, :c] = x
        self.conv2(inner, out=out[:, c:])
        return out


def _pre_activation(rw: _Rewriter, norm: Module, path: str) -> Module:
    """BN → ReLU of a pre-activation block: the BN kept (nothing before it to fold into), the ReLU in place."""
    if isinstance(norm, Identity):
        return inf.ReLUStep()
    return inf.ReLUAfter(rw.keep(norm, path, "reads a concatenation, not a conv; its ReLU in place"))


def _dense_bottleneck(rw: _Rewriter, block: DenseBottleneck, path: str):
    if not rw.folded(block, "bn2"):
        return rw.keep(block, path, "has a BatchNorm that could not be folded (no running statistics): runs unfused")
    bn1 = _pre_activation(rw, block.bn1, rw.join(path, "bn1"))
    conv1 = rw.fused_conv(block.conv1, rw.join(path, "conv1"), relu=True)
    conv2 = rw.fused_conv(block.conv2, rw.join(path, "conv2"), relu=False, extra=", written into the concatenation")
    return _DeployedDenseBottleneck(bn1, conv1, conv2)


def _dense_transition(rw: _Rewriter, block: DenseTransition, path: str):
    return inf.InferenceSequence([("bn1", _pre_activation(rw, block.bn1, rw.join(path, "bn1"))),
                                  ("conv1", rw.fused_conv(block.conv1, rw.join(path, "conv1"), relu=False)),
                                  ("pool", inf.AvgPool(2))])


# -- whole models: the steps of their forward, in order ------------------------------------
def _resnet(rw: _Rewriter, model: ResNetCIFAR, path: str):
    if not rw.folded(model, "bn1"):
        return rw.keep(model, path, "has a stem BatchNorm that could not be folded (no running statistics): "
                                    "runs unfused")
    return [("conv1", rw.fused_conv(model.conv1, "conv1", relu=True)),
            *[(f"layer{i}", rw.module(getattr(model, f"layer{i}"), f"layer{i}")) for i in (1, 2, 3)],
            ("pool", inf.GlobalAvgPool()), (model.head_name, inf.InferenceLinear(model.head))]


def _features_classifier(rw: _Rewriter, model: Module, path: str):
    """VGG, AlexNet, Table3CNN: ``classifier(flatten(features(x)))``."""
    return [("features", rw.module(model.features, "features")), ("flatten", inf.Flatten()),
            ("classifier", rw.module(model.classifier, "classifier"))]


def _mobilenet(rw: _Rewriter, model: MobileNetV2, path: str):
    if not rw.folded(model, "bn1", "bn2"):
        return rw.keep(model, path, "has a BatchNorm that could not be folded (no running statistics): runs unfused")
    return [("conv1", rw.fused_conv(model.conv1, "conv1", relu=True)), ("layers", rw.module(model.layers, "layers")),
            ("conv2", rw.fused_conv(model.conv2, "conv2", relu=True)), ("pool", inf.AvgPool(4)),
            ("flatten", inf.Flatten()), ("linear", inf.InferenceLinear(model.linear))]


def _densenet(rw: _Rewriter, model: DenseNetBC, path: str):
    steps = [("conv1", rw.fused_conv(model.conv1, "conv1", relu=False))]
    for name in ("dense1", "trans1", "dense2", "trans2", "dense3"):
        steps.append((name, rw.module(getattr(model, name), name)))
    return steps + [("bn", _pre_activation(rw, model.bn, "bn")), ("pool", inf.GlobalAvgPool()),
                    ("fc", inf.InferenceLinear(model.fc))]


#: Module type → rewrite(rewriter, module, path): a deployed step, or (whole models) a list of (name, step).
REWRITES = {
    Sequential: _sequential,
    BasicBlock: _basic_block,
    InvertedResidual: _inverted_residual,
    DenseBottleneck: _dense_bottleneck,
    DenseTransition: _dense_transition,
    ResNetCIFAR: _resnet,
    VGG: _features_classifier,
    AlexNet: _features_classifier,
    Table3CNN: _features_classifier,
    MobileNetV2: _mobilenet,
    DenseNetBC: _densenet,
}


def _batch_norms(model: Module) -> int:
    return sum(isinstance(m, BatchNorm2d) for m in model.modules())


def deploy(model: Module, input_shape=(1, 3, 32, 32)) -> DeployedModel:
    """An inference-only model computing what ``model.eval()`` computes (see the module docstring).

    Args:
        model: any minibasis Module (its zoo architectures are fused, others kept as they are);
            it is copied and not changed, its mode included.
        input_shape: (N, C, H, W) of the one traced forward pass that finds which BatchNorm
            follows which conv (:func:`minibasis.fuse_batch_norm`); the CIFAR shape by default.

    Returns a :class:`DeployedModel`; ``.report`` says what was fused and what runs unfused.
    """
    if not isinstance(model, Module):
        raise TypeError(f"deploy needs a minibasis.nn.Module, got {type(model).__name__}")
    if isinstance(model, inf.InferenceModule):
        raise ValueError("deploy: the model is deployed already")
    source = copy_module(model)
    folded = fuse_batch_norm(source.eval(), input_shape, inplace=True)
    report = DeployReport(folded_batch_norms=_batch_norms(model) - _batch_norms(folded))
    rewriter = _Rewriter(report)
    if type(folded) in REWRITES:
        steps = rewriter.module(folded, "")
        if isinstance(steps, inf.InferenceSequence):  # a Sequential model: its steps, under their own names
            steps = list(steps._modules.items())
    else:
        steps = None
    if not isinstance(steps, list):  # not a model deploy knows: kept whole (its layer paths gain "model.")
        steps = [("model", steps if steps is not None else rewriter.keep(
            folded, "", "not known to deploy: runs unfused (BatchNorms folded)"))]
    return DeployedModel(steps, report).eval()
