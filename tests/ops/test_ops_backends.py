"""bitnet.ops public API: every available backend against the pure-torch reference (exact integers),
the float epilogue, the fused quantise+matmul, torch.compile tracing, backend choice and bad input."""

from __future__ import annotations

import importlib
import importlib.util

import os

import pytest
import torch

# Triton picks interpreter vs compiler when it is imported: set it before anything (torch.compile) does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitnet.ops as ops
from bitnet.ops import cpu as native
from bitnet.ops import reference as ref
from bitnet.quant import activation_quant_int8, pack_i2, ternary_matmul_reference, unpack_i2

CPU_BACKENDS = ["reference"] + (["cpu"] if native.available() else [])


def make(m, k, n, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    x_q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    return x_q.to(device), pack_i2(w).to(device), w


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    old = ops._requested
    ops.set_backend(request.param)
    yield request.param
    ops._requested = old


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.sampled_from([1, 2, 3, 4, 5, 17, 33]), k=st.integers(1, 600), n=st.integers(1, 70), seed=st.integers(0, 99))
def test_matmul_int_exact(cpu_backend, m, k, n, seed):
    x_q, wp, w = make(m, k, n, seed)
    got = ops.ternary_matmul_int(x_q, wp, k)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got, ternary_matmul_reference(x_q, wp, k))
    # and the reference itself is the plain integer product
    assert torch.equal(got, (x_q.to(torch.int64) @ w.to(torch.int64).T).to(torch.int32))


def test_matmul_int_extremes(cpu_backend):
    # all -128 against all +1 / all -1 rows: the largest |acc| (128 * K), and K at a block boundary +- 1
    for k in (127, 128, 129, 2560):
        x_q = torch.full((3, k), -128, dtype=torch.int8)
        w = torch.stack([torch.ones(k), -torch.ones(k), torch.zeros(k)]).to(torch.int8)
        got = ops.ternary_matmul_int(x_q, pack_i2(w), k)
        assert got[0].tolist() == [-128 * k, 128 * k, 0]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_linear_epilogue(cpu_backend, m, with_bias):
    k, n = 300, 45
    x = torch.randn(m, k)
    x_q, x_scale = activation_quant_int8(x)
    _, wp, _ = make(1, k, n, seed=3)
    w_scale = torch.tensor(0.0123)
    bias = torch.randn(n) if with_bias else None
    got = ops.ternary_linear(x_q, x_scale, wp, w_scale, k, bias)
    acc = ternary_matmul_reference(x_q, wp, k)
    want = acc.float() * w_scale / x_scale + (bias if with_bias else 0)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("m", [1, 2, 19])
def test_bitlinear_packed_fused(cpu_backend, m, bits):
    k, n = 257, 66
    x = torch.randn(m, k) * 3
    x[0, 5] = 0.0
    _, wp, _ = make(1, k, n, seed=4)
    w_scale = torch.tensor(0.7)
    bias = torch.randn(n)
    got = ops.bitlinear_packed(x, wp, w_scale, k, bias, bits)
    x_q, x_scale = activation_quant_int8(x, bits)
    want = ternary_matmul_reference(x_q, wp, k).float() * w_scale / x_scale + bias
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_bitlinear_packed_leading_dims_and_dtypes(cpu_backend):
    k, n = 130, 9
    _, wp, _ = make(1, k, n, seed=5)
    x = torch.randn(2, 3, k, dtype=torch.bfloat16)
    got = ops.bitlinear_packed(x, wp, torch.tensor(1.5), k)
    assert got.shape == (2, 3, n) and got.dtype == torch.float32
    want = ref.bitlinear(x.reshape(6, k), wp, torch.tensor(1.5), k, None)
    torch.testing.assert_close(got.reshape(6, n), want, rtol=1e-6, atol=1e-5)
    x_q, s = activation_quant_int8(x)
    assert ops.ternary_matmul_int(x_q, wp, k).shape == (2, 3, n)
    assert ops.ternary_linear(x_q, s, wp, torch.tensor(1.5), k).shape == (2, 3, n)


