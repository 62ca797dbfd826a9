"""Quantisers of both papers as plain functions (no modules, no state).

Notation follows ../DESIGN.md:

* b1.58 (2402.17764, eq. 1-3): ``gamma = mean(|W|)``,
  ``Wq = clamp(round(W / (gamma + eps)), -1, 1)``.
* b1 (2310.11453, eq. 1-3): ``alpha = mean(W)``, ``Wb = sign(W - alpha)`` with 0 -> +1,
  scale ``beta = mean(|W|)``.
* activations (both papers): per token absmax, ``s = Qp / max(|x|)``,
  ``xq = clamp(round(x * s), -Qp - 1, Qp)`` with ``Qp = 2**(bits-1) - 1``.

Every function returns integer-valued tensors (in the input's float dtype unless said otherwise)
together with the scale needed to undo the quantisation, so that
``y = (xq @ Wq^T) * w_scale / x_scale`` is the exact BitLinear output.
"""

from __future__ import annotations

import torch

EPS = 1e-5
WEIGHT_KINDS = ("1.58", "1")
"""Accepted names of the weight quantisation: ternary absmean (b1.58) and binary sign (b1)."""


def check_bits(bits: int) -> int:
    """Validate an activation bit width; returns it. Allowed: integers 2..8 (int8 storage)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8 (activations are stored as int8), got {bits!r}")
    return bits


def normalize_weight_kind(kind) -> str:
    """Map user spellings ('1.58', 1.58, 'b1.58', 'ternary', '1', 1, 'b1', 'binary') to '1.58' or '1'."""
    aliases = {
        "1.58": "1.58", "b1.58": "1.58", "1.58b": "1.58", "ternary": "1.58",
        "1": "1", "1.0": "1", "b1": "1", "1b": "1", "binary": "1",
    }
    key = str(kind).strip().lower()
    if key not in aliases:
        raise ValueError(
            f"weight kind must be one of '1.58' (ternary absmean, b1.58) or '1' (binary sign, b1), got {kind!r}"
        )
    return aliases[key]


def ternary_weight_quant(w: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """b1.58 absmean quantiser.

    Args:
        w: weight of any shape, usually (out_features, in_features).
    Returns:
        (wq, gamma): ``wq`` has w's shape and dtype with values in {-1, 0, 1};
        ``gamma`` is a 0-dim float32 tensor, ``mean(|W|)``. Dequantised weight: ``wq * gamma``.
    """
    gamma = w.detach().abs().float().mean()                      # scalar, eq. (3) of 2402.17764
    wq = (w / (gamma + eps).to(w.dtype)).round().clamp(-1, 1)     # eq. (1)-(2)
    return wq, gamma


def binary_weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """b1 sign quantiser of BitNet (2310.11453).

    Returns:
        (wb, beta): ``wb = sign(w - mean(w))`` in {-1, +1} (exact zeros map to +1), and the 0-dim
        float32 scale ``beta = mean(|w|)``. Dequantised weight: ``wb * beta``.
    """
    alpha = w.detach().float().mean()                              # eq. (2): centre
    centred = w - alpha.to(w.dtype)
    wb = torch.where(centred >= 0, torch.ones_like(w), -torch.ones_like(w))  # eq. (1): Sign, 0 -> +1
    beta = w.detach().abs().float().mean()                         # eq. (11): beta = ||W||_1 / (n m)
    return wb, beta


def weight_quant(w: torch.Tensor, kind: str = "1.58") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight with the given kind ('1.58' ternary or '1' binary). Returns (values, scale)."""
    kind = normalize_weight_kind(kind)
    return ternary_weight_quant(w) if kind == "1.58" else binary_weight_quant(w)


def activation_quant(x: torch.Tensor, bits: int = 8, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax quantiser over the last dimension.

    Args:
        x: (..., features) activations.
        bits: 2..8.
    Returns:
        (xq, s): ``xq`` (..., features) integer-valued in [-Qp-1, Qp], same dtype as x;
        ``s`` (..., 1) float32 scale ``Qp / max|x|`` (so ``x ~= xq / s``).
    """
    qp = 2 ** (check_bits(bits) - 1) - 1
    s = qp / x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=eps)
    xq = (x * s.to(x.dtype)).round().clamp(-qp - 1, qp)
    return xq, s


def activation_quant_int8(x: torch.Tensor, bits: int = 8, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`activation_quant` but returns ``xq`` as int8 (for the integer kernels).

    The rounding is done in float32 whatever the input dtype, so every backend sees the same codes.
    """
    qp = 2 ** (check_bits(bits) - 1) - 1
    xf = x.float()
    s = qp / xf.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    xq = (xf * s).round().clamp(-qp - 1, qp).to(torch.int8)
    return xq, s


def ste(x: torch.Tensor, q: torch.Tensor, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Straight-through estimator: forward value ``x + strength * (q - x)``, gradient of identity.

    ``strength`` (lambda) in [0, 1] blends full precision (0) into full quantisation (1), as used to
    warm up quantisation when converting a pretrained model.
    """
    if isinstance(strength, (int, float)) and strength == 1.0:
        return x + (q - x).detach()
    return x + (strength * (q - x)).detach()


def fake_quant_weight(w: torch.Tensor, kind: str = "1.58", strength: float = 1.0) -> torch.Tensor:
    """Dequantised weight with STE gradient: ``w + (Wq * scale - w).detach()``."""
    q, scale = weight_quant(w, kind)
    return ste(w, q * scale.to(w.dtype), strength)


def fake_quant_activation(x: torch.Tensor, bits: int = 8, strength: float = 1.0) -> torch.Tensor:
    """Dequantised activations with STE gradient: ``x + (xq / s - x).detach()``."""
    xq, s = activation_quant(x, bits)
    return ste(x, xq / s.to(x.dtype), strength)
