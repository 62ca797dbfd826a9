"""Kernels of packed ternary layers, one declared op per kernel, three backends.

Ops (``torch.library.custom_op`` in the ``bitnet`` namespace, each with a fake impl so that
``torch.compile(fullgraph=True)`` traces them):

* ``ternary_matmul_int(x_q, w_packed, in_features)`` -> int32 (M, N), the exact integer product;
* ``ternary_linear(x_q, x_scale, w_packed, w_scale, in_features, bias)`` -> float32 (M, N),
  ``acc * w_scale / x_scale (+ bias)``;
* ``bitlinear_packed(x, w_packed, w_scale, in_features, bias, bits)`` -> float32 (M, N): per-token
  absmax int8 quantisation of ``x`` (as :func:`bitnet.quant.activation_quant_int8`) and the product
  in one native call (the decode hot path). Differentiable with respect to ``x`` (straight-through
  the activation quantiser, through the frozen weights: :func:`ternary_input_grad`), so adapters train
  on a packed base.

Weights are in the I2 layout of :mod:`bitnet.quant.packing` (uint8 (N, ceil(K/128)*32)).

Backends: ``reference`` (pure torch, any device: the ground truth), ``cpu`` (native SIMD library,
see :mod:`bitnet.ops.cpu`), ``triton`` (CUDA). The choice is made once, at import, from
``$BITNET_BACKEND`` (``auto`` | ``reference`` | ``cpu`` | ``triton``; default ``auto``: triton for
CUDA tensors when triton is importable, cpu for CPU tensors when the native library loaded,
reference otherwise). :func:`backend` says which one a device gets; :func:`set_backend` changes it.

:data:`DISPATCH` is the one table ``{op: {backend: impl}}`` of every declared op (the int8 op of
:mod:`bitnet.ops.int8` included): the op bodies and the eager fast path look their implementation up
there. :func:`native_on` is the one answer to "do tensors on this device run on the native CPU
library?", which every layer above (``runtime``, the fused native block) asks.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ..quant import check_bits, padded_in_features
from . import cpu as _cpu
from . import reference as _ref

BACKENDS = ("auto", "reference", "cpu", "triton")
"""Accepted values of ``$BITNET_BACKEND`` / :func:`set_backend`."""

_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _parse_backend(name) -> str:
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"bitnet backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if key == "cpu" and not _cpu.available():
        raise RuntimeError(f"bitnet backend 'cpu' was asked for, but {_cpu.LOAD_ERROR}")
    if key == "triton" and not _TRITON_IMPORTABLE:
        raise RuntimeError("bitnet backend 'triton' was asked for, but triton is not installed")
    return key


_requested = _parse_backend(os.environ.get("BITNET_BACKEND", "auto") or "auto")

if os.environ.get("BITNET_ISA", "").strip() and _cpu.available():
    _cpu.set_default_isa(os.environ["BITNET_ISA"])       # ValueError / RuntimeError if not usable here


def set_backend(name: str) -> None:
    """Choose the backend for all later calls: 'auto', 'reference', 'cpu' or 'triton'."""
    global _requested
    _requested = _parse_backend(name)


def native_on(device="cpu") -> bool:
    """True when tensors on ``device`` run on the native CPU library: the device is the CPU, the library
    loaded and the backend is 'auto' or 'cpu'. Cheap (a hot-path check); never raises for a device."""
    if device != "cpu" and (device.type if isinstance(device, torch.device) else torch.device(device).type) != "cpu":
        return False
    return _requested in ("auto", "cpu") and _cpu.available()


native_cpu_selected = native_on
"""Former name of :func:`native_on` (CPU tensors), kept for callers of it."""


def backend(device="cpu") -> str:
    """The backend that tensors on ``device`` use: 'reference', 'cpu' or 'triton'."""
    dev = torch.device(device).type
    if _requested == "auto":
        if dev == "cpu":
            return "cpu" if native_on() else "reference"
        if dev == "cuda":
            return "triton" if _TRITON_IMPORTABLE else "reference"
        return "reference"
    if _requested == "cpu" and dev != "cpu":
        raise RuntimeError(f"BITNET_BACKEND is 'cpu' but the tensors are on {dev}")
    if _requested == "triton" and dev != "cuda":
        raise RuntimeError(f"BITNET_BACKEND is 'triton' but the tensors are on {dev} (triton needs CUDA)")
    return _requested


def set_num_threads(n: int) -> None:
    """Number of threads of the native CPU backend (n <= 0: all cores). No effect on torch itself."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if _cpu.available():
        _cpu.set_num_threads(n)


def get_num_threads() -> int:
    """Threads of the native CPU backend (torch's count when the native backend is missing)."""
    return _cpu.get_num_threads() if _cpu.available() else torch.get_num_threads()


