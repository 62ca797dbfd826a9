"""Triton backend: ternary (I2-packed) matmul kernels for GPUs, testable on CPU with ``TRITON_INTERPRET=1``.

Weights are read in the native I2 layout of :mod:`bitnet.quant.packing` (never changed here):
uint8 ``(N, Kp/4)``, ``Kp = ceil(K/128)*128``; 128-weight block ``b`` = 32 bytes, byte ``j`` holds the codes
``c = W + 1`` of ``k = 128b + j + 32q`` at bits ``2q+1:2q`` (q = 0..3). One load of a byte tile therefore
gives, after ``(p >> 2q) & 3``, four tiles of weights that line up with four *contiguous* runs of 32
activations each.

Kernels
-------
* GEMV (decode, small M): one program = ``BLOCK_N`` weight rows x one activation row x one K split.
  It streams the packed bytes once, unpacks by shift/mask, and accumulates ``sum_k x*c - sum_k x``
  (unsigned code x signed activation, BitNet b1.58 eq. ``y = xq @ Wq^T``). Split-K (int32 atomics)
  fills the GPU when ``N`` is small.
* GEMM (prefill): ``tl.dot(int8, int8) -> int32`` on tensor cores, the 4 shifted sub-tiles of each
  128-block (32*KB weights each) as four dots per step; signed weights ``c - 1``.
* Activation quantiser: per-row absmax int8, bit for bit equal to
  :func:`bitnet.quant.activation_quant_int8` (float32 math, IEEE division, round half to even).

Both matmul kernels end with an optional fused epilogue ``y = acc * w_scale / x_scale (+ bias)``.
The GEMV is used for ``M <= GEMV_MAX_M``, the GEMM above. On a GPU the block sizes are autotuned; under
the Triton interpreter one small fixed configuration is used so that CPU tests stay fast.

This module imports without Triton installed; then ``TRITON_AVAILABLE`` is False and every entry point
raises a clear error. Triton itself is imported lazily (first call), and Triton decides at its own import
whether it interprets: ``TRITON_INTERPRET=1`` must be set before anything imports ``triton``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from bitnet.quant.packing import I2_BLOCK, padded_in_features
from bitnet.quant.quantizers import EPS, check_bits

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
"""True when the ``triton`` package is installed (it is imported on the first kernel call, not here)."""

triton = tl = libdevice = None  # set by _load_triton(); the kernel bodies read them as module globals

GEMV_MAX_M = 4
"""Largest number of activation rows sent to the GEMV kernel by ``kernel="auto"``; larger M uses the GEMM."""

KERNELS = ("auto", "gemv", "gemm")
"""Accepted values of the ``kernel`` argument."""

__all__ = [
    "TRITON_AVAILABLE", "GEMV_MAX_M", "KERNELS", "interpret_mode",
    "triton_ternary_matmul_int", "triton_ternary_linear", "triton_quantize_activations",
]


# --------------------------------------------------------------------------------------------------
# Kernel bodies (plain functions, wrapped by triton.jit lazily in _kernels()).
# --------------------------------------------------------------------------------------------------

def _gemv_body(
    x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr,
    N, K, KBLOCKS, BLOCKS_PER_SPLIT,
    stride_xm, stride_wn, stride_om, stride_xs,
    BLOCK_N: tl.constexpr, KB: tl.constexpr, SPLIT_K: tl.constexpr,
    FLOAT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_N), M, SPLIT_K). Each step reads KB 128-blocks = KB*32 bytes per weight row.
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                      # (BLOCK_N,)
    n_mask = offs_n < N
    offs_b = tl.arange(0, KB * 32)                                        # byte index inside a step
    k_of_b = (offs_b // 32) * 128 + offs_b % 32                           # k of quarter 0 for that byte
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn             # (BLOCK_N, 1)
    x_row = x_ptr + m * stride_xm
    blk_lo = pid_k * BLOCKS_PER_SPLIT
    blk_hi = tl.minimum(blk_lo + BLOCKS_PER_SPLIT, KBLOCKS)
    acc = tl.zeros((BLOCK_N, KB * 32), dtype=tl.int32)                   # sum x*c, reduced at the end
    xsum = tl.zeros((KB * 32,), dtype=tl.int32)                          # sum x
    for blk in range(blk_lo, blk_hi, KB):
        byte = blk * 32 + offs_b                                          # (KB*32,)
        b_mask = byte < blk_hi * 32
        p = tl.load(w_rows + byte[None, :], mask=n_mask[:, None] & b_mask[None, :], other=0)  # uint8
        for q in tl.static_range(4):
            k = blk * 128 + k_of_b + 32 * q                              # 4 runs of 32 contiguous k per block
            xv = tl.load(x_row + k, mask=b_mask & (k < K), other=0).to(tl.int32)
            c = ((p >> (2 * q)) & 3).to(tl.int32)                         # codes {0,1,2}
            acc += c * xv[None, :]
            xsum += xv
    dot = tl.sum(acc, axis=1) - tl.sum(xsum, axis=0)                      # (BLOCK_N,) int32
    out_ptrs = out_ptr + m * stride_om + offs_n
    if FLOAT_OUT:
        ws = tl.load(ws_ptr)
        xs = tl.load(xs_ptr + m * stride_xs)
        y = tl.math.div_rn(dot.to(tl.float32) * ws, xs)                   # acc * w_scale / x_scale
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
        tl.store(out_ptrs, y, mask=n_mask)
    elif SPLIT_K == 1:
        tl.store(out_ptrs, dot, mask=n_mask)
    else:
        tl.atomic_add(out_ptrs, dot, mask=n_mask)                         # exact: integers


def _gemm_body(
    x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr,
    M, N, K, KBLOCKS, M_BUCKET,
    stride_xm, stride_wn, stride_om, stride_xs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr, GROUP_M: tl.constexpr,
    FLOAT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # 1-D grid over (M/BLOCK_M) x (N/BLOCK_N) tiles, grouped along M for L2 reuse of weight tiles.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_b = tl.arange(0, KB * 32)
    k_of_b = (offs_b // 32) * 128 + offs_b % 32
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm             # (BLOCK_M, 1)
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn             # (1, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for blk in range(0, KBLOCKS, KB):
        byte = blk * 32 + offs_b
        b_mask = byte < KBLOCKS * 32
        p = tl.load(w_cols + byte[:, None], mask=b_mask[:, None] & n_mask[None, :], other=0)  # (KB*32, BLOCK_N)
        for q in tl.static_range(4):
            k = blk * 128 + k_of_b + 32 * q
            xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0)  # int8
            w = ((p >> (2 * q)) & 3).to(tl.int8) - 1                      # ternary {-1,0,1}, int8
            acc = tl.dot(xt, w, acc)                                      # int8 x int8 -> int32
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if FLOAT_OUT:
        ws = tl.load(ws_ptr)
        xs = tl.load(xs_ptr + offs_m.to(tl.int64) * stride_xs, mask=m_mask, other=1.0)
        y = tl.math.div_rn(acc.to(tl.float32) * ws, xs[:, None])
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y, mask=o_mask)
    else:
        tl.store(out_ptrs, acc, mask=o_mask)


def _int8_body(
    x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # Int8 weights (the int8 LM head): acc (BLOCK_M, BLOCK_N) = x_q (M, K) @ w_q (N, K)^T in int32 (exact),
    # then y = acc * w_scale[n] / x_scale[m] (+ bias[n]). 2-D grid over (M/BLOCK_M, N/BLOCK_N).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm              # (BLOCK_M, 1)
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn              # (1, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)   # int8 (BM, BK)
        w = tl.load(w_cols + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)     # int8 (BK, BN)
        acc = tl.dot(xt, w, acc)                                           # int8 x int8 -> int32
    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=1.0)
    y = tl.math.div_rn(acc.to(tl.float32) * ws[None, :], xs[:, None])    # acc * w_scale / x_scale
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], y,
             mask=m_mask[:, None] & n_mask[None, :])


def _act_quant_body(
    x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, eps,
    QP: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    # One program per row: s = QP / max(max|x|, eps); xq = clamp(rint(x * s), -QP-1, QP), all float32.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    nans = tl.zeros((BLOCK_K,), dtype=tl.int32)
    infs = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))                                # skips NaN: counted apart
        nans += (x != x).to(tl.int32)
        infs += (tl.abs(x) == float("inf")).to(tl.int32)
    a = tl.maximum(tl.max(amax, axis=0), eps)
    s = tl.math.div_rn(1.0, a) * QP                                       # torch: qp / a == a.reciprocal() * qp
    # A non-finite row as torch computes it: s = qp / max|x| is NaN (a NaN in the row) or 0 (an inf), and
    # every code is 0 (torch turns NaN into int8 0), so every output of the row is NaN.
    has_nan = tl.sum(nans, axis=0) > 0
    nonfinite = has_nan | (tl.sum(infs, axis=0) > 0)
    s = tl.where(nonfinite, tl.where(has_nan, float("nan"), 0.0), s)
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK_K):
        kmask = k0 + offs < K
        v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=kmask, other=0).to(tl.float32) * s
        if INTERPRET:
            # round half to even without libdevice (not available in the interpreter); exact for |v| < 2**23
            f = tl.floor(v)
            d = v - f
            odd = f - 2.0 * tl.floor(f * 0.5)                                # 1.0 if f is odd else 0.0
            r = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))
        else:
            r = libdevice.rint(v)                                         # cvt.rni: half to even
        r = tl.minimum(tl.maximum(r, -QP - 1.0), QP * 1.0)
        r = tl.where(nonfinite, 0.0, r)
        tl.store(q_ptr + row * stride_qm + k0 + offs, r.to(tl.int8), mask=kmask)


# --------------------------------------------------------------------------------------------------
# Lazy compilation, configs.
# --------------------------------------------------------------------------------------------------

_KERNELS: dict = {}


def _require_triton() -> None:
    """Import triton on first use (module globals ``triton``, ``tl``, ``libdevice``)."""
    global triton, tl, libdevice
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton backend needs the 'triton' package: pip install triton")
    if triton is None:
        import triton as _triton
        import triton.language as _tl
        from triton.language.extra import libdevice as _libdevice

        triton, tl, libdevice = _triton, _tl, _libdevice


def _env_interpret() -> bool:
    knobs = getattr(triton, "knobs", None)                                # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    _require_triton()
    # triton's own @jit helpers (tl.zeros, tl.sum, ...) were built in the mode of triton's import
    return type(tl.zeros).__name__ == "InterpretedFunction"


def _gemv_configs():
    cfgs = []
    for block_n in (8, 16, 32):
        for kb in (2, 4):
            for warps in (2, 4):
                cfgs.append(triton.Config({"BLOCK_N": block_n, "KB": kb}, num_warps=warps, num_stages=3))
    cfgs.append(triton.Config({"BLOCK_N": 64, "KB": 2}, num_warps=4, num_stages=3))
    cfgs.append(triton.Config({"BLOCK_N": 4, "KB": 8}, num_warps=1, num_stages=3))
    return cfgs


def _gemm_configs():
    shapes = [  # BLOCK_M, BLOCK_N, KB, warps, stages
        (16, 64, 1, 4, 4), (16, 128, 1, 4, 4), (16, 128, 2, 4, 3), (32, 64, 1, 4, 4), (32, 128, 1, 4, 4),
        (64, 64, 1, 4, 4), (64, 128, 1, 4, 3), (64, 128, 2, 8, 3), (64, 256, 1, 8, 3),
        (128, 64, 1, 4, 4), (128, 128, 1, 8, 3), (128, 256, 1, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "KB": kb, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, kb, w, s in shapes
    ]


def _prune_gemm(configs, named_args, **kwargs):
    # Tiles much taller than M only waste tensor-core work; keep BLOCK_M <= max(16, next_pow2(M)).
    cap = max(16, named_args["M_BUCKET"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or configs[:1]


# Fixed configurations under the interpreter (small tiles: fast on CPU, still exercise every code path).
_INTERP_GEMV = {"BLOCK_N": 16, "KB": 2}
_INTERP_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "KB": 1, "GROUP_M": 2}
_ACT_BLOCK_K = 1024


def _kernels():
    """The jitted kernels for the current mode (compiled / interpreted), built on first use."""
    _require_triton()
    mode = interpret_mode()
    if mode != _env_interpret():
        raise RuntimeError(
            f"TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r} now, but triton was imported "
            f"{'with' if mode else 'without'} it; set it before anything imports triton"
        )
    if mode not in _KERNELS:
        ns = {
            "gemv": triton.jit(_gemv_body),
            "gemm": triton.jit(_gemm_body),
            "act_quant": triton.jit(_act_quant_body),
            "int8": triton.jit(_int8_body),
        }
        if not mode:
            ns["gemv_tuned"] = triton.autotune(
                configs=_gemv_configs(), key=["N", "K", "SPLIT_K", "FLOAT_OUT"], reset_to_zero=["out_ptr"],
            )(ns["gemv"])
            ns["gemm_tuned"] = triton.autotune(
                configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "FLOAT_OUT"],
                prune_configs_by={"early_config_prune": _prune_gemm},
            )(ns["gemm"])
        _KERNELS[mode] = ns
    return _KERNELS[mode]


# --------------------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------------------

def _check_device(*tensors: torch.Tensor) -> torch.device:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device; got {dev} and {t.device}")
    if dev.type == "cpu" and not interpret_mode():
        raise RuntimeError(
            "Triton kernels need CUDA tensors; to run them on CPU set TRITON_INTERPRET=1 "
            "before anything imports triton (slow, for tests)"
        )
    return dev


def _check_matmul_args(x_q: torch.Tensor, w_packed: torch.Tensor, in_features: int) -> tuple[int, int, int]:
    if x_q.dtype != torch.int8 or x_q.dim() != 2:
        raise ValueError(f"x_q must be a 2-D int8 tensor (M, K), got {x_q.dtype} of shape {tuple(x_q.shape)}")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise ValueError(
            f"w_packed must be a 2-D uint8 I2 tensor (N, Kp/4), got {w_packed.dtype} of shape {tuple(w_packed.shape)}"
        )
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    m, k = x_q.shape
    if k != in_features:
        raise ValueError(f"x_q has {k} features but in_features={in_features}")
    n, kp4 = w_packed.shape
    if kp4 * 4 != padded_in_features(in_features):
        raise ValueError(
            f"w_packed has {kp4} bytes per row, which does not match in_features={in_features} "
            f"(expected {padded_in_features(in_features) // 4})"
        )
    return m, n, k


def _choose_kernel(kernel: str, m: int, split_k: Optional[int] = None) -> str:
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be None or a positive int, got {split_k!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "gemv" if m <= GEMV_MAX_M else "gemm"
    return kernel


def _auto_split_k(m: int, n: int, kblocks: int, device: torch.device) -> int:
    """Split K until the GEMV grid has ~2 programs per SM, keeping >= 4 blocks (512 k) per split."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    programs = m * triton.cdiv(n, 16)
    split = 1
    while programs * split < target and triton.cdiv(kblocks, split * 2) >= 4:
        split *= 2
    return split


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _launch(x_q, w_packed, k, out, xs, ws, bias, float_out: bool, kernel: str, split_k: Optional[int]):
    """Run one matmul kernel into ``out`` (int32, or float32 when float_out). Returns out."""
    kern = _kernels()
    interp = interpret_mode()
    m, n = out.shape
    kblocks = w_packed.shape[1] // 32
    dummy = out
    xs_arg = xs if xs is not None else dummy
    ws_arg = ws if ws is not None else dummy
    b_arg = bias if bias is not None else dummy
    stride_xs = xs.stride(0) if xs is not None else 0
    if kernel == "gemv":
        split = split_k or _auto_split_k(m, n, kblocks, x_q.device)
        split = max(1, min(int(split), kblocks))
        bps = triton.cdiv(kblocks, split)
        split = triton.cdiv(kblocks, bps)                                  # no empty splits
        args = (x_q, w_packed, out, xs_arg, ws_arg, b_arg, n, k, kblocks, bps,
                x_q.stride(0), w_packed.stride(0), out.stride(0), stride_xs)
        flags = dict(SPLIT_K=split, FLOAT_OUT=float_out, HAS_BIAS=bias is not None)
        if interp:
            grid = (triton.cdiv(n, _INTERP_GEMV["BLOCK_N"]), m, split)
            kern["gemv"][grid](*args, **flags, **_INTERP_GEMV)
        else:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m, split)  # noqa: E731
            kern["gemv_tuned"][grid](*args, **flags)
    else:
        args = (x_q, w_packed, out, xs_arg, ws_arg, b_arg, m, n, k, kblocks, min(_next_pow2(m), 4096),
                x_q.stride(0), w_packed.stride(0), out.stride(0), stride_xs)
        flags = dict(FLOAT_OUT=float_out, HAS_BIAS=bias is not None)
        if interp:
            cfg = _INTERP_GEMM
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
            kern["gemm"][grid](*args, **flags, **cfg)
        else:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            kern["gemm_tuned"][grid](*args, **flags)
    return out


