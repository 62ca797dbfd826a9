"""``BitNetInference``: load a checkpoint, generate text from a prompt (the tutorial-style entry point).

    inf = BitNetInference()                  # device=None: cuda, else mps, else cpu
    inf.load_model("runs/kjv")               # anything bitnet.load accepts (run folder, HF folder, hub id, .gguf)
    print(inf.generate("The dog jumped over the ", 512))   # continuation text only
    for piece in inf.stream("In the beginning", 200):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

import torch
from torch import nn

from ..tokenizer import ByteTokenizer
from .loop import stream_generate


DEFAULT_SAMPLING = dict(temperature=0.8, top_k=None, top_p=0.95, repetition_penalty=1.0)
"""Sampling defaults when neither the caller nor the checkpoint's generation_config.json set a value."""


class BitNetInference:
    """Text in, text out, around a BitNetTransformer and a tokenizer.

    Args:
        model: an already built model (optional; else call :meth:`load_model`).
        tokenizer: object with ``encode``/``decode``/``vocab_size`` (default: the checkpoint's
            tokenizer, else :class:`~bitnet.tokenizer.ByteTokenizer`).
        device: ``None``/``"auto"`` (cuda, mps, cpu), or an explicit device; one whose backend this
            torch lacks is a ValueError.
        pack: convert BitLinear layers to the packed 2-bit inference form (int8 head; default False:
            keep fp weights). ``None``: :meth:`load_model` packs on the CPU only, as the ``bitnet``
            commands do (see :func:`bitnet.load`); a ``model`` passed in is then left as it is.
            Official BitNet and GGUF checkpoints are ternary and always load packed.
        temperature, top_k, top_p, repetition_penalty: default sampling settings of
            :meth:`generate` / :meth:`stream` (each call may override them). ``None``: the checkpoint's
            ``generation_config.json``, else :data:`DEFAULT_SAMPLING`.
        context_overflow: ``"shift"`` (default: a sliding window lets the text outgrow the model's
            ``max_seq_len``) or ``"stop"`` (end at ``max_seq_len``); see
            :data:`bitnet.generate.loop.CONTEXT_OVERFLOW`. Per call overridable too.

    After :meth:`load_model`, ``self.loaded`` is the :class:`bitnet.loading.LoadedModel` (chat template,
    stop ids, generation defaults, context length, display name).
    """

    def __init__(self, model: nn.Module | None = None, tokenizer=None, device=None, pack: bool | None = False,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, context_overflow: str = "shift"):
        from ..loading import check_device

        self.device = check_device(device)
        self.tokenizer = tokenizer
        self.pack = pack
        self._asked = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        self.context_overflow = context_overflow
        self.sampling = self._sampling({})
        self.finish_reason: str | None = None
        self.stats: dict = {}
        self.loaded = None
        self.stop_ids: tuple[int, ...] | None = None
        self._model = None
        if model is not None:
            self._set_model(model, bool(pack))

    def _sampling(self, checkpoint: dict) -> dict:
        out = {k: (v if v is not None else checkpoint.get(k, DEFAULT_SAMPLING[k])) for k, v in self._asked.items()}
        return {**out, "context_overflow": self.context_overflow}

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("no model loaded: call BitNetInference.load_model(path) first")
        return self._model

    def _set_model(self, model: nn.Module, pack: bool) -> None:
        model = model.to(self.device).eval()
        if pack:
            import bitnet

            pack_fn = getattr(bitnet, "pack", None)
            if pack_fn is None:
                raise RuntimeError("pack=True needs bitnet.pack, which this installation of bitnet does not provide")
            packed = pack_fn(model)
            model = packed if packed is not None else model
        self._model = model
        if self.tokenizer is None:
            self.tokenizer = ByteTokenizer()

    def load_model(self, path, pack: bool | None = None, **kwargs) -> "BitNetInference":
        """Load any MODEL :func:`bitnet.load` accepts (``kwargs`` go there) with its tokenizer, stop ids and
        generation defaults."""
        from ..loading import load

        pack = self.pack if pack is None else pack
        loaded = load(path, device=self.device, pack=pack, **kwargs)
        self.loaded = loaded
        if self.tokenizer is None:
            self.tokenizer = loaded.require_tokenizer()
        self.stop_ids = loaded.stop_ids
        self.sampling = self._sampling(loaded.generation)
        self._model = loaded.model
        return self

    def _ids(self, prompt, special_tokens: bool = True) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt must be a non-empty string")
        encode = getattr(self.tokenizer, "encode_prompt", None) if special_tokens else None
        ids = encode(prompt) if encode is not None else self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("prompt encodes to no tokens")
        return ids

    def default_stop(self) -> tuple[int, ...]:
        """Stop ids used when a call gives none: the checkpoint's (eos and end-of-turn), else the
        tokenizer's ``eos_id``."""
        from ..loading import stop_token_ids

        return tuple(self.stop_ids) if self.stop_ids else stop_token_ids(self.tokenizer)

    def stream(self, prompt: str, max_new_tokens: int = 256, *, stop: Iterable[int] | None = None,
               seed: int | None = None, special_tokens: bool = True, **sampling) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece (complete characters only).

        ``stop`` is a list of token ids (default :meth:`default_stop`). ``special_tokens=False`` encodes
        the prompt as it is (a rendered chat template carries its own BOS); by default a plain prompt
        gets what the tokenizer adds to one (Llama 3's ``<|begin_of_text|>``). ``self.finish_reason`` is
        set when the iterator is exhausted, and ``self.stats`` to ``{"prompt_tokens", "new_tokens",
        "ttft_s" (prompt in -> first new token), "decode_tok_s" (tokens after the first per second)}``.
        """
        ids = self._ids(prompt, special_tokens)
        settings = {**self.sampling, **sampling}
        stop = self.default_stop() if stop is None else stop
        start = time.perf_counter()
        tokens = stream_generate(self.model, ids, max_new_tokens, stop_tokens=stop, seed=seed, **settings)
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        self.finish_reason = None
        stamps: list[float] = []
        self.stats = {"prompt_tokens": len(ids), "new_tokens": 0, "ttft_s": None, "decode_tok_s": None}
        for tok in tokens:
            stamps.append(time.perf_counter())
            piece = decoder.feed(tok)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
        self.finish_reason = tokens.finish_reason
        if stamps:
            decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
            self.stats.update(new_tokens=len(stamps), ttft_s=stamps[0] - start, decode_tok_s=decode)

    def generate(self, prompt: str, max_new_tokens: int = 256, *, include_prompt: bool = False,
                 stop: Iterable[int] | None = None, seed: int | None = None, **sampling) -> str:
        """The generated continuation of ``prompt`` as text (``include_prompt=True`` prepends the prompt).

        ``max_new_tokens`` (the second positional argument, as ``generate("The dog ...", 512)`` of the
        older package) bounds the number of new tokens — bytes for the byte tokenizer; generation also
        ends at a stop token, or at the model's ``max_seq_len`` with ``context_overflow="stop"``
        (see ``self.finish_reason``). Keywords: ``temperature`` (0 = greedy), ``top_k``, ``top_p``,
        ``repetition_penalty``, ``context_overflow``.
        """
        text = "".join(self.stream(prompt, max_new_tokens, stop=stop, seed=seed, **sampling))
        return prompt + text if include_prompt else text

    @torch.no_grad()
    def perplexity(self, text: str) -> float:
        """exp(mean next-token loss) of ``text`` under the model (needs at least 2 tokens)."""
        ids = torch.tensor(self._ids(text)[: self.model.max_seq_len + 1], device=self.device)
        if ids.numel() < 2:
            raise ValueError("text must encode to at least 2 tokens")
        logits = self.model(ids[None, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0].float(), ids[1:])
        return float(loss.exp())
