"""The experiment verbs end to end on tiny settings: demo, sweep, fine-tuning, the non-finite guard.

References are independent of the code under test: multiplication counts are recomputed by
hand from layer shapes, the uncompressed model's accuracy is recomputed with a plain forward
pass, and what fine-tuning may change is checked array by array.
"""
import json
import math

import numpy as np
import pytest

import minibasis
from minibasis import nn, optim
from minibasis.autograd import Function
from minibasis.cli import main
from minibasis.data import DataLoader, ToFloat, synthetic
from minibasis import training as trainer
from minibasis import training as finetune

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)


def _state(model) -> dict:
    return {k: minibasis.to_numpy(v).copy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------
def test_demo_runs_and_measured_counts_equal_the_formula(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--epochs", "1", "--num-train", "128", "--num-test", "64", "--batch-size", "32",
               "--thresholds", "1.0,0.9,0.7,0.5", "--output", str(out), "--quiet"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [row["threshold"] for row in results["thresholds"]] == [1.0, 0.9, 0.7, 0.5]
    # DemoCNN: conv 5×5 at 32×32, pool, conv 3×3 at 16×16, pool, conv 3×3 at 8×8 (padding keeps sizes).
    expected_sizes = [(32, 32), (16, 16), (8, 8)]
    replaced_somewhere = False
    for row in results["thresholds"]:
        total = original = 0
        for layer, size in zip(row["per_layer"], expected_sizes):
            assert (layer["Ho"], layer["Wo"]) == size
            kh, kw = layer["k"]
            d = layer["C"] * kh * kw
            hw = size[0] * size[1]
            original += layer["M"] * d * hw
            if layer["replaced"]:
                replaced_somewhere = True
                total += (layer["Q"] * d + layer["M"] * layer["Q"]) * hw   # basis stage + 1×1 stage
            else:
                total += layer["M"] * d * hw
        assert row["conv_mults_measured"] == total, row["threshold"]
        assert row["conv_mults_original"] == original
        assert row["conv_mults_formula"] == total
    assert replaced_somewhere  # the check above covered BasisConv layers, not only plain convs
    assert results["thresholds"][-1]["conv_mults_measured"] < results["thresholds"][0]["conv_mults_measured"]
    assert "equal the formula" in capsys.readouterr().out
    assert (out / "results.csv").is_file() and (out / "config.json").is_file() and (out / "log.txt").is_file()
    pytest.importorskip("matplotlib")
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# sweep (a small zoo model trained briefly on synthetic data)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def table3_checkpoint(tmp_path_factory):
    """table3_cnn trained for 2 epochs on 256 synthetic images (model.npz of `minibasis train`)."""
    out = tmp_path_factory.mktemp("table3") / "run"
    rc = main(["train", "--dataset", "synthetic", "--train-subset", "256", "--limit", "32", "--epochs", "2",
               "--lr", "0.02", "--batch-size", "32", "--output", str(out), "--quiet"])
    assert rc == 0
    return out / "model.npz"


def _plain_accuracy(checkpoint, images, labels) -> float:
    """Accuracy of the uncompressed table3_cnn from its weights, normalized here by hand."""
    from minibasis import io
    from minibasis.models import table3_cnn

    model = table3_cnn()
    model.load_state_dict(io.load(checkpoint)["state_dict"])
    model.eval()
    x = (images.astype(np.float32) / 255.0 - CIFAR10_MEAN) / CIFAR10_STD
    with minibasis.no_grad():
        logits = model(minibasis.tensor(x.astype(np.float32))).numpy()
    return float((logits.argmax(axis=1) == labels).mean())


@pytest.mark.slow
@pytest.mark.parametrize("replace_all", [True, False])
def test_sweep_retained_filters_fall_and_t1_keeps_accuracy(tmp_path, table3_checkpoint, replace_all):
    thresholds = [1.0, 0.95, 0.9, 0.8, 0.6, 0.4]
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", "table3_cnn", "--checkpoint", str(table3_checkpoint), "--dataset", "synthetic",
            "--normalize", "cifar10", "--limit", "64", "--thresholds", ",".join(map(str, thresholds)),
            "--output", str(out), "--quiet"] + (["--replace-all"] if replace_all else [])
    assert main(argv) == 0
    results = json.loads((out / "sweep.json").read_text())
    rows = results["thresholds"]
    assert [r["threshold"] for r in rows] == thresholds
    retained = [r["retained_filters"] for r in rows]
    assert all(a >= b for a, b in zip(retained, retained[1:])), retained
    assert retained[-1] < retained[0]
    assert all(r["filters_original"] == 32 + 32 + 64 for r in rows)
    for r in rows:  # retained filters: Q where replaced, M where kept
        assert r["retained_filters"] == sum(l["Q"] if l["replaced"] else l["M"] for l in r["per_layer"])
        assert r["retained_filters_pct"] == pytest.approx(100 * r["retained_filters"] / 128)
    _, (x_test, y_test) = synthetic(num_train=0, num_test=64, seed=0)
    reference = _plain_accuracy(table3_checkpoint, x_test, y_test)
    assert results["test_acc_original"] == reference
    top = rows[0]
    if replace_all:
        assert top["layers_replaced"] == 3  # t = 1 really runs BasisConv layers ...
    assert top["test_acc"] == reference     # ... and gives exactly the original accuracy
    assert (out / "sweep.csv").is_file()
    pytest.importorskip("matplotlib")
    assert (out / "retained_filters.png").is_file() and (out / "accuracy_vs_retained.png").is_file()


# ---------------------------------------------------------------------------
# fine-tuning: what each step may change
# ---------------------------------------------------------------------------
def _tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_fine_tuning_changes_only_what_each_step_allows():
    minibasis.manual_seed(3)
    model = _tiny_net()
    compressed, report = minibasis.compress(model, energy_threshold=0.7, layers=["3"], input_shape=(1, 3, 16, 16))
    assert [row.replaced for row in report.layers] == [True]
    assert isinstance(compressed[0], nn.Conv2d) and isinstance(compressed[3], nn.BasisConv2d)
    (x, y), _ = synthetic(num_train=64, num_test=0, image_size=16, seed=1)
    loader = DataLoader((x, y), batch_size=16, shuffle=True, seed=0, transform=ToFloat())
    before = _state(compressed)
    snapshots = {}
    finetune.fine_tune(compressed, loader, step1_params=finetune.coefficient_parameters(compressed),
                       epochs1=1, lr1=0.1, epochs2=1, lr2=0.05, progress=False,
                       on_step_end=lambda stage, m: snapshots.__setitem__(stage, _state(m)))
    step1, step2 = snapshots["step1"], snapshots["step2"]
    for key in ("3.basis", "0.weight"):  # the fixed basis and the kept conv's filters: never
        assert np.array_equal(before[key], step1[key]) and np.array_equal(step1[key], step2[key]), key
    assert not np.array_equal(before["3.coeffs"], step1["3.coeffs"])  # step 1 trains the coefficients ...
    for key in ("0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias", "8.weight", "8.bias"):
        assert np.array_equal(before[key], step1[key]), f"step 1 changed {key}"  # ... and nothing else
    for key in ("1.weight", "1.bias", "4.weight", "8.weight", "8.bias", "0.bias", "3.bias"):
        assert not np.array_equal(step1[key], step2[key]), f"step 2 left {key} unchanged"  # BN, fc, biases
    assert [p.requires_grad for p in (compressed[0].weight, compressed[3].coeffs, compressed[8].weight)] == \
        [False, True, True]


@pytest.mark.slow
def test_finetune_command_end_to_end(tmp_path, table3_checkpoint):
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", "table3_cnn", "--checkpoint", str(table3_checkpoint), "--dataset", "synthetic",
               "--normalize", "cifar10", "--threshold", "0.8", "--train-subset", "64", "--limit", "32",
               "--epochs1", "1", "--epochs2", "1", "--batch-size", "32", "--detect-anomaly",
               "--output", str(out), "--quiet"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in results["history"]] == ["step1", "step2"]
    assert all("test_acc" in r for r in results["history"])  # evaluation after every epoch
    assert results["compression"]["totals"]["conv_mults_after"] < results["compression"]["totals"]["conv_mults_before"]
    # The fine-tuned model file rebuilds its BasisConv layers when loaded again.
    assert main(["eval", "--model", "table3_cnn", "--checkpoint", str(out / "model.npz"), "--dataset", "synthetic",
                 "--normalize", "cifar10", "--limit", "32", "--output", str(tmp_path / "eval"), "--quiet"]) == 0


