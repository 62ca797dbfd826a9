"""Packed inference form: equal to the training form, no fp weights kept, b1 too, meta construction."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bitnet
from bitnet import BitLinear, BitNetTransformer, PackedBitLinear, pack
from bitnet.convert import is_packed, weight_bytes
from bitnet.quant import activation_quant_int8, unpack_i2


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 400), n=st.integers(1, 40), m=st.integers(1, 6), kind=st.sampled_from(["1.58", "1"]),
       bias=st.booleans(), norm=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_packed_layer_equals_training_form(k, n, m, kind, bias, norm, seed):
    torch.manual_seed(seed)
    layer = BitLinear(k, n, bias=bias, weight_kind=kind, norm=norm)
    x = torch.randn(m, k)
    packed = pack(layer)
    assert isinstance(packed, PackedBitLinear)
    wq, scale = layer.quantized_weight()
    assert torch.equal(unpack_i2(packed.w_packed, k), wq.to(torch.int8))    # weights exact
    assert packed.w_scale.item() == scale.item()
    expected = layer(x).detach()
    torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()) + 1e-6)


def test_integer_part_is_exact():
    torch.manual_seed(0)
    layer = BitLinear(200, 30, norm=False)
    packed = pack(layer)
    x = torch.randn(4, 200)
    xq, s = activation_quant_int8(x)
    wq, _ = layer.quantized_weight()
    acc = bitnet.ops.ternary_matmul_int(xq, packed.w_packed, 200)
    assert torch.equal(acc.long(), xq.long() @ wq.long().T)
    torch.testing.assert_close(packed(x), acc.float() * packed.w_scale / s)


@pytest.mark.parametrize("weights", ["1.58", "1"])
def test_pack_model_in_place_drops_fp_weights(weights):
    torch.manual_seed(0)
    model = BitNetTransformer(num_tokens=50, dim=128, depth=2, heads=4, kv_heads=2, weights=weights).eval()
    fp_bytes = weight_bytes(model)["linear"]
    tokens = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        before = model(tokens)
        assert pack(model) is model
        after = model(tokens)
    assert is_packed(model) and not any(isinstance(m, BitLinear) for m in model.modules())
    assert not any(p.dtype.is_floating_point and p.dim() == 2 for n, p in model.layers.named_parameters())
    assert weight_bytes(model)["linear"] * 14 < fp_bytes                 # 2 bits vs 32 bits (+ scales)
    assert model.config["packed"] is True
    # same prediction; small drift only where a rounding tie flips downstream
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(after, before, rtol=0.05, atol=0.05 * float(before.abs().max()))


def test_meta_model_packs_to_empty_buffers():
    with torch.device("meta"):
        model = BitNetTransformer(num_tokens=50, dim=64, depth=1, heads=4)
    pack(model)
    layer = model.layers[0].attn.q_proj
    assert isinstance(layer, PackedBitLinear) and layer.w_packed.device.type == "meta"
    assert layer.w_packed.shape == (64, 32)


def test_packed_errors():
    packed = pack(BitLinear(64, 8))
    with pytest.raises(ValueError, match="in_features=64"):
        packed(torch.randn(2, 63))
    with pytest.raises(TypeError, match="model must be"):
        pack([1, 2])