def native_info() -> dict:
    """What the native CPU backend is: loaded or not (and why), ISA chosen, ISAs available, threads, CPU."""
    info = {
        "available": _cpu.available(),
        "path": _cpu.LIB_PATH,
        "error": _cpu.LOAD_ERROR,
        "isa": _cpu.default_isa(),
        "isas_supported": _cpu.supported_isas(),
        "isas_compiled": _cpu.compiled_isas(),
        "threads": _cpu.get_num_threads() if _cpu.available() else None,
        "cpu": _cpu.cpu_name(),
        "backend_cpu": backend("cpu"),
        "requested": _requested,
    }
    return info


def _triton():
    from . import triton_backend  # lazy: only for CUDA tensors, and only when triton is importable

    return triton_backend


# ------------------------------------------------------------------------------------------------
# Argument checks (shared by the eager path and the fake impls, so errors are the same under compile)

def _check_matmul_args(x_q, w_packed, in_features, x_name="x_q"):
    if not isinstance(x_q, torch.Tensor) or x_q.dtype != torch.int8 or x_q.dim() != 2:
        raise TypeError(f"{x_name} must be a 2-D int8 tensor (M, K), got "
                        f"{_describe(x_q)}")
    if not isinstance(w_packed, torch.Tensor) or w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError(f"w_packed must be a 2-D uint8 tensor (N, ceil(K/128)*32) in the I2 layout, got {_describe(w_packed)}")
    _check_k(x_q, w_packed, in_features, x_name)


def _check_k(x, w_packed, in_features, x_name):
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    if x.shape[-1] != in_features:
        raise ValueError(f"{x_name} has {x.shape[-1]} features (last dim) but in_features={in_features}")
    if w_packed.shape[1] * 4 != padded_in_features(in_features):
        raise ValueError(f"w_packed has {w_packed.shape[1]} bytes per row; in_features={in_features} needs "
                         f"{padded_in_features(in_features) // 4} (I2 layout, rows padded to 128 weights)")
    if x.device != w_packed.device:
        raise ValueError(f"{x_name} is on {x.device} but w_packed is on {w_packed.device}")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _check_scales(m, n, device, x_scale, w_scale, bias):
    if x_scale is not None:
        if not isinstance(x_scale, torch.Tensor) or not x_scale.dtype.is_floating_point or x_scale.numel() != m \
                or x_scale.dim() not in (1, 2) or (x_scale.dim() == 2 and x_scale.shape[1] != 1):
            raise ValueError(f"x_scale must be a float tensor of shape ({m}, 1), got {_describe(x_scale)}")
        if x_scale.device != device:
            raise ValueError(f"x_scale is on {x_scale.device} but x_q is on {device}")
    if not isinstance(w_scale, torch.Tensor) or not w_scale.dtype.is_floating_point or w_scale.numel() != 1:
        raise ValueError(f"w_scale must be a 0-dim float tensor (the per-tensor weight scale), got {_describe(w_scale)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point or tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be None or a float tensor of shape ({n},), got {_describe(bias)}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but the input is on {device}")


# ------------------------------------------------------------------------------------------------
# Declared ops. The bodies dispatch on the backend of the tensors' device.

def impl(op: str, device):
    """The implementation of declared op ``op`` ('bitnet::...') for tensors on ``device``: DISPATCH[op][backend]."""
    return DISPATCH[op][backend(device)]


# Backend implementations with the ops' signatures (the native and Triton functions take plain floats,
# float32 scales or a separate quantisation step).

def _cpu_linear(x_q, x_scale, w_packed, w_scale, in_features, bias):
    return _cpu.linear(x_q, x_scale, w_packed, float(w_scale), in_features, bias)


def _cpu_bitlinear(x, w_packed, w_scale, in_features, bias, bits):
    return _cpu.bitlinear(x, w_packed, float(w_scale), in_features, bias, bits)


def _triton_matmul_int(x_q, w_packed, in_features):
    return _triton().triton_ternary_matmul_int(x_q, w_packed, in_features)


def _triton_linear(x_q, x_scale, w_packed, w_scale, in_features, bias):
    return _triton().triton_ternary_linear(x_q, x_scale.to(torch.float32), w_packed, w_scale.to(torch.float32),
                                           in_features, bias)


def _triton_bitlinear(x, w_packed, w_scale, in_features, bias, bits):
    tb = _triton()
    x_q, x_scale = tb.triton_quantize_activations(x, bits)
    return tb.triton_ternary_linear(x_q, x_scale, w_packed, w_scale.to(torch.float32), in_features, bias)


