"""The dispatch table of bitnet.ops: one entry {backend: impl} per declared op, used by the op bodies and
the eager fast path; one predicate (ops.native_on) for "is the native CPU path on"."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from bitnet import ops, runtime
from bitnet.nn.packed import PackedBitLinear
from bitnet.ops import cpu as native
from bitnet.ops import int8 as i8
from bitnet.quant import pack_i2

BACKENDS = [b for b in ops.BACKENDS if b != "auto"]


@pytest.fixture
def restore_backend():
    old = ops._requested
    yield
    ops._requested = old


def _declared_ops() -> set[str]:
    return {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("bitnet::")}


def _args(op: str, m: int = 3, k: int = 150, n: int = 11, bias: bool = True):
    """Arguments of ``op`` (small, odd shapes) on the CPU."""
    g = torch.Generator().manual_seed(0)
    wp = pack_i2(torch.randint(-1, 2, (n, k), generator=g))
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(m, k, generator=g)
    if op == "bitnet::ternary_matmul_int":
        return (torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8), wp, k)
    if op == "bitnet::ternary_linear":
        return (torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8), torch.rand(m, 1, generator=g) + 0.5,
                wp, torch.tensor(0.7), k, b)
    if op == "bitnet::bitlinear_packed":
        return (x, wp, torch.tensor(0.7), k, b, 8)
    if op == "bitnet::int8_linear":
        w_q, w_scale = i8.quantize_weight_int8(torch.randn(n, k, generator=g))
        return (x, w_q, w_scale, b, 8)
    raise AssertionError(f"no test arguments for {op}")


def test_table_covers_every_declared_op_and_backend():
    declared = _declared_ops()
    assert declared == set(ops.DISPATCH), "every torch.ops.bitnet op has one table entry, and nothing else"
    assert "bitnet::int8_linear" in declared
    for op, impls in ops.DISPATCH.items():
        assert set(impls) == set(BACKENDS), op
        assert all(callable(f) for f in impls.values()), op


def _triton_runnable() -> bool:
    try:
        from bitnet.ops import triton_backend as tb
    except ImportError:
        return False
    return tb.TRITON_AVAILABLE and (tb.interpret_mode() or torch.cuda.is_available())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(ops.DISPATCH))
def test_every_impl_matches_the_reference(op, backend):
    if backend == "cpu" and not native.available():
        pytest.skip(f"native library not loaded: {native.LOAD_ERROR}")
    if backend == "triton" and not _triton_runnable():
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    args = _args(op)
    if backend == "triton" and torch.cuda.is_available():
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    got = ops.DISPATCH[op][backend](*args).cpu()
    want = ops.DISPATCH[op]["reference"](*_args(op))
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype == torch.int32:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("op", sorted(ops.DISPATCH))
def test_op_body_and_eager_fast_path_look_up_the_table(op, monkeypatch, restore_backend):
    # Replace the reference entry by a counting wrapper: the public function (eager fast path) and the
    # declared op (dispatcher path) must both reach it.
    calls = []
    real = ops.DISPATCH[op]["reference"]

    def counting(*a):
        calls.append(op)
        return real(*a)

    monkeypatch.setitem(ops.DISPATCH[op], "reference", counting)
    ops.set_backend("reference")
    args = _args(op)
    public = {"bitnet::ternary_matmul_int": ops.ternary_matmul_int, "bitnet::ternary_linear": ops.ternary_linear,
              "bitnet::bitlinear_packed": ops.bitlinear_packed, "bitnet::int8_linear": i8.int8_linear}[op]
    eager = public(*args)
    assert calls == [op]
    declared = getattr(torch.ops.bitnet, op.split("::")[1]).default(*args)
    assert calls == [op, op]
    assert torch.equal(eager, declared)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_op_passes_opcheck(backend, bias, restore_backend):
    if backend == "cpu" and not native.available():
        pytest.skip(f"native library not loaded: {native.LOAD_ERROR}")
    ops.set_backend(backend)
    x, w_q, w_scale, b, bits = _args("bitnet::int8_linear", bias=bias)
    torch.library.opcheck(torch.ops.bitnet.int8_linear.default, (x, w_q, w_scale, b, bits))
    torch.library.opcheck(torch.ops.bitnet.int8_linear.default, (x.requires_grad_(), w_q, w_scale, b, bits))


def test_fake_impls_check_their_arguments():
    # The fake impls (what torch.compile traces) reject bad input with the same errors as the eager path.
    x, w_q, w_scale, b, bits = _args("bitnet::int8_linear")
    xq, wp, k = _args("bitnet::ternary_matmul_int")
    with FakeTensorMode() as mode:
        fx, fw, fs = mode.from_tensor(x), mode.from_tensor(w_q), mode.from_tensor(w_scale)
        assert torch.ops.bitnet.int8_linear.default(fx, fw, fs, None, 8).shape == (3, 11)
        with pytest.raises(ValueError, match=r"w_scale must have shape \(11,\)"):
            torch.ops.bitnet.int8_linear.default(fx, fw, fs[:5], None, 8)
        with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
            torch.ops.bitnet.int8_linear.default(fx, fw, fs, None, 9)
        with pytest.raises(TypeError, match="w_q must be a 2-D int8 tensor"):
            torch.ops.bitnet.int8_linear.default(fx, fx, fs, None, 8)
        fxq, fwp = mode.from_tensor(xq), mode.from_tensor(wp)
        with pytest.raises(ValueError, match="in_features"):
            torch.ops.bitnet.ternary_matmul_int.default(fxq, fwp, k + 1)


def test_int8_rejects_weights_on_another_device():
    x, w_q, w_scale, b, bits = _args("bitnet::int8_linear")
    with pytest.raises(ValueError, match="w_scale is on meta but x is on cpu"):
        i8.int8_linear(x, w_q, w_scale.to("meta"))


def _packed_model() -> nn.Module:
    return nn.Sequential(PackedBitLinear(150, 11))


def test_native_on_is_the_one_answer(restore_backend):
    model = _packed_model()
    for name in ("auto", "reference") + (("cpu",) if native.available() else ()):
        ops.set_backend(name)
        on = ops.native_on()
        assert on == (native.available() and name in ("auto", "cpu"))
        assert on == (ops.backend("cpu") == "cpu")
        assert ops.native_on(torch.device("cpu")) == on and ops.native_cpu_selected() == on
        assert i8.native_available() == on
        assert runtime.native_decode(model) == on
        assert not ops.native_on("meta") and not ops.native_on(torch.device("cuda"))
    ops.set_backend("auto")
    assert not runtime.native_decode(nn.Sequential(nn.Linear(3, 3)))     # nothing packed
