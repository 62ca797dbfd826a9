"""NaN and inf activations: every backend agrees with the reference, row by row.

The reference (``activation_quant_int8`` + exact integer product + rescale) turns a row holding a NaN
into scale NaN, a row holding an inf (and no NaN) into scale 0 (``qp / inf``), the codes of both into 0
(torch casts NaN to int8 0), and so every output of such a row into NaN (``0 / 0``, ``x / NaN``); finite
rows of the same batch are untouched. The native kernels used to skip NaN in their absmax and return
finite outputs for a NaN row (``bitlinear_packed([[nan, 1, -2, .5]], ...)`` gave ``[-2.016, 1.008]``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton (no GPU: the interpreter)

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import bitnet.ops as ops  # noqa: E402
from bitnet.ops import cpu as native  # noqa: E402
from bitnet.ops import int8 as i8  # noqa: E402
from bitnet.ops import reference as ref  # noqa: E402
from bitnet.quant import activation_quant_int8, pack_i2  # noqa: E402

NAN, INF = float("nan"), float("inf")
ISAS = native.supported_isas()
needs_native = pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")


def batch(k: int, seed: int = 0) -> torch.Tensor:
    """Rows: finite, NaN, +inf, -inf, finite, NaN and inf together, finite tiny values (5 + 2 rows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, k, generator=g) * 3
    x[1, k // 2] = NAN
    x[2, 0] = INF
    x[3, k - 1] = -INF
    x[5, 0], x[5, k - 1] = INF, NAN
    x[6] *= 1e-30
    return x


BAD_ROWS = [1, 2, 3, 5]


def weights(n: int, k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return pack_i2(torch.randint(-1, 2, (n, k), generator=g)), torch.tensor(0.37), torch.randn(n, generator=g)


def same(got: torch.Tensor, want: torch.Tensor, exact: bool = True) -> None:
    """Equal values, NaN where the reference has NaN (and nowhere else)."""
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got, want, equal_nan=True, **tol)


def test_the_reference_makes_every_output_of_a_nonfinite_row_nan():
    x = torch.tensor([[NAN, 1, -2, .5], [INF, 1, -2, .5], [-INF, 1, -2, .5], [1, 2, 3, 4]])
    w = pack_i2(torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]]))
    x_q, s = activation_quant_int8(x)
    assert torch.equal(x_q[:3], torch.zeros(3, 4, dtype=torch.int8))
    assert torch.isnan(s[0]).all() and torch.equal(s[1:3], torch.zeros(2, 1))
    y = ref.bitlinear(x, w, torch.tensor(1.0), 4, None)
    assert torch.isnan(y[:3]).all() and torch.isfinite(y[3]).all()


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [4, 130, 300])
@pytest.mark.parametrize("bits", [8, 4])
def test_native_quantiser_and_fused_linear_match_the_reference(isa, k, bits):
    x = batch(k)
    wp, ws, bias = weights(9, k)
    want_q, want_s = activation_quant_int8(x, bits)
    got_q, got_s = native.quantize_act(x, bits, isa=isa)
    assert torch.equal(got_q, want_q)
    same(got_s, want_s)
    want = ref.bitlinear(x, wp, ws, k, bias, bits)
    same(native.bitlinear(x, wp, float(ws), k, bias, bits, isa=isa), want, exact=False)
    same(native.linear(want_q, want_s, wp, float(ws), k, bias, isa=isa), want, exact=False)
    for m in range(x.shape[0]):                                     # decode-sized calls, one row each
        same(native.bitlinear(x[m:m + 1], wp, float(ws), k, None, bits, isa=isa),
             ref.bitlinear(x[m:m + 1], wp, ws, k, None, bits), exact=False)
    assert torch.isnan(want[BAD_ROWS]).all() and torch.isfinite(want[[0, 4, 6]]).all()


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_native_group_with_norm_matches_the_reference(isa):
    from bitnet.nn import RMSNorm

    k = 200
    x = batch(k)
    norm = RMSNorm(k, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k) + 0.5)
    mats = [weights(n, k, seed) for n, seed in ((5, 1), (11, 2))]
    group = native.BitLinearGroup([m[0] for m in mats], [m[1] for m in mats], [m[2] for m in mats], k, isa=isa)
    got = group(x, norm_weight=norm.weight.detach(), norm_eps=1e-6)
    with torch.no_grad():
        h = norm(x)
    want = torch.cat([ref.bitlinear(h, wp, ws, k, b) for wp, ws, b in mats], dim=-1)
    same(got, want, exact=False)


@pytest.mark.parametrize("native_on", [False, True])
def test_int8_linear_matches_the_reference(native_on):
    if native_on and not i8.native_available():
        pytest.skip("native int8 kernels not built")
    k, n = 150, 13
    x = batch(k)
    g = torch.Generator().manual_seed(3)
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) + 0.01
    want = i8.reference_linear(x, w_q, w_scale, None)
    assert torch.isnan(want[BAD_ROWS]).all()
    for isa in (ISAS if native_on else [None]):
        if native_on:
            got = i8.int8_linear(x, w_q, w_scale, isa=isa)
        else:
            ops.set_backend("reference")
            try:
                got = i8.int8_linear(x, w_q, w_scale)
            finally:
                ops.set_backend("auto")
        same(got, want, exact=False)


def test_public_op_on_every_cpu_backend():
    k = 37
    x = batch(k)
    wp, ws, bias = weights(6, k)
    want = ref.bitlinear(x, wp, ws, k, bias)
    for name in ["reference"] + (["cpu"] if native.available() else []):
        ops.set_backend(name)
        try:
            same(ops.bitlinear_packed(x, wp, ws, k, bias), want, exact=False)
        finally:
            ops.set_backend("auto")


triton_ok = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not triton_ok, reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # numpy under the interpreter
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
def test_triton_matches_the_reference():
    from bitnet.ops import triton_backend as tb

    if not (tb.interpret_mode() or torch.cuda.is_available()):
        pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU")
    device = "cpu" if tb.interpret_mode() else "cuda"
    k = 70
    x = batch(k)
    wp, ws, bias = weights(6, k)
    want_q, want_s = activation_quant_int8(x)
    got_q, got_s = tb.triton_quantize_activations(x.to(device))
    assert torch.equal(got_q.cpu(), want_q)
    same(got_s.cpu(), want_s)
    got = tb.triton_ternary_linear(got_q, got_s, wp.to(device), ws.to(device), k, bias.to(device))
    same(got.cpu(), ref.bitlinear(x, wp, ws, k, bias), exact=False)
    w_q = torch.randint(-127, 128, (5, k), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    w_scale = torch.rand(5) + 0.01
    got8 = tb.triton_int8_linear(got_q, got_s, w_q.to(device), w_scale.to(device), None)
    same(got8.cpu(), i8.reference_linear(x, w_q, w_scale, None), exact=False)