@torch.library.custom_op("bitnet::ternary_matmul_int", mutates_args=())
def _op_matmul_int(x_q: torch.Tensor, w_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    return impl("bitnet::ternary_matmul_int", x_q.device)(x_q, w_packed, in_features)


@_op_matmul_int.register_fake
def _(x_q, w_packed, in_features):
    _check_matmul_args(x_q, w_packed, in_features)
    return x_q.new_empty((x_q.shape[0], w_packed.shape[0]), dtype=torch.int32)


@torch.library.custom_op("bitnet::ternary_linear", mutates_args=())
def _op_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
               in_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return impl("bitnet::ternary_linear", x_q.device)(x_q, x_scale, w_packed, w_scale, in_features, bias)


@_op_linear.register_fake
def _(x_q, x_scale, w_packed, w_scale, in_features, bias):
    _check_matmul_args(x_q, w_packed, in_features)
    _check_scales(x_q.shape[0], w_packed.shape[0], x_q.device, x_scale, w_scale, bias)
    return x_q.new_empty((x_q.shape[0], w_packed.shape[0]), dtype=torch.float32)


@torch.library.custom_op("bitnet::bitlinear_packed", mutates_args=())
def _op_bitlinear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, in_features: int,
                  bias: Optional[torch.Tensor], bits: int) -> torch.Tensor:
    return impl("bitnet::bitlinear_packed", x.device)(x, w_packed, w_scale, in_features, bias, bits)


