"""PackedBitLinear: the inference form of BitLinear.

Holds the ternary (or binary) weight at 2 bits per weight in the I2 layout of
:mod:`bitnet.quant.packing` plus one float32 scale; no floating-point weight is kept. At run time the
input is normalised (if the layer has a norm), quantised to int8 per token and multiplied by the
packed weight in one call of :func:`bitnet.ops.bitlinear_packed` (native CPU / Triton / reference):

    y = (xq @ Wq^T) * w_scale / s  (+ bias)

which equals the training form's output (integer part exact, float rescale within rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..quant import check_bits, pack_i2, padded_in_features, unpack_i2
from .bitlinear import BitLinear, check_in_features
from .norm import RMSNorm


class PackedBitLinear(nn.Module):
    """Linear layer with packed 2-bit weights and int8 per-token activations (inference only).

    Buffers: ``w_packed`` uint8 (out_features, ceil(in_features/128)*32), ``w_scale`` float32 0-dim,
    ``bias`` float32 (out_features,) or None. Build it with :meth:`from_bitlinear` or :func:`bitnet.pack`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bits: int = 8,
                 norm: bool = False, norm_eps: float = 1e-6, weight_kind: str = "1.58", device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits = check_bits(bits)
        self.weight_kind = weight_kind
        kp4 = padded_in_features(in_features) // 4
        self.register_buffer("w_packed", torch.empty(out_features, kp4, dtype=torch.uint8, device=device))
        self.register_buffer("w_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.norm = RMSNorm(in_features, eps=norm_eps, device=device) if norm else None

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, layer: BitLinear) -> "PackedBitLinear":
        """Quantise ``layer``'s master weight (full strength) and pack it. Meta layers give empty buffers."""
        device = layer.weight.device
        packed = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, bits=layer.bits,
                     norm=layer.norm is not None, norm_eps=layer.norm.eps if layer.norm is not None else 1e-6,
                     weight_kind=layer.weight_kind, device=device)
        if layer.norm is not None:
            packed.norm.load_state_dict(layer.norm.state_dict(), assign=device.type == "meta")
        if device.type == "meta":
            return packed
        wq, scale = layer.quantized_weight()                       # (out, in) in {-1, 0, 1}, fp32 scalar
        packed.w_packed.copy_(pack_i2(wq.to(torch.int8)))
        packed.w_scale.copy_(scale)
        if layer.bias is not None:
            packed.bias.copy_(layer.bias.float())
        return packed

    @property
    def qweight(self) -> torch.Tensor:
        """The packed weight under the name ``peft`` looks for on quantised base layers (device, dtype)."""
        return self.w_packed

    def unpacked_weight(self) -> torch.Tensor:
        """The dequantised weight ``Wq * w_scale`` (out, in), float32 (for inspection and export)."""
        return unpack_i2(self.w_packed, self.in_features, torch.float32) * self.w_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_in_features(x, self.in_features, "PackedBitLinear")
        if self.norm is not None:
            x = self.norm(x)
        y = ops.bitlinear_packed(x, self.w_packed, self.w_scale, self.in_features, self.bias, self.bits)
        return y.to(x.dtype)                                               # no-op for float32 inputs

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_kind={self.weight_kind}, bits={self.bits}, norm={self.norm is not None}")