def triton_ternary_matmul_int(
    x_q: torch.Tensor, w_packed: torch.Tensor, in_features: int, *, kernel: str = "auto",
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """Exact integer product ``x_q @ W^T`` with W read from the I2 layout.

    Args:
        x_q: int8 (M, K) activations, K == in_features.
        w_packed: uint8 (N, Kp/4) I2-packed ternary weight (:func:`bitnet.quant.pack_i2`).
        in_features: K (the unpadded number of weights per row).
        kernel: "auto" (GEMV for M <= GEMV_MAX_M, else GEMM), "gemv" or "gemm".
        split_k: GEMV only: number of K splits (None: chosen from the GPU size; 1 under the interpreter).
    Returns:
        int32 (M, N), bit for bit equal to :func:`bitnet.quant.ternary_matmul_reference`.
    """
    _require_triton()
    m, n, k = _check_matmul_args(x_q, w_packed, in_features)
    _check_device(x_q, w_packed)
    kernel = _choose_kernel(kernel, m, split_k)
    if m == 0 or n == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=x_q.device)
    x_q = x_q.contiguous()
    w_packed = w_packed.contiguous()
    # the GEMV may split K and meet in int32 atomics: start from zeros (M is small there)
    out = (torch.zeros if kernel == "gemv" else torch.empty)(m, n, dtype=torch.int32, device=x_q.device)
    return _launch(x_q, w_packed, k, out, None, None, None, False, kernel, split_k)


