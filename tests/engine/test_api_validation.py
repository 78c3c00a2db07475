"""Wrong input anywhere in the public API gets a clear, early exception.

One table walks the public names of DESIGN.md (tensor and Tensor ops, functions, nn
layers and their forwards, BasisConv2d and its constructors, basis, formulas, compress,
models, data, io, optim, backend) with wrong ranks, channel counts, dtypes, sizes,
thresholds, strings where numbers belong and None. Every row says which exception must
come out (ValueError/TypeError, or the documented FileNotFoundError / KeyError /
CheckpointError) and fragments its message must contain, typically the expected and the
actual value. Never an IndexError, AttributeError, ZeroDivisionError or a NumPy
broadcasting message from deep inside.

``tests/engine/test_bad_input.py`` covers the engine's functional layer in depth; this table
is about breadth. Adding a case is one line: ``case(id, callable, args, error, *fragments)``.
"""
from __future__ import annotations

import numpy as np
import pytest

import minibasis as mb
from minibasis import basis as B
from minibasis import data, formulas, io, models, nn, optim
from minibasis import functions as F
from minibasis.data import transforms as T
from minibasis.nn import BasisConv2d


def f32(*shape):
    return mb.tensor(np.ones(shape, np.float32))


def f64(*shape):
    return mb.tensor(np.ones(shape, np.float64))


def weights(*shape, dtype=np.float64):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def linear():
    return nn.Linear(3, 2)


def sgd(**kwargs):
    return optim.SGD(linear().parameters(), **{"lr": 0.1, **kwargs})


def conv():
    return nn.Conv2d(3, 8, 3)


def images(n=4, c=3, size=8, dtype=np.uint8):
    return np.zeros((n, c, size, size), dtype)


def labels(n=4, dtype=np.int64):
    return np.zeros(n, dtype)


def path_in(tmp, name):
    """A callable's argument that needs the test's temporary folder: resolved at call time."""
    return lambda: tmp / name


def case(id, fn, args, error, *fragments, **kwargs):
    return pytest.param(fn, args, kwargs, error, fragments, id=id)


DIRECTORY_MISSING, DIRECTORY_EMPTY, TEXT_FILE = object(), object(), object()