# ---------------------------------------------------------------------------
# non-finite guard
# ---------------------------------------------------------------------------
class _NaNBackward(Function):
    """Identity forward; backward returns NaN (a broken op, as a user might write one)."""

    def forward(self, x):
        return x

    def backward(self, gy):
        return gy * np.float32("nan")


class _BrokenBackward(nn.Module):
    def forward(self, x):
        return _NaNBackward()(x)


def _guard_setup(model, images, labels, **kwargs):
    optimizer = optim.SGD([p for p in model.parameters()], lr=0.1)
    loader = DataLoader((images, labels), batch_size=8, shuffle=False, seed=0)
    return trainer.Trainer(model, optimizer, loader, epochs=1, progress=False, **kwargs)


def test_non_finite_loss_names_step_and_first_module():
    minibasis.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    images = np.random.default_rng(0).random((32, 3, 8, 8), dtype=np.float32)
    images[17, 1, 2, 3] = np.inf          # in the third batch of 8: step 3 goes non-finite
    labels = np.arange(32) % 3
    with pytest.raises(trainer.NonFiniteError) as info:
        _guard_setup(model, images, labels).fit()
    error = info.value
    assert (error.step, error.module, error.where) == (3, "0", "output")
    assert math.isnan(error.loss)
    assert "step 3" in str(error) and "'0'" in str(error)
    assert all("forward" not in m.__dict__ for m in model.modules())  # the detector left no wrapper behind


