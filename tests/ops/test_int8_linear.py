"""Int8 head kernels: native (every supported ISA) bit-exact vs the pure-torch reference; pack's int8 head."""

import copy
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet import BitNetTransformer, pack
from bitnet.nn import Int8Linear
from bitnet.ops import cpu as _cpu
from bitnet.ops import int8 as I

ISAS = [i for i in _cpu.supported_isas() if i in ("scalar", "avx2", "avxvnni", "avx512vnni", "amx")] or [None]


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 300), n=st.integers(1, 70), seed=st.integers(0, 2**31 - 1),
       isa=st.sampled_from(ISAS))
def test_int8_matmul_exact(m, k, n, seed, isa):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    assert torch.equal(I.int8_matmul_int(x, w, isa=isa), I.reference_matmul_int(x, w))


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 600), n=st.integers(1, 90), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1), isa=st.sampled_from(ISAS))
def test_int8_linear_exact(m, k, n, bias, seed, isa):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    w_q, w_s = I.quantize_weight_int8(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    assert torch.equal(I.int8_linear(x, w_q, w_s, b, isa=isa), I.reference_linear(x, w_q, w_s, b))


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 64, 4), (2, 63, 5), (3, 65, 3), (4, 128, 8), (5, 127, 9),
                                   (16, 2560, 48), (17, 2561, 301), (33, 129, 7), (8, 4099, 4)])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_int8_matmul_tile_edges(m, k, n, isa, nthreads):
    """Multiples and tails of the 64-byte K step, the 4-token and 4-row register tiles (AVX-512 VNNI:
    the masked K tail and the unsigned-weight correction), threaded and not."""
    g = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    before = _cpu.get_num_threads()
    _cpu.set_num_threads(nthreads)
    try:
        got = I.int8_matmul_int(x, w, isa=isa)
    finally:
        _cpu.set_num_threads(before)
    assert torch.equal(got, I.reference_matmul_int(x, w))


@pytest.mark.parametrize("isa", ISAS)
def test_int8_extremes_every_isa(isa):
    """-128 x -128 everywhere (the largest sums), and +127 weights against -128 activations."""
    k = 4099
    x = torch.full((6, k), -128, dtype=torch.int8)
    w = torch.full((9, k), -128, dtype=torch.int8)
    assert torch.equal(I.int8_matmul_int(x, w, isa=isa), torch.full((6, 9), 128 * 128 * k, dtype=torch.int32))
    w[::2] = 127
    assert torch.equal(I.int8_matmul_int(x, w, isa=isa), I.reference_matmul_int(x, w))


def test_extremes_and_large_gemv():
    k = 4099
    x = torch.full((3, k), -128, dtype=torch.int8)
    w = torch.full((33, k), -128, dtype=torch.int8)
    assert torch.equal(I.int8_matmul_int(x, w), torch.full((3, 33), 128 * 128 * k, dtype=torch.int32))
    x = torch.randn(1, 2560)
    w_q, w_s = I.quantize_weight_int8(torch.randn(3001, 2560))
    assert torch.equal(I.int8_linear(x, w_q, w_s), I.reference_linear(x, w_q, w_s))   # threaded split


def test_quantize_weight_int8():
    w = torch.randn(7, 33)
    w[3] = 0
    w_q, s = I.quantize_weight_int8(w)
    assert w_q.dtype == torch.int8 and int(w_q.abs().max()) <= 127 and s[3] == 1
    assert torch.allclose(w_q.float() * s[:, None], w, atol=float(s.max()) / 2 + 1e-7)


def test_int8_linear_module_close_to_fp():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 50, bias=True)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 3, 64)
    y = q(x)
    assert y.shape == (2, 3, 50) and y.dtype == torch.float32
    assert torch.allclose(y, lin(x), atol=0.05)
    assert torch.allclose(q.dequantized_weight(), lin.weight, atol=1e-2)
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_int8_linear_loads_float_weight():
    lin = torch.nn.Linear(16, 8, bias=False)
    q = Int8Linear(16, 8)
    q.load_state_dict({"weight": lin.weight.detach()})
    assert torch.equal(q.w_int8, I.quantize_weight_int8(lin.weight)[0])


@pytest.mark.parametrize("tie", [False, True])
def test_pack_converts_head(tie):
    torch.manual_seed(0)
    model = BitNetTransformer(num_tokens=300, dim=64, depth=2, heads=4, tie_embeddings=tie).eval()
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = pack(copy.deepcopy(model), head="fp")
        pack(model)
        assert isinstance(model.head, Int8Linear) and isinstance(ref.head, torch.nn.Linear)
        assert isinstance(model.embed, torch.nn.Embedding)
        a, b = model(tokens).argmax(-1), ref(tokens).argmax(-1)
    assert (a == b).float().mean() >= 0.95
    wb = importlib.import_module("bitnet.convert.pack").weight_bytes(model)
    assert wb["total"] > wb["linear"] > 0


def test_pack_head_fp_and_bad_option():
    model = BitNetTransformer(num_tokens=30, dim=32, depth=1, heads=4)
    assert isinstance(pack(model, head="fp").head, torch.nn.Linear)
    with pytest.raises(ValueError):
        pack(BitNetTransformer(num_tokens=30, dim=32, depth=1, heads=4), head="int4")


def test_pack_on_meta_then_assign():
    torch.manual_seed(1)
    model = pack(BitNetTransformer(num_tokens=50, dim=32, depth=1, heads=4).eval())
    with torch.device("meta"):
        empty = BitNetTransformer(num_tokens=50, dim=32, depth=1, heads=4)
    pack(empty)
    assert isinstance(empty.head, Int8Linear) and empty.head.w_int8.is_meta
    empty.load_state_dict(model.state_dict(), assign=True)
    assert torch.equal(empty.head.w_int8, model.head.w_int8)


def test_greedy_generation_nearly_unchanged():
    from bitnet.generate import generate

    torch.manual_seed(0)
    model = BitNetTransformer(num_tokens=200, dim=64, depth=2, heads=4, max_seq_len=64).eval()
    ref = copy.deepcopy(model)
    pack(model)
    pack(ref, head="fp")
    prompt = [1, 2, 3, 4]
    a = list(generate(model, prompt, max_new_tokens=16, temperature=0))
    b = list(generate(ref, prompt, max_new_tokens=16, temperature=0))
    assert sum(x == y for x, y in zip(a, b)) >= 0.75 * len(b)
