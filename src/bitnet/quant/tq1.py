"""TQ1: an experimental in-memory layout of ternary weights at 1.6 bits per weight (base 3).

Not the GGUF ``TQ1_0`` block layout (that one is a file format with 256-weight blocks and fp16
scales); this is the layout the experimental native GEMV of :mod:`bitnet.ops.tq1` reads, the
in-memory sibling of the I2 layout of :mod:`bitnet.quant.packing` (2 bits per weight).

Layout
------
A ternary matrix ``W`` (N, K), codes ``c = W + 1`` in {0, 1, 2}. Each row is padded along K with
code 1 (weight 0) up to ``Kp = ceil(K / 320) * 320`` and cut into blocks of 320 weights; a block is
64 bytes, and byte ``j`` (0..63) of block ``b`` holds the five weights 64 apart::

    digit i (i = 0..4)  ->  k = 320*b + 64*i + j

so one 64-byte load holds five vectors of 64 *contiguous* weights that line up with contiguous
activations (two 32-byte halves for 256-bit SIMD). The five codes become one byte as a base-3
fixed-point fraction (digit 0 most significant)::

    v = sum_i c_i * 3**(4 - i)            (0..242)
    q = ceil(v * 256 / 243)               (0..255)

and are read back without any division, by multiplying by 3 modulo 256::

    t_0 = q,   t_{i+1} = 3 * t_i mod 256,   c_i = floor(3 * t_i / 256)          (1)

Packed tensor: uint8 (N, Kp // 5), row-major. Bits per weight: 8/5 = 1.6 (plus the row padding).
Every byte (0..255) decodes to five codes in {0, 1, 2}; the 243 bytes :func:`pack_tq1` writes
round-trip exactly.

The integer product, as in I2: ``sum_k xq[k] * c[k] - sum_k xq[k]``. Since (1) gives
``256 * c_i = 3 * t_i - t_{i+1}``, a kernel can use the bytes ``t_i`` themselves as the unsigned
operand of an unsigned x signed dot product (VNNI) and never extract a digit::

    sum_k x_i[k] c_i[k] = (3 * sum_k x_i[k] t_i[k] - sum_k x_i[k] t_{i+1}[k]) / 256   (exact)
"""

from __future__ import annotations

import math

import torch

from .packing import _check_ternary

TQ1_BLOCK = 320
"""Number of weights along K in one TQ1 block (64 bytes, 5 weights per byte)."""

TQ1_BLOCK_BYTES = TQ1_BLOCK // 5


def tq1_padded_in_features(k: int) -> int:
    """K rounded up to the TQ1 block size (320)."""
    return math.ceil(k / TQ1_BLOCK) * TQ1_BLOCK


def tq1_row_bytes(k: int) -> int:
    """Bytes per packed TQ1 row of ``k`` weights."""
    return tq1_padded_in_features(k) // 5


def pack_tq1(w: torch.Tensor) -> torch.Tensor:
    """Pack a ternary matrix (N, K) into the TQ1 layout: uint8 (N, ceil(K/320)*64)."""
    if w.dim() != 2:
        raise ValueError(f"pack_tq1 expects a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    _check_ternary(w, "w")
    n, k = w.shape
    kp = tq1_padded_in_features(k)
    codes = torch.ones(n, kp, dtype=torch.int32, device=w.device)        # code 1 == weight 0 (padding)
    codes[:, :k] = (w + 1).to(torch.int32)
    digits = codes.view(n, kp // TQ1_BLOCK, 5, TQ1_BLOCK_BYTES)          # (N, blocks, digit i, byte j)
    powers = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32, device=w.device).view(1, 1, 5, 1)
    v = (digits * powers).sum(dim=2)                                    # (N, blocks, 64) in 0..242
    q = (v * 256 + 242) // 243                                          # ceil(v * 256 / 243)
    return q.to(torch.uint8).reshape(n, kp // 5).contiguous()           # (N, Kp/5)


def unpack_tq1_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Codes (N, in_features) uint8 in {0, 1, 2} of a TQ1 matrix, read with (1) as the kernels do."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if in_features < 0:
        raise ValueError(f"in_features must be >= 0, got {in_features}")
    n, row = packed.shape
    if row != tq1_row_bytes(in_features):
        raise ValueError(
            f"packed has {row} bytes per row, which does not match in_features={in_features} "
            f"(expected {tq1_row_bytes(in_features)})"
        )
    t = packed.to(torch.int32).view(n, row // TQ1_BLOCK_BYTES, 1, TQ1_BLOCK_BYTES)
    digits = []
    for _ in range(5):                                                  # (1): c_i = 3 t_i >> 8
        t3 = 3 * t
        digits.append(t3 >> 8)
        t = t3 & 255                                                    # t_{i+1} = 3 t_i mod 256
    codes = torch.cat(digits, dim=2)                                    # (N, blocks, 5, 64)
    return codes.reshape(n, row * 5)[:, :in_features].to(torch.uint8)


def unpack_tq1(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_tq1`: ternary values (N, in_features) as ``dtype``."""
    return unpack_tq1_codes(packed, in_features).to(dtype) - 1


def tq1_matmul_reference(x_q: torch.Tensor, packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Ground truth of the TQ1 integer product: int32 (M, N) = x_q (M, K) int8 @ W^T.

    Computed in float64, exact here (|acc| <= 128 * K << 2**53).
    """
    if x_q.dim() != 2 or x_q.shape[1] != in_features:
        raise ValueError(f"x_q must be (M, {in_features}), got shape {tuple(x_q.shape)}")
    w = unpack_tq1(packed, in_features, torch.float64)                  # (N, K)
    return (x_q.to(torch.float64) @ w.T).round().to(torch.int32)         # (M, N)


def i2_to_tq1(packed_i2: torch.Tensor, in_features: int) -> torch.Tensor:
    """Repack an I2 matrix (N, Kp/4) as TQ1 (N, ceil(K/320)*64), same weights."""
    from .packing import unpack_i2

    return pack_tq1(unpack_i2(packed_i2, in_features))
