"""BasisConv, measured: multiplication counts against the paper's formulas, and exactness at t = 1.

Run from the repository root:  python examples/basisconv_exactness.py

1. One 5×5 conv 32→64 on a 16×16 input: measured multiplications of the conv and of its
   BasisConv at several Q, next to M·D·Ho·Wo, Q·D·Ho·Wo + M·Q·Ho·Wo and Q/M + Q/D.
2. The paper's Table 3 CNN and its BasisConv twin (Q = M): learnable conv parameters
   (79,328 and 6,400 in the paper) and measured conv multiplications per image.
3. ``compress`` at t = 1 (every layer replaced) reproduces the network's outputs; at
   t = 0.9 the report shows what a threshold saves. The weights are random here (no
   training), so their energy is spread evenly and t < 1 saves little; trained
   filters are far more compressible.
"""
from fractions import Fraction

import numpy as np

import minibasis as mb
from minibasis import formulas, models, nn


def count_conv(module, x) -> int:
    with mb.no_grad(), mb.count_mults() as counter:
        module(x)
    return counter.conv


def single_layer() -> None:
    m, c, k, side, n = 64, 32, 5, 16, 2
    d = c * k * k
    mb.manual_seed(0)
    conv = nn.Conv2d(c, m, k, padding=2)
    x = mb.tensor(np.random.default_rng(0).standard_normal((n, c, side, side)).astype(np.float32))
    measured_conv = count_conv(conv, x) // n
    print(f"1. conv {c}->{m}, {k}x{k}, pad 2, input {side}x{side}: D = {d}, M = {m}  (per image)")
    print(f"   conv      measured {measured_conv:>10,}   formula M*D*Ho*Wo = {formulas.conv_mults(m, c, k, side, side):,}")
    for q in (4, 16, 32, 64):
        layer = nn.BasisConv2d.from_conv(conv, num_basis=q)
        measured = count_conv(layer, x) // n
        formula = formulas.basisconv_mults(m, q, c, k, side, side)
        ratio = Fraction(measured, measured_conv)
        print(f"   Q = {q:>2}    measured {measured:>10,}   formula {formula:>10,}   measured ratio {str(ratio):>7}"
              f" = {float(ratio):.4f}   Q/M + Q/D = {formulas.mult_ratio(m, q, c, k)}   equal: {ratio == formulas.mult_ratio(m, q, c, k)}")
    exact = nn.BasisConv2d.from_conv(conv, energy_threshold=1.0)
    reference = conv(x).numpy()
    err = np.abs(exact(x).numpy() - reference).max() / np.abs(reference).max()
    print(f"   t = 1: Q = {exact.num_basis}, energy {exact.energy:.6f}, max relative output difference {err:.2e} (float32)")


def conv_params(model) -> int:
    return sum(p.numel() for layer in model.modules() if isinstance(layer, (nn.Conv2d, nn.BasisConv2d))
               for name, p in layer.named_parameters() if not name.startswith("bn."))


def table3() -> None:
    x = mb.tensor(np.zeros((1, 3, 32, 32), dtype=np.float32))
    plain, twin = models.table3_cnn(), models.table3_cnn(basis=True, seed=0).eval()
    sides = (32, 15, 7)
    shapes = [(32, 3), (32, 32), (64, 32)]
    formula_plain = sum(formulas.conv_mults(m, c, 5, s, s) for (m, c), s in zip(shapes, sides))
    formula_twin = sum(formulas.basisconv_mults(m, m, c, 5, s, s) for (m, c), s in zip(shapes, sides))
    print("\n2. Table 3 CNN (per image)")
    print(f"   plain: learnable conv parameters {conv_params(plain):,} (paper 79,328); "
          f"conv mults measured {count_conv(plain, x):,}, formula {formula_plain:,}")
    print(f"   twin : learnable conv parameters {conv_params(twin):,} (paper 6,400); "
          f"conv mults measured {count_conv(twin, x):,}, formula {formula_twin:,}")


def whole_model() -> None:
    mb.manual_seed(1)
    model = models.table3_cnn()
    for p in model.parameters():  # float64 so that exactness can be checked to rounding
        p.data = p.data.astype(np.float64)
    x = mb.tensor(np.random.default_rng(1).standard_normal((4, 3, 32, 32)))
    reference = model.eval()(x).numpy()
    exact, _ = mb.compress(model, energy_threshold=1.0, skip_unprofitable=False)
    err = np.abs(exact.eval()(x).numpy() - reference).max() / np.abs(reference).max()
    print(f"\n3. compress(table3_cnn, t=1, skip_unprofitable=False): max relative output difference {err:.2e} (float64)")
    _, report = mb.compress(model, energy_threshold=0.9)
    print(report.table())


if __name__ == "__main__":
    single_layer()
    table3()
    whole_model()
