"""Choice of linear layer by weight kind, so one architecture serves b1.58, b1 and the fp baseline."""

from __future__ import annotations

from torch import nn

from .bitlinear import BitLinear

WEIGHTS_CHOICES = ("1.58", "1", "fp")
"""``"1.58"`` ternary BitLinear, ``"1"`` binary BitLinear, ``"fp"`` plain ``nn.Linear`` (baseline)."""


def check_weights(weights) -> str:
    """Normalise a ``weights`` choice; raises ValueError naming the allowed values."""
    key = str(weights).strip().lower()
    key = {"1.58": "1.58", "b1.58": "1.58", "1": "1", "1.0": "1", "b1": "1", "fp": "fp", "fp32": "fp"}.get(key)
    if key is None:
        raise ValueError(f"weights must be one of {WEIGHTS_CHOICES}, got {weights!r}")
    return key


def make_linear(in_features: int, out_features: int, weights: str = "1.58", bits: int = 8,
                norm: bool = False, bias: bool = False) -> nn.Module:
    """A BitLinear of the given kind, or ``nn.Linear`` for ``weights="fp"``."""
    weights = check_weights(weights)
    if weights == "fp":
        return nn.Linear(in_features, out_features, bias=bias)
    return BitLinear(in_features, out_features, bias=bias, weight_kind=weights, bits=bits, norm=norm)
