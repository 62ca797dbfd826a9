"""RMSNorm (Zhang & Sennrich 2019), the norm used before activation quantisation (SubLN)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension.

    Args:
        dim: size of the last dimension.
        eps: added inside the square root.
        affine: learn a per-feature ``weight`` (initialised to 1).
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., dim): normalise in float32 for stability, return in x's dtype.
        # mean(x^2) (..., 1) is summed in float64 and then rounded to float32, so its value does not hang
        # on the summation order (a float32 sum does: ~40% of rows differ in the last bit between two
        # orders); the native CPU block sums in double too and so normalises to the same floats bit for
        # bit. MPS has no float64: float32 there.
        xf = x.float()
        acc = torch.float32 if xf.device.type == "mps" else torch.float64
        ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True, dtype=acc).square() / xf.shape[-1]
        y = (xf * torch.rsqrt(ms.float() + self.eps)).to(x.dtype)
        return y * self.weight if self.weight is not None else y

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.weight is not None}"
