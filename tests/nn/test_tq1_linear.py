"""Experimental TQ1 packed layer and repack_tq1: bit-identical outputs to the I2 layer / model."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet import BitLinear, BitNetTransformer, PackedBitLinear, ops, pack
from bitnet.convert import weight_bytes
from bitnet.convert.tq1 import repack_tq1
from bitnet.models.fused_block import fused_path
from bitnet.nn.tq1_linear import PackedTQ1BitLinear
from bitnet.ops import cpu as native
from bitnet.ops import tq1 as tq1_ops
from bitnet.quant.tq1 import tq1_row_bytes

BACKENDS = ["reference"] + (["cpu"] if native.available() and tq1_ops.available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    old = ops._requested
    ops.set_backend(request.param)
    yield request.param
    ops._requested = old


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 700), n=st.integers(1, 40), m=st.integers(1, 5), kind=st.sampled_from(["1.58", "1"]),
       bias=st.booleans(), norm=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_layer_equals_the_i2_layer_bit_for_bit(k, n, m, kind, bias, norm, seed):
    torch.manual_seed(seed)
    i2 = pack(BitLinear(k, n, bias=bias, weight_kind=kind, norm=norm))
    if bias:
        torch.nn.init.normal_(i2.bias)
    t = PackedTQ1BitLinear.from_packed(i2)
    assert t.w_tq1.shape == (n, tq1_row_bytes(k)) and not hasattr(t, "w_packed")
    assert torch.equal(t.unpacked_weight(), i2.unpacked_weight())
    x = torch.randn(2, m, k)
    for name in BACKENDS:
        old = ops._requested
        ops.set_backend(name)
        try:
            assert torch.equal(t(x), i2(x)), name
        finally:
            ops._requested = old


def test_reference_equals_native():
    if "cpu" not in BACKENDS:
        pytest.skip("native TQ1 kernels not built")
    torch.manual_seed(1)
    i2 = pack(BitLinear(1000, 70, bias=True))
    t = PackedTQ1BitLinear.from_packed(i2)
    x = torch.randn(3, 1000)
    x[1] = 0.0                                                         # an all-zero token (scale clamp)
    assert torch.equal(tq1_ops.bitlinear(x, t.w_tq1, t.w_scale, 1000, t.bias),
                       tq1_ops.bitlinear_reference(x, t.w_tq1, t.w_scale, 1000, t.bias))


def test_repacked_model_gives_the_same_logits(backend):
    torch.manual_seed(0)
    model = pack(BitNetTransformer(num_tokens=50, dim=320, depth=2, heads=4, kv_heads=2, ff_mult=2,
                                   max_seq_len=32)).eval()
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad(), fused_path(False):
        want = model(tokens)
    before = weight_bytes(model)
    repack_tq1(model)
    kinds = {type(m) for m in model.modules() if isinstance(m, PackedBitLinear)}
    assert kinds == {PackedTQ1BitLinear}
    with torch.no_grad(), fused_path(False):
        got = model(tokens)                         # module path on both (fused: tests/models/test_fused_block_tq1.py)
    assert torch.equal(got, want)
    after = weight_bytes(model)
    assert after["linear"] < before["linear"] and after["other"] == before["other"]


def test_repack_rejects_what_it_cannot_repack():
    with pytest.raises(ValueError, match="no I2 PackedBitLinear"):
        repack_tq1(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="must be a PackedBitLinear"):
        PackedTQ1BitLinear.from_packed(BitLinear(4, 4))
    with pytest.raises(ValueError, match="in_features|must be"):
        PackedTQ1BitLinear.from_packed(pack(BitLinear(40, 4)))(torch.randn(2, 41))


def test_meta_layers_repack_to_empty_meta_layers():
    with torch.device("meta"):
        model = BitNetTransformer(num_tokens=20, dim=64, depth=1, heads=2, max_seq_len=16)
    repack_tq1(pack(model))
    layers = [m for m in model.modules() if isinstance(m, PackedTQ1BitLinear)]
    assert layers and all(m.w_tq1.is_meta for m in layers)
