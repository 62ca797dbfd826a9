"""TQ1 (experimental base-3 in-memory layout, 1.6 bits/weight): round trips, layout, reference GEMV."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet.quant import pack_i2, ternary_matmul_reference
from bitnet.quant.tq1 import (
    TQ1_BLOCK,
    i2_to_tq1,
    pack_tq1,
    tq1_matmul_reference,
    tq1_padded_in_features,
    tq1_row_bytes,
    unpack_tq1,
    unpack_tq1_codes,
)


def random_ternary(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g).to(torch.int8)


def test_every_group_of_five_round_trips():
    # all 3**5 = 243 code groups, placed as digits 0..4 of byte 0 (k = 0, 64, 128, 192, 256)
    groups = torch.tensor(list(itertools.product((0, 1, 2), repeat=5)), dtype=torch.int8)   # (243, 5)
    w = torch.zeros(243, TQ1_BLOCK, dtype=torch.int8)
    w[:, 0::64] = groups - 1
    packed = pack_tq1(w)
    assert packed.shape == (243, 64)
    assert packed[:, 0].unique().numel() == 243                       # 243 distinct bytes
    assert torch.equal(unpack_tq1(packed, TQ1_BLOCK), w)


def test_any_byte_decodes_to_codes():
    # the kernels never validate bytes: each of the 256 values must decode to digits in {0, 1, 2}
    packed = torch.arange(256, dtype=torch.uint8).view(4, 64)
    codes = unpack_tq1_codes(packed, TQ1_BLOCK)
    assert int(codes.max()) <= 2 and codes.shape == (4, TQ1_BLOCK)


def test_layout_is_the_documented_one():
    # weight k = 320 b + 64 i + j is digit i (3**(4-i) in v) of byte 64 b + j
    w = torch.zeros(1, 2 * TQ1_BLOCK, dtype=torch.int8)
    w[0, 64 * 0 + 5] = 1          # byte 5, digit 0 -> code 2
    w[0, 64 * 3 + 5] = -1         # byte 5, digit 3 -> code 0
    w[0, 320 + 64 * 4 + 63] = 1   # byte 64 + 63, digit 4 -> code 2
    packed = pack_tq1(w)[0]
    v5 = 2 * 81 + 1 * 27 + 1 * 9 + 0 * 3 + 1 * 1
    assert packed[5].item() == -(-v5 * 256 // 243)
    v127 = 81 + 27 + 9 + 3 + 2
    assert packed[127].item() == -(-v127 * 256 // 243)
    zero = 81 + 27 + 9 + 3 + 1     # all codes 1 (weight 0)
    assert packed[0].item() == -(-zero * 256 // 243)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 30), k=st.integers(1, 1000), seed=st.integers(0, 2**31 - 1))
def test_round_trip_random_shapes(n, k, seed):
    # K of any size: not a multiple of 5, of 64 or of the 320-weight block
    w = random_ternary((n, k), seed)
    packed = pack_tq1(w)
    assert packed.dtype == torch.uint8 and packed.shape == (n, tq1_row_bytes(k))
    assert tq1_padded_in_features(k) % TQ1_BLOCK == 0 and tq1_padded_in_features(k) >= k
    assert torch.equal(unpack_tq1(packed, k), w)
    assert torch.equal(i2_to_tq1(pack_i2(w), k), packed)


@settings(max_examples=50, deadline=None)
@given(m=st.integers(1, 5), n=st.integers(1, 24), k=st.integers(1, 900), seed=st.integers(0, 2**31 - 1))
def test_reference_gemv_matches_i2_and_a_plain_matmul(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = random_ternary((n, k), seed)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    got = tq1_matmul_reference(x, pack_tq1(w), k)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got, x.to(torch.int64).matmul(w.to(torch.int64).T).to(torch.int32))
    assert torch.equal(got, ternary_matmul_reference(x, pack_i2(w), k))


def test_no_division_identity_used_by_the_vnni_kernel():
    # 256 * c_i = 3 t_i - t_{i+1}: the dot product from the bytes t_i alone, exact
    g = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, (3, 2 * 64), generator=g, dtype=torch.uint8)
    k = 2 * TQ1_BLOCK
    x = torch.randint(-128, 128, (k,), generator=g, dtype=torch.int64)
    t = packed.to(torch.int64).view(3, 2, 1, 64)
    ts = [t]
    for _ in range(5):
        ts.append(3 * ts[-1] % 256)
    xs = x.view(1, 2, 5, 64)
    a = sum((ts[i][:, :, 0] * xs[:, :, i]).sum(dim=(1, 2)) for i in range(5))
    b = sum((ts[i + 1][:, :, 0] * xs[:, :, i]).sum(dim=(1, 2)) for i in range(5))
    assert torch.equal((3 * a - b) % 256, torch.zeros(3, dtype=torch.int64))
    codes = unpack_tq1_codes(packed, k).to(torch.int64)
    assert torch.equal((3 * a - b) // 256, codes @ x)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        pack_tq1(torch.tensor([[2.0, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        pack_tq1(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="in_features=100"):
        unpack_tq1(pack_tq1(torch.zeros(2, 330, dtype=torch.int8)), 100)
    with pytest.raises(ValueError, match="uint8"):
        unpack_tq1(torch.zeros(2, 64, dtype=torch.int8), 300)
    with pytest.raises(ValueError, match="x_q must be"):
        tq1_matmul_reference(torch.zeros(1, 5, dtype=torch.int8), pack_tq1(torch.zeros(1, 6)), 6)