def test_non_contiguous_inputs_are_handled(cpu_backend):
    k, n = 200, 12
    x_q, wp, _ = make(6, 2 * k, n)   # wp is for 2k; we need k
    _, wp, _ = make(1, k, n, seed=8)
    xs = x_q[:, ::2]                  # stride 2 along K
    assert not xs.is_contiguous()
    assert torch.equal(ops.ternary_matmul_int(xs, wp, k), ternary_matmul_reference(xs.contiguous(), wp, k))
    xt = x_q[:, :k]                   # row stride 2k
    assert torch.equal(ops.ternary_matmul_int(xt, wp, k), ternary_matmul_reference(xt.contiguous(), wp, k))
    wpt = wp.T.contiguous().T         # weight with transposed strides
    assert torch.equal(ops.ternary_matmul_int(xt, wpt, k), ternary_matmul_reference(xt.contiguous(), wp, k))


def test_empty_batch(cpu_backend):
    _, wp, _ = make(1, 10, 4)
    assert ops.ternary_matmul_int(torch.zeros(0, 10, dtype=torch.int8), wp, 10).shape == (0, 4)


def test_torch_compile_fullgraph():
    k, n = 140, 24
    _, wp, _ = make(1, k, n, seed=6)
    w_scale, bias = torch.tensor(0.3), torch.randn(n)

    def f(x):
        x_q, s = activation_quant_int8(x)
        y = ops.ternary_linear(x_q, s, wp, w_scale, k, bias)
        return torch.relu(y) + ops.bitlinear_packed(x, wp, w_scale, k, bias)

    x = torch.randn(3, k)
    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, f(x), rtol=1e-5, atol=1e-4)


def test_ops_are_registered():
    for name in ("ternary_matmul_int", "ternary_linear", "bitlinear_packed"):
        assert hasattr(torch.ops.bitnet, name)
    x_q, wp, _ = make(2, 50, 3)
    torch.library.opcheck(torch.ops.bitnet.ternary_matmul_int.default, (x_q, wp, 50))
    s = torch.rand(2, 1) + 0.5
    torch.library.opcheck(torch.ops.bitnet.ternary_linear.default, (x_q, s, wp, torch.tensor(0.5), 50, None))
    torch.library.opcheck(torch.ops.bitnet.bitlinear_packed.default, (torch.randn(2, 50), wp, torch.tensor(0.5), 50, None, 8))


# ------------------------------------------------------------------------------------------------
# Backend choice

def test_backend_names():
    assert ops.backend() in ("cpu", "reference")
    assert ops.backend("cpu") == ("cpu" if native.available() else "reference")
    assert ops.backend("meta") == "reference"
    with pytest.raises(ValueError, match="auto, reference, cpu, triton"):
        ops.set_backend("fast")


def test_env_backend_is_read_at_import(monkeypatch):
    monkeypatch.setenv("BITNET_BACKEND", "reference")
    mod = importlib.reload(ops)
    try:
        assert mod.backend("cpu") == "reference"
        monkeypatch.setenv("BITNET_BACKEND", "bogus")
        with pytest.raises(ValueError, match="BITNET_BACKEND|one of"):
            importlib.reload(ops)
    finally:
        monkeypatch.delenv("BITNET_BACKEND")
        importlib.reload(ops)


def test_forced_cpu_backend_rejects_other_devices():
    if not native.available():
        with pytest.raises(RuntimeError, match="native"):
            ops.set_backend("cpu")
        return
    old = ops._requested
    try:
        ops.set_backend("cpu")
        with pytest.raises(RuntimeError, match="cpu"):
            ops.backend("cuda")
    finally:
        ops._requested = old


def test_native_info_and_threads():
    info = ops.native_info()
    assert info["available"] == native.available()
    if not info["available"]:
        assert info["error"]
        return
    assert info["isa"] in info["isas_supported"] and "scalar" in info["isas_supported"]
    n = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        assert ops.get_num_threads() == 1
        x_q, wp, _ = make(5, 300, 40)
        assert torch.equal(ops.ternary_matmul_int(x_q, wp, 300), ternary_matmul_reference(x_q, wp, 300))
    finally:
        ops.set_num_threads(n)
    with pytest.raises(TypeError):
        ops.set_num_threads(1.5)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument

