"""Native CPU backend: every ISA this CPU supports against the reference (exact int32), the
activation quantiser bit for bit against activation_quant_int8, threads, and ISA selection."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bitnet.ops as ops
from bitnet.ops import cpu as native
from bitnet.quant import activation_quant_int8, pack_i2, ternary_matmul_reference

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")
ISAS = native.supported_isas()


def make(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    x_q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    return x_q, pack_i2(w)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 2560, 77), (2, 129, 33), (3, 255, 5), (4, 384, 16),
                                   (5, 640, 19), (17, 131, 70), (70, 300, 131), (130, 1000, 9)])
def test_matmul_every_isa(isa, m, k, n):
    x_q, wp = make(m, k, n, seed=m * 7 + k)
    assert torch.equal(native.matmul_int(x_q, wp, k, isa=isa), ternary_matmul_reference(x_q, wp, k))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 700), n=st.integers(1, 90), seed=st.integers(0, 9999))
def test_matmul_random_shapes_every_isa(m, k, n, seed):
    x_q, wp = make(m, k, n, seed)
    want = ternary_matmul_reference(x_q, wp, k)
    for isa in ISAS:
        assert torch.equal(native.matmul_int(x_q, wp, k, isa=isa), want), isa


def _tricky(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
    x[0, : min(k, 6)] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])[: min(k, 6)]  # ties
    if m > 1:
        x[1] = 0.0                                      # all zero: scale clamps to eps
    if m > 2:
        x[2, :] = 1e-30                                 # tiny values
    if m > 3:
        x[3, ::2] = -x[3, ::2].abs() - 1e4              # large values, sign mix
    return x


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [8, 5, 2])
@pytest.mark.parametrize("k", [1, 7, 8, 33, 2560])
def test_quantizer_bit_exact(isa, bits, k):
    x = _tricky(5, k, seed=k + bits)
    xq, s = native.quantize_act(x, bits, isa=isa)
    want_q, want_s = activation_quant_int8(x, bits)
    assert torch.equal(s, want_s)
    assert torch.equal(xq, want_q)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 300), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 9999))
def test_quantizer_bit_exact_random(m, k, scale, seed):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * scale
    want_q, want_s = activation_quant_int8(x)
    for isa in ISAS:
        xq, s = native.quantize_act(x, isa=isa)
        assert torch.equal(xq, want_q) and torch.equal(s, want_s), isa


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 2, 9])
def test_fused_bitlinear_every_isa(isa, m):
    k, n = 700, 50
    x = _tricky(m, k, seed=m)
    _, wp = make(1, k, n, seed=11)
    bias = torch.randn(n)
    got = native.bitlinear(x, wp, 0.25, k, bias, 8, isa=isa)
    x_q, s = activation_quant_int8(x)
    want = ternary_matmul_reference(x_q, wp, k).float() * torch.tensor(0.25) / s + bias
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    # same float32 operations in the same order as the reference epilogue: equal bit for bit
    assert torch.equal(got, native.linear(x_q, s, wp, 0.25, k, bias, isa=isa))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    x_q, wp = make(67, 520, 301, seed=5)
    want = ternary_matmul_reference(x_q, wp, 520)
    old = native.get_num_threads()
    try:
        native.set_num_threads(threads)
        assert native.get_num_threads() == threads
        assert torch.equal(native.matmul_int(x_q, wp, 520), want)
        assert torch.equal(native.matmul_int(x_q[:1], wp, 520), want[:1])
    finally:
        native.set_num_threads(old)


def test_concurrent_callers():
    # two Python threads at once: one gets the pool, the other runs its tasks itself
    x_q, wp = make(33, 900, 200, seed=9)
    want = ternary_matmul_reference(x_q, wp, 900)
    errors = []

    def work():
        for _ in range(10):
            if not torch.equal(native.matmul_int(x_q, wp, 900), want):
                errors.append("mismatch")

    ts = [threading.Thread(target=work) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


def test_isa_selection(monkeypatch):
    assert native.default_isa() == ISAS[-1] or "BITNET_ISA" in os.environ
    with pytest.raises(ValueError, match="isa must be one of"):
        native.matmul_int(*make(1, 4, 4), 4, isa="sse9")
    unsupported = [i for i in native.ISAS if i not in ISAS]
    for name in unsupported:
        with pytest.raises(RuntimeError, match="not"):
            native.set_default_isa(name)
    monkeypatch.setenv("BITNET_ISA", "scalar")
    try:
        importlib.reload(ops)
        assert ops.native_info()["isa"] == "scalar"
        x_q, wp = make(2, 200, 10)
        assert torch.equal(ops.ternary_matmul_int(x_q, wp, 200), ternary_matmul_reference(x_q, wp, 200))
        monkeypatch.setenv("BITNET_ISA", "bogus")
        with pytest.raises(ValueError, match="isa must be one of"):
            importlib.reload(ops)
    finally:
        monkeypatch.delenv("BITNET_ISA")
        native.set_default_isa(None)
        importlib.reload(ops)
    assert ops.native_info()["isa"] == ISAS[-1]


@pytest.mark.skipif(os.environ.get("BITNET_TEST_EMU") != "1" or shutil.which("g++") is None,
                    reason="opt-in (BITNET_TEST_EMU=1, ~30 s): needs g++")
def test_vnni_kernels_under_intrinsic_emulation(tmp_path):
    # The AVX-VNNI / AVX-512 VNNI kernels compiled against a scalar emulation of their intrinsics
    # (csrc/emu/immintrin.h) must match the scalar kernel: checks their logic on any x86-64 CPU.
    script = Path(__file__).resolve().parents[2] / "csrc" / "emu" / "build_emu_selftest.sh"
    r = subprocess.run(["sh", str(script), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0 and "all ISAs match" in r.stdout, r.stdout + r.stderr
