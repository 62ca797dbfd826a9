"""Triton backend vs the pure-torch reference, on CPU through the Triton interpreter (TRITON_INTERPRET=1).

Integers must match ``ternary_matmul_reference`` exactly; the float epilogue within float32 rounding;
the activation quantiser bit for bit. Shapes are small and odd on purpose: the interpreter is slow.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

# Triton fixes interpreter vs compiler when it is imported, so this must run before anything imports triton
# (the backend imports it lazily, on its first kernel call). With a GPU, the kernels are compiled and run there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitnet.ops import reference as reference_ops  # noqa: E402
from bitnet.ops import triton_backend as tb  # noqa: E402
from bitnet.quant import activation_quant_int8, pack_i2, ternary_matmul_reference  # noqa: E402



def test_imports_without_triton(monkeypatch):
    # A fresh copy of the module with triton hidden: flag False, clear error on use, no import error.
    monkeypatch.setitem(sys.modules, "triton", None)                  # find_spec -> None, import -> error
    spec = importlib.util.spec_from_file_location("_tb_without_triton", tb.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.TRITON_AVAILABLE is False
    with pytest.raises(RuntimeError, match="pip install triton"):
        mod.triton_ternary_matmul_int(torch.zeros(1, 1, dtype=torch.int8), torch.zeros(1, 32, dtype=torch.uint8), 1)


if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not tb.interpret_mode() and not torch.cuda.is_available():
    pytest.skip(
        "triton was imported before this module without TRITON_INTERPRET=1 and there is no GPU; "
        "run pytest with TRITON_INTERPRET=1",
        allow_module_level=True,
    )

DEVICE = torch.device("cpu") if tb.interpret_mode() else torch.device("cuda")


@pytest.fixture
def device():
    return DEVICE


def _case(m, n, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    packed = pack_i2(w)
    return x.to(device), packed.to(device), ternary_matmul_reference(x, packed, k)


def test_runs_in_interpreter_on_cpu(device):
    if device.type == "cpu":
        assert tb.interpret_mode()
        assert os.environ["TRITON_INTERPRET"] == "1"


# (M, N, K): M=1 and M<=GEMV_MAX_M hit the GEMV, M>GEMV_MAX_M the GEMM; K odd / multiple / not of 128.
SHAPES = [(1, 1, 1), (1, 37, 300), (3, 19, 129), (4, 8, 256), (5, 33, 200), (17, 40, 385), (33, 70, 128)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matmul_int_exact_auto(m, n, k, device):
    x, packed, ref = _case(m, n, k, device)
    out = tb.triton_ternary_matmul_int(x, packed, k)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("kernel,split_k", [("gemv", 1), ("gemv", 2), ("gemv", 3), ("gemm", None)])
def test_matmul_int_exact_each_kernel(kernel, split_k, device):
    x, packed, ref = _case(3, 13, 600, device, seed=1)                  # 5 K blocks: uneven splits
    out = tb.triton_ternary_matmul_int(x, packed, 600, kernel=kernel, split_k=split_k)
    assert torch.equal(out.cpu(), ref)


def test_matmul_int_extremes_and_padding_codes(device):
    # |acc| at its maximum (x = -128, w = -1 everywhere), and garbage in the padding codes is ignored.
    m, n, k = 2, 9, 130
    x = torch.full((m, k), -128, dtype=torch.int8)
    packed = pack_i2(-torch.ones(n, k))
    packed[:, 34:64] = 0xFF                                             # block 1 (bytes 32..63) holds k=128,129
    packed[:, 32:34] |= 0xFC                                            # only at bits 1:0 of bytes 0, 1
    ref = ternary_matmul_reference(x, packed, k)
    assert int(ref[0, 0]) == 128 * k
    for kernel in ("gemv", "gemm"):
        out = tb.triton_ternary_matmul_int(x.to(device), packed.to(device), k, kernel=kernel)
        assert torch.equal(out.cpu(), ref), kernel


def test_matmul_int_strided_input(device):
    x, packed, ref = _case(6, 12, 150, device, seed=2)
    wide = torch.zeros(6, 300, dtype=torch.int8, device=device)
    wide[:, :150] = x
    out = tb.triton_ternary_matmul_int(wide[:, :150], packed, 150)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("m,n,k,kernel,split_k,with_bias", [
    (1, 37, 300, "auto", None, True),
    (2, 10, 260, "gemv", 2, True),      # split-K: int32 atomics, then the epilogue
    (3, 19, 129, "gemv", 1, False),
    (11, 25, 333, "auto", None, True),  # GEMM
    (9, 16, 64, "gemm", None, False),
])
def test_linear_fused_epilogue(m, n, k, kernel, split_k, with_bias, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g) * 4
    w = torch.randint(-1, 2, (n, k), generator=g)
    packed = pack_i2(w)
    xq, xs = activation_quant_int8(x)
    ws = torch.tensor(0.0421, dtype=torch.float32)
    bias = torch.randn(n, generator=g).to(torch.bfloat16) if with_bias else None
    y = tb.triton_ternary_linear(
        xq.to(device), xs.to(device), packed.to(device), ws.to(device), k,
        bias.to(device) if with_bias else None, kernel=kernel, split_k=split_k,
    ).cpu()
    ref = ternary_matmul_reference(xq, packed, k).float() * ws / xs
    if with_bias:
        ref = ref + bias.float()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    # same float32 epilogue, same order as the reference backend: equal bit for bit on CPU
    assert torch.equal(y, reference_ops.linear(xq, xs, packed, ws, k, bias))
    # and close to the float BitLinear it stands for: dequantised x @ (w * ws)^T
    approx = (xq.float() / xs) @ (w.float() * ws).T + (bias.float() if with_bias else 0)
    torch.testing.assert_close(y, approx, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_activations_bit_exact(dtype, bits, device):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(2, 3, 1500, generator=g) * torch.rand(2, 3, 1, generator=g) * 10).to(dtype)
    x[0, 1] = 0                                                         # all-zero row: scale from eps
    xq, s = tb.triton_quantize_activations(x.to(device), bits)
    ref_q, ref_s = activation_quant_int8(x, bits)
    assert xq.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (2, 3, 1)
    assert torch.equal(xq.cpu(), ref_q)
    assert torch.equal(s.cpu(), ref_s)


def test_quantize_activations_ties_round_to_even(device):
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -100.5]])
    xq, s = tb.triton_quantize_activations(x.to(device))
    ref_q, ref_s = activation_quant_int8(x)
    assert torch.equal(xq.cpu(), ref_q) and torch.equal(s.cpu(), ref_s)


def test_errors_are_clear(device):
    x, packed, _ = _case(2, 4, 130, device)
    with pytest.raises(ValueError, match="x_q must be a 2-D int8"):
        tb.triton_ternary_matmul_int(x.float(), packed, 130)
    with pytest.raises(ValueError, match="in_features"):
        tb.triton_ternary_matmul_int(x, packed, 131)
    with pytest.raises(ValueError, match="bytes per row"):
        tb.triton_ternary_matmul_int(torch.zeros(2, 257, dtype=torch.int8, device=device), packed, 257)
    with pytest.raises(ValueError, match="kernel must be one of"):
        tb.triton_ternary_matmul_int(x, packed, 130, kernel="fast")
    with pytest.raises(ValueError, match="split_k"):
        tb.triton_ternary_matmul_int(x, packed, 130, kernel="gemv", split_k=0)
    with pytest.raises(ValueError, match="w_scale"):
        tb.triton_ternary_linear(x, torch.ones(2, 1, device=device), packed, torch.ones(2, device=device), 130)
    with pytest.raises(ValueError, match="bits"):
        tb.triton_quantize_activations(torch.ones(2, 3, device=device), bits=9)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(tb, "interpret_mode", lambda: False)
    x, packed, _ = _case(1, 2, 3, "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tb.triton_ternary_matmul_int(x, packed, 3)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(m=st.integers(1, 12), n=st.integers(1, 24), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_matmul_int_property(m, n, k, seed):
    x, packed, ref = _case(m, n, k, DEVICE, seed=seed)
    assert torch.equal(tb.triton_ternary_matmul_int(x, packed, k).cpu(), ref)
