"""Int8 weights x int8 activations: the kernels of :class:`bitnet.nn.Int8Linear` (the int8 LM head).

At decode time the output head of a large-vocabulary model (BitNet-b1.58-2B-4T: 128256 x 2560) is the
biggest single read of a token: 1.3 GB in fp32, more than all ternary layers together. Stored in int8
with one float32 scale per output row it is 4x smaller, and the product runs in exact integers:

    acc[m, n] = sum_k x_q[m, k] * w_q[n, k]                 (int32, exact)
    y[m, n]   = acc[m, n] * w_scale[n] / x_scale[m] (+ bias[n])

``x_q, x_scale`` is the per-token absmax int8 quantisation of :func:`bitnet.quant.activation_quant_int8`
(``x_scale = 127 / max|x|``); ``w_scale[n] = max|W[n]| / 127`` (:func:`quantize_weight_int8`).

Backends: the entry ``bitnet::int8_linear`` of :data:`bitnet.ops.DISPATCH` (the native CPU library,
bitnet_int8_* in ``csrc/int8*.cpp``; Triton on CUDA; the pure-torch reference on any device), chosen
as for the ternary ops by :func:`bitnet.ops.backend`.
``int8_linear`` is differentiable with respect to x (straight-through the activation quantiser, frozen
weights: :func:`int8_input_grad`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quant import activation_quant_int8, check_bits
from . import _plain_eager, backend, impl, native_on
from . import cpu as _cpu

MAX_K = 131072
"""Largest in_features of the native kernel (int32 accumulators stay exact)."""


def native_available() -> bool:
    """True when CPU tensors run on the native int8 kernels: :func:`bitnet.ops.native_on` (kept name)."""
    return native_on("cpu")


# ------------------------------------------------------------------------------------------------
# Reference (pure torch, exact)

@torch.no_grad()
def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row absmax int8 quantisation: ``(w_q int8 (N, K) in [-127, 127], w_scale float32 (N,))``
    with ``w ~= w_q * w_scale[:, None]``; all-zero rows get scale 1."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    w_q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return w_q, scale


def reference_matmul_int(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 (M, N) = x_q (M, K) @ w_q (N, K)^T: int64 arithmetic on CPU, float64 elsewhere (CUDA has
    no integer matmul; exact too, |acc| <= 2**14 * K << 2**53)."""
    if x_q.device.type == "cpu":
        return (x_q.to(torch.int64) @ w_q.to(torch.int64).T).to(torch.int32)
    return (x_q.to(torch.float64) @ w_q.to(torch.float64).T).round().to(torch.int32)


def reference_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     bits: int = 8) -> torch.Tensor:
    """float32 (M, N): quantise x per token, exact integer product, ``acc * w_scale / x_scale (+ bias)``."""
    x_q, x_scale = activation_quant_int8(x.float(), bits)
    acc = reference_matmul_int(x_q, w_q).float()
    y = acc * w_scale.float().reshape(1, -1) / x_scale.float().reshape(-1, 1)
    return y + bias.float() if bias is not None else y


# ------------------------------------------------------------------------------------------------
# Public ops

def _check_w(w_q, k):
    if not isinstance(w_q, torch.Tensor) or w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise TypeError(f"w_q must be a 2-D int8 tensor (N, K), got {getattr(w_q, 'dtype', type(w_q))}")
    if w_q.shape[1] != k:
        raise ValueError(f"the input has {k} features but w_q has {w_q.shape[1]} columns")


