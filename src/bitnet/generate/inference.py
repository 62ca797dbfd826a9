"""``BitNetInference``: load a checkpoint, generate text from a prompt (the tutorial-style entry point).

    inf = BitNetInference()                  # device=None: cuda, else mps, else cpu
    inf.load_model("runs/kjv")               # run folder, .safetensors or a state-dict .pth
    print(inf.generate("The dog jumped over the ", 512))   # continuation text only
    for piece in inf.stream("In the beginning", 200):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from ..io import read_tokenizer, resolve_device
from ..tokenizer import ByteTokenizer
from .loop import stream_generate


class BitNetInference:
    """Text in, text out, around a BitNetTransformer and a tokenizer.

    Args:
        model: an already built model (optional; else call :meth:`load_model`).
        tokenizer: object with ``encode``/``decode``/``vocab_size`` (default: the checkpoint's
            tokenizer, else :class:`~bitnet.tokenizer.ByteTokenizer`).
        device: ``None``/``"auto"`` (cuda, mps, cpu), or an explicit device.
        pack: convert BitLinear layers to the packed 2-bit inference form with ``bitnet.pack`` after
            loading. Raises RuntimeError if this installation has no ``bitnet.pack``.
        temperature, top_k, top_p, repetition_penalty: default sampling settings of
            :meth:`generate` / :meth:`stream` (each call may override them).
        context_overflow: ``"shift"`` (default: a sliding window lets the text outgrow the model's
            ``max_seq_len``) or ``"stop"`` (end at ``max_seq_len``); see
            :data:`bitnet.generate.loop.CONTEXT_OVERFLOW`. Per call overridable too.
    """

    def __init__(self, model: nn.Module | None = None, tokenizer=None, device=None, pack: bool = False,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = 0.95,
                 repetition_penalty: float = 1.0, context_overflow: str = "shift"):
        self.device = resolve_device(device)
        self.tokenizer = tokenizer
        self.pack = pack
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, context_overflow=context_overflow)
        self.finish_reason: str | None = None
        self._model = None
        if model is not None:
            self._set_model(model, pack)

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
        """Load a checkpoint (see :func:`bitnet.io.load_model`; ``kwargs`` go there) and its tokenizer."""
        from ..io import load_model

        model = load_model(path, device=self.device, **kwargs)
        if self.tokenizer is None:
            try:
                self.tokenizer = read_tokenizer(path)
            except FileNotFoundError:
                self.tokenizer = ByteTokenizer()
        self._set_model(model, self.pack if pack is None else pack)
        return self

    def _ids(self, prompt) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt must be a non-empty string")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("prompt encodes to no tokens")
        return ids

    def stream(self, prompt: str, max_new_tokens: int = 256, *, stop: Iterable[int] | None = None,
               seed: int | None = None, **sampling) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece (complete characters only).

        ``stop`` is a list of token ids (default: the tokenizer's ``eos_id`` if it has one).
        ``self.finish_reason`` is set when the iterator is exhausted.
        """
        ids = self._ids(prompt)
        settings = {**self.sampling, **sampling}
        if stop is None:
            eos = getattr(self.tokenizer, "eos_id", None)
            stop = () if eos is None else (eos,)
        tokens = stream_generate(self.model, ids, max_new_tokens, stop_tokens=stop, seed=seed, **settings)
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        self.finish_reason = None
        for tok in tokens:
            piece = decoder.feed(tok)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
        self.finish_reason = tokens.finish_reason

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
