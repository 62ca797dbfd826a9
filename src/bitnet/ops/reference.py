"""Reference backend: pure PyTorch, any device. The ground truth every other backend is tested against."""

from __future__ import annotations

from typing import Optional

import torch

from ..quant import activation_quant_int8, ternary_matmul_reference


def matmul_int(x_q: torch.Tensor, w_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 (M, N) = x_q (M, K) @ W^T, exact (see bitnet.quant.ternary_matmul_reference)."""
    return ternary_matmul_reference(x_q, w_packed, in_features)


def rescale(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 (M, N) = acc * w_scale / x_scale (+ bias): y = (xq @ Wq^T) * gamma / s (2402.17764)."""
    y = acc.to(torch.float32) * w_scale.to(torch.float32) / x_scale.reshape(-1, 1).to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


def linear(x_q, x_scale, w_packed, w_scale, in_features, bias):
    return rescale(matmul_int(x_q, w_packed, in_features), x_scale, w_scale, bias)


def bitlinear(x, w_packed, w_scale, in_features, bias, bits=8):
    x_q, x_scale = activation_quant_int8(x, bits)
    return linear(x_q, x_scale, w_packed, w_scale, in_features, bias)
