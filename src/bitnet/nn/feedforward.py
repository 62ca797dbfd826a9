"""Feed-forward blocks built from BitLinear layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import make_linear
from .norm import RMSNorm

ACTIVATIONS = ("gelu", "silu", "relu2")


def activation_fn(name: str):
    """``gelu``, ``silu`` (Swish) or ``relu2`` (squared ReLU, BitNet b1.58 2B4T)."""
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    if name == "relu2":
        return lambda x: F.relu(x).square()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


@dataclass(frozen=True)
class FeedForwardSpec:
    """What :meth:`BitFeedForward.forward` computes in eval mode, as data (the fused native block is
    built from it)::

        y = down(post_norm(act(gate(x)) * up(x)))     (act(up(x)) when ``gate`` is None)

    ``activation`` is a name of :data:`ACTIVATIONS`; ``post_norm`` may be None.
    """

    gate: Optional[nn.Module]
    up: nn.Module
    post_norm: Optional[nn.Module]
    down: nn.Module
    activation: str


class BitFeedForward(nn.Module):
    """``dim -> dim*mult -> act -> [norm] -> dropout -> dim_out`` with BitLinear projections.

    Args:
        dim: input features.
        dim_out: output features (default ``dim``).
        mult: hidden expansion factor.
        swish: SiLU instead of GELU.
        post_act_ln: normalise the hidden activations after the nonlinearity (SubLN position).
        dropout: dropout on the hidden activations.
        glu: gated variant ``down(act(gate(x)) * up(x))`` (SwiGLU with ``swish=True``).
        activation: overrides ``swish``: one of ``gelu``, ``silu``, ``relu2``.
        weights: ``"1.58"``, ``"1"`` or ``"fp"`` (plain nn.Linear, baseline).
        linear_norm: give each BitLinear its own input RMSNorm (True for a standalone block;
            False when the surrounding model already normalises).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        mult: float = 4,
        swish: bool = False,
        post_act_ln: bool = False,
        dropout: float = 0.0,
        glu: bool = False,
        activation: str | None = None,
        weights: str = "1.58",
        bits: int = 8,
        linear_norm: bool = True,
        hidden_dim: int | None = None,
    ):
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        hidden = hidden_dim if hidden_dim is not None else int(dim * mult)
        if hidden <= 0:
            raise ValueError(f"mult must give a positive hidden size, got mult={mult!r} for dim={dim}")
        self.activation = activation or ("silu" if swish else "gelu")
        self.act = activation_fn(self.activation)
        self.glu = glu
        self.up = make_linear(dim, hidden, weights, bits, norm=linear_norm)
        self.gate = make_linear(dim, hidden, weights, bits, norm=linear_norm) if glu else None
        self.post_norm = RMSNorm(hidden) if post_act_ln else None
        self.dropout = nn.Dropout(dropout)
        self.down = make_linear(hidden, dim_out, weights, bits, norm=linear_norm)

    def spec(self) -> FeedForwardSpec:
        """:meth:`forward` as data (eval mode: dropout is the identity), for the fused native block."""
        return FeedForwardSpec(gate=self.gate if self.glu else None, up=self.up, post_norm=self.post_norm,
                               down=self.down, activation=self.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., dim) -> h (..., hidden) -> (..., dim_out)
        h = self.act(self.gate(x)) * self.up(x) if self.glu else self.act(self.up(x))
        if self.post_norm is not None:
            h = self.post_norm(h)
        return self.down(self.dropout(h))