def triton_ternary_linear(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, in_features: int,
    bias: Optional[torch.Tensor] = None, *, kernel: str = "auto", split_k: Optional[int] = None,
) -> torch.Tensor:
    """BitLinear output ``y = (x_q @ W^T) * w_scale / x_scale (+ bias)`` with a fused epilogue.

    Args:
        x_q: int8 (M, K) quantised activations.
        x_scale: float32 (M, 1) activation scales ``s`` (``x ~= x_q / s``), as from activation_quant_int8.
        w_packed: uint8 (N, Kp/4) I2-packed ternary weight.
        w_scale: float32 0-dim (or 1-element) weight scale ``gamma``.
        in_features: K.
        bias: optional (N,) tensor, any float dtype (added in float32).
        kernel, split_k: see :func:`triton_ternary_matmul_int`.
    Returns:
        float32 (M, N). The integer part is exact; the epilogue is float32 ``(acc * w_scale) / x_scale``.
    """
    _require_triton()
    m, n, k = _check_matmul_args(x_q, w_packed, in_features)
    if x_scale.dtype != torch.float32 or x_scale.numel() != m or (x_scale.dim() == 2 and x_scale.shape[1] != 1) \
            or x_scale.dim() not in (1, 2):
        raise ValueError(f"x_scale must be a float32 (M, 1) tensor with M={m}, got {x_scale.dtype} {tuple(x_scale.shape)}")
    if w_scale.dtype != torch.float32 or w_scale.numel() != 1:
        raise ValueError(f"w_scale must be a float32 0-dim tensor, got {w_scale.dtype} of shape {tuple(w_scale.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a float (N,) tensor with N={n}, got {bias.dtype} of shape {tuple(bias.shape)}")
    tensors = [x_q, x_scale, w_packed, w_scale] + ([bias] if bias is not None else [])
    _check_device(*tensors)
    kernel = _choose_kernel(kernel, m, split_k)
    if m == 0 or n == 0:
        return torch.zeros(m, n, dtype=torch.float32, device=x_q.device)
    x_q = x_q.contiguous()
    w_packed = w_packed.contiguous()
    xs = x_scale.reshape(m).contiguous()
    ws = w_scale.reshape(()).contiguous()
    bias = bias.contiguous() if bias is not None else None
    if kernel == "gemv":
        kblocks = w_packed.shape[1] // 32
        split = split_k or _auto_split_k(m, n, kblocks, x_q.device)
        if split > 1:
            # split-K partial sums meet in int32 (exact), then the same float32 epilogue as the kernel's.
            acc = torch.zeros(m, n, dtype=torch.int32, device=x_q.device)
            _launch(x_q, w_packed, k, acc, None, None, None, False, "gemv", split)
            y = acc.to(torch.float32) * ws / xs.view(m, 1)
            return y + bias.to(torch.float32) if bias is not None else y
        split_k = 1
    out = torch.empty(m, n, dtype=torch.float32, device=x_q.device)
    return _launch(x_q, w_packed, k, out, xs, ws, bias, True, kernel, split_k)


