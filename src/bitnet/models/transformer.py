"""BitNetTransformer: a small decoder-only language model with BitLinear projections.

Architecture (Llama-like, as BitNet b1.58): token embedding -> depth x [RMSNorm -> grouped-query
attention with rotary positions and a sub-norm before the output projection -> residual ->
RMSNorm -> gated feed-forward with a sub-norm before the down projection -> residual] -> RMSNorm
-> linear head. Embeddings and head stay in full precision; every projection inside the blocks is a
BitLinear (or nn.Linear for ``weights="fp"``, the baseline of the same shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import AttentionSpec, BitMGQA, KVCache, kv_dtype
from ..nn.feedforward import BitFeedForward, FeedForwardSpec
from ..nn.layers import check_weights
from ..nn.norm import RMSNorm
from ..quant import check_bits
from . import fused_block


@dataclass(frozen=True)
class BlockSpec:
    """What :meth:`TransformerBlock.forward` computes, as data: the fused native block is built from
    this (:mod:`bitnet.models.fused_block`), never from a second copy of the block's code::

        x = x + attn(attn_norm(x))          attn: see AttentionSpec (causal self-attention)
        x = x + ffn(ffn_norm(x))            ffn: see FeedForwardSpec
    """

    attn_norm: nn.Module
    attn: AttentionSpec
    ffn_norm: nn.Module
    ffn: FeedForwardSpec


class TransformerBlock(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``.

    On the native CPU backend a packed block in eval mode runs as one native call (see
    :mod:`bitnet.models.fused_block`; ``BITNET_FUSED=0`` or :func:`bitnet.models.set_fused` turn that
    off); :attr:`native_reason` says why a block does not.
    """

    def __init__(self, dim, heads, kv_heads, ff_mult, max_seq_len, weights, bits, dropout, activation,
                 rope_base, norm_eps):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = BitMGQA(dim, heads, kv_heads, dropout=dropout, layer_norm=True, layer_norm_eps=norm_eps,
                            weights=weights, bits=bits, linear_norm=False, rotary=True,
                            max_seq_len=max_seq_len, rope_base=rope_base)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)
        self.ffn = BitFeedForward(dim, dim, ff_mult, post_act_ln=True, dropout=dropout, glu=True,
                                  activation=activation, weights=weights, bits=bits, linear_norm=False)
        if self.ffn.post_norm is not None:       # the FFN sub-norm takes the model's eps like every other norm
            self.ffn.post_norm.eps = norm_eps

    def spec(self) -> BlockSpec:
        """:meth:`forward` as data (eval mode), for the fused native block."""
        return BlockSpec(attn_norm=self.attn_norm, attn=self.attn.spec(), ffn_norm=self.ffn_norm, ffn=self.ffn.spec())

    @property
    def native_reason(self) -> str | None:
        """None when this block can run as one native call, else why not (e.g. its projections are not
        packed, or its activation has no native code). Whether a given call takes that path also depends
        on the call (see :func:`bitnet.models.fused_block.run_native_stack`)."""
        return fused_block.unsupported(self.spec())

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        y = fused_block.run_native_block(self, x, cache, start_pos)       # one native call, when it may
        if y is not None:
            return y
        h = self.attn_norm(x)
        x = x + self.attn(h, h, h, is_causal=True, cache=cache, start_pos=start_pos)[0]
        return x + self.ffn(self.ffn_norm(x))


