"""Storage formats of ternary weights. This module is the one place that defines them.

I2 (native, what the kernels read), 2 bits per weight
-----------------------------------------------------
A ternary matrix ``W`` of shape (N, K) with values in {-1, 0, +1} is stored as codes
``c = W + 1`` in {0, 1, 2}. Each row is padded along K with code 1 (value 0) up to
``Kp = ceil(K / 128) * 128`` and cut into blocks of 128 consecutive weights. A block becomes
32 bytes; byte ``j`` (0..31) of block ``b`` holds four weights 32 apart::

    bits 1:0 -> k = 128*b + j
    bits 3:2 -> k = 128*b + 32 + j
    bits 5:4 -> k = 128*b + 64 + j
    bits 7:6 -> k = 128*b + 96 + j

so one 32-byte load, shifted by 0/2/4/6 and masked with 3, yields four vectors of 32 *contiguous*
weights that line up with contiguous activations (AVX2 / Triton friendly). Packed tensor: uint8,
shape (N, Kp // 4), row-major. The integer product with int8 activations ``xq`` is
``sum_k xq[k] * c[k] - sum_k xq[k]`` (unsigned x signed, the form of VNNI / maddubs instructions).

Compact (base 3), 1.6 bits per weight, for files
------------------------------------------------
The codes of the flattened tensor, padded with code 1 to a multiple of 5, are grouped by five and
stored as one byte ``c0 + 3*c1 + 9*c2 + 27*c3 + 81*c4`` (<= 242).

(An experimental in-memory 1.6-bit layout for a GEMV, TQ1, is defined in :mod:`bitnet.quant.tq1`.)
"""

from __future__ import annotations

import math

import torch

I2_BLOCK = 128
"""Number of weights along K in one I2 block (32 bytes)."""


def padded_in_features(k: int) -> int:
    """K rounded up to the I2 block size."""
    return math.ceil(k / I2_BLOCK) * I2_BLOCK


def _check_ternary(w: torch.Tensor, name: str) -> None:
    if w.dtype.is_floating_point or w.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        bad = (w != -1) & (w != 0) & (w != 1)
        if bool(bad.any()):
            raise ValueError(f"{name} must hold only -1, 0 or +1; found {w[bad].flatten()[0].item()!r}")
    else:
        raise TypeError(f"{name} must be a float or signed integer tensor, got dtype {w.dtype}")


def pack_i2(w: torch.Tensor) -> torch.Tensor:
    """Pack a ternary matrix (N, K) into the I2 layout: uint8 (N, ceil(K/128)*32)."""
    if w.dim() != 2:
        raise ValueError(f"pack_i2 expects a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    _check_ternary(w, "w")
    n, k = w.shape
    kp = padded_in_features(k)
    codes = torch.ones(n, kp, dtype=torch.uint8, device=w.device)      # code 1 == weight 0 (padding)
    codes[:, :k] = (w + 1).to(torch.uint8)
    blocks = codes.view(n, kp // I2_BLOCK, 4, 32)                       # (N, blocks, quarter, j)
    packed = blocks[:, :, 0] | (blocks[:, :, 1] << 2) | (blocks[:, :, 2] << 4) | (blocks[:, :, 3] << 6)
    return packed.reshape(n, kp // 4).contiguous()                     # (N, Kp/4)


def unpack_i2_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_i2` up to the codes: uint8 (N, in_features) in {0, 1, 2}."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    n, kp4 = packed.shape
    if kp4 * 4 != padded_in_features(in_features):
        raise ValueError(
            f"packed has {kp4} bytes per row, which does not match in_features={in_features} "
            f"(expected {padded_in_features(in_features) // 4})"
        )
    blocks = packed.view(n, kp4 // 32, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(1, 1, 4, 1)
    codes = (blocks >> shifts) & 3                                      # (N, blocks, 4, 32)
    return codes.reshape(n, kp4 * 4)[:, :in_features]


def unpack_i2(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_i2`: ternary values (N, in_features) as ``dtype``."""
    return unpack_i2_codes(packed, in_features).to(dtype) - 1


def pack_base3(w: torch.Tensor) -> torch.Tensor:
    """Pack a ternary tensor of any shape into base-3 bytes (5 weights per byte), uint8 (ceil(numel/5),)."""
    _check_ternary(w, "w")
    flat = (w.reshape(-1) + 1).to(torch.uint8)
    pad = (-flat.numel()) % 5
    if pad:
        flat = torch.cat([flat, torch.ones(pad, dtype=torch.uint8, device=w.device)])
    groups = flat.view(-1, 5).to(torch.int32)
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=w.device)
    return (groups * powers).sum(dim=1).to(torch.uint8)


def unpack_base3(packed: torch.Tensor, shape, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_base3`: ternary values of ``shape`` as ``dtype``."""
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(numel / 5):
        raise ValueError(
            f"packed must be a 1-D uint8 tensor of {math.ceil(numel / 5)} bytes for shape {shape}, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if bool((packed > 242).any()):
        raise ValueError("packed holds a byte above 242, which is not a valid base-3 group of five")
    v = packed.to(torch.int32).unsqueeze(1)
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=packed.device)
    codes = (v // powers) % 3                                           # (bytes, 5)
    return (codes.reshape(-1)[:numel].to(dtype) - 1).reshape(shape)


def ternary_matmul_reference(x_q: torch.Tensor, packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Ground truth of the integer product: int32 (M, N) = x_q (M, K) int8 @ W^T, W unpacked from I2.

    Computed in float64, which is exact here (|acc| <= 128 * K << 2**53).
    """
    w = unpack_i2(packed, in_features, torch.float64)                   # (N, K)
    return (x_q.to(torch.float64) @ w.T).round().to(torch.int32)         # (M, N)
