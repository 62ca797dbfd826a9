"""The quantisers of both papers on hand-made tensors, and the STE."""

import pytest
import torch

from bitnet.quant import (
    activation_quant,
    activation_quant_int8,
    binary_weight_quant,
    check_bits,
    fake_quant_weight,
    normalize_weight_kind,
    ste,
    ternary_weight_quant,
)


def test_ternary_absmean_hand_made():
    w = torch.tensor([[0.9, -0.2, 0.0, -1.5], [0.1, 0.5, -0.6, 0.2]])
    wq, gamma = ternary_weight_quant(w)
    # gamma = mean |W| = (0.9+0.2+0+1.5+0.1+0.5+0.6+0.2)/8 = 0.5
    assert gamma.item() == pytest.approx(0.5)
    # W / gamma = [1.8, -0.4, 0, -3 | 0.2, 1.0, -1.2, 0.4] -> round, clamp
    assert wq.tolist() == [[1.0, -0.0, 0.0, -1.0], [0.0, 1.0, -1.0, 0.0]]


def test_binary_sign_hand_made_zero_maps_to_plus_one():
    w = torch.tensor([[1.0, 2.0], [3.0, -2.0]])        # mean 1.0 -> centred [0, 1, 2, -3]
    wb, beta = binary_weight_quant(w)
    assert wb.tolist() == [[1.0, 1.0], [1.0, -1.0]]     # exact zero after centring -> +1
    assert beta.item() == pytest.approx(2.0)             # mean |W| = (1+2+3+2)/4


def test_b1_and_b158_differ():
    torch.manual_seed(0)
    w = torch.randn(16, 32) * 0.02
    t, _ = ternary_weight_quant(w)
    b, _ = binary_weight_quant(w)
    assert set(t.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert set(b.unique().tolist()) == {-1.0, 1.0}


def test_activation_absmax_per_token_hand_made():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.01, 0.02, -0.04]])
    xq, s = activation_quant(x, bits=8)
    assert s[:, 0].tolist() == pytest.approx([127 / 2.0, 127 / 0.04])
    assert xq[0].tolist() == [64.0, -127.0, 32.0]      # round(63.5) = 64 (half to even), 31.75 -> 32
    assert xq[1].tolist() == [32.0, 64.0, -127.0]      # 31.75 -> 32, 63.5 -> 64
    xq8, s8 = activation_quant_int8(x)
    assert xq8.dtype == torch.int8 and torch.equal(xq8.float(), xq) and torch.equal(s8, s)


def test_activation_bits_range_and_clamp():
    x = torch.randn(4, 64)
    for bits in (2, 4, 8):
        xq, _ = activation_quant(x, bits)
        qp = 2 ** (bits - 1) - 1
        assert xq.max() <= qp and xq.min() >= -qp - 1
    for bad in (1, 9, 0, 3.5, True):
        with pytest.raises(ValueError, match="bits"):
            check_bits(bad)


def test_activation_of_zero_token_is_finite():
    xq, s = activation_quant(torch.zeros(2, 8))
    assert torch.isfinite(s).all() and (xq == 0).all()


def test_ste_gradient_is_identity_and_reaches_weights():
    w = torch.randn(8, 16, requires_grad=True)
    fake_quant_weight(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    x = torch.randn(5, requires_grad=True)
    y = ste(x, x.round(), strength=0.5)
    assert torch.allclose(y, x + 0.5 * (x.round() - x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("kind,expected", [("1.58", "1.58"), (1.58, "1.58"), ("b1", "1"), (1, "1"), ("binary", "1")])
def test_weight_kind_spellings(kind, expected):
    assert normalize_weight_kind(kind) == expected


def test_unknown_weight_kind_is_named():
    with pytest.raises(ValueError, match="weight kind must be one of '1.58'.*'1'"):
        normalize_weight_kind("2bit")
