"""Rotary position embedding (RoFormer), rotate-half (NEOX) convention as in Llama / GGUF bitnet."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for ``max_seq_len`` positions.

    ``rotate(x, start_pos)`` rotates x (batch, heads, T, head_dim) at positions start_pos..start_pos+T-1.
    """

    def __init__(self, head_dim: int, max_seq_len: int = 2048, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.max_seq_len, self.base = head_dim, max_seq_len, base
        self.build_tables()

    def build_tables(self, device=None) -> None:
        """(Re)compute the cos/sin tables (L, head_dim) on ``device``."""
        hd = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))  # (hd/2,)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device=device), inv_freq)  # (L, hd/2)
        angles = torch.cat([angles, angles], dim=-1)                                                      # (L, hd)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def rotate(self, x: torch.Tensor, start_pos=0) -> torch.Tensor:
        """Rotate x (B, heads, T, hd). ``start_pos``: an int, or a LongTensor (B,) of per-row start positions."""
        t = x.shape[-2]
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos.view(-1, 1) + torch.arange(t, device=start_pos.device)           # (B, T)
            cos = self.cos[positions].unsqueeze(1).to(x.dtype)                                     # (B, 1, T, hd)
            sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        else:
            if start_pos + t > self.max_seq_len:
                raise ValueError(
                    f"sequence position {start_pos + t} exceeds max_seq_len={self.max_seq_len} of the rotary table"
                )
            cos = self.cos[start_pos:start_pos + t].to(x.dtype)                                     # (T, hd)
            sin = self.sin[start_pos:start_pos + t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)                                                     # rotate_half
        return x * cos + rotated * sin
