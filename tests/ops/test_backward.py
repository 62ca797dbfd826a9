"""Backward of the packed ops with respect to their input (frozen weights, straight-through estimator):
compared with the STE formula and with autograd through the training form (BitLinear fake quantisation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bitnet.ops as ops
from bitnet.nn import BitLinear, Int8Linear, PackedBitLinear
from bitnet.ops import cpu as native
from bitnet.ops import int8 as int8_ops
from bitnet.quant import fake_quant_activation, pack_i2

CPU_BACKENDS = ["reference"] + (["cpu"] if native.available() else [])


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    old = ops._requested
    ops.set_backend(request.param)
    yield request.param
    ops._requested = old


@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (5, 130, 37), (7, 256, 300)])
def test_bitlinear_packed_input_grad_is_the_ste_formula(cpu_backend, m, k, n, monkeypatch):
    monkeypatch.setattr(ops, "GRAD_CHUNK_ELEMENTS", 1000)                  # several row blocks per call
    g = torch.Generator().manual_seed(m * k + n)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    w_packed, w_scale = pack_i2(w), torch.tensor(0.37)
    bias = torch.randn(n, generator=g).requires_grad_()
    x = torch.randn(m, k, generator=g).requires_grad_()
    grad_y = torch.randn(m, n, generator=g)
    y = ops.bitlinear_packed(x, w_packed, w_scale, k, bias)
    y.backward(grad_y)
    expect = grad_y @ (w.float() * 0.37)                                   # grad_x = grad_y @ (Wq * gamma)
    torch.testing.assert_close(x.grad, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, grad_y.sum(0))
    with torch.no_grad():                                                  # forward unchanged by the grad path
        assert torch.equal(y, ops.bitlinear_packed(x.detach(), w_packed, w_scale, k, bias.detach()))


def test_packed_layer_grad_matches_training_form_autograd(cpu_backend):
    """Autograd through BitLinear's fake quantisation (STE on x, weight frozen) == the packed backward."""
    torch.manual_seed(0)
    train = BitLinear(96, 40, norm=True)
    packed = PackedBitLinear.from_bitlinear(train)
    x = torch.randn(3, 4, 96)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    q, gamma = train.quantized_weight()
    # training form with the weight frozen at its quantised value: F.linear(STE(norm(x)), Wq * gamma)
    ya = F.linear(fake_quant_activation(train.norm(xa)), (q * gamma).detach())
    yb = packed(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-6)
    assert packed.norm.weight.grad is not None                             # the norm before it trains


def test_input_grad_dtype_and_gradcheck_of_the_linear_part():
    torch.manual_seed(1)
    w = torch.randint(-1, 2, (9, 128), dtype=torch.int8)
    x = torch.randn(2, 128, dtype=torch.bfloat16, requires_grad=True)
    ops.bitlinear_packed(x, pack_i2(w), torch.tensor(1.5), 128).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    # the backward is the exact vector-Jacobian product of y = x @ (Wq * gamma)^T, the STE surrogate
    xs = torch.randn(3, 128, dtype=torch.float64)
    vjp = ops.ternary_input_grad(xs[:, :9].float(), pack_i2(w), torch.tensor(1.5), 128)
    _, ref = torch.autograd.functional.vjp(lambda v: v @ (w.double() * 1.5).T, torch.zeros(3, 128, dtype=torch.float64),
                                           xs[:, :9])
    torch.testing.assert_close(vjp.double(), ref, rtol=1e-6, atol=1e-6)


def test_int8_head_input_grad(monkeypatch):
    monkeypatch.setattr(int8_ops, "GRAD_CHUNK_ELEMENTS", 500)
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 50, bias=False)
    head = Int8Linear.from_linear(lin)
    x = torch.randn(4, 64, requires_grad=True)
    y = head(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ head.dequantized_weight(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(y, head(x.detach()))