def triton_int8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Int8-weight linear (the int8 LM head): ``y = (x_q @ w_q^T) * w_scale[n] / x_scale[m] (+ bias)``.

    Args: x_q int8 (M, K); x_scale float32 (M,) or (M, 1); w_q int8 (N, K); w_scale float32 (N,);
    bias float (N,) or None. Returns float32 (M, N); the integer product is exact (int8 ``tl.dot``).
    """
    _require_triton()
    if x_q.dtype != torch.int8 or x_q.dim() != 2 or w_q.dtype != torch.int8 or w_q.dim() != 2 \
            or w_q.shape[1] != x_q.shape[1]:
        raise ValueError(f"x_q (M, K) and w_q (N, K) must be int8 with equal K, got {x_q.dtype} "
                         f"{tuple(x_q.shape)} and {w_q.dtype} {tuple(w_q.shape)}")
    m, k = x_q.shape
    n = w_q.shape[0]
    if x_scale.dtype != torch.float32 or x_scale.numel() != m:
        raise ValueError(f"x_scale must be float32 with M={m} values, got {x_scale.dtype} {tuple(x_scale.shape)}")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (n,):
        raise ValueError(f"w_scale must be a float32 ({n},) tensor, got {w_scale.dtype} {tuple(w_scale.shape)}")
    tensors = [x_q, x_scale, w_q, w_scale] + ([bias] if bias is not None else [])
    _check_device(*tensors)
    out = torch.empty(m, n, dtype=torch.float32, device=x_q.device)
    if m == 0 or n == 0:
        return out
    x_q, w_q = x_q.contiguous(), w_q.contiguous()
    xs, ws = x_scale.reshape(m).contiguous(), w_scale.contiguous()
    b = bias.contiguous() if bias is not None else None
    bm, bn, bk = (16, 32, 32) if interpret_mode() else (16, 64, 128)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _kernels()["int8"][grid](x_q, w_q, out, xs, ws, b if b is not None else ws, m, n, k, x_q.stride(0),
                             w_q.stride(0), out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                             HAS_BIAS=b is not None)
    return out


def triton_quantize_activations(x: torch.Tensor, bits: int = 8, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax quantiser, bit for bit equal to :func:`bitnet.quant.activation_quant_int8`.

    Args:
        x: (..., K) float tensor (fp32 / fp16 / bf16); the math is done in float32.
        bits: 2..8.
    Returns:
        (x_q, s): int8 (..., K) in [-Qp-1, Qp] and float32 (..., 1) scale ``Qp / max(max|x|, eps)``.
    """
    _require_triton()
    qp = 2 ** (check_bits(bits) - 1) - 1
    if not x.dtype.is_floating_point or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor with at least 1 dim, got {x.dtype} of shape {tuple(x.shape)}")
    _check_device(x)
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m > 0 and k > 0:
        block_k = min(_ACT_BLOCK_K, _next_pow2(k))
        _kernels()["act_quant"][(m,)](
            x2, xq, s, k, x2.stride(0), xq.stride(0), float(eps),
            QP=qp, BLOCK_K=block_k, INTERPRET=interpret_mode(),
        )
    elif m > 0:
        s.fill_(qp / eps)
    return xq.reshape(*lead, k), s.reshape(*lead, 1)
