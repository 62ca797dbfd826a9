"""The fused BitLinear (one autograd Function) against the reference composition it replaces.

The forward must be bit-identical (torch.equal) and the STE gradients equal up to float rounding (the
norm weight's gradient is summed chunk by chunk, in another order than autograd's), for
both weight kinds, bits 8 and 4, norm on/off, bias on/off, 1D/2D/3D inputs, lambda < 1, and with the
row-chunked passes forced to use many chunks. The caches (quantised weight, shared norm-free input)
must never serve stale values.
"""

import copy
import itertools

import pytest
import torch
from torch import nn

import bitnet.nn.bitlinear as bl
from bitnet import BitLinear, BitNetTransformer, replace_linears_in_hf
from bitnet.nn.bitlinear import fused_bitlinear

CASES = list(itertools.product(["1.58", "1"], [8, 4], [True, False], [True, False]))


def _run(layer, x, fused, grad=None):
    """Output, gradient output and the grads of x and every parameter, on the chosen path."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with fused_bitlinear(fused):
        y = layer(x)
    grad = torch.randn_like(y) if grad is None else grad
    y.backward(grad)
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return y.detach(), grad, grads, y.grad_fn


@pytest.mark.parametrize("chunk", [1 << 16, 50])
@pytest.mark.parametrize("shape", [(37, 48), (3, 29, 48), (48,)])
@pytest.mark.parametrize("kind,bits,norm,bias", CASES)
def test_fused_forward_bit_identical_and_gradients_equal(kind, bits, norm, bias, shape, chunk, monkeypatch):
    monkeypatch.setattr(bl, "_CHUNK_ELEMENTS", chunk)            # 50: one row per chunk
    torch.manual_seed(CASES.index((kind, bits, norm, bias)) * 10 + len(shape))
    for strength in (1.0, 0.6):
        layer = BitLinear(48, 20, bias=bias, weight_kind=kind, bits=bits, norm=norm, quant_strength=strength)
        with torch.no_grad():
            if norm:
                layer.norm.weight.uniform_(0.5, 1.5)
            if bias:
                layer.bias.normal_()
        x = torch.randn(*shape) * 3
        y_ref, g, grads_ref, fn_ref = _run(layer, x, fused=False)
        y, _, grads, fn = _run(layer, x, fused=True, grad=g)
        assert type(fn).__name__ == "_BitLinearFunctionBackward" and type(fn_ref).__name__ != type(fn).__name__
        assert torch.equal(y, y_ref)
        for name in grads_ref:                                   # (norm.weight: chunk sums, other order)
            assert torch.allclose(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("norm", [True, False])
def test_fused_non_contiguous_input(norm):
    torch.manual_seed(0)
    layer = BitLinear(48, 20, bias=True, norm=norm)
    x = torch.randn(29, 3, 48).transpose(0, 1)                    # (3, 29, 48), not contiguous
    y_ref, g, grads_ref, _ = _run(layer, x, fused=False)
    y, _, grads, _ = _run(layer, x, fused=True, grad=g)
    assert torch.equal(y, y_ref)
    for name in grads_ref:
        assert torch.allclose(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6), name


def test_fused_handles_zero_rows_and_huge_values():
    layer = BitLinear(16, 8, bias=True)
    x = torch.randn(6, 16)
    x[1] = 0.0                                                    # absmax 0: scale clamped by eps
    x[2] *= 1e6
    x[3, :3] = torch.tensor([1e-30, -1e-30, 0.0])
    ref = layer.reference_forward(x)
    assert torch.equal(layer(x), ref) and torch.isfinite(ref).all()


def _model_grads(model, tokens, fused):
    model.zero_grad(set_to_none=True)
    with fused_bitlinear(fused):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weights", ["1.58", "1"])
def test_model_training_step_equals_reference(weights):
    torch.manual_seed(0)
    model = BitNetTransformer(64, 32, 2, heads=4, kv_heads=2, max_seq_len=16, weights=weights)
    tokens = torch.randint(0, 64, (3, 13))
    loss_ref, grads_ref = _model_grads(model, tokens, fused=False)
    loss, grads = _model_grads(model, tokens, fused=True)
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), name


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.fc1, self.fc2, self.head = nn.Linear(24, 40), nn.Linear(40, 24), nn.Linear(24, 50)

    def loss(self, tokens, targets):
        h = self.emb(tokens)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())


def test_drop_in_with_norm_equals_reference():
    torch.manual_seed(0)
    model = replace_linears_in_hf(_Plain(), norm=True, exclude=["head"])
    tokens = torch.randint(0, 50, (4, 9))
    loss_ref, grads_ref = _model_grads(model, tokens, fused=False)
    loss, grads = _model_grads(model, tokens, fused=True)
    assert torch.equal(loss, loss_ref)
    for name, g in grads_ref.items():
        assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), name


def test_weight_cache_is_reused_and_follows_every_weight_change():
    torch.manual_seed(0)
    layer = BitLinear(32, 16, norm=False)
    first = layer.fake_quantized_weight(torch.float32)
    assert layer.fake_quantized_weight(torch.float32) is first      # unchanged weight: cached
    x = torch.randn(5, 32)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    for _ in range(2):                                             # optimizer steps change the weight
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        assert torch.equal(layer(x), layer.reference_forward(x))
    with torch.no_grad():                                          # in-place edit bumps the version
        layer.weight.mul_(-1)
    assert torch.equal(layer(x), layer.reference_forward(x))
    layer.weight.data.copy_(torch.randn(16, 32))                   # .data bypasses the version counter...
    layer.clear_cache()                                            # ...documented: clear the cache
    assert torch.equal(layer(x), layer.reference_forward(x))
    layer.weight = nn.Parameter(torch.randn(16, 32))               # a new parameter object
    assert torch.equal(layer(x), layer.reference_forward(x))
    layer.eval()                                                   # eval: nothing cached
    assert layer.fake_quantized_weight(torch.float32) is not layer.fake_quantized_weight(torch.float32)


def test_weight_cache_follows_foreach_and_fused_optimizers():
    for kwargs in ({"foreach": True}, {"fused": True}, {"foreach": False}):
        torch.manual_seed(0)
        layer = BitLinear(32, 16)
        x = torch.randn(5, 32)
        opt = torch.optim.Adam(layer.parameters(), lr=0.05, **kwargs)
        layer(x).sum().backward()
        opt.step()
        assert torch.equal(layer(x), layer.reference_forward(x)), kwargs


def test_gradient_accumulation_with_cached_weight():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    a, b = torch.randn(4, 16), torch.randn(3, 16)
    layer(a).sum().backward()
    layer(b).sum().backward()                                      # second micro-batch, same weight
    fused = layer.weight.grad.clone()
    layer.zero_grad()
    with fused_bitlinear(False):
        layer(a).sum().backward()
        layer(b).sum().backward()
    assert torch.allclose(fused, layer.weight.grad, rtol=1e-6, atol=1e-7)


def test_shared_input_is_quantised_once_but_never_stale():
    torch.manual_seed(0)
    q, k = BitLinear(16, 8, norm=False), BitLinear(16, 8, norm=False, bits=4)
    x = torch.randn(5, 16)
    assert torch.equal(q(x), q.reference_forward(x))
    assert torch.equal(k(x), k.reference_forward(x))               # other bits: not the cached values
    assert torch.equal(q(x), q.reference_forward(x))
    with torch.no_grad():
        x.mul_(3)                                                   # in place: version bump
    assert torch.equal(q(x), q.reference_forward(x))


def test_other_dtypes_autocast_inference_and_no_grad():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, bias=True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.reference_forward(x))
    with torch.inference_mode():
        assert torch.equal(layer(x), layer.reference_forward(x))
    double = copy.deepcopy(layer).double()                          # float64: the reference path
    y = double(x.double().requires_grad_())
    assert y.dtype == torch.float64 and type(y.grad_fn).__name__ != "_BitLinearFunctionBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
