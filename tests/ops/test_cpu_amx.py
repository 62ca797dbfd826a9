"""AMX-INT8 prefill kernel (isa "amx"): exact int32 against the reference over random prefill-sized
shapes, the fused float epilogue bit for bit against the AVX-512 VNNI kernel, grouped projections,
threads, and the switch to the vector kernel below the panel threshold (8 tokens). Skips where the CPU (or the
OS) has no AMX-INT8: `lscpu | grep amx_int8`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet.ops import cpu as native
from bitnet.quant import pack_i2, ternary_matmul_reference

HAVE_AMX = native.available() and "amx" in native.supported_isas()
pytestmark = pytest.mark.skipif(not HAVE_AMX, reason="no AMX-INT8 on this CPU/OS (or native library not built)")


def make(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    x_q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    return x_q, pack_i2(w)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = native.get_num_threads()
    native.set_num_threads(request.param)
    yield request.param
    native.set_num_threads(before)


@pytest.mark.parametrize("m,k,n", [(7, 256, 16), (8, 300, 17), (15, 256, 16), (16, 128, 16), (16, 1, 1), (17, 131, 70), (31, 640, 33),
                                   (32, 2560, 48), (33, 384, 15), (129, 257, 130), (200, 1000, 257),
                                   (300, 129, 31),
                                   # an odd last pair of I2 blocks, then the task's next panel (its first chunk
                                   # is unpacked during the last one): one block of tokens, several, 27 pairs
                                   (20, 640, 70), (64, 1200, 90), (130, 6912, 40)])
def test_amx_matmul_exact(threads, m, k, n):
    x_q, wp = make(m, k, n, seed=m * 131 + k * 7 + n)
    assert torch.equal(native.matmul_int(x_q, wp, k, isa="amx"), ternary_matmul_reference(x_q, wp, k))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(8, 300), k=st.integers(1, 1500), n=st.integers(1, 200), seed=st.integers(0, 9999))
def test_amx_matmul_random_shapes(m, k, n, seed):
    x_q, wp = make(m, k, n, seed)
    assert torch.equal(native.matmul_int(x_q, wp, k, isa="amx"), ternary_matmul_reference(x_q, wp, k))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 160), k=st.integers(1, 900), n=st.integers(1, 120), bias=st.booleans(),
       seed=st.integers(0, 9999))
def test_amx_float_epilogue_bit_for_bit(m, k, n, bias, seed):
    """The fused AVX-512 epilogue (acc * w_scale / x_scale + bias) equals the scalar one exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    wp = pack_i2(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    b = torch.randn(n, generator=g) if bias else None
    got = native.bitlinear(x, wp, 0.731, k, b, 8, isa="amx")
    want = native.bitlinear(x, wp, 0.731, k, b, 8, isa="avx512vnni")
    assert torch.equal(got, want)


@pytest.mark.parametrize("m", [3, 16, 40, 128])
def test_amx_grouped_projections_equal_single_calls(threads, m):
    """q|k|v in one call (one quantisation, one VNNI layout shared by the three matrices)."""
    k = 384
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    sizes = [96, 32, 32]
    ws = [pack_i2(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)) for n in sizes]
    scales = [torch.tensor(0.5 + i) for i in range(3)]
    group = native.BitLinearGroup(ws, scales, [None, None, None], k, isa="amx")
    got = group(x)
    want = torch.cat([native.bitlinear(x, w, float(s), k, None, 8, isa="avx512vnni") for w, s in zip(ws, scales)], 1)
    assert torch.equal(got, want)


def test_amx_is_the_default_where_supported():
    assert native.supported_isas()[-1] == "amx"
