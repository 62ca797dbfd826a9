"""Random KV-cache contents for the model tests."""

from __future__ import annotations

import torch


def fill_random(caches, g: torch.Generator) -> None:
    """Random earlier entries: floats for a float cache, codes in [-127, 127] and small scales for int8."""
    for c in caches:
        if c.quantized:
            for t in (c.k, c.v):
                t.copy_(torch.randint(-127, 128, t.shape, generator=g))
            for t in (c.k_scale, c.v_scale):
                t.copy_(torch.rand(t.shape, generator=g) / 100)
        else:
            c.k.copy_(torch.randn(c.k.shape, generator=g))
            c.v.copy_(torch.randn(c.v.shape, generator=g))
