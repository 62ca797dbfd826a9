"""Experimental TQ1 (1.6-bit) native GEMV: every ISA's kernel against the pure-torch reference, exact int32."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet.ops import cpu as native
from bitnet.ops import tq1
from bitnet.quant.tq1 import pack_tq1, tq1_matmul_reference, tq1_row_bytes

pytestmark = pytest.mark.skipif(not tq1.available(), reason=f"native TQ1 kernels not built: {tq1.LOAD_ERROR}")
ISAS = native.supported_isas()


def make(m, k, n, seed=0, any_bytes=False):
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    if any_bytes:   # every byte value decodes; the kernels must agree on the 13 that pack_tq1 never writes too
        return x_q, torch.randint(0, 256, (n, tq1_row_bytes(k)), generator=g, dtype=torch.uint8)
    return x_q, pack_tq1(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))


def test_each_isa_has_its_kernel():
    names = {isa: tq1.kernel_name(isa) for isa in ISAS}
    assert names["scalar"] == "scalar"
    if "avx512vnni" in names:
        assert names["avx512vnni"] == "avx512vnni"
    if "avx2" in names:
        assert names["avx2"] == "avx2"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 2560, 77), (1, 6912, 9), (2, 319, 33), (3, 321, 5),
                                   (1, 640, 16), (4, 1000, 19), (1, 1925, 70)])
def test_matmul_every_isa(isa, m, k, n):
    x_q, wp = make(m, k, n, seed=m * 7 + k)
    assert torch.equal(tq1.matmul_int(x_q, wp, k, isa=isa), tq1_matmul_reference(x_q, wp, k))


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 3), k=st.integers(1, 1400), n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       any_bytes=st.booleans())
def test_matmul_random_shapes(isa, m, k, n, seed, any_bytes):
    x_q, wp = make(m, k, n, seed, any_bytes)
    assert torch.equal(tq1.matmul_int(x_q, wp, k, isa=isa), tq1_matmul_reference(x_q, wp, k))


@pytest.mark.parametrize("isa", ISAS)
def test_extreme_values_at_the_largest_k(isa):
    # all weights +1 (code 2) against x = -128 and +127: the largest |sums| the int32 trick must carry
    k = tq1.MAX_IN_FEATURES
    wp = pack_tq1(torch.ones(2, k, dtype=torch.int8))
    x_q = torch.stack([torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8)])
    got = tq1.matmul_int(x_q, wp, k, isa=isa)
    assert got[0, 0].item() == -128 * k and got[1, 1].item() == 127 * k
    assert torch.equal(got, tq1_matmul_reference(x_q, wp, k))


def test_threads_give_the_same_result():
    x_q, wp = make(1, 2560, 777, seed=5)
    before = native.get_num_threads()
    try:
        native.set_num_threads(1)
        one = tq1.matmul_int(x_q, wp, 2560)
        native.set_num_threads(2)
        two = tq1.matmul_int(x_q, wp, 2560)
    finally:
        native.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(one, tq1_matmul_reference(x_q, wp, 2560))


def test_strided_activations():
    x_q, wp = make(3, 700, 11, seed=2)
    wide = torch.zeros(3, 1000, dtype=torch.int8)
    wide[:, :700] = x_q
    assert torch.equal(tq1.matmul_int(wide[:, :700], wp, 700), tq1_matmul_reference(x_q, wp, 700))


def test_bad_input_is_rejected():
    x_q, wp = make(1, 400, 3)
    with pytest.raises(ValueError, match="packed must be"):
        tq1.matmul_int(x_q, wp[:, :64], 400)
    with pytest.raises(ValueError, match="x_q must be"):
        tq1.matmul_int(x_q.to(torch.int32), wp, 400)
    with pytest.raises(ValueError, match="in_features must be in"):
        tq1.matmul_int(x_q, wp, tq1.MAX_IN_FEATURES + 1)
