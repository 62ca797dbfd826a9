"""Experimental TQ1 GEMV (1.6-bit weights, layout of :mod:`bitnet.quant.tq1`): ctypes bindings of the
functions of ``csrc/tq1_native.h``, in the library :mod:`bitnet.ops.cpu` loaded.

An experiment beside the I2 path: ``benchmarks/bench_tq1.py`` measures the GEMV against I2 at the
BitNet-b1.58-2B-4T shapes; :class:`bitnet.nn.tq1_linear.PackedTQ1BitLinear` (opt-in, via
:func:`bitnet.convert.tq1.repack_tq1`) runs a model's linears on it. :func:`available` is False (and :data:`LOAD_ERROR` says
why) when the native library is missing or was built without these functions.

    from bitnet.quant.tq1 import pack_tq1
    from bitnet.ops import tq1
    out = tq1.matmul_int(x_q, pack_tq1(w), in_features)      # int32 (M, N), exact
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from ..quant import EPS, activation_quant_int8, check_bits
from ..quant.tq1 import tq1_matmul_reference, tq1_row_bytes
from . import cpu
from .reference import rescale

MAX_IN_FEATURES = 32767
"""Largest K the native kernels accept (their int32 sums are exact up to it); BITNET_TQ1_MAX_K."""

LOAD_ERROR: Optional[str] = None


def _declare() -> Optional[ctypes.CDLL]:
    """The native library (its TQ1 functions are declared with the rest, in bitnet.ops.cpu.SIGNATURES)."""
    global LOAD_ERROR
    if cpu._lib is None:
        LOAD_ERROR = cpu.LOAD_ERROR
    return cpu._lib


_lib = _declare()


def available() -> bool:
    """True if the native TQ1 kernels are loaded."""
    return _lib is not None


def kernel_name(isa: Optional[str] = None) -> str:
    """The TQ1 kernel ``isa`` (None: the default ISA) runs: 'avx512vnni', 'avx2' or 'scalar'."""
    if _lib is None:
        raise RuntimeError(f"the native TQ1 kernels are not available: {LOAD_ERROR}")
    name = _lib.bitnet_tq1_kernel_name(cpu.isa_id(isa))
    return name.decode() if name is not None else ""


def matmul_int(x_q: torch.Tensor, packed: torch.Tensor, in_features: int, isa: Optional[str] = None) -> torch.Tensor:
    """int32 (M, N) = x_q (M, K) int8 @ W^T with W in the TQ1 layout (N, ceil(K/320)*64), exact.

    Equal, bit for bit, to :func:`bitnet.quant.tq1.tq1_matmul_reference`.
    """
    if _lib is None:
        raise RuntimeError(f"the native TQ1 kernels are not available: {LOAD_ERROR}")
    k = int(in_features)
    if not 0 <= k <= MAX_IN_FEATURES:
        raise ValueError(f"in_features must be in 0..{MAX_IN_FEATURES} for the TQ1 kernels, got {k}")
    if x_q.dtype != torch.int8 or x_q.dim() != 2 or x_q.shape[1] != k or x_q.device.type != "cpu":
        raise ValueError(f"x_q must be a CPU int8 tensor (M, {k}), got {x_q.dtype} {tuple(x_q.shape)} on {x_q.device}")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != tq1_row_bytes(k) \
            or packed.device.type != "cpu":
        raise ValueError(f"packed must be a CPU uint8 TQ1 tensor (N, {tq1_row_bytes(k)}) for in_features={k}, "
                         f"got {packed.dtype} {tuple(packed.shape)} on {packed.device}")
    x_q, ldx = cpu._rows(x_q)
    if not packed.is_contiguous():
        packed = packed.contiguous()
    m, n = x_q.shape[0], packed.shape[0]
    out = torch.empty((m, n), dtype=torch.int32)
    rc = _lib.bitnet_tq1_matmul_int(x_q.data_ptr(), m, k, ldx, packed.data_ptr(), n, packed.shape[1],
                                    out.data_ptr(), n, cpu.isa_id(isa))
    cpu._check_rc(rc, "tq1_matmul_int")
    return out


def _check_packed(packed: torch.Tensor, k: int) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != tq1_row_bytes(k):
        raise ValueError(f"packed must be a uint8 TQ1 tensor (N, {tq1_row_bytes(k)}) for in_features={k}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")


def bitlinear_reference(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, in_features: int,
                        bias: Optional[torch.Tensor] = None, bits: int = 8) -> torch.Tensor:
    """Pure-torch TQ1 BitLinear (any device): per-token absmax quantisation, exact integer product,
    ``acc * w_scale / s (+ bias)`` in float32, the order of every backend of ``bitnet.ops.bitlinear_packed``."""
    _check_packed(packed, in_features)
    x_q, s = activation_quant_int8(x, bits)                              # (M, K) int8, (M, 1)
    return rescale(tq1_matmul_reference(x_q, packed, in_features), s, w_scale, bias)


def bitlinear(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, in_features: int,
              bias: Optional[torch.Tensor] = None, bits: int = 8, isa: Optional[str] = None) -> torch.Tensor:
    """TQ1 BitLinear: float32 (..., N) from x (..., K) float, ``packed`` TQ1 (N, ceil(K/320)*64),
    ``w_scale`` 0-dim float32. Native (one call: quantise, GEMV, rescale) on CPU tensors when the
    kernels are loaded and the CPU backend is selected, else :func:`bitlinear_reference`. Inference
    only (no autograd, no torch.compile op)."""
    from . import backend

    k = int(in_features)
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.shape[-1] != k:
        raise ValueError(f"x must be a float tensor (..., {k}), got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    check_bits(bits)
    _check_packed(packed, k)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    n = packed.shape[0]
    if _lib is None or x.device.type != "cpu" or backend(x.device) != "cpu" or k > MAX_IN_FEATURES:
        return bitlinear_reference(x2, packed, w_scale, k, bias, bits).reshape(*lead, n)
    x2, ldx = cpu._rows(x2 if x2.dtype == torch.float32 else x2.float())
    if not packed.is_contiguous():
        packed = packed.contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=torch.float32)
    rc = _lib.bitnet_tq1_bitlinear(x2.data_ptr(), m, k, ldx, int(bits), EPS, packed.data_ptr(), n, packed.shape[1],
                                   float(w_scale), cpu._ptr(bias), out.data_ptr(), n, cpu.isa_id(None))
    cpu._check_rc(rc, "tq1_bitlinear")
    return out.reshape(*lead, n)


class TQ1LinearGroup(cpu.BitLinearGroup):
    """:class:`bitnet.ops.cpu.BitLinearGroup` over TQ1 weights (uint8 (N_j, ceil(K/320)*64)): the same
    call (RMSNorm, quantise once, every matrix into its column range, bit for bit the I2 group's numbers
    for the same weights) through ``bitnet_tq1_bitlinear_multi``, and the linear-set format code
    (BITNET_WEIGHTS_TQ1) that makes the native block (:class:`bitnet.ops.cpu.NativeBlock`) run it."""

    format = 1

    def __init__(self, weights, scales, biases, in_features: int, bits: int = 8, eps: float = EPS,
                 isa: Optional[str] = None):
        if _lib is None:
            raise RuntimeError(f"the native TQ1 kernels are not available: {LOAD_ERROR}")
        k = int(in_features)
        if not 0 <= k <= MAX_IN_FEATURES:
            raise ValueError(f"in_features must be in 0..{MAX_IN_FEATURES} for the TQ1 kernels, got {k}")
        for i, w in enumerate(weights):
            if w.dim() != 2 or w.shape[1] != tq1_row_bytes(k):
                raise ValueError(f"weights[{i}] must be TQ1 rows (N, {tq1_row_bytes(k)}) for in_features={k}, "
                                 f"got {tuple(w.shape)}")
        super().__init__(weights, scales, biases, k, bits, eps, isa)

    def __call__(self, x: torch.Tensor, norm_weight: Optional[torch.Tensor] = None,
                 norm_eps: float = 1e-6) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must be float32 (M, {self.in_features}), got {x.dtype} {tuple(x.shape)}")
        x, ldx = cpu._rows(x)
        if norm_weight is not None and (norm_weight.dtype != torch.float32 or not norm_weight.is_contiguous()):
            norm_weight = norm_weight.to(torch.float32).contiguous()
        m = x.shape[0]
        out = torch.empty((m, self.total), dtype=torch.float32)
        rc = _lib.bitnet_tq1_bitlinear_multi(x.data_ptr(), m, self.in_features, ldx, self.bits, self.eps,
                                             cpu._ptr(norm_weight), float(norm_eps), len(self.sizes), self._w,
                                             self._n, self.ldw, self._s, self._b, out.data_ptr(), self.total,
                                             self._isa)
        cpu._check_rc(rc, "tq1_bitlinear_multi")
        return out
