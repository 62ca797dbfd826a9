"""BitLinear: the call forms of tutorials, the exact math, gradients, errors."""

import pytest
import torch
from torch import nn

from bitnet import BitLinear, set_quant_strength
from bitnet.quant import activation_quant, ternary_weight_quant


def test_drop_in_shapes_any_leading_dims():
    layer = BitLinear(512, 400)
    assert layer(torch.randn(10, 512)).shape == (10, 400)
    assert layer(torch.randn(2, 3, 5, 512)).shape == (2, 3, 5, 400)
    assert isinstance(layer, nn.Linear) and layer.bias is None


@pytest.mark.parametrize("kind", ["1.58", "1"])
def test_output_is_integer_matmul_then_one_rescale(kind):
    torch.manual_seed(0)
    layer = BitLinear(64, 24, weight_kind=kind, norm=False)
    x = torch.randn(7, 64)
    wq, gamma = layer.quantized_weight()
    xq, s = activation_quant(x)
    integer = (xq.double() @ wq.double().T)                  # exact integers
    assert torch.equal(integer, integer.round())
    expected = integer * gamma.double() / s.double()         # y = (xq @ Wq^T) * gamma / s
    assert torch.allclose(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_norm_is_applied_before_activation_quant():
    torch.manual_seed(0)
    layer = BitLinear(32, 8)
    x = torch.randn(3, 32) * 5
    plain = BitLinear(32, 8, norm=False)
    plain.weight = layer.weight
    assert torch.allclose(layer(x), plain(layer.norm(x)))


def test_gradients_reach_fp_master_weights_through_ste():
    torch.manual_seed(0)
    layer = BitLinear(16, 4, bias=True)
    x = torch.randn(5, 16, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.bias.grad is not None and x.grad is not None
    assert layer.weight.dtype == torch.float32               # master weights stay fp32


def test_forward_creates_no_parameters_or_modules():
    layer = BitLinear(16, 4)
    before = (len(list(layer.parameters())), len(list(layer.modules())))
    for _ in range(3):
        layer(torch.randn(2, 16))
    assert (len(list(layer.parameters())), len(list(layer.modules()))) == before


def test_quant_strength_zero_is_full_precision():
    torch.manual_seed(0)
    layer = BitLinear(16, 4, norm=False)
    x = torch.randn(3, 16)
    set_quant_strength(layer, 0.0)
    assert torch.allclose(layer(x), x @ layer.weight.T, atol=1e-6)
    set_quant_strength(layer, 1.0)
    assert not torch.allclose(layer(x), x @ layer.weight.T, atol=1e-3)
    with pytest.raises(ValueError, match="strength"):
        set_quant_strength(layer, 1.5)


def test_ternary_weights_in_effect():
    layer = BitLinear(64, 8, norm=False)
    wq, gamma = ternary_weight_quant(layer.weight)
    assert set(wq.unique().tolist()) <= {-1.0, 0.0, 1.0} and gamma > 0


def test_bad_input_errors_name_the_argument():
    with pytest.raises(ValueError, match="in_features=512"):
        BitLinear(512, 4)(torch.randn(3, 500))
    with pytest.raises(ValueError, match="weight kind"):
        BitLinear(8, 4, weight_kind="3")
    with pytest.raises(ValueError, match="bits"):
        BitLinear(8, 4, bits=16)
    with pytest.raises(ValueError, match="out_features"):
        BitLinear(8, 0)
