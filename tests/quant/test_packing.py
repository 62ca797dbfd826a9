"""I2 and base-3 storage formats: exact round trips over random shapes (property tests)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet.quant import (
    pack_base3,
    pack_i2,
    padded_in_features,
    ternary_matmul_reference,
    unpack_base3,
    unpack_i2,
    unpack_i2_codes,
)


def random_ternary(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g).to(torch.int8)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 700), seed=st.integers(0, 2**31 - 1))
def test_i2_round_trip(n, k, seed):
    w = random_ternary((n, k), seed)
    packed = pack_i2(w)
    assert packed.dtype == torch.uint8 and packed.shape == (n, padded_in_features(k) // 4)
    assert torch.equal(unpack_i2(packed, k), w)


def test_i2_layout_is_the_documented_one():
    # one row, K=128: weight k goes to byte k % 32 at bit offset 2 * (k // 32)
    w = torch.zeros(1, 128, dtype=torch.int8)
    w[0, 0], w[0, 33], w[0, 70], w[0, 127] = 1, -1, 1, 1
    packed = pack_i2(w)[0]
    assert packed[0].item() == (2 << 0) | (1 << 2) | (1 << 4) | (1 << 6)   # k=0 (+1), 32, 64, 96 (0)
    assert packed[1].item() == (1 << 0) | (0 << 2) | (1 << 4) | (1 << 6)   # k=33 is -1 -> code 0
    assert (packed[6].item() >> 4) & 3 == 2                                  # k=70 = 64 + 6
    assert (packed[31].item() >> 6) & 3 == 2                                 # k=127 = 96 + 31
    assert set(unpack_i2_codes(pack_i2(w), 128).unique().tolist()) <= {0, 1, 2}


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 23), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_base3_round_trip(shape, seed):
    w = random_ternary(tuple(shape), seed)
    packed = pack_base3(w)
    assert packed.numel() == -(-w.numel() // 5) and int(packed.max()) <= 242
    assert torch.equal(unpack_base3(packed, w.shape), w)


def test_pack_rejects_non_ternary_and_bad_shapes():
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        pack_i2(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        pack_i2(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="in_features"):
        unpack_i2(pack_i2(torch.zeros(2, 130, dtype=torch.int8)), 100)
    with pytest.raises(ValueError, match="bytes for shape"):
        unpack_base3(torch.zeros(3, dtype=torch.uint8), (4, 4))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 5), n=st.integers(1, 20), k=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_reference_matmul_is_exact(m, n, k, seed):
    w = random_ternary((n, k), seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(-128, 128, (m, k), generator=g).to(torch.int8)
    expected = x.long() @ w.long().T                    # exact int64 product
    assert torch.equal(ternary_matmul_reference(x, pack_i2(w), k).long(), expected)
