"""The Hugging Face BitNet weight layout (what microsoft/bitnet-b1.58-2B-4T ships) <-> ternary values / I2.

HF layout: a ternary weight (out, in) is stored as uint8 (out/4, in), packed along dim 0 in four blocks
of rows: byte row r holds rows r, r+R, r+2R, r+3R (R = out/4) at bits 1:0, 3:2, 5:4, 7:6, as codes
``value + 1`` in {0, 1, 2}. Each linear has a ``weight_scale`` (shape [1]) that multiplies the output:
``y = F.linear(act_quant(x), W) * weight_scale`` (``linear_class="autobitlinear"``, offline mode).

Our kernels read the I2 layout of :mod:`bitnet.quant.packing` instead (packed along ``in``);
:func:`hf_to_i2` converts one into the other through the ternary values.
"""

from __future__ import annotations

import torch

from ..quant import pack_i2

HF_VALUES_PER_BYTE = 4


def pack_hf_bitnet(w: torch.Tensor) -> torch.Tensor:
    """Ternary (out, in) in {-1, 0, 1} (any float/int dtype) -> uint8 (out/4, in) in the HF BitNet layout."""
    if w.dim() != 2:
        raise ValueError(f"pack_hf_bitnet expects a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    out, k = w.shape
    if out % HF_VALUES_PER_BYTE:
        raise ValueError(f"out_features={out} must be a multiple of 4 for the HF BitNet layout")
    if bool(((w != -1) & (w != 0) & (w != 1)).any()):
        raise ValueError("w must hold only -1, 0 or +1 (quantise it first)")
    codes = (w + 1).to(torch.uint8).view(HF_VALUES_PER_BYTE, out // HF_VALUES_PER_BYTE, k)   # (4, R, in)
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


def unpack_hf_bitnet(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """uint8 (out/4, in) HF BitNet layout -> ternary values (out, in) as ``dtype``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor (out/4, in), got {packed.dtype} of shape {tuple(packed.shape)}")
    codes = torch.cat([(packed >> (2 * i)) & 3 for i in range(HF_VALUES_PER_BYTE)], dim=0)     # (out, in)
    if bool((codes == 3).any()):
        raise ValueError("packed holds the 2-bit code 3, which is not a ternary value in the HF BitNet layout")
    return codes.to(dtype) - 1


def hf_to_i2(packed: torch.Tensor) -> torch.Tensor:
    """HF BitNet layout uint8 (out/4, in) -> our I2 layout uint8 (out, ceil(in/128)*32)."""
    return pack_i2(unpack_hf_bitnet(packed, torch.int8))


__all__ = ["HF_VALUES_PER_BYTE", "hf_to_i2", "pack_hf_bitnet", "unpack_hf_bitnet"]
