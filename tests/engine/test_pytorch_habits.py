"""What a PyTorch user writes works the same: Tensor methods, containers, layers, losses.

Every differentiable method is gradchecked in float64 (finite differences, independent of
PyTorch); PyTorch (2.x CPU, optional) is the oracle for values, indices and gradients.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minibasis as mb
from minibasis import nn
from minibasis import functions as F

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

TOL = dict(rtol=1e-12, atol=1e-12)


def both(shape, seed=0):
    """The same float64 values as a minibasis leaf and a torch leaf, both requiring grad."""
    array = np.random.default_rng(seed).standard_normal(shape)
    return mb.tensor(array.copy(), requires_grad=True), torch.tensor(array, requires_grad=True)


def same_forward_and_backward(ours, theirs, x, tx, seed=1):
    """Same values; same input gradient for one random upstream gradient."""
    np.testing.assert_allclose(ours.data, theirs.detach().numpy(), **TOL)
    g = np.random.default_rng(seed).standard_normal(tuple(theirs.shape))
    ours.backward(g)
    theirs.backward(torch.from_numpy(g))
    np.testing.assert_allclose(x.grad.data, tx.grad.numpy(), **TOL)


# ---------------------------------------------------------------------------
# size(): PyTorch's method, not NumPy's element count
# ---------------------------------------------------------------------------
def test_size_is_the_shape_as_in_pytorch_and_numel_counts():
    x = mb.tensor(np.zeros((2, 3, 4)))
    assert x.size() == (2, 3, 4) == tuple(torch.zeros(2, 3, 4).size())
    assert (x.size(0), x.size(-1)) == (2, 4)
    assert x.numel() == 24 and x.dim() == 3
    with pytest.raises(ValueError, match="dim 3 is out of range"):
        x.size(3)
    with pytest.raises(TypeError, match="dim must be an int"):
        x.size(1.0)


def test_parameter_counts_still_add_up_after_the_size_change():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    assert model.num_parameters() == 4 * 3 * 9 + 4 + 4 * 2 + 2


# ---------------------------------------------------------------------------
# shape methods: same values and gradients as torch, and gradchecked
# ---------------------------------------------------------------------------
SHAPE_CASES = {
    "flatten()": (lambda t: t.flatten(), (2, 3, 4)),
    "flatten(1)": (lambda t: t.flatten(1), (2, 3, 4)),
    "flatten(0, 1)": (lambda t: t.flatten(0, 1), (2, 3, 4)),
    "flatten(-2, -1)": (lambda t: t.flatten(-2, -1), (2, 3, 4)),
    "view(6, -1)": (lambda t: t.view(6, -1), (2, 3, 4)),
    "view((4, 6))": (lambda t: t.view((4, 6)), (2, 3, 4)),
    "unsqueeze(0)": (lambda t: t.unsqueeze(0), (2, 3)),
    "unsqueeze(-1)": (lambda t: t.unsqueeze(-1), (2, 3)),
    "unsqueeze(1)": (lambda t: t.unsqueeze(1), (2, 3)),
    "squeeze()": (lambda t: t.squeeze(), (2, 1, 3, 1)),
    "squeeze(1)": (lambda t: t.squeeze(1), (2, 1, 3, 1)),
    "squeeze(0) keeps a longer axis": (lambda t: t.squeeze(0), (2, 1, 3, 1)),
    "squeeze((1, 3))": (lambda t: t.squeeze((1, 3)), (2, 1, 3, 1)),
    "permute(2, 0, 1)": (lambda t: t.permute(2, 0, 1), (2, 3, 4)),
    "permute((0, 2, 3, 1))": (lambda t: t.permute((0, 2, 3, 1)), (2, 3, 4, 5)),
    "clone()": (lambda t: t.clone(), (2, 3)),
}


@pytest.mark.parametrize("name", SHAPE_CASES)
def test_shape_method_matches_torch(name):
    fn, shape = SHAPE_CASES[name]
    x, tx = both(shape)
    out = fn(x)
    assert out.shape == tuple(fn(tx).shape)
    same_forward_and_backward(out, fn(tx), x, tx)


@pytest.mark.parametrize("name", SHAPE_CASES)
def test_shape_method_gradcheck(name):
    fn, shape = SHAPE_CASES[name]
    assert mb.gradcheck(fn, [np.random.default_rng(2).standard_normal(shape)])


def test_clone_owns_its_memory_and_stays_in_the_graph():
    x = mb.tensor(np.ones(3), requires_grad=True)
    y = x.clone()
    y.data[0] = 5.0
    assert x.data[0] == 1.0
    (y * 2.0).sum().backward()
    np.testing.assert_array_equal(x.grad.data, [2.0, 2.0, 2.0])


@pytest.mark.parametrize("call, error, text", [
    (lambda t: t.unsqueeze(4), ValueError, "unsqueeze: dim 4 is out of range"),
    (lambda t: t.permute(1, 0), ValueError, "permute: got 2 dims"),
    (lambda t: t.flatten(2, 1), ValueError, "start_dim 2 comes after end_dim 1"),
    (lambda t: t.squeeze(3), ValueError, "squeeze: dim 3 is out of range"),
    (lambda t: t.max(dim=1.5), TypeError, "dim must be an int"),
])
def test_bad_dims_are_named(call, error, text):
    with pytest.raises(error, match=text):
        call(mb.tensor(np.zeros((2, 3, 1))))


# ---------------------------------------------------------------------------
# max / min / argmax / argmin
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["max", "min"])
@pytest.mark.parametrize("dim, keepdim", [(0, False), (1, False), (-1, True), (2, True)])
def test_max_min_along_a_dim_return_values_and_indices_like_torch(which, dim, keepdim):
    x, tx = both((3, 4, 5), seed=dim + 10)  # dim ≥ -1
    values, indices = getattr(x, which)(dim, keepdim=keepdim)
    tvalues, tindices = getattr(tx, which)(dim, keepdim=keepdim)
    result = getattr(x, which)(dim=dim, keepdim=keepdim)
    assert result.values.shape == tuple(tvalues.shape) and result.indices is not None
    np.testing.assert_array_equal(indices.data, tindices.numpy())
    assert indices.dtype == np.int64 and not indices.requires_grad
    same_forward_and_backward(values, tvalues, x, tx)
    assert mb.gradcheck(lambda t: getattr(t, which)(dim, keepdim)[0],
                        [np.random.default_rng(dim + 1).standard_normal((3, 4, 5))])


@pytest.mark.parametrize("which", ["max", "min"])
def test_full_max_min_share_the_gradient_among_ties_like_torch(which):
    data = np.array([[1.0, 3.0, 3.0], [-2.0, 3.0, -2.0]])
    if which == "min":
        data = -data
    x, tx = mb.tensor(data.copy(), requires_grad=True), torch.tensor(data, requires_grad=True)
    out, tout = getattr(x, which)(), getattr(tx, which)()
    assert out.shape == () and out.item() == tout.item()
    same_forward_and_backward(out, tout, x, tx)
    assert mb.gradcheck(lambda t: getattr(t, which)(), [np.random.default_rng(3).standard_normal((3, 4))])


@pytest.mark.parametrize("which", ["argmax", "argmin"])
@pytest.mark.parametrize("dim, keepdim", [(None, False), (0, False), (1, True), (-1, False)])
def test_argmax_argmin_like_torch(which, dim, keepdim):
    x, tx = both((4, 5), seed=7)
    ours = getattr(x, which)(dim, keepdim=keepdim) if dim is not None else getattr(x, which)()
    theirs = getattr(tx, which)(dim, keepdim=keepdim) if dim is not None else getattr(tx, which)()
    assert ours.shape == tuple(theirs.shape)
    np.testing.assert_array_equal(ours.data, theirs.numpy())
    assert ours.dtype == np.int64 and not ours.requires_grad


def test_argmax_of_logits_gives_the_predicted_classes():
    logits = mb.tensor(np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]], dtype=np.float32))
    np.testing.assert_array_equal(logits.argmax(dim=1).data, [1, 0])


# ---------------------------------------------------------------------------
# to / float / double / item
# ---------------------------------------------------------------------------
def test_to_casts_differentiably_and_returns_self_when_nothing_changes():
    x = mb.tensor(np.array([1.5, -2.0]), requires_grad=True)  # float64 array keeps its dtype
    assert x.to("float64") is x and x.double() is x and x.to(np.float64) is x
    assert x.to("cpu") is x and x.to("numpy") is x
    y = x.float()
    assert y.dtype == np.float32 and x.to(np.float32).dtype == np.float32
    (y * 3.0).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad.data, [3.0, 3.0])
    with pytest.raises(TypeError, match="neither a dtype nor a backend"):
        x.to("gpu0")


def test_to_a_backend_moves_the_data_and_brings_the_gradient_back():
    x = mb.tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    moved = x.to("strict")  # the CPU stand-in for a device backend
    assert mb.backend.backend_of(moved.data) == "strict"
    np.testing.assert_array_equal(mb.backend.to_numpy(moved.data), [1.0, 2.0, 3.0])
    moved.backward(mb.backend.to_backend(np.array([1.0, 10.0, 100.0]), "strict"))
    assert mb.backend.backend_of(x.grad.data) == "numpy"
    np.testing.assert_array_equal(x.grad.data, [1.0, 10.0, 100.0])


def test_item_tolist_float_int():
    assert mb.tensor(np.array([[2.5]])).item() == 2.5
    assert float(mb.tensor(np.array([2.5]))) == 2.5 and int(mb.tensor(np.array([[7.0]]))) == 7
    assert mb.tensor(np.array([[1, 2], [3, 4]])).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="one element"):
        mb.tensor(np.zeros(3)).item()


# ---------------------------------------------------------------------------
# ModuleList / ModuleDict
# ---------------------------------------------------------------------------
class _Ours(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)])
        self.heads = nn.ModuleDict({"cls": nn.Linear(3, 2), "box": nn.Linear(3, 4)})
        self.layers.append(nn.BatchNorm1d(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return {name: head(x) for name, head in self.heads.items()}


class _Theirs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)])
        self.heads = torch.nn.ModuleDict({"cls": torch.nn.Linear(3, 2), "box": torch.nn.Linear(3, 4)})
        self.layers.append(torch.nn.BatchNorm1d(3))


def test_containers_register_their_modules_under_torch_key_names():
    ours, theirs = _Ours(), _Theirs()
    theirs_keys = [k for k in theirs.state_dict() if not k.endswith("num_batches_tracked")]
    assert list(ours.state_dict()) == theirs_keys
    assert [k for k, _ in ours.named_parameters()] == [k for k, _ in theirs.named_parameters()]
    assert [k for k, _ in ours.named_modules()] == [k for k, _ in theirs.named_modules()]
    # and a torch state dict loads into the minibasis model, which then computes the same
    ours.load_state_dict(theirs.state_dict())  # torch tensors load as they are
    ours.eval()
    theirs.eval()
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    out = ours(mb.tensor(x))
    tx = torch.from_numpy(x)
    for layer in theirs.layers:
        tx = layer(tx)
    for name in ("cls", "box"):
        np.testing.assert_allclose(out[name].data, theirs.heads[name](tx).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_containers_take_part_in_train_eval_and_to():
    model = _Ours()
    model.eval()
    assert not model.layers[3].training and not model.heads["cls"].training
    model.to(dtype="float64")
    assert model.heads["box"].weight.dtype == np.float64 and model.layers[0].weight.dtype == np.float64
    model.to("strict")
    assert mb.backend.backend_of(model.heads["box"].weight.data) == "strict"
    model.to("cpu")  # PyTorch's device name for the host
    assert mb.backend.backend_of(model.heads["box"].weight.data) == "numpy"
    assert model.layers[0].weight.dtype == np.float64


def test_module_list_indexing_like_a_list():
    a, b, c = nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)
    ml = nn.ModuleList([a, b])
    assert ml[0] is a and ml[-1] is b and len(ml) == 2 and list(ml) == [a, b]
    ml.insert(1, c)
    assert list(ml) == [a, c, b] and list(dict(ml.named_children())) == ["0", "1", "2"]
    del ml[0]
    assert list(ml) == [c, b] and list(ml.state_dict()) == ["0.weight", "0.bias"]
    ml[1] = a
    assert ml[1] is a
    assert isinstance(ml[:1], nn.ModuleList) and list(ml[:1]) == [c]
    ml.extend(nn.Sequential(nn.ReLU()))
    assert len(ml) == 3
    with pytest.raises(IndexError, match="out of range for 3 modules"):
        ml[3]
    with pytest.raises(TypeError, match="holds Modules, got int"):
        ml.append(3)
    with pytest.raises(NotImplementedError, match="no forward"):
        ml(mb.tensor(np.zeros((1, 1))))


def test_module_dict_like_a_dict():
    md = nn.ModuleDict([("a", nn.ReLU()), ("b", nn.Linear(2, 2))])
    assert list(md) == ["a", "b"] and "a" in md and len(md) == 2
    md["c"] = nn.Identity()
    assert list(md.keys()) == ["a", "b", "c"]
    assert isinstance(md.pop("a"), nn.ReLU) and list(md) == ["b", "c"]
    del md["c"]
    assert list(md) == ["b"] and list(md.state_dict()) == ["b.weight", "b.bias"]
    with pytest.raises(KeyError, match="no key 'zz'"):
        md["zz"]
    with pytest.raises(ValueError, match="contain no '.'"):
        md["x.y"] = nn.ReLU()
    with pytest.raises(TypeError, match="holds Modules"):
        md["d"] = "relu"


# ---------------------------------------------------------------------------
# layers and losses
# ---------------------------------------------------------------------------
def test_relu_inplace_is_accepted_and_never_overwrites_its_input():
    x = mb.tensor(np.array([-1.0, 2.0, -3.0]), requires_grad=True)
    layer = nn.ReLU(inplace=True)
    assert repr(layer) == "ReLU(inplace=True)" and repr(nn.ReLU()) == "ReLU()"
    y = layer(x)
    np.testing.assert_array_equal(x.data, [-1.0, 2.0, -3.0])  # the input (maybe saved elsewhere) is intact
    np.testing.assert_array_equal(y.data, [0.0, 2.0, 0.0])
    assert not np.shares_memory(x.data, y.data)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.data, [0.0, 1.0, 0.0])
    with pytest.raises(TypeError, match="inplace must be a bool"):
        nn.ReLU(inplace="yes")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_cross_entropy_loss_matches_torch(reduction, smoothing):
    x, tx = both((5, 4), seed=3)
    labels = np.array([0, 3, 1, 1, 2])
    ours = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=smoothing)(x, labels)
    theirs = torch.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=smoothing)(tx, torch.from_numpy(labels))
    assert ours.shape == tuple(theirs.shape)
    same_forward_and_backward(ours, theirs, x, tx)
    assert mb.gradcheck(lambda t: F.cross_entropy(t, labels, reduction, smoothing),
                        [np.random.default_rng(4).standard_normal((5, 4))])


def test_cross_entropy_loss_settings_are_checked():
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none', got 'avg'"):
        nn.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\], got 1.5"):
        nn.CrossEntropyLoss(label_smoothing=1.5)
    assert repr(nn.CrossEntropyLoss(label_smoothing=0.1)) == "CrossEntropyLoss(reduction='mean', label_smoothing=0.1)"


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_along_any_dim_matches_torch(dim, log):
    x, tx = both((2, 3, 4), seed=dim + 5)
    ours = (nn.LogSoftmax if log else nn.Softmax)(dim=dim)(x)
    theirs = (torch.nn.LogSoftmax if log else torch.nn.Softmax)(dim=dim)(tx)
    same_forward_and_backward(ours, theirs, x, tx)
    fn = F.log_softmax if log else F.softmax
    assert mb.gradcheck(lambda t: fn(t, dim), [np.random.default_rng(dim + 6).standard_normal((2, 3, 4))])


def test_softmax_needs_a_dim():
    with pytest.raises(TypeError, match="dim must be an int"):
        nn.Softmax(dim=None)
    assert repr(nn.Softmax(dim=1)) == "Softmax(dim=1)"


def test_dropout2d_drops_whole_channels_and_counts_one_product_per_element():
    mb.manual_seed(0)
    layer = nn.Dropout2d(p=0.25)
    x = mb.tensor(np.ones((40, 50, 3, 2)), requires_grad=True)
    with mb.count_mults() as counter:
        y = layer(x)
        y.sum().backward()
    maps = y.data.reshape(40, 50, -1)
    first = maps[:, :, :1]
    np.testing.assert_array_equal(maps, np.broadcast_to(first, maps.shape))  # each map is all one value
    assert set(np.unique(first)) <= {0.0, 1 / 0.75}
    dropped = (first == 0).mean()
    assert abs(dropped - 0.25) < 0.05  # 2,000 channels: the std of the fraction is 0.0097
    np.testing.assert_array_equal(x.grad.data, y.data)  # d(sum)/dx is the mask itself
    # one product per element in each direction, measured where it happens
    assert counter.forward.total == x.numel() and counter.backward.total == x.numel()
    layer.eval()
    np.testing.assert_array_equal(layer(x).data, x.data)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        nn.Dropout2d()(mb.tensor(np.ones((2, 3))))


def test_dropout2d_gradcheck_with_a_fixed_mask():
    def fn(x):
        mb.manual_seed(3)  # the same mask on every call
        return F.dropout2d(x, 0.5, training=True)
    assert mb.gradcheck(fn, [np.random.default_rng(0).standard_normal((2, 6, 2, 2))])


# ---------------------------------------------------------------------------
# DataLoader yields Tensors
# ---------------------------------------------------------------------------
def test_data_loader_yields_tensors_by_default_and_arrays_on_request():
    from minibasis.data import DataLoader
    from minibasis.distributed import ShardedDataLoader

    images = np.random.default_rng(0).standard_normal((10, 3, 4, 4)).astype(np.float32)
    labels = np.arange(10) % 3
    tensors = list(DataLoader((images, labels), batch_size=4, shuffle=True, seed=1))
    arrays = list(DataLoader((images, labels), batch_size=4, shuffle=True, seed=1, as_tensors=False))
    assert len(tensors) == len(arrays) == 3
    for (x, y), (xa, ya) in zip(tensors, arrays):
        assert isinstance(x, mb.Tensor) and isinstance(y, mb.Tensor) and not x.requires_grad
        assert type(xa) is np.ndarray and type(ya) is np.ndarray
        assert x.dtype == np.float32 and y.dtype == np.int64
        np.testing.assert_array_equal(x.data, xa)
        np.testing.assert_array_equal(y.data, ya)
        np.testing.assert_array_equal(np.asarray(x), xa)  # NumPy reads a host tensor as PyTorch allows
    x, y = tensors[0]
    assert nn.CrossEntropyLoss()(nn.Sequential(nn.Flatten(), nn.Linear(48, 3))(x), y).shape == ()
    with pytest.raises(TypeError, match="as_tensors must be a bool"):
        DataLoader((images, labels), batch_size=4, as_tensors="no")
    sharded = ShardedDataLoader.from_loader(DataLoader((images, labels), batch_size=4, as_tensors=False),
                                            rank=0, world_size=2)
    assert sharded.as_tensors is False and type(next(iter(sharded))[0]) is np.ndarray
    sharded = ShardedDataLoader((images, labels), 4, rank=1, world_size=2)
    assert isinstance(next(iter(sharded))[0], mb.Tensor)


@pytest.mark.parametrize("as_tensors", [True, False])
def test_trainer_takes_either_kind_of_batch_and_learns_the_same(as_tensors):
    from minibasis.data import DataLoader, ToFloat, synthetic
    from minibasis.training import Trainer

    mb.manual_seed(0)
    (x, y), _ = synthetic(num_train=32, num_test=0, image_size=16, seed=0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 10))
    loader = DataLoader((x, y), batch_size=16, shuffle=True, seed=0, transform=ToFloat(), as_tensors=as_tensors)
    history = Trainer(model, mb.optim.SGD(model.parameters(), lr=0.1), loader, epochs=1, progress=False).fit()
    # the same run on arrays gives the same loss, to the bit
    mb.manual_seed(0)
    twin = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 10))
    loader = DataLoader((x, y), batch_size=16, shuffle=True, seed=0, transform=ToFloat(), as_tensors=not as_tensors)
    twin_history = Trainer(twin, mb.optim.SGD(twin.parameters(), lr=0.1), loader, epochs=1, progress=False).fit()
    assert history[0]["train_loss"] == twin_history[0]["train_loss"]


# ---------------------------------------------------------------------------
# the README's example
# ---------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]


def test_readme_shows_the_pytorch_habits_example_and_what_it_prints():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    code = (REPO / "examples" / "pytorch_habits.py").read_text(encoding="utf-8")
    assert code.split('"""', 2)[2].strip() in readme
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "pytorch_habits.py")], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 6
    assert f"the last `{lines[4]}`" in readme and f"`{lines[5]}`" in readme


