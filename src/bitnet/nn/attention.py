"""Grouped-query attention with BitLinear projections and a preallocated KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import make_linear
from .norm import RMSNorm
from .rotary import RotaryEmbedding


KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
"""Element types a KV cache may be asked for by name (``kv_dtype`` arguments, ``--kv-dtype`` flags); ``int8``
stores each key/value vector as int8 with one float32 scale (:func:`quantize_kv`)."""


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector absmax int8 of keys/values x (..., head_dim), as the int8 KV cache stores them:

        d = max_i |x_i| / 127,   q_i = clamp(round(x_i / d), -127, 127)   (round half to even; d = 0: q = 0)

    in float32. Returns (q int8 (..., head_dim), d float32 (...)); :func:`dequantize_kv` reads them back as
    ``q * d`` (error at most d / 2 per entry). The native CPU attention writes the same bits. x must be finite.
    """
    x = x.float()
    d = x.abs().amax(dim=-1) / 127                                        # (...,)
    q = torch.where(d.unsqueeze(-1) > 0, x / d.unsqueeze(-1), 0.0).round().clamp_(-127, 127)
    return q.to(torch.int8), d


def dequantize_kv(q: torch.Tensor, d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * d`` (one float32 multiply per entry, as the native attention reads an int8 cache), in ``dtype``."""
    return (q.to(torch.float32) * d.unsqueeze(-1)).to(dtype)


def kv_dtype(value, name: str = "kv_dtype") -> Optional[torch.dtype]:
    """``value`` (None, a name of :data:`KV_DTYPES` or one of its torch dtypes) as a torch dtype (None stays
    None: the model's own dtype); anything else raises ValueError naming ``name`` and the allowed values."""
    if value is None or (isinstance(value, torch.dtype) and value in KV_DTYPES.values()):
        return value
    if isinstance(value, str) and value in KV_DTYPES:
        return KV_DTYPES[value]
    raise ValueError(f"{name} must be one of {', '.join(KV_DTYPES)} (or that torch.dtype, or None for the "
                     f"model's dtype), got {value!r}")


class KVCache(nn.Module):
    """Preallocated keys/values (batch, kv_heads, max_len, head_dim) and the number of filled positions.

    Rows may sit at different positions (continuous batching): pass a LongTensor ``start_pos`` of
    shape (batch,) to :meth:`update` for one-token decode steps, and use :meth:`row` to prefill one
    row on its own.

    ``static=True``: with per-row positions, :meth:`update` returns the whole cache (max_len positions;
    attention masks the ones past each row's position) and reads no value back to Python, so the shapes
    of a decode step never change and the step can be captured (torch.compile fullgraph, CUDA graphs).

    ``dtype``: what the cache stores (a floating dtype or ``torch.int8``; default float32). A cache narrower
    than the model's compute dtype (``torch.float16`` beside a float32 model: half the bytes a decode step
    reads) stores k/v rounded to it (``Tensor.to``, nearest even) and :meth:`update` returns them widened back
    to the dtype of the k/v it was given, so the attention math keeps the model's dtype. ``torch.int8`` (a
    quarter of float32's bytes) stores each (row, head, position) vector as :func:`quantize_kv` does, its
    scale in ``k_scale`` / ``v_scale`` (batch, kv_heads, max_len) float32, and returns ``q * scale``. The
    fused native CPU blocks read and write float32, float16 and int8 caches in place
    (bitnet.ops.cpu.KV_DTYPES), with the same rounding.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, device=None, dtype=torch.float32,
                 _storage: tuple[torch.Tensor, ...] | None = None, static: bool = False):
        super().__init__()
        if _storage is None and (not isinstance(dtype, torch.dtype)
                                 or not (dtype.is_floating_point or dtype == torch.int8)):
            raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float32, torch.float16) or torch.int8, "
                             f"got {dtype!r}")
        shape = (batch, kv_heads, max_len, head_dim)
        if _storage is None:
            _storage = (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            if dtype == torch.int8:
                _storage += (torch.zeros(shape[:3], device=device), torch.zeros(shape[:3], device=device))
        k, v = _storage[:2]
        if (k.dtype == torch.int8) != (len(_storage) == 4):
            raise ValueError("an int8 cache's storage is (k, v, k_scale, v_scale); a float cache's is (k, v)")
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.quantized = len(_storage) == 4
        if self.quantized:
            self.register_buffer("k_scale", _storage[2], persistent=False)    # (B, kv_heads, max_len) float32
            self.register_buffer("v_scale", _storage[3], persistent=False)
        self.max_len = max_len
        self.length = 0
        self.static = static

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The storage: (k, v), and for an int8 cache (k, v, k_scale, v_scale)."""
        return (self.k, self.v) + ((self.k_scale, self.v_scale) if self.quantized else ())

    def rows(self, first: int, end: int) -> "KVCache":
        """A cache of batch ``end - first`` that shares rows ``first..end-1``'s storage."""
        return KVCache(end - first, self.k.shape[1], self.max_len, self.k.shape[3],
                       _storage=tuple(t[first:end] for t in self.tensors()), static=self.static)

    def row(self, index: int) -> "KVCache":
        """A cache of batch 1 that shares row ``index``'s storage (for prefilling one sequence)."""
        return self.rows(index, index + 1)

    def copy_rows_(self, first: int, src: "KVCache", src_first: int, n: int, length: int) -> None:
        """Copy positions [0, length) of ``src``'s rows src_first..src_first+n-1 into rows first..first+n-1
        (scales too: both caches must store the same dtype)."""
        if self.quantized != src.quantized:
            raise ValueError(f"copy_rows_ needs caches of one kind: {self.k.dtype} and {src.k.dtype}")
        for mine, theirs in zip(self.tensors(), src.tensors()):
            mine[first:first + n, :, :length].copy_(theirs[src_first:src_first + n, :, :length])

    def _write(self, index, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (..., hd) at ``self.k[index]`` (quantised, with their scales, in an int8 cache)."""
        if self.quantized:
            (qk, sk), (qv, sv) = quantize_kv(k), quantize_kv(v)
            self.k[index], self.k_scale[index] = qk, sk
            self.v[index], self.v_scale[index] = qv, sv
        else:
            self.k[index] = k.to(self.k.dtype)
            self.v[index] = v.to(self.v.dtype)

    def _read(self, end: int | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of positions [0, end) (all for None) in ``dtype``."""
        parts = self.tensors() if end is None else tuple(t[:, :, :end] for t in self.tensors())
        if not self.quantized:
            return parts[0].to(dtype), parts[1].to(dtype)
        k, v, ks, vs = parts
        return dequantize_kv(k, ks, dtype), dequantize_kv(v, vs, dtype)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv_heads, T, hd) at ``start_pos``; return all keys/values so far (in k's / v's dtype).

        ``start_pos`` is an int (all rows aligned) or a LongTensor (B,) of per-row positions (T must be 1);
        in that case the returned keys span ``max(start_pos) + 1`` positions and rows must be masked.
        """
        if isinstance(start_pos, torch.Tensor):
            if k.shape[2] != 1:
                raise ValueError(f"per-row positions need one new token per row, got {k.shape[2]}")
            if not self.static:                  # static: fixed shapes, no host sync (the caller checks)
                end = int(start_pos.max()) + 1
                if end > self.max_len:
                    raise ValueError(f"KV cache is full: position {end} exceeds its max_len={self.max_len}")
            rows = torch.arange(k.shape[0], device=k.device)
            self._write((rows, slice(None), start_pos), k[:, :, 0], v[:, :, 0])          # (B, Hkv, hd)
            if self.static:
                return self._read(None, k.dtype)
        else:
            end = start_pos + k.shape[2]
            if end > self.max_len:
                raise ValueError(f"KV cache is full: position {end} exceeds its max_len={self.max_len}")
            self._write((slice(None), slice(None), slice(start_pos, end)), k, v)
        self.length = end
        # widened to the dtype of the given k/v (a no-op when the cache has it): the math keeps that dtype
        return self._read(end, k.dtype)


@dataclass(frozen=True)
class AttentionSpec:
    """What :meth:`BitMGQA.forward` computes, as data (the fused native block is built from it)::

        out = o(sub_norm(softmax(rotary(q(x)) rotary(k(x))^T / sqrt(head_dim), causal) v(x)))

    ``heads`` query heads share ``kv_heads`` K/V heads of ``head_dim`` each; ``sub_norm`` and ``rotary``
    (cos/sin tables, base) may be None. The projections are the modules themselves.
    """

    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    sub_norm: Optional[nn.Module]
    heads: int
    kv_heads: int
    head_dim: int
    rotary: Optional[RotaryEmbedding]


class BitMGQA(nn.Module):
    """Multi-head / grouped-query attention: ``query_heads`` query heads share ``kv_heads`` K/V heads.

    Args:
        embed_dim: model width; must be divisible by ``query_heads``.
        query_heads, kv_heads: ``kv_heads`` must divide ``query_heads``.
        dropout: attention dropout (training only).
        bias: bias in the projections.
        layer_norm: RMSNorm on the attention output before ``out_proj`` (SubLN).
        weights: ``"1.58"``, ``"1"`` or ``"fp"``.
        linear_norm: each projection normalises its own input (standalone use); False inside a model
            with pre-norm blocks.
        rotary: apply rotary position embedding to q and k (needs ``max_seq_len``).

    ``forward(query, key, value, need_weights=False, is_causal=False, ...)`` returns
    ``(out, attn_weights)`` with out (B, Tq, embed_dim) and attn_weights (B, heads, Tq, Tk) averaged
    over heads when ``average_attn_weights``, or None when ``need_weights`` is False.
    """

    def __init__(
        self,
        embed_dim: int,
        query_heads: int = 8,
        kv_heads: int = 4,
        dropout: float = 0.0,
        bias: bool = False,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-6,
        weights: str = "1.58",
        bits: int = 8,
        linear_norm: bool = True,
        rotary: bool = False,
        max_seq_len: int = 2048,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        if query_heads <= 0 or embed_dim % query_heads:
            raise ValueError(f"query_heads={query_heads} must be positive and divide embed_dim={embed_dim}")
        if kv_heads <= 0 or query_heads % kv_heads:
            raise ValueError(f"kv_heads={kv_heads} must be positive and divide query_heads={query_heads}")
        self.embed_dim, self.query_heads, self.kv_heads = embed_dim, query_heads, kv_heads
        self.head_dim = embed_dim // query_heads
        kv_dim = self.head_dim * kv_heads
        self.q_proj = make_linear(embed_dim, embed_dim, weights, bits, norm=linear_norm, bias=bias)
        self.k_proj = make_linear(embed_dim, kv_dim, weights, bits, norm=linear_norm, bias=bias)
        self.v_proj = make_linear(embed_dim, kv_dim, weights, bits, norm=linear_norm, bias=bias)
        self.sub_norm = RMSNorm(embed_dim, eps=layer_norm_eps) if layer_norm else None
        self.out_proj = make_linear(embed_dim, embed_dim, weights, bits, norm=linear_norm, bias=bias)
        self.dropout = dropout
        self.rotary = RotaryEmbedding(self.head_dim, max_seq_len, rope_base) if rotary else None

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)          # (B, heads, T, hd)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None = None,
               start_pos: int | torch.Tensor = 0, is_causal: bool = False, need_weights: bool = False):
        """Attention of projected heads: q (B, Hq, Tq, hd), k/v (B, Hkv, Tk, hd) before rotary and cache.

        Rotates q and k, appends k/v to ``cache``, and returns ``(out (B, Tq, embed_dim), weights)``
        (weights (B, Hq, Tq, Tk) or None), before the sub-norm and output projection."""
        if self.rotary is not None:
            q, k = self.rotary.rotate(q, start_pos), self.rotary.rotate(k, start_pos)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)                            # (B, Hkv, start+Tk, hd)
        b, group = q.shape[0], self.query_heads // self.kv_heads
        tq, tk = q.shape[2], k.shape[2]
        mask = None
        if isinstance(start_pos, torch.Tensor):
            # rows at different positions: row b sees keys 0..start_pos[b]      mask (B, 1, 1, Tk)
            mask = (torch.arange(tk, device=q.device).view(1, -1) <= start_pos.view(-1, 1)).view(-1, 1, 1, tk)
        elif is_causal and tq > 1:
            # query i sits at absolute position (tk - tq + i): it sees keys 0..tk-tq+i
            mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if group > 1 and tq == 1 and not need_weights and dropout == 0.0:
            # one query per row (decode): the `group` query heads of a K/V head read it in one matmul,
            # without repeating K/V:  (B, Hkv, group, hd) @ (B, Hkv, hd, Tk) -> (B, Hkv, group, Tk)
            scores = (q.view(b, self.kv_heads, group, self.head_dim) @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = (scores.softmax(dim=-1) @ v).view(b, self.query_heads, 1, self.head_dim)
        else:
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            if need_weights:
                scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)   # (B, Hq, Tq, Tk)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = scores.softmax(dim=-1)
                out = F.dropout(weights, dropout, self.training) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).reshape(b, tq, self.embed_dim), weights      # (B, Tq, D)

    def spec(self) -> AttentionSpec:
        """:meth:`forward` as data (self-attention, ``key = value = query``), for the fused native block."""
        return AttentionSpec(q=self.q_proj, k=self.k_proj, v=self.v_proj, o=self.out_proj, sub_norm=self.sub_norm,
                             heads=self.query_heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                             rotary=self.rotary)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        is_causal: bool = False,
        average_attn_weights: bool = False,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
    ):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} must have shape (batch, seq, {self.embed_dim}), got {tuple(t.shape)}")
        q = self._split(self.q_proj(query), self.query_heads)               # (B, Hq, Tq, hd)
        k = self._split(self.k_proj(key), self.kv_heads)                    # (B, Hkv, Tk, hd)
        v = self._split(self.v_proj(value), self.kv_heads)
        out, weights = self.attend(q, k, v, cache, start_pos, is_causal, need_weights)   # (B, Tq, D)
        if self.sub_norm is not None:
            out = self.sub_norm(out)
        out = self.out_proj(out)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights
