"""``minibasis count MODEL_FILE``: a model file is counted as it is stored (BasisConv layout included),
with the counts checked against sums written out here, and bad files refused in one line."""
import json

import pytest

import minibasis
from minibasis.cli import main
from minibasis.models import table3_cnn


def _table3_basis_conv_mults(q=(32, 32, 64)) -> int:
    """Random-basis Table 3 net: per layer Q·D (basis stage) + M·Q (coefficients) per output pixel."""
    layers = [(32, 3 * 25, 32 * 32), (32, 32 * 25, 15 * 15), (64, 32 * 25, 7 * 7)]  # (M, D, Ho·Wo)
    return sum((qi * d + m * qi) * p for qi, (m, d, p) in zip(q, layers))


def test_a_random_basis_model_file_is_counted_as_stored(tmp_path, capsys):
    path = tmp_path / "basis.npz"
    minibasis.save_model(table3_cnn(basis=True), path, normalization="cifar10", dataset="cifar10")
    out = tmp_path / "count.json"
    assert main(["count", "table3_cnn", str(path), "--json", str(out)]) == 0
    plain, basis = json.loads(out.read_text())["models"]
    assert plain["conv_mults_measured"] == 32 * 3 * 25 * 32 * 32 + 32 * 32 * 25 * 15 * 15 + 64 * 32 * 25 * 7 * 7
    assert basis["conv_mults_measured"] == basis["conv_mults_formula"] == _table3_basis_conv_mults()
    assert basis["description"].endswith("basis.npz") and basis["config"]["num_classes"] == 10
    assert basis["learnable_params"] < plain["learnable_params"]


@pytest.mark.parametrize("argv, fragment", [
    (["missing.npz"], "does not exist"),
    (["FILE", "--depth", "20"], "do not apply to model files"),
    (["JUNK"], "cannot read the model file"),
])
def test_bad_model_files_are_refused_in_one_line(tmp_path, capsys, argv, fragment):
    good = tmp_path / "good.npz"
    minibasis.save_model(table3_cnn(), good, normalization="cifar10", dataset="cifar10")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a model")
    argv = [str(good) if a == "FILE" else str(junk) if a == "JUNK" else str(tmp_path / a) if a.endswith(".npz") else a
            for a in argv]
    assert main(["count", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
