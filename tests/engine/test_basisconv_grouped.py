"""BasisConv2d and grouped/dilated/"same" convs: from_conv's refusal of grouped convs, dilation kept, to_conv folds."""
from __future__ import annotations

import numpy as np
import pytest

import minibasis as mb
from minibasis import nn
from minibasis.nn import BasisConv2d


def float64_conv(*args, **kwargs):
    conv = nn.Conv2d(*args, **kwargs)
    for p in conv.parameters():
        p.data = p.data.astype(np.float64)
    return conv


@pytest.mark.parametrize("groups, c, m", [(2, 4, 6), (8, 8, 8)])
def test_from_conv_refuses_grouped_convs_with_the_reason(groups, c, m):
    conv = nn.Conv2d(c, m, 3, padding=1, groups=groups)
    with pytest.raises(ValueError) as info:
        BasisConv2d.from_conv(conv, energy_threshold=1.0)
    text = str(info.value)
    assert f"groups={groups}" in text and "Q/M + Q/D" in text and "Conv2d" in text


@pytest.mark.parametrize("kwargs", [dict(padding=2, dilation=2), dict(padding="same", dilation=(1, 3)),
                                    dict(stride=2, padding="valid", dilation=(2, 1)), dict(kernel_size=(2, 4), padding="same")])
def test_from_conv_keeps_dilation_and_padding_mode_and_is_exact_at_t1(kwargs):
    kwargs = dict(kwargs)
    kernel = kwargs.pop("kernel_size", 3)
    conv = float64_conv(5, 7, kernel, **kwargs)
    layer = BasisConv2d.from_conv(conv, energy_threshold=1.0)
    assert layer.dilation == conv.dilation and layer.padding == conv.padding and layer.stride == conv.stride
    x = mb.tensor(np.random.default_rng(0).standard_normal((2, 5, 9, 8)))
    with mb.no_grad():
        want, got = conv(x).data, layer(x).data
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    if "dilation" in kwargs:
        assert "dilation=" in repr(layer)


def random_layer_with_everything(dilation=1, padding=1, stride=1):
    rng = np.random.default_rng(1)
    layer = BasisConv2d.random(4, 6, 3, 5, stride=stride, padding=padding, bias=True, bn=True, basis_bias=True,
                               seed=3, dtype=np.float64, dilation=dilation)
    layer.bn.weight.data = rng.uniform(0.5, 2.0, 5)
    layer.bn.bias.data = rng.standard_normal(5)
    layer.bn.running_mean = rng.standard_normal(5)
    layer.bn.running_var = rng.uniform(0.5, 2.0, 5)
    layer.bias.data = rng.standard_normal(6)
    layer.basis_bias.data = rng.standard_normal(5)
    return layer.eval()


@pytest.mark.parametrize("build", [
    lambda: BasisConv2d.from_conv(float64_conv(4, 6, 3, padding=1), num_basis=3),
    lambda: BasisConv2d.from_conv(float64_conv(4, 6, 3, padding=1, bias=False), energy_threshold=1.0),
    lambda: random_layer_with_everything(),
    lambda: random_layer_with_everything(dilation=2, padding="same"),
    lambda: random_layer_with_everything(stride=2, padding=0),
])
def test_to_conv_folds_into_one_equivalent_conv(build):
    layer = build()
    conv = layer.to_conv()
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (layer.out_channels, layer.in_channels, 3, 3)
    assert conv.weight.dtype == np.float64 and (conv.stride, conv.padding, conv.dilation) == \
        (layer.stride, layer.padding, layer.dilation)
    x = mb.tensor(np.random.default_rng(2).standard_normal((3, 4, 8, 7)))
    with mb.no_grad():
        np.testing.assert_allclose(conv(x).data, layer(x).data, rtol=1e-11, atol=1e-11)
    # The reference weight, by the definition: Σ_j W_ij a_j e_j
    if layer.bn is None:
        want = np.einsum("mq,qcij->mcij", layer.coeffs.data, layer.basis)
        np.testing.assert_allclose(conv.weight.data, want, rtol=1e-12, atol=1e-12)
        assert (conv.bias is None) == (layer.bias is None)


def test_to_conv_without_running_statistics_is_refused():
    layer = BasisConv2d.random(4, 6, 3, 5, padding=1, bn=False, seed=0)
    layer.bn = nn.BatchNorm2d(5, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        layer.to_conv()
