"""The fused CPU inference path of a packed :class:`TransformerBlock` (native backend, eager, no grad).

The module path runs one native call per projection plus ~8 small torch ops per RMSNorm. Here a block
makes four native calls, each of which normalises its input, quantises it once per token and runs all
the projections that read it (``bitnet.ops.cpu.BitLinearGroup``):

    x (B*T, D) --[attn_norm + q|k|v]--> rotary, KV cache, attention --[sub_norm + o]--> + x
      --[ffn_norm + gate|up]--> act(gate) * up --[post_norm + down]--> + x

Outputs equal the module path up to float rounding (the RMSNorm is computed in C, in float32 with a
double sum of squares, so an activation can round to the neighbouring int8 value). Everything else
(rotary, cache, attention) is the module's own code, via :meth:`BitMGQA.attend`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..ops import cpu
from ..nn.norm import RMSNorm
from ..nn.packed import PackedBitLinear


def _norm_args(norm: Optional[RMSNorm], dim: int) -> tuple[Optional[torch.Tensor], float]:
    """(weight, eps) of an RMSNorm for the native call; a norm without affine weight uses ones."""
    if norm is None:
        return None, 0.0
    w = norm.weight.detach() if norm.weight is not None else torch.ones(dim)
    return w, float(norm.eps)


class FusedBlock:
    """Native groups of one block's packed projections. Build with :meth:`for_block` (None when the
    block cannot take the fused path); call with ``(block, x, cache, start_pos)``."""

    def __init__(self, block):
        attn, ffn = block.attn, block.ffn
        bits = attn.q_proj.bits

        def group(layers):
            return cpu.BitLinearGroup([m.w_packed for m in layers], [m.w_scale for m in layers],
                                      [m.bias for m in layers], layers[0].in_features, bits), layers

        (self.qkv, qkv), (self.o, o) = group([attn.q_proj, attn.k_proj, attn.v_proj]), group([attn.out_proj])
        self.gate_up, gu = group([ffn.gate, ffn.up] if ffn.gate is not None else [ffn.up])
        self.down, down = group([ffn.down])
        self._groups = [(self.qkv, qkv), (self.o, o), (self.gate_up, gu), (self.down, down)]

    @staticmethod
    def eligible(block) -> bool:
        """All projections packed, without their own norm, one activation width; block norms RMSNorm."""
        attn, ffn = block.attn, block.ffn
        layers = [attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, ffn.up, ffn.down]
        if ffn.gate is not None:
            layers.append(ffn.gate)
        if not all(type(m) is PackedBitLinear and m.norm is None for m in layers):
            return False
        if len({m.bits for m in layers}) != 1:
            return False
        norms = [block.attn_norm, block.ffn_norm, attn.sub_norm, ffn.post_norm]
        return all(n is None or type(n) is RMSNorm for n in norms[2:]) and all(type(n) is RMSNorm for n in norms[:2])

    @classmethod
    def for_block(cls, block) -> Optional["FusedBlock"]:
        """The block's fused runner, built on first use and rebuilt when its buffers were replaced."""
        runner = block.__dict__.get("_fused_runner")
        if runner is not None and runner.valid():
            return runner
        runner = cls(block) if cls.eligible(block) else None
        block.__dict__["_fused_runner"] = runner
        return runner

    def valid(self) -> bool:
        """Whether the groups still point at the layers' buffers (a reload or .to() replaces them)."""
        return all(g.valid_for([m.w_packed for m in ls], [m.w_scale for m in ls]) for g, ls in self._groups)

    def __call__(self, block, x: torch.Tensor, cache, start_pos) -> torch.Tensor:
        attn, ffn = block.attn, block.ffn
        b, t, d = x.shape
        x2 = x.reshape(b * t, d)                                                   # (BT, D)
        qkv = self.qkv(x2, *_norm_args(block.attn_norm, d))                     # (BT, D + 2 * kv_dim)
        self.o.prefetch()                                  # the workers read ahead while attention runs
        native = _native_attention_positions(attn, cache, start_pos, b, t)
        if native is not None:
            # rotary, cache append and attention in one native call                (BT, D)
            positions, end = native
            out = cpu.attention_step(qkv, b, attn.query_heads, attn.kv_heads, attn.head_dim, attn.rotary.cos,
                                     attn.rotary.sin, cache.k, cache.v, positions)
            cache.length = end
        else:
            q, k, v = self.qkv.split(qkv)
            q = q.reshape(b, t, attn.query_heads, attn.head_dim).transpose(1, 2)   # (B, Hq, T, hd)
            k = k.reshape(b, t, attn.kv_heads, attn.head_dim).transpose(1, 2)      # (B, Hkv, T, hd)
            v = v.reshape(b, t, attn.kv_heads, attn.head_dim).transpose(1, 2)
            out, _ = attn.attend(q, k, v, cache, start_pos, is_causal=True)        # (B, T, D)
        x2 = x2 + self.o(out.reshape(b * t, d), *_norm_args(attn.sub_norm, d))    # sub_norm + o, residual
        # ffn_norm + gate|up, then act(gate) * up: (BT, hidden)
        gu = self.gate_up.split(self.gate_up(x2, *_norm_args(block.ffn_norm, d)))
        self.down.prefetch()
        h = ffn.act(gu[0]) * gu[1] if ffn.gate is not None else ffn.act(gu[0])
        x2 = x2 + self.down(h, *_norm_args(ffn.post_norm, h.shape[-1]))          # post_norm + down, residual
        return x2.view(b, t, d)


def _native_attention_positions(attn, cache, start_pos, batch: int, t: int):
    """(start positions (B,) int64, end) for :func:`bitnet.ops.cpu.attention_step`, or None when the torch
    attention must run (no cache or rotary, a cache of another layout, per-row positions with T > 1).
    Raises the cache's own error when the new tokens do not fit."""
    if cache is None or attn.rotary is None:
        return None
    k, v, cos = cache.k, cache.v, attn.rotary.cos
    if (k.dtype != torch.float32 or v.dtype != torch.float32 or cos.dtype != torch.float32 or k.shape[0] != batch
            or not (k.is_contiguous() and v.is_contiguous() and cos.is_contiguous() and attn.rotary.sin.is_contiguous())):
        return None
    if isinstance(start_pos, torch.Tensor):
        if t != 1 or start_pos.dtype != torch.int64 or start_pos.device.type != "cpu":
            return None
        positions, end = start_pos.contiguous().view(-1), int(start_pos.max()) + 1
    else:
        positions, end = torch.full((batch,), int(start_pos), dtype=torch.int64), int(start_pos) + t
    if end > cache.max_len:
        raise ValueError(f"KV cache is full: position {end} exceeds its max_len={cache.max_len}")
    if end > cos.shape[0]:
        return None                                        # the rotary module raises its own error
    return positions, end


def use_fused(block, x: torch.Tensor) -> Optional[FusedBlock]:
    """The fused runner if ``x`` may take the native path now: eval mode, float32 CPU tensor that needs
    no gradient, no torch.compile / modes, the native CPU backend selected; else None."""
    if block.training or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 3:
        return None
    if (torch.is_grad_enabled() and x.requires_grad) or not ops._plain_eager(x):
        return None
    if ops.backend("cpu") != "cpu":
        return None
    return FusedBlock.for_block(block)
