"""Autoregressive decoding with the model's KV cache: prefill the prompt once, then one position per token.

Works with any model that has ``max_seq_len``, ``new_caches(batch, max_len)`` and
``forward(tokens, caches=None, start_pos=0) -> logits (B, T, vocab)`` — BitNetTransformer and its
packed inference form.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .decoder import Decoder, accepts_logits_to_keep, model_device  # noqa: F401  (re-exported)
from ..runtime import native_decode, torch_threads
from .sampling import NonFiniteLogitsError, check_sampling_args, check_seed, sample_next_token

FINISH_REASONS = ("length", "stop", "max_seq_len")
"""``length``: max_new_tokens reached; ``stop``: a stop token was sampled (not returned);
``max_seq_len``: prompt + generated tokens filled the model's context."""

CONTEXT_OVERFLOW = ("stop", "shift")
"""What happens when prompt + output reach ``model.max_seq_len``: ``"stop"`` ends generation
(finish_reason ``max_seq_len``); ``"shift"`` keeps going on a sliding window: the last
``max_seq_len // 2`` tokens are re-encoded at positions 0.. into fresh caches (llama.cpp's context
shift), so text can be longer than the context the model was trained on."""


def _prompt_tensor(prompt_ids, num_tokens: int | None, device) -> torch.Tensor:
    if isinstance(prompt_ids, torch.Tensor):
        ids = prompt_ids.detach()
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"prompt_ids must be one sequence, shape (T,) or (1, T); got {tuple(prompt_ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must hold integer token ids, got dtype {ids.dtype}")
        ids = ids.to(torch.int64)
    else:
        ids = list(prompt_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("prompt_ids must be a sequence of int token ids")
        ids = torch.tensor(ids, dtype=torch.int64)
    if ids.numel() == 0:
        raise ValueError("prompt_ids is empty: the prompt must contain at least one token")
    if num_tokens is not None and (int(ids.min()) < 0 or int(ids.max()) >= num_tokens):
        raise ValueError(
            f"prompt_ids must lie in [0, {num_tokens - 1}] (the model's vocabulary); "
            f"got min {int(ids.min())}, max {int(ids.max())}"
        )
    return ids.to(device)


class TokenStream:
    """Iterator over generated token ids (ints). After it is exhausted, ``finish_reason`` is one of
    :data:`FINISH_REASONS` and ``tokens`` holds every id it yielded."""

    def __init__(self, gen: Iterator[int]):
        self._gen = gen
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> int:
        try:
            tok = next(self._gen)
        except StopIteration as stop:
            self.finish_reason = stop.value
            raise
        self.tokens.append(tok)
        return tok


def stream_generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    context_overflow: str = "stop",
) -> TokenStream:
    """Lazily generate up to ``max_new_tokens`` ids after ``prompt_ids`` (one sequence); see :func:`generate`."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    if context_overflow not in CONTEXT_OVERFLOW:
        raise ValueError(f"context_overflow must be one of {CONTEXT_OVERFLOW}, got {context_overflow!r}")
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    check_seed(seed)
    device = model_device(model)
    max_seq_len = int(getattr(model, "max_seq_len"))
    prompt = _prompt_tensor(prompt_ids, getattr(model, "num_tokens", None), device)
    shift = context_overflow == "shift"
    if prompt.numel() >= max_seq_len and not shift:
        raise ValueError(
            f"prompt_ids has {prompt.numel()} tokens, leaving no room to generate within "
            f"max_seq_len={max_seq_len}; shorten the prompt or pass context_overflow='shift'"
        )
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    stops = {int(t) for t in stop_tokens}

    n_prompt = prompt.numel()
    budget = max_new_tokens if shift else min(max_new_tokens, max_seq_len - n_prompt)
    keep = max(1, max_seq_len // 2)                     # tokens kept in the window after a shift
    seq = torch.empty(n_prompt + budget, dtype=torch.int64, device=device)       # prompt + generated
    seq[:n_prompt] = prompt
    state = {"start": 0, "decoder": None}              # window start in seq; the Decoder, once made

    def decoder() -> Decoder:
        if state["decoder"] is None:                    # sized for the whole run: a shift reuses it
            state["decoder"] = Decoder(model, 1, min(max_seq_len, n_prompt + budget - state["start"]))
        return state["decoder"]

    # Each model call runs in its own inference_mode block: a block spanning a ``yield`` would leave
    # grad mode switched off in the caller's code between tokens.
    @torch.inference_mode()
    def next_token(pos: int) -> int:
        """Sample the token at ``pos`` given seq[:pos]; the model sees the window seq[start:pos]."""
        if pos - state["start"] > max_seq_len:          # window full: keep the last ``keep`` tokens
            state["start"] = pos - keep
            decoder().reset()
        start = state["start"]
        if not use_cache:
            with torch_threads(1 if native_decode(model) else None):      # the Decoder's thread policy
                logits = model(seq[None, start:pos])[0, -1]
        else:
            dec = decoder()
            filled = dec.positions[0]                   # seq[start:start+filled] are in the caches
            if pos - start - filled == 1:
                logits = dec.step([int(seq[pos - 1])])[0]
            else:                                       # prefill: the prompt, or the shifted window
                logits = dec.prefill(seq[start + filled:pos])
        try:
            tok = sample_next_token(logits[None], temperature, top_k, top_p, repetition_penalty,
                                    previous=seq[None, :pos], generator=generator)     # logits (1, vocab)
        except NonFiniteLogitsError as e:
            raise NonFiniteLogitsError(f"generating token {pos - n_prompt + 1} (position {pos}): {e}") from None
        return int(tok)

    def run() -> Iterator[int]:
        if budget == 0:
            return "length" if max_new_tokens == 0 else "max_seq_len"
        if n_prompt > max_seq_len:                      # shift mode: start from the prompt's tail
            state["start"] = n_prompt - keep
        for i in range(budget):
            pos = n_prompt + i
            tok_id = next_token(pos)
            if tok_id in stops:
                return "stop"
            seq[pos] = tok_id
            yield tok_id
        return "length" if budget == max_new_tokens else "max_seq_len"

    return TokenStream(run())


def generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int], None] | None = None,
    use_cache: bool = True,
    context_overflow: str = "stop",
) -> list[int]:
    """Generate token ids after ``prompt_ids`` and return only the new ones (prompt not included).

    Args:
        model: a BitNetTransformer-like model (put it in ``eval()`` mode).
        prompt_ids: one non-empty sequence of ids: list, (T,) or (1, T) tensor.
        max_new_tokens: upper bound on generated ids. Generation also stops when prompt + output fills
            ``model.max_seq_len`` or when a ``stop_tokens`` id is sampled (that id is not returned).
        temperature: 0 = greedy (argmax), else logits / temperature before sampling.
        top_k, top_p, repetition_penalty: see :mod:`bitnet.generate.sampling`.
        seed / generator: reproducible draws (a seed builds a ``torch.Generator`` on the model's device).
        callback: called with each new id as soon as it is sampled (streaming).
        use_cache: prefill + KV cache (default); False recomputes the whole window every step.
        context_overflow: ``"stop"`` (default) or ``"shift"`` (sliding window), see :data:`CONTEXT_OVERFLOW`.
    """
    stream = stream_generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, repetition_penalty=repetition_penalty, stop_tokens=stop_tokens,
                             seed=seed, generator=generator, use_cache=use_cache,
                             context_overflow=context_overflow)
    for tok in stream:
        if callback is not None:
            callback(tok)
    return stream.tokens
