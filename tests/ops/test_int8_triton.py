"""Triton int8-weight linear (the int8 LM head on CUDA), run under TRITON_INTERPRET=1 on CPU against
the reference; the int8 head as a traceable custom op."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bitnet.nn import Int8Linear  # noqa: E402
from bitnet.ops import int8 as i8  # noqa: E402
from bitnet.quant import activation_quant_int8  # noqa: E402

tb = pytest.importorskip("bitnet.ops.triton_backend")
if not (tb.interpret_mode() or torch.cuda.is_available()):
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 20), k=st.integers(1, 150), n=st.integers(1, 70), bias=st.booleans(), seed=st.integers(0, 999))
def test_triton_int8_linear_matches_reference(m, k, n, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) + 0.01
    b = torch.randn(n, generator=g) if bias else None
    x_q, x_scale = activation_quant_int8(x)
    got = tb.triton_int8_linear(x_q, x_scale, w_q, w_scale, b)
    want = i8.reference_linear(x, w_q, w_scale, b)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    # the integer part is exact: undo the epilogue
    acc = i8.reference_matmul_int(x_q, w_q).float()
    torch.testing.assert_close((got - (b if bias else 0)) * x_scale / w_scale, acc, rtol=1e-5, atol=1e-2)


def test_triton_int8_linear_errors():
    x_q = torch.zeros(2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="equal K"):
        tb.triton_int8_linear(x_q, torch.ones(2), torch.zeros(3, 9, dtype=torch.int8), torch.ones(3))
    with pytest.raises(ValueError, match="w_scale"):
        tb.triton_int8_linear(x_q, torch.ones(2), torch.zeros(3, 8, dtype=torch.int8), torch.ones(4))


def test_int8_head_traces_as_one_op():
    torch.manual_seed(0)
    head = Int8Linear.from_linear(torch.nn.Linear(40, 30, bias=True))
    x = torch.randn(3, 40)
    want = head(x)
    got = torch.compile(head, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want)
