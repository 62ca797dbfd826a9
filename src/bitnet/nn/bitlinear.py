"""BitLinear: the training form of a 1-bit / 1.58-bit linear layer (drop-in for ``nn.Linear``).

Forward (both papers): ``y = Quant_w(W) @ Quant_x(Norm(x))`` with fake quantisation and the
straight-through estimator, so the fp32 master weights receive the gradients. Numerically

    y = (xq @ Wq^T) * w_scale / s  (+ bias)

where ``Wq, w_scale = weight_quant(W)`` (ternary absmean or binary sign) and
``xq, s = activation_quant(x)`` (per-token absmax). ``bitnet.pack`` turns the layer into its
inference form (:class:`bitnet.nn.PackedBitLinear`) that stores ``Wq`` at 2 bits per weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import check_bits, fake_quant_activation, fake_quant_weight, normalize_weight_kind, weight_quant
from .norm import RMSNorm


def check_in_features(x: torch.Tensor, in_features: int, layer: str) -> None:
    """Raise a clear error when the last dimension of ``x`` is not ``in_features``."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{layer} expects input with last dimension in_features={in_features}, got shape {tuple(x.shape)}"
        )


class BitLinear(nn.Linear):
    """Linear layer with ternary (b1.58) or binary (b1) weights and k-bit per-token activations.

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (bias defaults to False, as in the papers).
        weight_kind: ``"1.58"`` ternary absmean (default) or ``"1"`` binary sign.
        bits: activation bits, 2..8 (default 8).
        norm: apply an RMSNorm to the input before quantising it (default True). Switch it off
            where the architecture already normalises the input (e.g. converted pretrained models).
        quant_strength: lambda in [0, 1] of ``x + lambda * (q(x) - x).detach()``; 1 is full
            quantisation, lower values warm up a converted full-precision model.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        weight_kind: str = "1.58",
        bits: int = 8,
        norm: bool = True,
        norm_eps: float = 1e-6,
        quant_strength: float = 1.0,
        device=None,
        dtype=None,
    ):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_kind = normalize_weight_kind(weight_kind)
        self.bits = check_bits(bits)
        self.norm = RMSNorm(in_features, eps=norm_eps, device=device, dtype=dtype) if norm else None
        self.quant_strength = float(quant_strength)

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Wq, scale): integer-valued weight (out, in) and its float32 scale."""
        return weight_quant(self.weight, self.weight_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_in_features(x, self.in_features, "BitLinear")
        if self.norm is not None:
            x = self.norm(x)                                                  # SubLN before Quant
        x = fake_quant_activation(x, self.bits, self.quant_strength)          # xq / s, STE
        w = fake_quant_weight(self.weight, self.weight_kind, self.quant_strength)  # Wq * gamma, STE
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, weight_kind={self.weight_kind}, bits={self.bits}, "
            f"norm={self.norm is not None}"
        )


def set_quant_strength(model: nn.Module, strength: float) -> nn.Module:
    """Set lambda (0 = full precision, 1 = fully quantised) on every BitLinear of ``model``."""
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.quant_strength = float(strength)
    return model