@_op_bitlinear.register_fake
def _(x, w_packed, w_scale, in_features, bias, bits):
    _check_bitlinear_args(x, w_packed, w_scale, in_features, bias, bits)
    return x.new_empty((x.shape[0], w_packed.shape[0]), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Backward of bitlinear_packed with respect to its input (frozen packed weights: adapters / LoRA on a
# 2-bit base). Straight-through estimator through the activation quantiser (2402.17764: d q(x)/dx := 1),
# so with y = (xq @ Wq^T) * gamma / s:   grad_x = grad_y @ (Wq * gamma)   (M, N) @ (N, K) -> (M, K).
# The weights are unpacked a block of rows at a time into a temporary (at most GRAD_CHUNK_ELEMENTS
# values), so no float copy of a layer's weight outlives the call, let alone one of the whole model.

GRAD_CHUNK_ELEMENTS = 1 << 22
"""Largest temporary (rows x in_features values) a backward call unpacks at once (16 MB in float32)."""


def ternary_input_grad(grad_y: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                       in_features: int) -> torch.Tensor:
    """``grad_y @ (Wq * w_scale)``: float32 (M, K) from grad_y (M, N) and I2 weights (N, ceil(K/128)*32)."""
    from ..quant import unpack_i2

    g = grad_y.to(torch.float32)
    n = w_packed.shape[0]
    rows = max(1, GRAD_CHUNK_ELEMENTS // max(1, in_features))
    out = g.new_zeros((g.shape[0], in_features))
    for r0 in range(0, n, rows):
        w = unpack_i2(w_packed[r0:r0 + rows], in_features, torch.float32)      # (rows, K) temporary
        out.addmm_(g[:, r0:r0 + rows], w)
    return out * w_scale.to(torch.float32)


def _bitlinear_setup_context(ctx, inputs, output):
    x, w_packed, w_scale, in_features, bias, _bits = inputs
    ctx.save_for_backward(w_packed, w_scale)
    ctx.in_features, ctx.x_dtype = in_features, x.dtype


def _bitlinear_backward(ctx, grad_y):
    w_packed, w_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = ternary_input_grad(grad_y, w_packed, w_scale, ctx.in_features).to(ctx.x_dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad_y.sum(0)
    return grad_x, None, None, None, grad_bias, None


_op_bitlinear.register_autograd(_bitlinear_backward, setup_context=_bitlinear_setup_context)


def _check_bitlinear_args(x, w_packed, w_scale, in_features, bias, bits):
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() != 2:
        raise TypeError(f"x must be a 2-D floating point tensor (M, K), got {_describe(x)}")
    if not isinstance(w_packed, torch.Tensor) or w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError(f"w_packed must be a 2-D uint8 tensor (N, ceil(K/128)*32) in the I2 layout, got {_describe(w_packed)}")
    _check_k(x, w_packed, in_features, "x")
    _check_scales(x.shape[0], w_packed.shape[0], x.device, None, w_scale, bias)
    check_bits(bits)


# ------------------------------------------------------------------------------------------------
# Public functions: validate, flatten leading dims, call the op.

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_function_mode_on = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: True)
_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)


def _plain_eager(*tensors) -> bool:
    """True when the op may be run directly, skipping the dispatcher (~40 us per call, which matters at
    decode time): eager mode, plain tensors that need no gradient, no torch function / dispatch mode.
    Anything else (torch.compile, export, fake or meta tensors, subclasses, modes) goes through the op."""
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.requires_grad or t.is_meta):
            return False
    return not (_is_compiling() or _function_mode_on() or _dispatch_stack_len())


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def ternary_matmul_int(x_q: torch.Tensor, w_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Exact integer product ``x_q @ W^T``.

    Args:
        x_q: int8 (..., K) activations (K == in_features).
        w_packed: uint8 (N, ceil(K/128)*32), ternary weights in the I2 layout (:func:`bitnet.quant.pack_i2`).
        in_features: K.
    Returns:
        int32 (..., N).
    """
    if isinstance(x_q, torch.Tensor) and x_q.dim() > 2:
        _check_matmul_args(_flat(x_q), w_packed, in_features)
        return ternary_matmul_int(_flat(x_q), w_packed, in_features).reshape(*x_q.shape[:-1], w_packed.shape[0])
    _check_matmul_args(x_q, w_packed, in_features)
    op = impl("bitnet::ternary_matmul_int", x_q.device) if _plain_eager(x_q, w_packed) else _op_matmul_int
    return op(x_q, w_packed, in_features)


def ternary_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                   in_features: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BitLinear output from int8 activations: ``(x_q @ W^T) * w_scale / x_scale (+ bias)``.

    Args:
        x_q: int8 (..., K); x_scale: float (..., 1), the activation scale s = Qp / max|x| per token.
        w_packed: uint8 (N, ceil(K/128)*32) I2 weights; w_scale: 0-dim float32 tensor (gamma = mean|W|).
        in_features: K. bias: optional float (N,).
    Returns:
        float32 (..., N).
    """
    lead = x_q.shape[:-1] if isinstance(x_q, torch.Tensor) else None
    if isinstance(x_q, torch.Tensor) and x_q.dim() > 2:
        x_q = _flat(x_q)
        if isinstance(x_scale, torch.Tensor):
            x_scale = x_scale.reshape(-1, 1)
    _check_matmul_args(x_q, w_packed, in_features)
    _check_scales(x_q.shape[0], w_packed.shape[0], x_q.device, x_scale, w_scale, bias)
    if x_scale.dim() == 1:
        x_scale = x_scale.reshape(-1, 1)
    op = impl("bitnet::ternary_linear", x_q.device) if _plain_eager(x_q, x_scale, w_packed, w_scale, bias) else _op_linear
    y = op(x_q, x_scale, w_packed, w_scale, in_features, bias)
    return y.reshape(*lead, w_packed.shape[0]) if len(lead) != 1 else y


def bitlinear_packed(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, in_features: int,
                     bias: Optional[torch.Tensor] = None, bits: int = 8) -> torch.Tensor:
    """Fused packed BitLinear: per-token absmax quantisation of ``x`` to ``bits`` (int8 storage,
    exactly :func:`bitnet.quant.activation_quant_int8`), then ``(x_q @ W^T) * w_scale / x_scale (+ bias)``.

    Args:
        x: float (..., K) (any float dtype; quantised in float32). w_packed: uint8 I2 (N, ceil(K/128)*32).
        w_scale: 0-dim float32 tensor. in_features: K. bias: optional float (N,). bits: 2..8.
    Returns:
        float32 (..., N).
    """
    lead = x.shape[:-1] if isinstance(x, torch.Tensor) else None
    if isinstance(x, torch.Tensor) and x.dim() > 2:
        x = _flat(x)
    _check_bitlinear_args(x, w_packed, w_scale, in_features, bias, bits)
    op = impl("bitnet::bitlinear_packed", x.device) if _plain_eager(x, w_packed, w_scale, bias) else _op_bitlinear
    y = op(x, w_packed, w_scale, in_features, bias, bits)
    return y.reshape(*lead, w_packed.shape[0]) if len(lead) != 1 else y


# ------------------------------------------------------------------------------------------------
# The dispatch table. The int8 op lives in its own module (it needs the names above).

from . import int8 as _int8  # noqa: E402

DISPATCH: dict[str, dict[str, object]] = {
    "bitnet::ternary_matmul_int": {"reference": _ref.matmul_int, "cpu": _cpu.matmul_int, "triton": _triton_matmul_int},
    "bitnet::ternary_linear": {"reference": _ref.linear, "cpu": _cpu_linear, "triton": _triton_linear},
    "bitnet::bitlinear_packed": {"reference": _ref.bitlinear, "cpu": _cpu_bitlinear, "triton": _triton_bitlinear},
    "bitnet::int8_linear": {"reference": _int8.reference_linear, "cpu": _int8.native_linear,
                            "triton": _int8.triton_linear},
}
"""``{op: {backend: impl}}`` for every declared op (``torch.ops.bitnet.*``) and every backend of
:func:`backend` ('reference', 'cpu', 'triton'); each impl takes the op's arguments."""

__all__ = [
    "BACKENDS", "DISPATCH", "backend", "bitlinear_packed", "get_num_threads", "impl", "native_info", "native_on",
    "set_backend", "set_num_threads", "ternary_input_grad", "ternary_linear", "ternary_matmul_int",
]
