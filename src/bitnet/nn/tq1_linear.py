"""PackedTQ1BitLinear: an experimental packed BitLinear whose weight is in the 1.6-bit TQ1 layout.

Same math and the same numbers as :class:`~bitnet.nn.packed.PackedBitLinear` (the integer product is
exact in both layouts, the quantiser and the float rescale are shared): only the weight bytes differ,
``w_tq1`` uint8 (out_features, ceil(in_features/320)*64), 0.8x the bytes of I2's ``w_packed``.
Opt-in, in memory only: build it with :func:`bitnet.convert.tq1.repack_tq1` from a packed model; save
the I2 model, not this one. The fused native block of :mod:`bitnet.models.fused_block` runs blocks of
these layers too (linear sets of format TQ1), with the I2 block's numbers bit for bit.
"""

from __future__ import annotations

import torch

from ..ops import tq1 as tq1_ops
from ..quant.tq1 import i2_to_tq1, tq1_row_bytes, unpack_tq1
from .bitlinear import check_in_features
from .packed import PackedBitLinear


class PackedTQ1BitLinear(PackedBitLinear):
    """Linear layer with 1.6-bit (base-3) ternary weights and int8 per-token activations (inference only).

    Buffers: ``w_tq1`` uint8 (out_features, ceil(in_features/320)*64), ``w_scale`` float32 0-dim,
    ``bias`` float32 (out_features,) or None; no ``w_packed``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bits: int = 8,
                 norm: bool = False, norm_eps: float = 1e-6, weight_kind: str = "1.58", device=None):
        super().__init__(in_features, out_features, bias=bias, bits=bits, norm=norm, norm_eps=norm_eps,
                         weight_kind=weight_kind, device=device)
        del self.w_packed                                            # the parent's I2 buffer: not kept
        self.register_buffer("w_tq1", torch.empty(out_features, tq1_row_bytes(in_features), dtype=torch.uint8,
                                                  device=device))

    @classmethod
    @torch.no_grad()
    def from_packed(cls, layer: PackedBitLinear) -> "PackedTQ1BitLinear":
        """The same layer with its I2 weight repacked as TQ1 (same weights, same outputs)."""
        if type(layer) is not PackedBitLinear:
            raise TypeError(f"layer must be a PackedBitLinear, got {type(layer).__name__}")
        device = layer.w_packed.device
        out = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, bits=layer.bits,
                  norm=layer.norm is not None, norm_eps=layer.norm.eps if layer.norm is not None else 1e-6,
                  weight_kind=layer.weight_kind, device=device)
        if device.type == "meta":
            return out
        out.w_tq1.copy_(i2_to_tq1(layer.w_packed, layer.in_features))
        out.w_scale.copy_(layer.w_scale)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
        if layer.norm is not None:
            out.norm.load_state_dict(layer.norm.state_dict())
        return out

    @property
    def qweight(self) -> torch.Tensor:
        return self.w_tq1

    def unpacked_weight(self) -> torch.Tensor:
        """The dequantised weight ``Wq * w_scale`` (out, in), float32."""
        return unpack_tq1(self.w_tq1, self.in_features, torch.float32) * self.w_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_in_features(x, self.in_features, "PackedTQ1BitLinear")
        if self.norm is not None:
            x = self.norm(x)
        y = tq1_ops.bitlinear(x, self.w_tq1, self.w_scale, self.in_features, self.bias, self.bits)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", format=tq1"
