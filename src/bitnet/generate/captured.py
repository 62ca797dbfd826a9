"""A captured decode step: one token per row over static KV caches, compiled once with
``torch.compile(fullgraph=True)`` and, on CUDA, replayed as a CUDA graph (``mode="reduce-overhead"``),
so a GPU decode step costs one graph launch instead of hundreds of kernel launches from Python.

    dec = CapturedDecoder(model, batch=1, max_len=512)        # caches + compiled step
    logits = dec.prefill(prompt)                              # (B, vocab), eager
    for _ in range(n):
        tok = logits.argmax(-1, keepdim=True)                 # (B, 1)
        logits = dec.step(tok)                                # (B, vocab), captured

Packed layers run inside the graph through the ``bitnet::`` custom ops (Triton kernels on CUDA); on
CPU the native backend's fused blocks are faster than a compiled graph, so :func:`default_mode`
compiles only on CUDA unless asked.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .decoder import Decoder


def default_mode(device: torch.device) -> Optional[str]:
    """``"reduce-overhead"`` (CUDA graphs) on CUDA, None (plain inductor) elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


class CapturedDecoder(nn.Module):
    """Static-shape decoding of ``model`` (a BitNetTransformer, packed or not) for ``batch`` rows.

    Args:
        model: the language model (eval mode is set).
        batch: rows decoded together.
        max_len: cache length (default ``model.max_seq_len``).
        compile: compile the step (False: run it eagerly, same results; for debugging).
        backend, mode: passed to ``torch.compile`` (mode default: :func:`default_mode`).
        kv_dtype: the caches' dtype (``None``: the model's; ``"float16"``: half the bytes, see
            :class:`~bitnet.generate.Decoder`).
    """

    def __init__(self, model: nn.Module, batch: int = 1, max_len: Optional[int] = None, compile: bool = True,
                 backend: str = "inductor", mode: Optional[str] = None, kv_dtype=None):
        super().__init__()
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        max_len = int(max_len or model.max_seq_len)
        if not 1 <= max_len <= model.max_seq_len:
            raise ValueError(f"max_len must lie in [1, {model.max_seq_len}] (the model's max_seq_len), got {max_len}")
        self.decoder = Decoder(model, rows=batch, max_len=max_len, static=True,   # caches, prefill, threads
                               kv_dtype=kv_dtype)
        self.model = self.decoder.model
        self.batch, self.max_len = batch, max_len
        self.caches = nn.ModuleList(self.decoder.caches)          # buffers: static addresses
        self.register_buffer("positions", torch.zeros(batch, dtype=torch.int64, device=self.decoder.device),
                             persistent=False)
        step = self.decoder.forward_rows                          # tokens (B, 1), positions (B,) -> (B, vocab)
        if compile:
            step = torch.compile(step, fullgraph=True, dynamic=False, backend=backend,
                                 mode=mode if mode is not None else default_mode(self.decoder.device))
        self._compiled = step
        self._next = 0

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run prompts ``tokens`` (B, T) (equal lengths) from position 0 eagerly; returns the last logits (B, vocab)."""
        if tokens.dim() != 2 or tokens.shape[0] != self.batch:
            raise ValueError(f"tokens must have shape ({self.batch}, T), got {tuple(tokens.shape)}")
        if tokens.shape[1] >= self.max_len:
            raise ValueError(f"a prompt of {tokens.shape[1]} tokens leaves no room in max_len={self.max_len}")
        logits = self.decoder.prefill_all(tokens)
        self.positions.fill_(tokens.shape[1])
        self._next = tokens.shape[1]                 # host copy of the (equal) positions: no device sync
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (B, 1) at the rows' current positions; returns logits (B, vocab)."""
        if tokens.shape != (self.batch, 1):
            raise ValueError(f"tokens must have shape ({self.batch}, 1), got {tuple(tokens.shape)}")
        if self._next >= self.max_len:
            raise ValueError(f"the caches are full (max_len={self.max_len})")
        logits = self._compiled(tokens, self.positions)
        self.positions += 1
        self._next += 1
        return logits.clone()          # a CUDA graph's output is overwritten by its next replay