CASES = [
    # -- tensor() and the Tensor's own operators ------------------------------------------------
    case("tensor from str", mb.tensor, ("abc",), TypeError, "numeric", "str"),
    case("tensor from None", mb.tensor, (None,), TypeError, "numeric", "NoneType"),
    case("tensor from object array", mb.tensor, (np.array([object()]),), TypeError, "numeric", "object"),
    case("tensor unknown dtype", mb.tensor, ([1.0],), TypeError, "notadtype", dtype="notadtype"),
    case("Tensor + non-broadcastable", lambda a, b: a + b, (f32(2, 3), f32(4, 5)), ValueError,
         "broadcast", "(2, 3)", "(4, 5)"),
    case("Tensor * non-broadcastable", lambda a, b: a * b, (f32(2, 3), f32(3, 2)), ValueError, "(2, 3)", "(3, 2)"),
    case("Tensor - non-broadcastable", lambda a, b: a - b, (f32(2, 3), f32(2, 4)), ValueError, "(2, 3)", "(2, 4)"),
    case("Tensor / non-broadcastable", lambda a, b: a / b, (f32(2, 3), f32(4)), ValueError, "(2, 3)", "(4,)"),
    case("array + Tensor non-broadcastable", lambda a, b: a + b, (np.ones((3, 1, 2), np.float32), f32(4, 3)),
         ValueError, "(3, 1, 2)", "(4, 3)"),
    case("Tensor + None", lambda a, b: a + b, (f32(2), None), TypeError, "NoneType"),
    case("Tensor * str", lambda a, b: a * b, (f32(2), "a"), TypeError, "str"),
    case("Tensor ** str", lambda a, b: a ** b, (f32(2), "a"), TypeError, "scalar", "str"),
    case("Tensor @ vectors", lambda a, b: a @ b, (f32(3), f32(3)), ValueError, "at least 2 dims", "(3,)"),
    case("sum axis out of range", lambda t: t.sum(axis=2), (f32(2, 3),), ValueError, "axis 2", "(2, 3)"),
    case("mean negative axis out of range", lambda t: t.mean(axis=-3), (f32(2, 3),), ValueError, "axis -3", "(2, 3)"),
    case("sum axis str", lambda t: t.sum(axis="a"), (f32(2, 3),), TypeError, "axis", "'a'"),
    case("reshape wrong size", lambda t: t.reshape(4, 2), (f32(2, 3),), ValueError, "size 6", "(4,2)"),
    case("transpose axis out of range", lambda t: t.transpose(0, 2), (f32(2, 3),), ValueError, "(0, 2)", "(2, 3)"),
    case("transpose repeated axis", lambda t: t.transpose(0, 0, 1), (f32(2, 3, 4),), ValueError,
         "(0, 0, 1)", "(2, 3, 4)"),
    # -- functions -----------------------------------------------------------------------------
    case("relu of str", F.relu, ("a",), TypeError, "numeric", "str"),
    case("relu of None", F.relu, (None,), TypeError, "NoneType"),
    case("linear of None", F.linear, (None, f32(4, 3)), TypeError, "NoneType"),
    case("conv2d float stride", F.conv2d, (f32(1, 3, 8, 8), f32(4, 3, 3, 3)), TypeError, "stride", "1.5", stride=1.5),
    case("conv2d str padding", F.conv2d, (f32(1, 3, 8, 8), f32(4, 3, 3, 3)), TypeError, "padding", "'full'",
         padding="full"),
    case("conv2d None input", F.conv2d, (None, f32(4, 3, 3, 3)), ValueError, "(N, C, H, W)"),
    case("max_pool2d float kernel", F.max_pool2d, (f32(1, 1, 4, 4), 2.5), TypeError, "kernel_size", "2.5"),
    case("avg_pool2d str stride", F.avg_pool2d, (f32(1, 1, 4, 4), 2), TypeError, "stride", "'2'", stride="2"),
    case("adaptive_avg_pool2d None size", F.adaptive_avg_pool2d, (f32(1, 1, 4, 4), None), TypeError,
         "output_size", "None"),
    case("batch_norm negative eps", F.batch_norm, (f32(4, 3), None, None, f32(3), f32(3), True), ValueError,
         "eps", "-1.0", eps=-1.0),
    case("batch_norm str momentum", F.batch_norm, (f32(4, 3), None, None, f32(3), f32(3), True), TypeError,
         "momentum", "'a'", momentum="a"),
    case("batch_norm momentum above 1", F.batch_norm, (f32(4, 3), None, None, f32(3), f32(3), True), ValueError,
         "momentum", "[0, 1]", "1.5", momentum=1.5),
    case("dropout str p", F.dropout, (f32(2, 2), "a"), TypeError, "[0, 1)", "'a'"),
    case("dropout None p", F.dropout, (f32(2, 2), None), TypeError, "[0, 1)", "None"),
    case("flatten start_dim out of range", F.flatten, (f32(2, 3), 5), ValueError, "start_dim", "5", "(2, 3)"),
    case("flatten str start_dim", F.flatten, (f32(2, 3), "a"), TypeError, "start_dim", "'a'"),
    case("concat axis out of range", F.concat, ([f32(1, 2), f32(1, 2)],), ValueError, "axis 3", "(1, 2)", axis=3),
    case("concat of one Tensor", F.concat, (f32(1, 2),), TypeError, "list or tuple", "Tensor"),
    case("concat with a str", F.concat, ([f32(1, 2), "a"],), TypeError, "str"),
    case("pad str widths", F.pad, (f32(2, 2), "a"), ValueError, "(before, after)", "'a'"),
    case("pad None width", F.pad, (f32(2, 2), [(1, 1), (1, None)]), ValueError, "(before, after)", "None"),
    case("cross_entropy None labels", F.cross_entropy, (f32(3, 4), None), TypeError, "integers", "object"),
    # -- nn layers: constructors and forwards ------------------------------------------------------
    case("Conv2d bool channels", nn.Conv2d, (True, 4, 3), ValueError, "in_channels", "True"),
    case("Conv2d None kernel", nn.Conv2d, (3, 4, None), ValueError, "kernel_size", "None"),
    case("Conv2d float kernel", nn.Conv2d, (3, 4, 2.5), ValueError, "kernel_size", "2.5"),
    case("Conv2d negative out_channels", nn.Conv2d, (3, -4, 3), ValueError, "out_channels", "-4"),
    case("Conv2d zero stride in pair", nn.Conv2d, (3, 4, 3), ValueError, "stride", "(1, 0)", stride=(1, 0)),
    case("Conv2d negative padding", nn.Conv2d, (3, 4, 3), ValueError, "padding", "-1", padding=-1),
    case("Conv2d str padding", nn.Conv2d, (3, 4, 3), ValueError, "padding", "'full'", padding="full"),
    case("Conv2d input too small", lambda x: nn.Conv2d(3, 4, 3)(x), (f32(1, 3, 2, 2),), ValueError,
         "kernel (3, 3)", "(2, 2)"),
    case("Conv2d wrong channels", lambda x: nn.Conv2d(3, 4, 3)(x), (f32(1, 4, 8, 8),), ValueError,
         "4 channels", "expects 3"),
    case("Linear float features", nn.Linear, (3, 2.0), ValueError, "out_features", "2.0"),
    case("Linear None features", nn.Linear, (None, 2), ValueError, "in_features", "None"),
    case("Linear vector input", lambda x: linear()(x), (f32(3),), ValueError, "(N, in_features)", "(3,)"),
    case("BatchNorm2d negative features", nn.BatchNorm2d, (-1,), ValueError, "num_features", "-1"),
    case("BatchNorm2d zero eps", nn.BatchNorm2d, (3,), ValueError, "eps", "0", eps=0),
    case("BatchNorm2d momentum 2", nn.BatchNorm2d, (3,), ValueError, "momentum", "2.0", momentum=2.0),
    case("BatchNorm1d str momentum", nn.BatchNorm1d, (3,), TypeError, "momentum", "'a'", momentum="a"),
    case("BatchNorm2d wrong channels", lambda x: nn.BatchNorm2d(3)(x), (f32(2, 4, 2, 2),), ValueError,
         "3 channels", "(2, 4, 2, 2)"),
    case("BatchNorm1d wrong features", lambda x: nn.BatchNorm1d(3).eval()(x), (f32(2, 4),), ValueError,
         "3 channels", "(2, 4)"),
    case("MaxPool2d zero kernel", nn.MaxPool2d, (0,), ValueError, "kernel_size", "0"),
    case("MaxPool2d str kernel", nn.MaxPool2d, ("2",), ValueError, "kernel_size", "'2'"),
    case("MaxPool2d negative stride", nn.MaxPool2d, (2,), ValueError, "stride", "-1", stride=-1),
    case("AvgPool2d negative padding", nn.AvgPool2d, (2,), ValueError, "padding", "-1", padding=-1),
    case("AvgPool2d padding above half kernel", nn.AvgPool2d, (3,), ValueError, "padding (2, 2)", "kernel (3, 3)",
         padding=2),
    case("AdaptiveAvgPool2d non-global", nn.AdaptiveAvgPool2d, (2,), ValueError, "output_size=1", "2"),
    case("Dropout str p", nn.Dropout, ("a",), TypeError, "[0, 1)", "'a'"),
    case("Dropout None p", nn.Dropout, (None,), TypeError, "[0, 1)", "None"),
    case("Flatten str start_dim", nn.Flatten, ("a",), TypeError, "start_dim", "'a'"),
    case("Flatten start_dim beyond input", lambda x: nn.Flatten(2)(x), (f32(2, 3),), ValueError,
         "start_dim", "(2, 3)"),
    case("Sequential of an int", nn.Sequential, (nn.ReLU(), 3), TypeError, "Modules", "int"),
    case("ReLU layer of str", lambda x: nn.ReLU()(x), ("a",), TypeError, "numeric", "str"),
    case("Parameter from str", nn.Parameter, ("abc",), TypeError, "floating", "str"),
    case("load_state_dict list", lambda s: linear().load_state_dict(s), ([1, 2],), TypeError, "dict", "list"),
    case("load_state_dict None", lambda s: linear().load_state_dict(s), (None,), TypeError, "dict", "NoneType"),
    case("load_state_dict missing key", lambda s: linear().load_state_dict(s),
         ({"weight": np.zeros((2, 3), np.float32)},), KeyError, "missing keys", "'bias'"),
    case("load_state_dict unexpected key", lambda s: linear().load_state_dict(s),
         ({"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32), "foo": np.zeros(1)},),
         KeyError, "unexpected keys", "'foo'"),
    case("load_state_dict wrong shape", lambda s: linear().load_state_dict(s),
         ({"weight": np.zeros((3, 2), np.float32), "bias": np.zeros(2, np.float32)},), ValueError,
         "'weight'", "(3, 2)", "(2, 3)"),
    case("load_state_dict str value", lambda s: linear().load_state_dict(s),
         ({"weight": "abc", "bias": np.zeros(2, np.float32)},), ValueError, "'weight'", "(2, 3)"),
    case("Module.train str", lambda m: linear().train(m), ("yes",), TypeError, "bool", "'yes'"),
    case("Module.requires_grad_ None", lambda f: linear().requires_grad_(f), (None,), TypeError, "bool", "None"),
    case("register_buffer int name", lambda n: linear().register_buffer(n, np.zeros(1)), (3,), TypeError,
         "str", "int"),
    case("register_buffer dotted name", lambda n: linear().register_buffer(n, np.zeros(1)), ("a.b",), ValueError,
         "'a.b'", "."),
    case("Module.to unknown device", lambda d: linear().to(d), ("tpu",), ValueError, "'tpu'", "numpy"),
    # -- BasisConv2d -----------------------------------------------------------------------------
    case("BasisConv2d zero num_basis", BasisConv2d, (3, 8, 3, 0), ValueError, "num_basis", "0"),
    case("BasisConv2d num_basis above D", BasisConv2d, (1, 8, 3, 10), ValueError, "num_basis (10)", "9"),
    case("BasisConv2d basis shape", BasisConv2d, (3, 8, 3, 4), ValueError, "(4, 3, 3, 3)", "(4, 2, 3, 3)",
         basis=np.zeros((4, 2, 3, 3), np.float32)),
    case("BasisConv2d integer basis", BasisConv2d, (3, 8, 3, 4), TypeError, "floating", "int64",
         basis=np.zeros((4, 3, 3, 3), np.int64)),
    case("BasisConv2d integer dtype", BasisConv2d, (3, 8, 3, 4), TypeError, "floating", "int32", dtype=np.int32),
    case("BasisConv2d negative padding", BasisConv2d, (3, 8, 3, 4), ValueError, "padding", "-1", padding=-1),
    case("BasisConv2d coeffs shape", BasisConv2d, (3, 8, 3, 4), ValueError, "(8, 4)", "(8, 5)",
         coeffs=np.zeros((8, 5), np.float32)),
    case("BasisConv2d wrong channels", lambda x: BasisConv2d(3, 8, 3, 4)(x), (f32(1, 5, 8, 8),), ValueError,
         "5 channels", "expects 3"),
    case("BasisConv2d float64 input", lambda x: BasisConv2d(3, 8, 3, 4)(x), (f64(1, 3, 8, 8),), TypeError,
         "float64", "float32"),
    case("from_conv both settings", lambda: BasisConv2d.from_conv(conv(), energy_threshold=0.9, num_basis=3), (),
         ValueError, "exactly one", "0.9", "3"),
    case("from_conv no setting", lambda: BasisConv2d.from_conv(conv()), (), ValueError, "exactly one", "None"),
    case("from_conv threshold 0", lambda t: BasisConv2d.from_conv(conv(), energy_threshold=t), (0.0,), ValueError,
         "(0, 1]", "0.0"),
    case("from_conv threshold 1.5", lambda t: BasisConv2d.from_conv(conv(), energy_threshold=t), (1.5,), ValueError,
         "(0, 1]", "1.5"),
    case("from_conv threshold str", lambda t: BasisConv2d.from_conv(conv(), energy_threshold=t), ("0.9",),
         ValueError, "(0, 1]", "'0.9'"),
    case("from_conv threshold NaN", lambda t: BasisConv2d.from_conv(conv(), energy_threshold=t), (float("nan"),),
         ValueError, "(0, 1]", "nan"),
    case("from_conv num_basis above min(D, M)", lambda q: BasisConv2d.from_conv(conv(), num_basis=q), (100,),
         ValueError, "[1, 8]", "100"),
    case("from_conv of a Linear", BasisConv2d.from_conv, (nn.Linear(3, 2),), TypeError, "Conv2d", "Linear",
         num_basis=1),
    case("BasisConv2d.random str seed", BasisConv2d.random, (3, 4, 3, 4), TypeError, "seed", "'abc'", seed="abc"),
    case("BasisConv2d.random negative seed", BasisConv2d.random, (3, 4, 3, 4), ValueError, "seed", "-1", seed=-1),
    case("BasisConv2d.random zero out_channels", BasisConv2d.random, (3, 0, 3, 4), ValueError, "out_channels", "0"),
    # -- basis --------------------------------------------------------------------------------------
    case("eigen_basis 2-D weight", B.eigen_basis, (weights(4, 27),), ValueError, "4-D", "(4, 27)", num_basis=2),
    case("eigen_basis integer weight", B.eigen_basis, (np.ones((4, 3, 3, 3), np.int64),), ValueError,
         "floating", "int64", num_basis=2),
    case("eigen_basis None weight", B.eigen_basis, (None,), ValueError, "floating", "object", num_basis=2),
    case("eigen_basis NaN weight", B.eigen_basis, (np.full((4, 3, 3, 3), np.nan),), ValueError, "NaN", num_basis=2),
    case("eigen_basis zero weight", B.eigen_basis, (np.zeros((4, 3, 3, 3)),), ValueError, "all zeros",
         "(4, 3, 3, 3)", energy_threshold=0.9),
    case("eigen_basis empty weight", B.eigen_basis, (np.ones((0, 3, 3, 3)),), ValueError, "empty", "(0, 3, 3, 3)",
         num_basis=1),
    case("eigen_basis threshold 0", B.eigen_basis, (weights(4, 3, 3, 3),), ValueError, "(0, 1]", "0",
         energy_threshold=0),
    case("eigen_basis threshold 1.01", B.eigen_basis, (weights(4, 3, 3, 3),), ValueError, "(0, 1]", "1.01",
         energy_threshold=1.01),
    case("eigen_basis threshold bool", B.eigen_basis, (weights(4, 3, 3, 3),), ValueError, "(0, 1]", "True",
         energy_threshold=True),
    case("eigen_basis num_basis above min(D, M)", B.eigen_basis, (weights(4, 3, 3, 3),), ValueError, "[1, 4]", "5",
         num_basis=5),
    case("random_orthonormal_basis zero dim", B.random_orthonormal_basis, (0, 1), ValueError, "dim", "0"),
    case("random_orthonormal_basis Q above dim", B.random_orthonormal_basis, (3, 4), ValueError, "(4)", "(3)"),
    case("random_orthonormal_basis str dim", B.random_orthonormal_basis, ("9", 4), ValueError, "dim", "'9'"),
    case("random_orthonormal_basis str seed", B.random_orthonormal_basis, (9, 4), TypeError, "seed", "'x'",
         seed="x"),
    case("random_orthonormal_basis float seed", B.random_orthonormal_basis, (9, 4), TypeError, "seed", "1.5",
         seed=1.5),
    # -- formulas -----------------------------------------------------------------------------------
    case("conv_mults zero M", formulas.conv_mults, (0, 3, 3, 8, 8), ValueError, "out_channels", "0"),
    case("conv_mults str M", formulas.conv_mults, ("4", 3, 3, 8, 8), ValueError, "out_channels", "'4'"),
    case("conv_mults None C", formulas.conv_mults, (4, None, 3, 8, 8), ValueError, "in_channels", "None"),
    case("conv_mults kernel triple", formulas.conv_mults, (4, 3, (3, 3, 3), 8, 8), ValueError,
         "(kh, kw)", "(3, 3, 3)"),
    case("basisconv_mults negative Q", formulas.basisconv_mults, (4, -1, 3, 3, 8, 8), ValueError, "num_basis", "-1"),
    case("mult_ratio bool M", formulas.mult_ratio, (True, 1, 3, 3), ValueError, "out_channels", "True"),
    case("learnable_params basis_bias without Q", formulas.learnable_params, (4, 3, 3), ValueError,
         "basis_bias", "num_basis", basis_bias=True),
    case("learnable_reduction zero Q", formulas.learnable_reduction, (3, 3, 0), ValueError, "num_basis", "0"),
    case("conv_output_size kernel above input", formulas.conv_output_size, (3, 5), ValueError, "5", "3"),
    # -- compress -----------------------------------------------------------------------------------
    case("compress threshold 0", lambda t: mb.compress(models.table3_cnn(), energy_threshold=t), (0.0,), ValueError,
         "(0, 1]", "0.0"),
    case("compress threshold 2", lambda t: mb.compress(models.table3_cnn(), energy_threshold=t), (2,), ValueError,
         "(0, 1]", "2"),
    case("compress no setting", lambda: mb.compress(models.table3_cnn()), (), ValueError, "exactly one", "None"),
    case("compress a str", mb.compress, ("model",), TypeError, "Module", "str", energy_threshold=0.9),
    case("compress unknown layer", lambda: mb.compress(models.table3_cnn(), 0.9, layers=["nope"]), (), ValueError,
         "'nope'", "features.0"),
    case("compress layers as str", lambda: mb.compress(models.table3_cnn(), 0.9, layers="features.0"), (),
         TypeError, "list", "'features.0'"),
    case("compress 3-D input shape", lambda: mb.compress(models.table3_cnn(), 0.9, input_shape=(3, 32, 32)), (),
         ValueError, "(N, 3, 32, 32)", "(3, 32, 32)"),
    # -- models -------------------------------------------------------------------------------------
    case("table3_cnn zero classes", models.table3_cnn, (), ValueError, "0", num_classes=0),
    case("alexnet str classes", models.alexnet, ("10",), ValueError, "'10'"),
    case("vgg16 None classes", models.vgg16, (None,), ValueError, "None"),
    case("resnet_cifar depth 21", models.resnet_cifar, (21,), ValueError, "6n+2", "21"),
    case("resnet_cifar str depth", models.resnet_cifar, ("20",), ValueError, "6n+2", "'20'"),
    case("resnet_cifar shortcut C", models.resnet_cifar, (20,), ValueError, "('A', 'B')", "'C'", shortcut="C"),
    case("densenet_bc zero growth", models.densenet_bc, (), ValueError, "growth_rate", "0", depth=100, growth_rate=0),
    case("get_model unknown name", models.get_model, ("resnet99",), ValueError, "'resnet99'", "resnet20"),
    case("table3_cnn grey input", lambda x: models.table3_cnn()(x), (f32(1, 1, 32, 32),), ValueError,
         "(N, 3, 32, 32)", "(1, 1, 32, 32)"),
    case("resnet20 unbatched input", lambda x: models.resnet_cifar(20)(x), (f32(3, 32, 32),), ValueError,
         "(N, 3, H, W)", "(3, 32, 32)"),
    # -- data ---------------------------------------------------------------------------------------
    case("DataLoader zero batch", data.DataLoader, ((images(), labels()), 0), ValueError, "batch_size", "0"),
    case("DataLoader str batch", data.DataLoader, ((images(), labels()), "4"), TypeError, "batch_size", "'4'"),
    case("DataLoader None dataset", data.DataLoader, (None, 4), TypeError, "(images, labels)", "NoneType"),
    case("DataLoader negative seed", data.DataLoader, ((images(), labels()), 2), ValueError, "seed", "-1", seed=-1),
    case("DataLoader count mismatch", data.DataLoader, ((images(), labels(3)), 2), ValueError, "4 images", "3 labels"),
    case("DataLoader float labels", data.DataLoader, ((images(), labels(dtype=np.float32)), 2), ValueError,
         "integer labels", "float32"),
    case("DataLoader list images", data.DataLoader, ((images().tolist(), labels()), 2), TypeError,
         "numpy arrays", "list"),
    case("DataLoader transform not callable", data.DataLoader, ((images(), labels()), 2), TypeError,
         "callable", "int", transform=3),
    case("Normalize zero std", T.Normalize, ((0.5, 0.5, 0.5), (0.0, 1.0, 1.0)), ValueError, "std", "> 0", "0.0"),
    case("Normalize str mean", T.Normalize, ("a", 1.0), TypeError, "mean", "'a'"),
    case("Normalize length mismatch", T.Normalize, ((0.5, 0.5), (1, 1, 1)), ValueError, "2", "3"),
    case("Normalize channel mismatch", lambda x: T.Normalize((0.5,) * 3, (1,) * 3)(x, None),
         (images(c=4, dtype=np.float32),), ValueError, "3 values", "4 channels"),
    case("RandomCrop negative padding", T.RandomCrop, (32, -1), ValueError, "padding", "-1"),
    case("RandomCrop str size", T.RandomCrop, ("32",), ValueError, "size", "'32'"),
    case("RandomCrop larger than image", lambda x: T.RandomCrop(40, 0)(x, np.random.default_rng(0)), (images(),),
         ValueError, "(40, 40)", "8x8"),
    case("RandomCrop without rng", lambda x: T.RandomCrop(8, 1)(x, None), (images(),), TypeError,
         "Generator", "NoneType"),
    case("RandomHorizontalFlip p 2", T.RandomHorizontalFlip, (2.0,), ValueError, "[0, 1]", "2.0"),
    case("RandomHorizontalFlip str p", T.RandomHorizontalFlip, ("a",), TypeError, "p", "'a'"),
    case("ToFloat int16 images", lambda x: T.ToFloat()(x, None), (images(dtype=np.int16),), ValueError,
         "uint8 or floating", "int16"),
    case("Compose of one transform", T.Compose, (T.ToFloat(),), TypeError, "sequence", "ToFloat"),
    case("Compose with an int", T.Compose, ([T.ToFloat(), 3],), TypeError, "callable", "int"),
    case("load_cifar10 missing folder", data.load_cifar10, (DIRECTORY_MISSING,), FileNotFoundError,
         "CIFAR-10 not found", "data_batch_1"),
    case("load_cifar10 empty folder", data.load_cifar10, (DIRECTORY_EMPTY,), FileNotFoundError,
         "cifar-10-batches-py", "data_batch_1"),
    case("load_cifar10 a file", data.load_cifar10, (TEXT_FILE,), FileNotFoundError, "notes.txt"),
    case("load_cifar10 None", data.load_cifar10, (None,), TypeError, "NoneType"),
    case("load_cifar100 empty folder", data.load_cifar100, (DIRECTORY_EMPTY,), FileNotFoundError,
         "cifar-100-python", "train"),
    case("load_svhn empty folder", data.load_svhn, (DIRECTORY_EMPTY,), FileNotFoundError, "train_32x32.mat"),
    case("synthetic negative count", data.synthetic, (), ValueError, "num_train", "-1", num_train=-1),
    # -- io -----------------------------------------------------------------------------------------
    case("load missing file", io.load, (DIRECTORY_MISSING,), FileNotFoundError, "missing"),
    case("load a folder", io.load, (DIRECTORY_EMPTY,), IsADirectoryError, "empty"),
    case("load a text file", io.load, (TEXT_FILE,), io.CheckpointError, "notes.txt", "zip"),
    case("load None", io.load, (None,), TypeError, "NoneType"),
    case("save a str", io.save, ("abc", DIRECTORY_EMPTY), TypeError, "state_dict()", "str"),
    case("save an object", io.save, ({"a": object()}, DIRECTORY_MISSING), TypeError, "object", "a"),
    case("load_torch_checkpoint text file", io.load_torch_checkpoint, (TEXT_FILE,), io.CheckpointError,
         "notes.txt", "not a PyTorch checkpoint"),
    case("load_torch_checkpoint missing", io.load_torch_checkpoint, (DIRECTORY_MISSING,), FileNotFoundError,
         "missing"),
    case("atomic_write append mode", lambda p: io.atomic_write(p, "a").__enter__(), (DIRECTORY_MISSING,), ValueError,
         "'wb', 'w' or 'wt'", "'a'"),
    # -- optim --------------------------------------------------------------------------------------
    case("SGD str lr", sgd, (), TypeError, "lr", "'0.1'", lr="0.1"),
    case("SGD None lr", sgd, (), TypeError, "lr", "None", lr=None),
    case("SGD negative lr", sgd, (), ValueError, "lr", "-1", lr=-1),
    case("SGD NaN lr", sgd, (), ValueError, "lr", "nan", lr=float("nan")),
    case("SGD str momentum", sgd, (), TypeError, "momentum", "'0.9'", momentum="0.9"),
    case("SGD negative weight_decay", sgd, (), ValueError, "weight_decay", "-0.1", weight_decay=-0.1),
    case("SGD empty parameters", optim.SGD, ([],), ValueError, "empty", lr=0.1),
    case("SGD plain tensors", optim.SGD, ([f32(2)],), TypeError, "Parameter", "Tensor", lr=0.1),
    case("SGD a module", optim.SGD, (nn.Linear(3, 2),), TypeError, "parameters()", "Linear", lr=0.1),
    case("SGD None parameters", optim.SGD, (None,), TypeError, "parameters()", "NoneType", lr=0.1),
    case("SGD group without params", optim.SGD, ([{"lr": 0.1}],), ValueError, "'params'", "['lr']", lr=0.1),
    case("SGD group unknown option", lambda: optim.SGD([{"params": linear().parameters(), "lrr": 1}], lr=0.1), (),
         ValueError, "['lrr']", "momentum"),
    case("SGD group str lr", lambda: optim.SGD([{"params": linear().parameters(), "lr": "x"}], lr=0.1), (),
         TypeError, "lr", "'x'"),
    case("SGD nesterov without momentum", sgd, (), ValueError, "Nesterov", "momentum > 0", nesterov=True),
    case("SGD load_state_dict empty", lambda s: sgd().load_state_dict(s), ({},), KeyError, "param_groups"),
    case("SGD load_state_dict None", lambda s: sgd().load_state_dict(s), (None,), TypeError, "dict", "NoneType"),
    case("StepLR zero step", lambda: optim.StepLR(sgd(), 0), (), ValueError, "step_size", "0"),
    case("StepLR str step", lambda: optim.StepLR(sgd(), "3"), (), TypeError, "step_size", "'3'"),
    case("StepLR float step", lambda: optim.StepLR(sgd(), 2.5), (), TypeError, "step_size", "2.5"),
    case("StepLR not an optimizer", optim.StepLR, ("sgd", 3), TypeError, "Optimizer", "str"),
    case("StepLR str gamma", lambda: optim.StepLR(sgd(), 3, gamma="0.1"), (), TypeError, "gamma", "'0.1'"),
    case("StepLR negative gamma", lambda: optim.StepLR(sgd(), 3, gamma=-0.1), (), ValueError, "gamma", "-0.1"),
    case("StepLR load_state_dict empty", lambda s: optim.StepLR(sgd(), 3).load_state_dict(s), ({},), KeyError,
         "step_size"),
    # -- backend ------------------------------------------------------------------------------------
    case("use None", mb.use, (None,), ValueError, "None", "numpy"),
    case("manual_seed str", mb.manual_seed, ("x",), TypeError, "seed", "'x'"),
    case("manual_seed negative", mb.manual_seed, (-1,), ValueError, "seed", "-1"),
    case("manual_seed above 2**32", mb.manual_seed, (2**33,), ValueError, "seed", str(2**33)),
]


@pytest.fixture
def resolve(tmp_path):
    """Stand-ins for paths: a missing file, an empty folder, a text file that is no checkpoint."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello, not a checkpoint\n")
    places = {id(DIRECTORY_MISSING): tmp_path / "missing", id(DIRECTORY_EMPTY): tmp_path / "empty",
              id(TEXT_FILE): tmp_path / "notes.txt"}
    return lambda value: places.get(id(value), value)


@pytest.mark.parametrize("fn, args, kwargs, error, fragments", CASES)
def test_wrong_input_raises_a_clear_error(fn, args, kwargs, error, fragments, resolve):
    args = tuple(resolve(a) for a in args)
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    exc = info.value
    message = str(exc)
    # Errors from deep inside, whatever else they also are, fail the case.
    assert not isinstance(exc, (IndexError, AttributeError, ZeroDivisionError)), f"{type(exc).__name__}: {message}"
    assert "could not be broadcast" not in message and "not supported between instances" not in message, message
    assert isinstance(exc, error), f"expected {error.__name__}, got {type(exc).__name__}: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {type(exc).__name__} message {message!r}"


def test_the_table_is_broad():
    assert len(CASES) >= 100
    assert len({p.id for p in CASES}) == len(CASES), "case ids must be unique"


def test_a_failed_manual_seed_changes_no_generator():
    """The seed is checked before any generator is replaced."""
    from minibasis import backend

    mb.manual_seed(7)
    expected = np.random.default_rng(7).uniform(size=3)
    with pytest.raises(ValueError):
        mb.manual_seed(2**33)
    np.testing.assert_array_equal(backend.host_rng().uniform(size=3), expected)