def _check_linear_args(x, w_q, w_scale, bias, bits):
    """The checks of int8_linear on x (M, K) (shared by the eager path and the fake impl)."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() < 1:
        raise TypeError("x must be a floating point tensor (..., K)")
    _check_w(w_q, x.shape[-1])
    n = w_q.shape[0]
    if not isinstance(w_scale, torch.Tensor) or tuple(w_scale.shape) != (n,):
        raise ValueError(f"w_scale must have shape ({n},), got {tuple(getattr(w_scale, 'shape', ()))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be None or a tensor of shape ({n},), got {tuple(getattr(bias, 'shape', ()))}")
    for name, t in (("w_q", w_q), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    check_bits(bits)


def int8_matmul_int(x_q: torch.Tensor, w_q: torch.Tensor, isa: Optional[str] = None) -> torch.Tensor:
    """Exact int32 (..., N) = x_q (..., K) int8 @ w_q (N, K) int8 ^T."""
    if not isinstance(x_q, torch.Tensor) or x_q.dtype != torch.int8 or x_q.dim() < 1:
        raise TypeError("x_q must be an int8 tensor (..., K)")
    _check_w(w_q, x_q.shape[-1])
    lead, k, n = x_q.shape[:-1], x_q.shape[-1], w_q.shape[0]
    x2 = x_q.reshape(-1, k)
    if w_q.device != x2.device:
        raise ValueError(f"w_q is on {w_q.device} but x_q is on {x2.device}")
    if not native_on(x2.device) or x2.is_meta or k > MAX_K:
        return reference_matmul_int(x2, w_q).reshape(*lead, n)
    x2, w_q = x2.contiguous(), w_q.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=torch.int32)
    rc = _cpu._need().bitnet_int8_matmul_int(x2.data_ptr(), m, k, k, w_q.data_ptr(), n, k, out.data_ptr(), n,
                                              _cpu.isa_id(isa))
    _cpu._check_rc(rc, "int8_matmul_int")
    return out.reshape(*lead, n)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                bits: int = 8, isa: Optional[str] = None) -> torch.Tensor:
    """Int8 linear: per-token absmax quantisation of x (..., K) to ``bits``, exact integer product with
    w_q (N, K) int8, then ``acc * w_scale[n] / x_scale (+ bias)``. Returns float32 (..., N)."""
    _check_linear_args(x, w_q, w_scale, bias, bits)
    lead, k, n = x.shape[:-1], x.shape[-1], w_q.shape[0]
    x2 = x.reshape(-1, k)
    if isa is not None and backend(x2.device) == "cpu":
        return native_linear(x2, w_q, w_scale, bias, int(bits), isa).reshape(*lead, n)   # an ISA asked for
    if isa is None and not _plain_eager(x2, w_q, w_scale, bias):
        return _op_int8_linear(x2, w_q, w_scale, bias, int(bits)).reshape(*lead, n)   # traceable op
    return impl("bitnet::int8_linear", x2.device)(x2, w_q, w_scale, bias, int(bits)).reshape(*lead, n)


# Backend implementations of bitnet::int8_linear (the "reference" one is reference_linear), x2 (M, K).

def triton_linear(x2, w_q, w_scale, bias, bits):
    """Triton (CUDA): quantise the activations, then the int8 kernel."""
    from . import triton_backend as tb

    x_q, x_scale = tb.triton_quantize_activations(x2, bits)
    return tb.triton_int8_linear(x_q, x_scale, w_q, w_scale.float(), bias)


def native_linear(x2, w_q, w_scale, bias, bits, isa=None):
    """The native CPU library (the torch reference past MAX_K features, where int32 could overflow)."""
    k, n = x2.shape[1], w_q.shape[0]
    if k > MAX_K:
        return reference_linear(x2, w_q, w_scale, bias, bits)
    x2 = x2.float().contiguous() if x2.dtype != torch.float32 or not x2.is_contiguous() else x2
    w_q = w_q.contiguous()
    ws = w_scale.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=torch.float32)
    rc = _cpu._need().bitnet_int8_linear(x2.data_ptr(), m, k, k, int(bits), 1e-5, w_q.data_ptr(), n, k,
                                         ws.data_ptr(), None if b is None else b.data_ptr(), out.data_ptr(), n,
                                         _cpu.isa_id(isa))
    _cpu._check_rc(rc, "int8_linear")
    return out


@torch.library.custom_op("bitnet::int8_linear", mutates_args=())
def _op_int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    bits: int) -> torch.Tensor:
    return impl("bitnet::int8_linear", x.device)(x, w_q, w_scale, bias, bits)


@_op_int8_linear.register_fake
def _(x, w_q, w_scale, bias, bits):
    _check_linear_args(x, w_q, w_scale, bias, bits)
    return x.new_empty((x.shape[0], w_q.shape[0]), dtype=torch.float32)


# Backward with respect to x (frozen int8 weights; straight-through the activation quantiser):
#   grad_x = grad_y @ (W_q * w_scale[:, None])     (M, N) @ (N, K) -> (M, K)
# dequantised a block of rows at a time (at most GRAD_CHUNK_ELEMENTS values), nothing kept.

GRAD_CHUNK_ELEMENTS = 1 << 22


def int8_input_grad(grad_y: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``grad_y @ (w_q * w_scale[:, None])``: float32 (M, K) from grad_y (M, N), w_q int8 (N, K)."""
    g = grad_y.to(torch.float32)
    n, k = w_q.shape
    rows = max(1, GRAD_CHUNK_ELEMENTS // max(1, k))
    out = g.new_zeros((g.shape[0], k))
    for r0 in range(0, n, rows):
        w = w_q[r0:r0 + rows].to(torch.float32) * w_scale[r0:r0 + rows].to(torch.float32)[:, None]   # temporary
        out.addmm_(g[:, r0:r0 + rows], w)
    return out


def _setup_context(ctx, inputs, output):
    x, w_q, w_scale, _bias, _bits = inputs
    ctx.save_for_backward(w_q, w_scale)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad_y):
    w_q, w_scale = ctx.saved_tensors
    grad_x = int8_input_grad(grad_y, w_q, w_scale).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    grad_bias = grad_y.sum(0) if ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_bias, None


_op_int8_linear.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["MAX_K", "int8_input_grad", "int8_linear", "int8_matmul_int", "native_available", "native_linear",
           "quantize_weight_int8", "reference_linear", "reference_matmul_int", "triton_linear"]
