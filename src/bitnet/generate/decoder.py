"""The one decode path of bitnet: a :class:`Decoder` owns a model's KV caches for ``rows`` sequences and
runs ``prefill`` (a row's prompt, all its tokens in one forward) and ``step`` (one new token for each of
several rows, in one forward over the batch).

Everything that decodes goes through it: :func:`bitnet.generate.generate` / ``stream_generate``
(one row), the server's continuous-batching :class:`bitnet.serve.engine.Engine` (one row per slot),
the captured (torch.compile / CUDA graph) :class:`bitnet.generate.captured.CapturedDecoder` and the
decode benchmarks::

    dec = Decoder(model, rows=2, max_len=256)
    a = dec.prefill([1, 2, 3], row=0)            # (vocab,) logits after the prompt of row 0
    b = dec.prefill([4, 5], row=1)
    logits = dec.step([7, 8], rows=[0, 1])       # (2, vocab): row 0 at position 3, row 1 at position 2
    dec.reset(1)                                 # row 1 starts a new sequence at its next prefill

It also owns the thread policy: when the native CPU kernels do the matmuls (packed model on the CPU),
torch runs with one intra-op thread during each call (see :func:`bitnet.runtime.torch_threads`); the
native pool keeps the threads set by ``bitnet.ops.set_num_threads``.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn

from ..nn.attention import kv_dtype as parse_kv_dtype
from ..runtime import native_decode, torch_threads


def accepts_argument(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword argument ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (computing the head for the last positions only)."""
    return accepts_argument(model, "logits_to_keep")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty module)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _check_count(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    return value


class Decoder:
    """Prefill and batched one-token steps over KV caches for ``rows`` sequences of ``model``.

    Args:
        model: a BitNetTransformer-like model: ``max_seq_len``, ``new_caches(batch, max_len, static=)`` and
            ``forward(tokens (B, T), caches, start_pos)`` where ``start_pos`` is an int or, for one token
            per row, a LongTensor (B,) of per-row positions. Set to ``eval()``.
        rows: sequences held at once (rows of the batch caches).
        max_len: tokens per row, prompt + output (default and maximum: ``model.max_seq_len``).
        static: fixed-shape caches for capture (see :class:`bitnet.nn.KVCache`).
        kv_dtype: what the KV caches store: None (the model's dtype, the default), ``"float32"``,
            ``"float16"``, ``"bfloat16"`` or ``"int8"`` (or that torch dtype; see
            :data:`bitnet.nn.attention.KV_DTYPES`). ``"float16"`` beside a float32 model halves the bytes each
            step reads from the caches, ``"int8"`` quarters them (one int8 per entry and a float32 scale per
            key/value vector, :func:`bitnet.nn.attention.quantize_kv`); keys and values are rounded when
            written, the attention math stays float32. Needs a model whose ``new_caches`` takes ``dtype=``.

    Attributes:
        positions: per row, how many of its tokens are in the caches (where its next token goes).
    """

    def __init__(self, model: nn.Module, rows: int = 1, max_len: int | None = None, *, static: bool = False,
                 kv_dtype=None):
        self.rows = _check_count("rows", rows, 1)
        self.kv_dtype = parse_kv_dtype(kv_dtype)
        # the caches' dtype, for every cache the decoder makes (prefill_rows' scratch ones too)
        self._cache_args = {} if self.kv_dtype is None else {"dtype": self.kv_dtype}
        max_seq_len = int(model.max_seq_len)
        self.max_len = _check_count("max_len", max_seq_len if max_len is None else max_len, 1, max_seq_len)
        self.model = model.eval()
        self.device = model_device(model)
        self.caches = model.new_caches(rows, self.max_len, static=static, **self._cache_args)
        self.positions = [0] * rows
        self._last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        self._ragged = accepts_argument(model, "logits_at") and not static   # prefill_rows in one forward
        # thread policy: one torch thread beside the native kernels' own pool (None: leave torch alone)
        self.torch_threads = 1 if native_decode(model) else None
        self._row_caches: dict[int, list] = {}
        self._prefix_caches: dict[int, list] = {}

    # ---------------------------------------------------------------- state

    def reset(self, row: int | None = None) -> None:
        """Forget row ``row`` (all rows for None): its next prefill starts at position 0."""
        if row is None:
            self.positions = [0] * self.rows
        else:
            self.positions[self._check_row(row)] = 0

    def room(self, row: int) -> int:
        """Tokens row ``row`` can still take before its caches are full."""
        return self.max_len - self.positions[self._check_row(row)]

    def _check_row(self, row) -> int:
        return _check_count("row", row, 0, self.rows - 1)

    def _row_view(self, row: int) -> list:
        """Caches of batch 1 sharing row ``row``'s storage (the whole caches when there is one row)."""
        if self.rows == 1:
            return self.caches
        if row not in self._row_caches:
            self._row_caches[row] = [c.row(row) for c in self.caches]
        return self._row_caches[row]

    def _prefix_view(self, n: int) -> list:
        """Caches of batch ``n`` sharing rows ``0..n-1`` of the caches."""
        if n == self.rows:
            return self.caches
        if n not in self._prefix_caches:
            self._prefix_caches[n] = self._block_view(0, n)
        return self._prefix_caches[n]

    def _block_view(self, first: int, n: int) -> list:
        """Caches of batch ``n`` sharing rows ``first..first+n-1`` of the caches (contiguous: one slice)."""
        end = first + n
        return [c.rows(first, end) for c in self.caches]

    # ---------------------------------------------------------------- model calls

    def _tokens(self, tokens) -> torch.Tensor:
        """(T,) int64 on the model's device from a list / 1-D or (1, T) tensor."""
        if isinstance(tokens, torch.Tensor):
            t = tokens.reshape(-1) if tokens.dim() == 2 and tokens.shape[0] == 1 else tokens
            if t.dim() != 1:
                raise ValueError(f"tokens must be one sequence, shape (T,) or (1, T); got {tuple(tokens.shape)}")
            return t.to(device=self.device, dtype=torch.int64)
        return torch.tensor(list(tokens), dtype=torch.int64, device=self.device)

    def prefill(self, tokens: Sequence[int] | torch.Tensor, row: int = 0) -> torch.Tensor:
        """Append ``tokens`` (T >= 1) to row ``row`` in one forward; returns the logits after the last (vocab,).

        The row continues from :attr:`positions` (0 after :meth:`reset`): a prompt can be fed in pieces.
        """
        row = self._check_row(row)
        ids = self._tokens(tokens)
        start, n = self.positions[row], ids.numel()
        if n == 0:
            raise ValueError("tokens is empty: prefill needs at least one token")
        if start + n > self.max_len:
            raise ValueError(f"row {row} holds {start} tokens; {n} more exceed max_len={self.max_len}")
        with torch.inference_mode(), torch_threads(self.torch_threads):
            logits = self.model(ids[None], caches=self._row_view(row), start_pos=start, **self._last_only)
        self.positions[row] = start + n
        return logits[0, -1]

    def prefill_rows(self, prompts: Sequence[Sequence[int]], rows: Sequence[int]) -> torch.Tensor:
        """Start ``rows`` afresh with ``prompts`` (one each, any lengths >= 1) in ONE forward; returns the
        logits after each prompt (len(rows), vocab), in the order of ``rows``.

        The prompts are right-padded to the longest (causal attention: no real token sees the padding); the
        padding's entries lie past each row's position, where its next tokens overwrite them. Rows listed
        in increasing order without gaps (``rows == [r, r+1, ...]``) are written in place, through a view of
        the caches; other rows get their keys/values through a scratch cache, copied into them one slice per
        run of consecutive rows (the same values either way). One forward over all prompts reads the weights
        once for all of them instead of once per prompt. Models without ``logits_at`` prefill row by row.
        """
        rows = [self._check_row(r) for r in rows]
        prompts = [[int(t) for t in p] for p in prompts]
        if len(prompts) != len(rows) or len(set(rows)) != len(rows):
            raise ValueError(f"prefill_rows needs one prompt per distinct row: got {len(prompts)} prompts for rows {rows}")
        lengths = [len(p) for p in prompts]
        if lengths and (min(lengths) == 0 or max(lengths) > self.max_len):
            raise ValueError(f"each prompt must hold 1..{self.max_len} tokens (max_len), got lengths {lengths}")
        if len(rows) == 1 or not self._ragged:
            out = []
            for p, r in zip(prompts, rows):
                self.reset(r)
                out.append(self.prefill(p, row=r))
            return torch.stack(out)
        g, t = len(rows), max(lengths)
        ids = torch.zeros(g, t, dtype=torch.int64)                                            # (G, T) padded
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.int64)
        last = torch.tensor(lengths, dtype=torch.int64) - 1                                   # (G,)
        in_place = rows == list(range(rows[0], rows[0] + g))
        # rows r..r+G-1 of the caches themselves, or a scratch cache: (G, Hkv, T or max_len, hd) each
        caches = self._block_view(rows[0], g) if in_place else self.model.new_caches(g, t, **self._cache_args)
        with torch.inference_mode(), torch_threads(self.torch_threads):
            logits = self.model(ids.to(self.device), caches=caches, start_pos=0,
                                logits_at=last.to(self.device))[:, 0]                         # (G, vocab)
            if not in_place:
                for i, j in _runs(rows):           # scratch rows i..j-1 -> cache rows rows[i]..rows[i]+j-i-1
                    a, b = rows[i], rows[i] + j - i
                    for c, s in zip(self.caches, caches):                                     # (G, Hkv, T, hd)
                        c.copy_rows_(a, s, i, b - a, t)
        for r, n in zip(rows, lengths):
            self.positions[r] = n
        return logits

    def prefill_all(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prompts of equal length for every row, ``tokens`` (rows, T), from position 0 in one forward;
        returns the last logits (rows, vocab)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != self.rows:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a tensor of shape ({self.rows}, T), got {shape}")
        if not 1 <= tokens.shape[1] <= self.max_len:
            raise ValueError(f"prompts of {tokens.shape[1]} tokens do not fit max_len={self.max_len}")
        with torch.inference_mode(), torch_threads(self.torch_threads):
            logits = self.model(tokens.to(self.device), caches=self.caches, start_pos=0, **self._last_only)
        self.positions = [int(tokens.shape[1])] * self.rows
        return logits[:, -1]

    def forward_rows(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The step's forward, without bookkeeping: ``tokens`` (rows, 1) at ``positions`` (rows,) over all
        rows -> logits (rows, vocab). What :class:`CapturedDecoder` compiles."""
        return self.model(tokens, caches=self.caches, start_pos=positions)[:, -1]

    def step(self, tokens: Sequence[int], rows: Sequence[int] | None = None) -> torch.Tensor:
        """Feed one token to each of ``rows`` (default ``0..len(tokens)-1``) at its position, in one forward.

        Returns logits (len(rows), vocab), in the order of ``rows``. Rows not listed but below the highest
        listed one ride along with a dummy token written at their own next position (overwritten by their
        next real token, so their state is unchanged).
        """
        tokens = [int(t) for t in tokens]
        rows = list(range(len(tokens))) if rows is None else [self._check_row(r) for r in rows]
        if len(rows) != len(tokens) or not rows:
            raise ValueError(f"step needs one token per row: got {len(tokens)} tokens for {len(rows)} rows")
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows must be distinct, got {rows}")
        for r in rows:
            if self.positions[r] >= self.max_len:
                raise ValueError(f"row {r} is full (max_len={self.max_len})")
        n = max(rows) + 1                                  # rows 0..n-1 run; the others stay untouched
        feed = [0] * n
        pos = [min(p, self.max_len - 1) for p in self.positions[:n]]
        for r, t in zip(rows, tokens):
            feed[r] = t
        with torch.inference_mode(), torch_threads(self.torch_threads):
            ids = torch.tensor(feed, dtype=torch.int64, device=self.device)[:, None]          # (n, 1)
            if n == 1:
                logits = self.model(ids, caches=self._prefix_view(1), start_pos=pos[0])[:, -1]
            else:
                at = torch.tensor(pos, dtype=torch.int64, device=self.device)                 # (n,)
                logits = self.model(ids, caches=self._prefix_view(n), start_pos=at)[:, -1]   # (n, vocab)
        for r in rows:
            self.positions[r] += 1
        return logits if rows == list(range(n)) else logits[rows]


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive values in ``rows``, as index ranges [i, j): rows[i..j-1] = r, r+1, ..."""
    runs, i = [], 0
    for j in range(1, len(rows) + 1):
        if j == len(rows) or rows[j] != rows[j - 1] + 1:
            runs.append((i, j))
            i = j
    return runs


__all__ = ["Decoder", "accepts_logits_to_keep", "model_device"]
