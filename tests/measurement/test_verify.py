"""minibasis.verify and ``minibasis verify``: the checks pass on the engine, and they can fail.

A check that cannot fail proves nothing, so most tests here plant a defect -- a counting
error in the backend (a batched GEMM counted without its batch), a backward pass that
forgets to count its weight gradient, an off-by-one output size in the formulas, a basis
that drops a vector -- and require the check to report it, with a minimal counterexample
and a snippet that reproduces it.
"""
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

import minibasis as mb
from minibasis import backend, formulas, nn, verify
from minibasis.cli import main
from minibasis.functions import conv as conv_module
from minibasis.functions import smallest_chunks
from minibasis.verify import layer_formulas


# -- planted defects --------------------------------------------------------------------------------
def matmul_count_without_batch(a_shape, b_shape):
    """The count of a @ b with the batch dimensions forgotten (correct for plain 2-D GEMMs only)."""
    a_shape = (1,) + a_shape if len(a_shape) == 1 else a_shape
    b_shape = b_shape + (1,) if len(b_shape) == 1 else b_shape
    return a_shape[-2] * a_shape[-1] * b_shape[-1]


def output_size_rounded_up(size, kernel_size, stride=1, padding=0, dilation=1):
    """ceil instead of floor: off by one whenever the stride does not divide the remainder."""
    dilated = dilation * (kernel_size - 1) + 1
    return -(-(size + 2 * padding - dilated) // stride) + 1


@pytest.fixture
def batch_dropped_from_gemm_counts(monkeypatch):
    monkeypatch.setattr(backend, "_matmul_mults", matmul_count_without_batch)


@pytest.fixture
def weight_gradient_not_counted(monkeypatch):
    """Conv backward computes the weight gradient with the counter detached (one term dropped)."""
    original = conv_module.Conv2dFunction.backward

    def backward(self, gy):
        needs = self.needs_input_grad
        if not needs[1]:
            return original(self, gy)
        try:
            self.needs_input_grad = (False, True) + needs[2:]
            recorder = backend._recorder
            backend.set_mult_recorder(None)
            try:
                weight_part = original(self, gy)
            finally:
                backend.set_mult_recorder(recorder)
            self.needs_input_grad = (needs[0], False) + needs[2:]
            rest = original(self, gy)
        finally:
            self.needs_input_grad = needs
        return (rest[0], weight_part[1]) + tuple(rest[2:])

    monkeypatch.setattr(conv_module.Conv2dFunction, "backward", backward)


@pytest.fixture
def conv_forward_one_row_too_many(monkeypatch):
    """The conv forward sizes its output one row too tall whenever the vertical stride is > 1."""
    original = conv_module.conv_output_shape

    def output_shape(h, w, kernel, stride, padding, dilation=(1, 1)):
        ho, wo = original(h, w, kernel, stride, padding, dilation)
        return (ho + 1, wo) if stride[0] > 1 else (ho, wo)

    monkeypatch.setattr(conv_module, "conv_output_shape", output_shape)


@pytest.fixture
def off_by_one_output_size(monkeypatch):
    monkeypatch.setattr(formulas, "conv_output_size", output_size_rounded_up)


# -- the engine passes ------------------------------------------------------------------------------
@pytest.mark.parametrize("use_hypothesis", [True, False])
def test_formulas_pass_on_the_engine(use_hypothesis):
    report = verify.check_formulas(60, seed=3, use_hypothesis=use_hypothesis)
    assert report.passed, report.table()
    assert report.engine == ("hypothesis" if use_hypothesis else "numpy")
    assert report.counterexample is None and report.snippet is None
    tally = report.tally()
    assert tally["conv forward mults"] == {"cases": len(report.outcomes), "failed": 0}
    assert tally["basisconv backward mults"]["cases"] >= 1
    document = json.loads(report.to_json())
    assert document["check"] == "formulas" and document["passed"] is True and document["cases_run"] == 60
    assert "PASSED" in report.table()


def test_numpy_draws_cover_the_space_and_are_valid():
    rng = np.random.default_rng(0)
    space = verify.GeometrySpace(max_groups=3, max_dilation=3)
    cases = [layer_formulas.draw_case(rng, space) for _ in range(300)]
    for case in cases:
        assert case.in_channels % case.groups == 0 and case.out_channels % case.groups == 0
        assert 1 <= case.num_basis <= case.in_channels * case.kernel_size[0] * case.kernel_size[1]
        if case.padding == "same":
            assert case.stride == (1, 1)
            continue
        padding = (0, 0) if case.padding == "valid" else case.padding
        for axis, size in enumerate((case.height, case.width)):
            span = case.dilation[axis] * (case.kernel_size[axis] - 1) + 1
            assert size + 2 * padding[axis] >= span
        assert (case.input_grad, case.weight_grad) != (False, False)
    kernels = {k for case in cases for k in case.kernel_size}
    assert {1, 2, 3, 4} <= kernels  # odd and even
    assert any(case.height != case.width for case in cases)
    assert any(case.groups > 1 for case in cases) and any(max(case.dilation) > 1 for case in cases)
    assert any(max(case.stride) > 1 for case in cases)
    assert any(not isinstance(case.padding, str) and max(case.padding) > 0 for case in cases)
    assert {"same", "valid"} <= {case.padding for case in cases if isinstance(case.padding, str)}
    assert {(c.input_grad, c.weight_grad) for c in cases} == {(True, True), (True, False), (False, True)}


def test_without_hypothesis_installed_numpy_draws_the_cases(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # import hypothesis → ImportError
    report = verify.check_formulas(10, seed=0)
    assert report.engine == "numpy" and report.passed and len(report.outcomes) == 10
    assert main(["verify", "formulas", "--cases", str(len(layer_formulas.STRATA))]) == 0  # one case per stratum
    assert "NumPy draws" in capsys.readouterr().out


def test_same_seed_same_cases():
    first = verify.check_formulas(15, seed=7, use_hypothesis=False)
    second = verify.check_formulas(15, seed=7, use_hypothesis=False)
    assert [o.case for o in first.outcomes] == [o.case for o in second.outcomes]


def test_backward_conventions_by_hand():
    # Conv: one forward-sized product per gradient. BasisConv, M = 4, Q = 3, D = 18, P = 10:
    # coefficient gradient 4·3·10 = 120; input gradient 120 (1×1 stage) + 3·18·10 = 540 (basis stage).
    assert formulas.conv_backward_mults(500, input_grad=True, weight_grad=True) == 1000
    assert formulas.conv_backward_mults(500, input_grad=False, weight_grad=True) == 500
    assert formulas.basisconv_backward_mults(4, 3, 18, 10, input_grad=False, coeffs_grad=True) == 120
    assert formulas.basisconv_backward_mults(4, 3, 18, 10, input_grad=True, coeffs_grad=True) == 780
    assert formulas.basisconv_backward_mults(4, 3, 18, 10, input_grad=True, coeffs_grad=False) == 660
    # a learned basis bias: the intermediate needs a gradient although the input does not
    assert formulas.basisconv_backward_mults(4, 3, 18, 10, input_grad=False, coeffs_grad=True,
                                                   intermediate_grad=True) == 240
    # stored values of a BasisConv: basis 3·18 + coefficients 4·3 + bias 4
    assert formulas.stored_values_formula(4, 2, 3, num_basis=3, bias=True) == 54 + 12 + 4


# -- planted defects are found, shrunk and reproduced ----------------------------------------------
def test_a_gemm_count_without_its_batch_is_found_and_shrunk(batch_dropped_from_gemm_counts):
    report = verify.check_formulas(200, seed=0)
    assert not report.passed
    case = report.counterexample
    # The first stratum (im2col) finds it in the smallest layer of its stratum: a 1×1 kernel on one pixel
    # (padded to im2col), two images; BasisConv's 1×1 stage is one batched GEMM over the images, so at
    # batch 2 it counts what it counts at batch 1.
    assert (case.batch, case.kernel_size, case.height, case.width) == (2, (1, 1), 1, 1)
    assert case.in_channels == case.out_channels == case.groups == 1
    failures = {c.check for c in report.counterexample_outcome.failures}
    assert failures == {"basisconv mults at batch N = N × batch 1"}
    assert "FAILED" in report.table() and "reproduce it with" in report.table()
    with pytest.raises(AssertionError, match="at batch N"):
        exec(report.snippet, {})


def test_a_backward_pass_that_forgets_a_term_is_found(weight_gradient_not_counted):
    report = verify.check_formulas(200, seed=0)
    assert not report.passed
    failures = {c.check for c in report.counterexample_outcome.failures}
    assert "conv backward mults" in failures and "conv forward mults" not in failures
    case = report.counterexample
    assert case.weight_grad and (case.batch, case.in_channels, case.out_channels, case.height) == (2, 1, 1, 1)
    with pytest.raises(AssertionError, match="backward mults"):
        exec(report.snippet, {})


def test_an_off_by_one_output_size_is_found(off_by_one_output_size):
    report = verify.check_formulas(200, seed=0)
    assert not report.passed
    case = report.counterexample
    # A minimal layer on which floor and ceil differ: a stride that does not divide the remainder.
    assert (case.batch, case.in_channels, case.out_channels, case.kernel_size) == (2, 1, 1, (1, 1))
    padding = (0, 0) if case.padding == "valid" else case.padding
    sizes = (case.height, case.width)
    assert any((size + 2 * padding[axis] - 1) % case.stride[axis] for axis, size in enumerate(sizes))
    assert "conv output shape" in {c.check for c in report.counterexample_outcome.failures}
    with pytest.raises(AssertionError, match="output shape"):
        exec(report.snippet, {})


def test_an_off_by_one_output_size_in_the_conv_forward_is_found(conv_forward_one_row_too_many):
    report = verify.check_formulas(200, seed=0)
    assert not report.passed
    case = report.counterexample
    assert case.stride == (2, 1) and (case.batch, case.in_channels, case.height, case.width) == (2, 1, 1, 1)
    failure = report.counterexample_outcome.failures[0]
    assert failure.check == "conv runs" and "raised" in report.table()
    with pytest.raises(ValueError, match=re.escape(failure.measured.split(": ", 1)[1])):
        exec(report.snippet, {})


def test_without_hypothesis_the_first_failing_draw_is_reported(batch_dropped_from_gemm_counts):
    report = verify.check_formulas(40, seed=1, use_hypothesis=False)
    assert not report.passed and report.engine == "numpy"
    first_failing = next(o.case for o in report.outcomes if not o.passed)
    assert report.counterexample == first_failing
    assert "not shrunk" in report.table()


def test_cli_exits_1_with_a_shrunk_counterexample(batch_dropped_from_gemm_counts, capsys, tmp_path):
    out = tmp_path / "formulas.json"
    assert main(["verify", "formulas", "--cases", "100", "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "counterexample (shrunk by hypothesis)" in captured.out and "import minibasis" in captured.out
    document = json.loads(out.read_text())
    counterexample = document["counterexample"]
    assert document["passed"] is False and 2 in (counterexample["batch"], counterexample["groups"])
    assert document["mismatches"] and document["snippet"].startswith("# minibasis verify formulas")


def test_cli_passes_and_writes_json(capsys, tmp_path):
    out = tmp_path / "formulas.json"
    assert main(["verify", "formulas", "--cases", "20", "--seed", "5", "--json", str(out)]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert json.loads(out.read_text())["seed"] == 5


def test_cli_json_on_standard_output(capsys):
    assert main(["verify", "formulas", "--cases", str(len(layer_formulas.STRATA)), "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["cases_run"] == len(layer_formulas.STRATA) and "PASSED" in captured.err


@pytest.mark.parametrize("argv", [["verify", "formulas", "--cases", "0"], ["verify", "formulas", "--seed", "-1"],
                                  ["verify", "exactness", "no_such_model"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_cli_without_a_check_is_a_usage_error(capsys):
    assert main(["verify"]) == 2
    assert "error" in capsys.readouterr().err


# -- the snippet is a real program ------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_snippets_pass_on_the_engine_for_drawn_cases(seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        case = layer_formulas.draw_case(rng)
        for kind in ("conv", "basisconv", "linear") if case.basisconv_applies else ("conv", "linear"):
            exec(layer_formulas.snippet(case, kind), {})  # raises AssertionError on any mismatch


def test_a_snippet_runs_standalone():
    case = layer_formulas.draw_case(np.random.default_rng(11))
    result = subprocess.run([sys.executable, "-c", layer_formulas.snippet(case, "conv")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "every measured count equals its formula" in result.stdout


def test_snippet_rejects_an_unknown_kind():
    case = layer_formulas.draw_case(np.random.default_rng(0))
    with pytest.raises(ValueError, match="kind"):
        layer_formulas.snippet(case, "pool")


# -- exactness --------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 2, stride=2))
        self.classifier = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        return self.classifier(mb.functions.flatten(self.features(x)))


def test_exactness_passes_at_t_1():
    mb.manual_seed(0)
    report = verify.check_exactness(Tiny(), dtype="float32", input_shape=(3, 8, 8), num_inputs=4)
    assert report.passed, report.table()
    assert [row.path for row in report.layers] == ["features.0", "features.2"]
    assert all(row.num_basis == min(row.out_channels, row.in_channels * math.prod(row.kernel_size))
               for row in report.layers)
    assert 0 < report.worst_weight_error <= verify.BOUNDS["float32"].weight
    assert report.max_logit_difference > 0 or report.worst_output_error == 0
    document = json.loads(report.to_json())
    assert document["check"] == "exactness" and len(document["layers"]) == 2


def test_exactness_fails_when_a_basis_vector_is_dropped(monkeypatch):
    original = nn.BasisConv2d.from_conv.__func__

    def one_vector_short(cls, conv, energy_threshold=None, num_basis=None):
        full = original(cls, conv, energy_threshold=energy_threshold, num_basis=num_basis)
        return original(cls, conv, num_basis=max(1, full.num_basis - 1))

    monkeypatch.setattr(nn.BasisConv2d, "from_conv", classmethod(one_vector_short))
    mb.manual_seed(0)
    report = verify.check_exactness(Tiny(), dtype="float32", input_shape=(3, 8, 8), num_inputs=4)
    assert not report.passed
    assert report.worst_weight_error > 1e-3 and "ABOVE BOUND" in report.table()


def test_exactness_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        verify.check_exactness(Tiny(), dtype="float16")
    with pytest.raises(ValueError, match="images"):
        verify.check_exactness(Tiny(), np.zeros((3, 8, 8)))
    with pytest.raises(TypeError, match="Module"):
        verify.check_exactness(object())


def test_exactness_cli_on_a_zoo_model(capsys, tmp_path):
    out = tmp_path / "exactness.json"
    assert main(["verify", "exactness", "table3_cnn", "--dtype", "float32", "--images", "2",
                 "--json", str(out)]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert json.loads(out.read_text())["num_inputs"] == 2


# -- counts on a network ------------------------------------------------------------------------------
class SmallNet(nn.Module):
    """conv (input needs no gradient) → BN → ReLU → conv → head: paths conv0, bn0, conv1, head."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, stride=2)
        self.head = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        x = self.conv1(mb.functions.relu(self.bn0(self.conv0(x))))
        return self.head(mb.functions.flatten(x))


def test_counts_pass_for_the_original_and_compressed_models():
    mb.manual_seed(0)
    report = verify.check_counts(SmallNet(), thresholds=(1.0, 0.6), input_shape=(2, 3, 8, 8))
    assert report.passed, report.table()
    rows = {(r.variant, r.path): r for r in report.rows}
    assert {variant for variant, _ in rows} == {"original", "t=1", "t=0.6"}
    conv0, conv1 = rows["original", "conv0"], rows["original", "conv1"]
    # By definition: conv0 8·3·9 products at 8·8 positions; conv1 6·8·9 at 3·3 positions (per image).
    assert conv0.mults == 8 * 27 * 64 and conv1.mults == 6 * 72 * 9
    # The image needs no gradient: conv0 computes only its weight gradient, conv1 both.
    assert conv0.backward_mults == conv0.mults and conv1.backward_mults == 2 * conv1.mults
    assert rows["t=0.6", "conv1"].kind == "basisconv"
    assert json.loads(report.to_json())["failed"] == 0


def test_counts_fail_when_backward_forgets_a_term(weight_gradient_not_counted, capsys):
    mb.manual_seed(0)
    report = verify.check_counts(SmallNet(), thresholds=(), input_shape=(1, 3, 8, 8))
    assert not report.passed
    assert all(row.mults == row.formula_mults for row in report.rows)  # forward is still right
    assert all(row.backward_mults < row.backward_formula for row in report.rows)
    assert "MISMATCH" in report.table()
    assert main(["verify", "counts", "table3_cnn", "--thresholds", "0.9"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_counts_cli_on_the_shared_resnet20(capsys, tmp_path):
    weights = shared_file("models", "akamaster", "resnet20-12fca82f.th")
    out = tmp_path / "counts.json"
    assert main(["verify", "counts", str(weights), "--thresholds", "0.9", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["passed"] is True and len(document["rows"]) == 2 * 19


def shared_file(*parts):
    from minibasis.experiments import common  # imported here: the attribute exists only once imported
    path = common.shared_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared material {path} not present")
    return path


def test_exactness_cli_on_the_shared_resnet20_and_cifar10(capsys, tmp_path):
    weights = shared_file("models", "akamaster", "resnet20-12fca82f.th")
    data_dir = shared_file("data", "cifar-10-batches-py").parent
    out = tmp_path / "exactness.json"
    assert main(["verify", "exactness", str(weights), "--data", str(data_dir), "--images", "16",
                 "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["dtype"] == "float64" and document["bounds"]["weight"] == 200 * 2.0 ** -53
    assert document["inputs"] == "images" and document["num_inputs"] == 16 and len(document["layers"]) == 19
    assert all(layer["Q"] == min(layer["M"], layer["C"] * 9) for layer in document["layers"])
    assert 0 < document["worst_output_error"] <= document["bounds"]["output"]


def test_a_failure_that_does_not_reproduce_is_reported_as_such(monkeypatch):
    calls = []
    real = layer_formulas.run_case

    def flaky(case):
        outcome = real(case)
        calls.append(case)
        if len(calls) == 3:  # the third case run fails once, then never again
            outcome.comparisons.append(layer_formulas.Comparison("conv forward mults", 1, 2))
        return outcome

    monkeypatch.setattr(layer_formulas, "run_case", flaky)
    report = verify.check_formulas(10, seed=0, use_hypothesis=False)
    assert not report.passed and report.snippet is None
    assert "passed when run again" in report.table()


class GrayNet(nn.Module):
    """One-channel input: conv 1→4 → head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.head(mb.functions.flatten(self.conv(x)))


def test_input_channels_come_from_the_first_conv():
    from minibasis.measure import input_channels
    assert input_channels(GrayNet()) == 1
    assert input_channels(SmallNet()) == 3
    assert input_channels(nn.Linear(5, 2)) == 3 and input_channels(nn.Linear(5, 2), default=7) == 7
    report = verify.check_counts(GrayNet(), thresholds=(1.0,), input_shape=(1, input_channels(GrayNet()), 8, 8))
    assert report.passed and report.input_shape == (1, 1, 8, 8)


def test_counts_cli_names_an_input_the_model_refuses(capsys):
    assert main(["verify", "counts", "table3_cnn", "--thresholds", "0.9", "--in-channels", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot run on an input of shape (1, 1, 32, 32)" in err and "Traceback" not in err


def test_counts_at_a_batch_catch_a_slip_in_the_chunk_loops_that_batch_one_misses(monkeypatch):
    from counting_mutations import SLIPS

    SLIPS["conv forward, strided: chunks after the first uncounted"].plant(monkeypatch.setattr)
    mb.manual_seed(0)
    with smallest_chunks():  # 8×8 images: a batch of 3 in 3 chunks (ResNet-20's 32×32 at 128: ~10 chunks)
        report = verify.check_counts(SmallNet(), thresholds=(), input_shape=(1, 3, 8, 8), batch=3)
    assert not report.passed
    rows = {r.path: r for r in report.rows}
    assert rows["conv0"].passed  # not strided
    conv1 = rows["conv1"]
    assert (conv1.mults, conv1.backward_mults) == (conv1.formula_mults, conv1.backward_formula)  # batch 1 is right
    assert conv1.batch_mults != conv1.mults and "MISMATCH" in report.table()
