"""``minibasis count``: measured conv multiplications against sums computed here from the architectures."""
import json

import pytest

from minibasis.cli import main


def _count(tmp_path, *argv):
    path = tmp_path / "count.json"
    assert main(["count", *argv, "--json", str(path)]) == 0
    return {r["description"]: r for r in json.loads(path.read_text())["models"]}


def _resnet_cifar_conv_mults(depth: int, shortcut: str) -> int:
    """Σ M·C·k²·Ho·Wo of a CIFAR ResNet, written out stage by stage from He et al.'s layout."""
    n = (depth - 2) // 6
    total = 16 * 3 * 9 * 32 * 32                                   # stem
    total += 2 * n * 16 * 16 * 9 * 32 * 32                         # stage 1: 2n convs 16→16 at 32×32
    total += 32 * 16 * 9 * 16 * 16 + (2 * n - 1) * 32 * 32 * 9 * 16 * 16   # stage 2 at 16×16
    total += 64 * 32 * 9 * 8 * 8 + (2 * n - 1) * 64 * 64 * 9 * 8 * 8       # stage 3 at 8×8
    if shortcut == "B":
        total += 32 * 16 * 16 * 16 + 64 * 32 * 8 * 8               # the two strided 1×1 projections
    return total


def _table3_conv_mults() -> int:
    """The paper's Table 3 net: 5×5 convs (pad 2) at 32×32, 15×15, 7×7 (3×3 stride-2 pools between)."""
    return 32 * 3 * 25 * 32 * 32 + 32 * 32 * 25 * 15 * 15 + 64 * 32 * 25 * 7 * 7


def test_measured_conv_mults_equal_independent_sums(tmp_path):
    reports = _count(tmp_path, "table3_cnn", "resnet20", "resnet_cifar", "--depth", "32")
    table3, r20, r32 = reports["table3_cnn"], reports["resnet20"], reports["resnet_cifar(depth=32)"]
    assert table3["conv_mults_measured"] == table3["conv_mults_formula"] == _table3_conv_mults()
    assert r20["conv_mults_measured"] == r20["conv_mults_formula"] == _resnet_cifar_conv_mults(20, "A")
    assert r32["conv_mults_measured"] == _resnet_cifar_conv_mults(32, "A")
    # Per layer too, and the layer list is the 19 convs of ResNet-20.
    assert r20["conv_layers"] == 19
    assert all(row["measured_mults"] == row["formula_mults"] for row in r20["layers"])
    # The akamaster README's parameter count for ResNet-20 (CIFAR-10).
    assert r20["params"] == 269_722


def test_paper_nets_match_table2_where_the_paper_is_consistent(tmp_path):
    reports = _count(tmp_path, "alexnet", "vgg16", "resnet110")
    alex, vgg, r110 = reports["alexnet"], reports["vgg16"], reports["resnet110(shortcut=B)"]
    # The paper's Table 1 parameters and Table 2 filter counts (Σ min(M, D)).
    assert (alex["params"], alex["filters_min_md"]) == (2_495_396, 1152)
    assert (vgg["params"], vgg["filters_min_md"]) == (14_765_988, 4187)
    assert (r110["params"], r110["filters_min_md"]) == (1_736_564, 4096)
    # Table 2's GFLOPs for VGG16 (0.313) and ResNet-110 (0.253) are conv multiplications.
    assert vgg["conv_mults_measured"] == 313_196_544
    assert r110["conv_mults_measured"] == _resnet_cifar_conv_mults(110, "B") == 253_149_184
    # Plain filter counts Σ M: VGG16 has 2·64 + 2·128 + 3·256 + 6·512 filters.
    assert vgg["filters"] == 4224
    assert alex["paper"] == {"params": 2_495_396, "filters": 1152, "gflops": 0.24}
    # AlexNet at 32×32, the figure the paper's 0.24 cannot be: 8×8, 4×4 and then 2×2 maps.
    alex_mults = 64 * 3 * 121 * 8 * 8 + 192 * 64 * 25 * 4 * 4 + (384 * 192 + 256 * 384 + 256 * 256) * 9 * 2 * 2
    assert alex["conv_mults_measured"] == alex_mults


def test_table_and_json_on_stdout(capsys):
    assert main(["count", "resnet20", "--layers", "--json", "-"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["models"][0]["model"] == "resnet20"
    assert "layer3.2.conv2" in captured.err and "conv mults measured" in captured.err


def test_paper_figures_only_for_the_papers_configuration(tmp_path):
    reports = _count(tmp_path, "resnet110", "--shortcut", "A")
    (report,) = reports.values()
    assert report["paper"] is None  # option A is not the net the paper measured


@pytest.mark.parametrize("argv, message", [
    (["count", "resnet21"], "unknown model"),
    (["count", "alexnet", "--depth", "20"], "--depth"),
    (["count", "resnet_cifar"], "needs --depth"),
    (["count", "resnet_cifar", "--depth", "21"], "6n+2"),
    (["count", "vgg16", "--shortcut", "B"], "--shortcut"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_densenet190_filters_and_mults(tmp_path):
    (report,) = _count(tmp_path, "densenet190", "--batch", "2").values()  # 9.3e9 mults per image: 2 images
    assert report["batches"] == [2, 1]
    assert report["params"] == 25_821_620
    assert report["filters_min_md"] == 20117
    assert report["conv_mults_measured"] == report["conv_mults_formula"]
