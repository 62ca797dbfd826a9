"""The fused CPU inference path of a packed :class:`TransformerBlock` (native backend, eager, no grad).

The module path runs one native call per projection plus ~40 small torch ops per block. Here:

* with a KV cache (decode and cached prefill), the whole block is **one native call**
  (``bitnet.ops.cpu.NativeBlock`` -> ``bitnet_block_forward``): RMSNorm + int8 quantisation once per
  input, q|k|v and gate|up each in one pass over their weights, rotary + cache append + attention in
  C, the activation and both residuals; the thread pool reads the next projection's weights into
  cache while attention runs;
* without a cache (or a cache of another layout), four native calls (``BitLinearGroup``: norm +
  quantise once + several matrices) with the module's own torch attention (:meth:`BitMGQA.attend`)::

    x (B*T, D) --[attn_norm + q|k|v]--> rotary, KV cache, attention --[sub_norm + o]--> + x
      --[ffn_norm + gate|up]--> act(gate) * up --[post_norm + down]--> + x

Outputs equal the module path up to float rounding (the RMSNorm is computed in C, in float32 with a
double sum of squares, so an activation can round to the neighbouring int8 value).
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
                                      [m.bias for m in layers], layers[0].in_features, bits)

        gate_up = [ffn.gate, ffn.up] if ffn.gate is not None else [ffn.up]
        self.qkv, self.o = group([attn.q_proj, attn.k_proj, attn.v_proj]), group([attn.out_proj])
        self.gate_up, self.down = group(gate_up), group([ffn.down])
        # what the groups point at: (dict of a module, key, tensor) triples; a reload or .to() replaces them
        norms = [n for n in (block.attn_norm, attn.sub_norm, block.ffn_norm, ffn.post_norm) if n is not None]
        self._watched = [(m._buffers, k, m._buffers[k]) for m in [attn.q_proj, attn.k_proj, attn.v_proj,
                         attn.out_proj, ffn.down, *gate_up] for k in ("w_packed", "w_scale", "bias")]
        self._watched += [(n._parameters, "weight", n._parameters.get("weight")) for n in norms]
        # the whole block in one native call, used whenever the cached native attention applies
        self.native = None
        self._rotary_ok, self._table_len = False, 0
        rot = attn.rotary
        if rot is not None:
            self._watched += [(rot._buffers, "cos", rot.cos), (rot._buffers, "sin", rot.sin)]
            self._rotary_ok = all(t.dtype == torch.float32 and t.is_contiguous() for t in (rot.cos, rot.sin))
            self._table_len = rot.cos.shape[0]
        if self._rotary_ok and ffn.activation in cpu.BLOCK_ACTIVATIONS:
            d = attn.embed_dim
            norm_args = {"attn_norm": _norm_args(block.attn_norm, d), "sub_norm": _norm_args(attn.sub_norm, d),
                         "ffn_norm": _norm_args(block.ffn_norm, d),
                         "post_norm": _norm_args(ffn.post_norm, ffn.down.in_features)}
            self.native = cpu.NativeBlock({"qkv": self.qkv, "o": self.o, "gate_up": self.gate_up, "down": self.down},
                                          norm_args, attn.query_heads, attn.kv_heads, attn.head_dim, ffn.activation,
                                          rot.cos, rot.sin)

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
        """Whether the weights, scales, norms and rotary tables are still the tensors the groups point at."""
        for d, key, t in self._watched:
            if d.get(key) is not t:
                return False
        return True

    def __call__(self, block, x: torch.Tensor, cache, start_pos) -> torch.Tensor:
        attn, ffn = block.attn, block.ffn
        b, t, d = x.shape
        native = _start_positions(start_pos, b, t)
        if native is not None and not self.native_cache_ok(cache, b, native[1]):
            native = None
        if native is not None and self.native is not None:
            return _run_native([self], [cache], x, *native)
        x2 = x.reshape(b * t, d)                                                   # (BT, D)
        qkv = self.qkv(x2, *_norm_args(block.attn_norm, d))                     # (BT, D + 2 * kv_dim)
        self.o.prefetch()                                  # the workers read ahead while attention runs
        if native is not None:
            # rotary, cache append and attention in one native call                (BT, D)
            positions, end = native
            if isinstance(positions, int):
                positions = torch.full((b,), positions, dtype=torch.int64)
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

    def native_cache_ok(self, cache, batch: int, end: int) -> bool:
        """Whether the native attention can use ``cache`` (float32, contiguous, ``batch`` rows) and this
        block's rotary table up to position ``end``. Raises the cache's own error when ``end`` does not fit."""
        if cache is None or not self._rotary_ok:
            return False
        k, v = cache.k, cache.v
        if (k.dtype != torch.float32 or v.dtype != torch.float32 or k.shape[0] != batch
                or not (k.is_contiguous() and v.is_contiguous())):
            return False
        if end > cache.max_len:
            raise ValueError(f"KV cache is full: position {end} exceeds its max_len={cache.max_len}")
        return end <= self._table_len                      # beyond it the rotary module raises its own error


def _start_positions(start_pos, batch: int, t: int):
    """(start positions: an int for all rows or an int64 (B,) tensor, end) for the native attention, or
    None when the torch attention must run (per-row positions with T > 1, or not a CPU int64 tensor)."""
    if isinstance(start_pos, torch.Tensor):
        if t != 1 or start_pos.dtype != torch.int64 or start_pos.device.type != "cpu":
            return None
        return start_pos.contiguous().view(-1), int(start_pos.max()) + 1
    return int(start_pos), int(start_pos) + t


def _run_native(runners, caches, x: torch.Tensor, positions, end: int) -> torch.Tensor:
    """x (B, T, D) through the one-call native blocks of ``runners`` in order; x itself is not modified."""
    b, t, d = x.shape
    y = x.reshape(b * t, d).clone(memory_format=torch.contiguous_format)      # (BT, D), updated in place
    for r, cache in zip(runners, caches):
        r.native(y, cache.k, cache.v, positions)
        cache.__dict__["length"] = end                     # a plain attribute (skips Module.__setattr__)
    return y.view(b, t, d)


def run_native_stack(blocks, x: torch.Tensor, caches, start_pos) -> Optional[torch.Tensor]:
    """All ``blocks`` on the one-call native path in a plain loop (no per-block module call, checks or
    hooks to run), or None when any block or cache cannot take it (the caller then runs the blocks
    one by one). x (B, T, D) is not modified; returns the new hidden states."""
    if caches is None or len(caches) != len(blocks) or not blocks:
        return None
    if any(b._forward_hooks or b._forward_pre_hooks for b in blocks) or _global_hooks():
        return None
    first = use_fused(blocks[0], x)
    if first is None or first.native is None:
        return None
    b, t, d = x.shape
    native = _start_positions(start_pos, b, t)                # once for all blocks
    if native is None:
        return None
    runners = []
    for block, cache in zip(blocks, caches):
        r = first if block is blocks[0] else FusedBlock.for_block(block)
        if r is None or r.native is None or not r.native_cache_ok(cache, b, native[1]):
            return None
        runners.append(r)
    return _run_native(runners, caches, x, *native)


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m

    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks)


def use_fused(block, x: torch.Tensor) -> Optional[FusedBlock]:
    """The fused runner if ``x`` may take the native path now: eval mode, float32 CPU tensor that needs
    no gradient, no torch.compile / modes, the native CPU backend selected; else None."""
    if block.training or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 3:
        return None
    if (x.requires_grad and torch.is_grad_enabled()) or not ops.native_cpu_selected() or not ops._plain_eager(x):
        return None
    return FusedBlock.for_block(block)