class BitNetTransformer(nn.Module):
    """Decoder-only language model.

    Args:
        num_tokens: vocabulary size.
        dim: model width.
        depth: number of blocks.
        heads: query heads (must divide ``dim``).
        ff_mult: feed-forward expansion (hidden = dim * ff_mult).
        kv_heads: key/value heads for grouped-query attention (default ``heads``).
        max_seq_len: longest context (rotary table and KV cache size).
        weights: ``"1.58"`` (ternary, default), ``"1"`` (binary) or ``"fp"`` (nn.Linear baseline).
        bits: activation bits of the BitLinear layers.
        activation: gate nonlinearity, ``"silu"`` (SwiGLU, default), ``"gelu"`` or ``"relu2"``.
        tie_embeddings: share the embedding matrix with the output head.

    ``forward(tokens)`` maps token ids (B, T) to logits (B, T, num_tokens); ``logits_to_keep=n`` computes
    them for the last n positions only (a prefill that samples one token needs 1); ``logits_at`` (B,)
    computes them at one position per row, (B, 1, num_tokens) (prompts of different lengths, right-padded
    into one prefill). For decoding pass
    ``caches=model.new_caches(B)`` and ``start_pos`` (number of tokens already in the caches), or a
    LongTensor (B,) of per-row positions for one-token steps of sequences of different lengths
    (continuous batching; prefill each row with ``[c.row(i) for c in caches]``).
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        heads: int = 8,
        ff_mult: float = 4,
        kv_heads: int | None = None,
        max_seq_len: int = 2048,
        weights: str = "1.58",
        bits: int = 8,
        dropout: float = 0.0,
        activation: str = "silu",
        rope_base: float = 10000.0,
        norm_eps: float = 1e-6,
        tie_embeddings: bool = False,
    ):
        super().__init__()
        for name, value in (("num_tokens", num_tokens), ("dim", dim), ("depth", depth),
                            ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if heads <= 0 or dim % heads:
            raise ValueError(f"heads={heads} must be positive and divide dim={dim}")
        kv_heads = heads if kv_heads is None else kv_heads
        weights = check_weights(weights)
        self.config = dict(num_tokens=num_tokens, dim=dim, depth=depth, heads=heads, ff_mult=ff_mult,
                           kv_heads=kv_heads, max_seq_len=max_seq_len, weights=weights, bits=check_bits(bits),
                           dropout=dropout, activation=activation, rope_base=rope_base, norm_eps=norm_eps,
                           tie_embeddings=tie_embeddings)
        self.num_tokens, self.max_seq_len = num_tokens, max_seq_len
        self.embed = nn.Embedding(num_tokens, dim)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, heads, kv_heads, ff_mult, max_seq_len, weights, bits, dropout, activation,
                             rope_base, norm_eps)
            for _ in range(depth)
        )
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, num_tokens, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def new_caches(self, batch: int = 1, max_len: int | None = None, device=None, dtype=None,
                   static: bool = False) -> list[KVCache]:
        """One preallocated KV cache per block for decoding ``batch`` sequences of up to ``max_len`` tokens
        (``static``: fixed-shape decode steps for capture, see :class:`bitnet.nn.KVCache`).

        ``dtype``: what the caches store, one of :data:`bitnet.nn.attention.KV_DTYPES` (a torch dtype or its
        name); default the model's compute dtype. ``torch.float16`` beside a float32 model halves the bytes
        each decode step reads from the caches, ``torch.int8`` quarters them (one float32 scale per key/value
        vector, :func:`bitnet.nn.attention.quantize_kv`); the math stays float32, and the fused native CPU
        blocks read and write float16 and int8 caches in place."""
        param = self.norm.weight                  # compute dtype (the embedding table may be stored in 16 bits)
        attn = self.layers[0].attn
        dtype = kv_dtype(dtype, "dtype")
        return [
            KVCache(batch, attn.kv_heads, max_len or self.max_seq_len, attn.head_dim,
                    device=device or param.device, dtype=dtype or param.dtype, static=static)
            for _ in self.layers
        ]

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Clear errors for token ids of the wrong shape, dtype or range."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.numel():
            lo, hi = (int(v) for v in tokens.aminmax())                    # one op (a decode step checks it)
            if lo < 0 or hi >= self.num_tokens:
                raise ValueError(f"token ids must lie in [0, {self.num_tokens - 1}] (num_tokens={self.num_tokens}); "
                                 f"got min {lo}, max {hi}")

    @staticmethod
    def _check_logits_at(logits_at, tokens: torch.Tensor, logits_to_keep: int) -> None:
        if logits_to_keep:
            raise ValueError("pass logits_to_keep or logits_at, not both")
        if (not isinstance(logits_at, torch.Tensor) or logits_at.shape != tokens.shape[:1]
                or logits_at.is_floating_point() or logits_at.dtype == torch.bool):
            shape = tuple(logits_at.shape) if isinstance(logits_at, torch.Tensor) else type(logits_at).__name__
            raise ValueError(f"logits_at must be an integer tensor of shape ({tokens.shape[0]},) (one position per "
                             f"row), got {shape}")
        if logits_at.numel() and (int(logits_at.min()) < 0 or int(logits_at.max()) >= tokens.shape[1]):
            raise ValueError(f"logits_at must lie in [0, {tokens.shape[1] - 1}] (positions of tokens), "
                             f"got {logits_at.tolist()}")

    def forward(self, tokens: torch.Tensor, caches: list[KVCache] | None = None,
                start_pos: int | torch.Tensor = 0, logits_to_keep: int = 0,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.compiler.is_compiling():                              # (a captured step checks nothing)
            self.check_tokens(tokens)
            if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
                raise ValueError(f"logits_to_keep must be an int >= 0 (0: all positions), got {logits_to_keep!r}")
            if logits_at is not None:
                self._check_logits_at(logits_at, tokens, logits_to_keep)
            end = (int(start_pos.max()) if isinstance(start_pos, torch.Tensor) else start_pos) + tokens.shape[1]
            if end > self.max_seq_len:
                raise ValueError(f"sequence of {end} tokens exceeds max_seq_len={self.max_seq_len}")
        x = self.embed(tokens)                                              # (B, T, dim)
        if x.dtype != self.norm.weight.dtype:       # 16-bit table of the packed form: rows back to fp32
            x = x.to(self.norm.weight.dtype)
        stacked = fused_block.run_native_stack(self.layers, x, caches, start_pos)   # packed, CPU: all blocks
        if stacked is not None:
            x = stacked
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, None if caches is None else caches[i], start_pos)
        if logits_to_keep:                                                  # e.g. 1 after a prefill
            x = x[:, -logits_to_keep:]
        elif logits_at is not None:                                         # ragged prompts, right-padded
            x = x[torch.arange(x.shape[0], device=x.device), logits_at.to(x.device)][:, None]   # (B, 1, dim)
        return self.head(self.norm(x))                                      # (B, T or kept, num_tokens)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) of ``tokens`` (B, T) against ``targets`` (B, T)."""
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