def test_anomaly_mode_names_the_module_whose_backward_breaks():
    images = np.random.default_rng(1).random((16, 3, 6, 6), dtype=np.float32)
    labels = np.arange(16) % 3

    def net():
        minibasis.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), _BrokenBackward(), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    # The cheap default check only sees the loss: the NaN gradient poisons the conv weights
    # at step 1, the loss of step 2 is NaN, and the conv's output is the first non-finite one.
    with pytest.raises(trainer.NonFiniteError) as info:
        _guard_setup(net(), images, labels).fit()
    assert (info.value.step, info.value.module, info.value.where) == (2, "0", "output")
    # Anomaly mode stops at step 1, at the module whose backward produced the NaN.
    model = net()
    with pytest.raises(trainer.NonFiniteError) as info:
        _guard_setup(model, images, labels, detect_anomaly=True).fit()
    assert (info.value.step, info.value.module, info.value.where) == (1, "1", "gradient produced by backward")
    assert math.isfinite(info.value.loss)
    assert np.isfinite(model[0].weight.numpy()).all()  # stopped before the optimizer step


# ---------------------------------------------------------------------------
# device hygiene
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_commands_run_on_a_strict_device_backend_and_match_numpy(tmp_path, serial_engine):
    """The "strict" stand-in refuses every silent host/device mix-up as CuPy would; its results
    equal NumPy's bit for bit, so training, resume, fine-tuning and the sweep must agree (NumPy on the
    serial chunk loop, which strict arrays always take)."""
    from minibasis import io

    def train(epochs, device, folder, *extra):
        return main(["train", "--basis", "random", "--dataset", "synthetic", "--train-subset", "64", "--limit", "32",
                     "--epochs", str(epochs), "--batch-size", "32", "--quiet", "--device", device,
                     "--output", str(tmp_path / folder), *extra])

    assert train(2, "numpy", "numpy") == 0
    assert train(1, "strict", "strict") == 0
    assert train(2, "strict", "strict", "--resume") == 0  # extended to 2 epochs through --resume
    a = io.load(tmp_path / "numpy" / "model.npz")["state_dict"]
    b = io.load(tmp_path / "strict" / "model.npz")["state_dict"]
    assert all(np.array_equal(a[k], b[k]) for k in a)

    plain = tmp_path / "plain"
    assert main(["train", "--dataset", "synthetic", "--train-subset", "32", "--limit", "16", "--epochs", "1",
                 "--batch-size", "32", "--quiet", "--output", str(plain)]) == 0
    common = ["--model", "table3_cnn", "--checkpoint", str(plain / "model.npz"), "--dataset", "synthetic",
              "--normalize", "cifar10", "--limit", "16", "--device", "strict", "--quiet"]
    assert main(["sweep", *common, "--thresholds", "1,0.6", "--output", str(tmp_path / "sweep")]) == 0
    assert main(["finetune", *common, "--threshold", "0.8", "--train-subset", "16", "--epochs1", "1",
                 "--epochs2", "1", "--detect-anomaly", "--output", str(tmp_path / "ft")]) == 0
    assert main(["demo", "--device", "strict", "--epochs", "1", "--num-train", "32", "--num-test", "16",
                 "--thresholds", "1,0.7", "--quiet", "--output", str(tmp_path / "demo")]) == 0
