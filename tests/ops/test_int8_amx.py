"""AMX-INT8 int8 x int8 kernel (the int8 LM head, isa "amx"; csrc/int8_amx.cpp): exact int32 against
the pure-torch reference over random shapes (M tails and blocks of 16 tokens, K tails of 64, N tails of
16 rows), float outputs bit for bit equal to the AVX2 and scalar kernels, NaN/inf rows as the others,
threads, and torch's own bf16 matmuls (oneDNN, also on AMX) unaffected on the same thread. Skips where
the CPU (or the OS) has no AMX-INT8: `lscpu | grep amx_int8`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet.ops import cpu as native
from bitnet.ops import int8 as I

HAVE_AMX = native.available() and "amx" in native.supported_isas() and I.native_available()
pytestmark = pytest.mark.skipif(not HAVE_AMX, reason="no AMX-INT8 on this CPU/OS (or native library not built)")

NAN, INF = float("nan"), float("inf")


def ints(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return x, w


class threads:
    """Native thread count for a block (restored after)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = native.get_num_threads()
        native.set_num_threads(self.n)

    def __exit__(self, *exc):
        native.set_num_threads(self.before)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 3000), n=st.integers(1, 300), nthreads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**31 - 1))
def test_amx_int8_matmul_exact(m, k, n, nthreads, seed):
    x, w = ints(m, k, n, seed)
    with threads(nthreads):
        got = I.int8_matmul_int(x, w, isa="amx")
    assert torch.equal(got, I.reference_matmul_int(x, w))


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 64, 16), (16, 64, 16), (16, 63, 15), (17, 65, 17), (15, 128, 33),
                                   (32, 2560, 48), (33, 2561, 300), (1, 2560, 4099),
                                   (64, 200, 33), (70, 129, 47), (129, 65, 20), (200, 333, 301)])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_amx_int8_matmul_edges(m, k, n, nthreads):
    """Exact multiples and tails of the 16-token, 64-k and 16-row tile edges, of the 64-token groups that
    share one weight tile load; a threaded decode GEMV."""
    x, w = ints(m, k, n, seed=m * 7919 + k * 31 + n)
    with threads(nthreads):
        got = I.int8_matmul_int(x, w, isa="amx")
    assert torch.equal(got, I.reference_matmul_int(x, w))


def test_amx_int8_extremes():
    """-128 * -128 everywhere: the largest sums (signed x signed, no unsigned-operand bias)."""
    k = 4099
    x = torch.full((17, k), -128, dtype=torch.int8)
    w = torch.full((33, k), -128, dtype=torch.int8)
    assert torch.equal(I.int8_matmul_int(x, w, isa="amx"), torch.full((17, 33), 128 * 128 * k, dtype=torch.int32))
    w[::2] = 127
    assert torch.equal(I.int8_matmul_int(x, w, isa="amx"), I.reference_matmul_int(x, w))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 1500), n=st.integers(1, 300), bias=st.booleans(),
       nthreads=st.sampled_from([1, 2]), seed=st.integers(0, 2**31 - 1))
def test_amx_int8_linear_bit_for_bit(m, k, n, bias, nthreads, seed):
    """The float outputs equal the AVX2 and scalar kernels' and the reference exactly (shared epilogue)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    w_q, w_s = I.quantize_weight_int8(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    with threads(nthreads):
        got = I.int8_linear(x, w_q, w_s, b, isa="amx")
        others = [I.int8_linear(x, w_q, w_s, b, isa=isa) for isa in ("avx2", "scalar") if isa in native.supported_isas()]
    for want in others + [I.reference_linear(x, w_q, w_s, b)]:
        assert torch.equal(got, want)


def test_amx_int8_linear_nonfinite_rows_as_the_other_kernels():
    """A NaN or inf in a row makes every output of that row NaN (as the reference); other rows untouched."""
    k, n = 150, 37
    g = torch.Generator().manual_seed(3)
    x = torch.randn(19, k, generator=g) * 3
    x[1, k // 2] = NAN
    x[2, 0] = INF
    x[3, k - 1] = -INF
    x[17, 0], x[17, 5] = INF, NAN
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w_s = torch.rand(n, generator=g) + 0.01
    got = I.int8_linear(x, w_q, w_s, isa="amx")
    bad = [1, 2, 3, 17]
    assert torch.isnan(got[bad]).all() and not torch.isnan(got[[i for i in range(19) if i not in bad]]).any()
    for want in (I.int8_linear(x, w_q, w_s, isa="avx2"), I.reference_linear(x, w_q, w_s, None)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_torch_bf16_matmul_unaffected_on_the_same_thread():
    """The kernel restores the thread's tile configuration (oneDNN keeps its own loaded between calls)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 256, generator=g).bfloat16()
    b = torch.randn(256, 96, generator=g).bfloat16()
    before = a @ b
    x, w = ints(20, 300, 70, seed=1)
    with threads(1):
        for _ in range(3):
            assert torch.equal(I.int8_matmul_int(x, w, isa="amx"), I.reference_matmul_int(x, w))
            assert torch.equal(a @ b, before)