def test_an_unknown_model_name_says_how_to_register_a_custom_one(tmp_path):
    from minibasis import models

    with pytest.raises(ValueError, match=r"unknown model 'mynet'.*register_model\('mynet', constructor\)"):
        models.get_model("mynet")

    class MyNet(nn.Module):
        def __init__(self, width=3):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, width), nn.Linear(width, 2)])

        def forward(self, x):
            return self.layers[1](self.layers[0](x))

    models.register_model("mynet_habits", MyNet)
    try:
        model = models.get_model("mynet_habits", width=5)
        mb.save_model(model, tmp_path / "m.npz")
        loaded, _ = mb.load_model(tmp_path / "m.npz")
        assert isinstance(loaded, MyNet) and loaded.layers[0].out_features == 5
        for key, value in model.state_dict().items():
            np.testing.assert_array_equal(loaded.state_dict()[key], value)
    finally:
        models.MODELS.pop("mynet_habits")


@pytest.mark.parametrize("shape, dims", [((3, 5), (0, 1)), ((3, 5), (1, 0)), ((2, 3, 4), (0, 2)),
                                         ((2, 3, 4), (-1, 1)), ((2, 3, 4, 5), (1, -2)), ((2, 3), (1, 1))])
def test_transpose_of_two_dims_swaps_them_as_pytorch_does(shape, dims):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(shape)
    np.testing.assert_array_equal(mb.tensor(x).transpose(*dims).numpy(), torch.tensor(x).transpose(*dims).numpy())
    assert mb.gradcheck(lambda t: t.transpose(*dims) * mb.tensor(np.arange(x.size, dtype=np.float64)
                                                                .reshape(torch.tensor(x).transpose(*dims).shape)),
                        [mb.tensor(x, requires_grad=True)])


def test_transpose_keeps_numpys_permutation_forms():
    x = np.random.default_rng(1).standard_normal((2, 3, 4))
    np.testing.assert_array_equal(mb.tensor(x).transpose((2, 0, 1)).numpy(), x.transpose(2, 0, 1))
    np.testing.assert_array_equal(mb.tensor(x).transpose(2, 0, 1).numpy(), x.transpose(2, 0, 1))
    np.testing.assert_array_equal(mb.tensor(x).transpose().numpy(), x.T)
    np.testing.assert_array_equal(mb.tensor(x[0]).transpose((0, 1)).numpy(), x[0])  # a permutation: unchanged
    with pytest.raises(ValueError, match="out of range"):
        mb.tensor(x).transpose(0, 3)