def test_bad_inputs():
    x_q, wp, _ = make(2, 100, 5)
    ws = torch.tensor(1.0)
    with pytest.raises(TypeError, match="x_q"):
        ops.ternary_matmul_int(x_q.float(), wp, 100)
    with pytest.raises(TypeError, match="w_packed"):
        ops.ternary_matmul_int(x_q, wp.to(torch.int8), 100)
    with pytest.raises(ValueError, match="in_features"):
        ops.ternary_matmul_int(x_q, wp, 99)
    with pytest.raises(ValueError, match="w_packed"):
        ops.ternary_matmul_int(torch.zeros(2, 200, dtype=torch.int8), wp, 200)
    with pytest.raises(ValueError, match="in_features"):
        ops.ternary_matmul_int(x_q, wp, 0)
    with pytest.raises(ValueError, match="x_scale"):
        ops.ternary_linear(x_q, torch.ones(3, 1), wp, ws, 100)
    with pytest.raises(ValueError, match="w_scale"):
        ops.ternary_linear(x_q, torch.ones(2, 1), wp, torch.ones(2), 100)
    with pytest.raises(ValueError, match="bias"):
        ops.ternary_linear(x_q, torch.ones(2, 1), wp, ws, 100, torch.ones(4))
    with pytest.raises(TypeError, match="x must"):
        ops.bitlinear_packed(x_q, wp, ws, 100)
    with pytest.raises(ValueError, match="bits"):
        ops.bitlinear_packed(torch.randn(2, 100), wp, ws, 100, bits=9)
    with pytest.raises(ValueError, match="on meta"):
        ops.ternary_matmul_int(x_q.to("meta"), wp, 100)


def test_eager_fast_path_equals_dispatched_op():
    # plain eager calls skip the dispatcher; the registered op must give the same result
    k, n = 300, 20
    x = torch.randn(4, k)
    _, wp, _ = make(1, k, n, seed=12)
    ws, bias = torch.tensor(0.1), torch.randn(n)
    assert torch.equal(ops.bitlinear_packed(x, wp, ws, k, bias), torch.ops.bitnet.bitlinear_packed(x, wp, ws, k, bias, 8))
    x_q, s = activation_quant_int8(x)
    assert torch.equal(ops.ternary_linear(x_q, s, wp, ws, k, bias), torch.ops.bitnet.ternary_linear(x_q, s, wp, ws, k, bias))
    assert torch.equal(ops.ternary_matmul_int(x_q, wp, k), torch.ops.bitnet.ternary_matmul_int(x_q, wp, k))
    # inputs that need a gradient go through the op, whose backward is the straight-through input gradient
    y = ops.bitlinear_packed(x.requires_grad_(), wp, ws, k)
    assert y.grad_fn is not None
    y.sum().backward()
    torch.testing.assert_close(x.grad, (unpack_i2(wp, k, torch.float32) * ws).sum(0).expand(4, k))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_dispatch_glue(monkeypatch):
    # The CUDA path of the ops (argument order, dtypes) run on CPU through Triton's interpreter.
    from bitnet.ops import triton_backend as tb

    if not torch.cuda.is_available() and not tb.interpret_mode():
        pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(ops, "backend", lambda dev="cpu": "triton")
    k, n = 130, 20
    x = torch.randn(3, k, device=device)
    _, wp, _ = make(1, k, n, seed=13, device=device)
    ws, bias = torch.tensor(0.3, device=device), torch.randn(n, device=device)
    x_q, s = activation_quant_int8(x)
    acc = ternary_matmul_reference(x_q, wp, k)
    assert torch.equal(ops.ternary_matmul_int(x_q, wp, k), acc)
    want = acc.float() * ws / s + bias
    torch.testing.assert_close(ops.ternary_linear(x_q, s, wp, ws, k, bias), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.bitlinear_packed(x, wp, ws, k, bias), want, rtol=1e-5, atol=1e-5)
