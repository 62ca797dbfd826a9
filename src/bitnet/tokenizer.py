"""Tokenizers with one small interface: ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``.

:class:`ByteTokenizer` is the default of this package: token id = UTF-8 byte value (0..255), plus
optional special tokens (``"<eos>"``, ...) numbered from 256. It needs no files and round-trips any
text exactly. :class:`HFTokenizer` wraps a Hugging Face tokenizer behind the same interface.
``tokenizer_from_config`` / ``tokenizer.to_config()`` store the choice in a checkpoint's config.json.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch


def _as_id_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise ValueError(f"ids must be one sequence (1-D), got shape {tuple(ids.shape)}")
        return [int(i) for i in ids.tolist()]
    return [int(i) for i in ids]


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are UTF-8 bytes, ids 256.. are ``special_tokens`` in order.

    Args:
        special_tokens: strings such as ``("<eos>",)``; they get ids 256, 257, ... . ``encode`` never
            produces them from text (a literal ``"<eos>"`` in text is encoded as its bytes); add them
            with ``add_eos=True`` or by id.

    ``decode`` maps invalid UTF-8 (e.g. a sequence cut inside a multi-byte character) to U+FFFD
    (``errors="replace"``); special tokens are rendered as their string unless
    ``skip_special_tokens=True``.
    """

    kind = "bytes"

    def __init__(self, special_tokens: Sequence[str] = ()):
        special_tokens = tuple(special_tokens)
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens must be distinct, got {special_tokens!r}")
        for tok in special_tokens:
            if not isinstance(tok, str) or not tok:
                raise ValueError(f"special_tokens must be non-empty strings, got {tok!r}")
        self.special_tokens = special_tokens
        self.special_ids = {tok: 256 + i for i, tok in enumerate(special_tokens)}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    @property
    def eos_id(self) -> int | None:
        """Id of ``"<eos>"`` when it is one of the special tokens, else None."""
        return self.special_ids.get("<eos>")

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` as ids (plus the ``<eos>`` id when ``add_eos``)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos=True needs '<eos>' among special_tokens")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD. Raises ValueError for ids outside the vocabulary."""
        out: list[str] = []
        buf = bytearray()
        for i in _as_id_list(ids):
            if 0 <= i < 256:
                buf.append(i)
                continue
            if not 256 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size - 1}]")
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if not skip_special_tokens:
                out.append(self.special_tokens[i - 256])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """Incremental decoder for streaming: feeds ids one at a time, emits complete characters only."""
        return StreamDecoder(self, skip_special_tokens)

    def to_config(self) -> dict:
        return {"type": self.kind, "special_tokens": list(self.special_tokens)}

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens!r})"


class StreamDecoder:
    """Turns a stream of token ids into text pieces without splitting multi-byte UTF-8 characters."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._emitted = ""

    def feed(self, token_id: int) -> str:
        """Text that became complete with ``token_id`` (often ``""`` in the middle of a character)."""
        token_id = int(token_id)
        if isinstance(self.tokenizer, ByteTokenizer):
            if 0 <= token_id < 256:
                return self._utf8.decode(bytes([token_id]))
            flushed = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            return flushed + self.tokenizer.decode([token_id], self.skip_special_tokens)
        # generic tokenizer: decode the growing sequence and emit the new suffix once it is stable
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        piece, self._emitted = text[len(self._emitted):], text
        return piece

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        piece, self._emitted = text[len(self._emitted):], text
        return piece


class HFTokenizer:
    """A Hugging Face tokenizer (``transformers.AutoTokenizer``) behind the ByteTokenizer interface.

    ``HFTokenizer("gpt2")`` loads by name or path; ``HFTokenizer(tok)`` wraps an existing object.
    """

    kind = "hf"

    def __init__(self, name_or_tokenizer):
        if isinstance(name_or_tokenizer, str):
            from transformers import AutoTokenizer

            self.name = name_or_tokenizer
            self.hf = AutoTokenizer.from_pretrained(name_or_tokenizer)
        else:
            self.hf = name_or_tokenizer
            self.name = getattr(name_or_tokenizer, "name_or_path", None)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = list(self.hf.encode(text, add_special_tokens=False))
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos=True but this tokenizer has no eos token")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def to_config(self) -> dict:
        if not self.name:
            raise ValueError("this Hugging Face tokenizer has no name_or_path to store in a checkpoint")
        return {"type": self.kind, "name": self.name}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def tokenizer_from_config(cfg: dict | None, source=None):
    """Rebuild the tokenizer stored by ``to_config()``; None gives the plain ByteTokenizer.

    ``source`` (the config.json the dict came from) is named in errors, and a relative Hugging Face
    tokenizer ``name`` is looked up in its folder first, then in the working directory. A name that is
    no folder is loaded from the Hugging Face cache only: reading a checkpoint never goes online.
    Errors are ValueErrors naming the file and the field (``tokenizer.<field>``)."""
    where = f"{source}: " if source is not None else ""
    if cfg is None or (isinstance(cfg, dict) and not cfg):
        return ByteTokenizer()
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}tokenizer must be a JSON object, got {type(cfg).__name__}")
    kind = cfg.get("type")
    if kind == "bytes":
        special = cfg.get("special_tokens", [])
        if not isinstance(special, (list, tuple)) or not all(isinstance(t, str) and t for t in special) \
                or len(set(special)) != len(special):
            raise ValueError(f"{where}tokenizer.special_tokens must be a list of distinct non-empty strings, "
                             f"got {special!r}"[:300])
        return ByteTokenizer(special)
    if kind == "hf":
        name = cfg.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}tokenizer.name must be a folder with Hugging Face tokenizer files, got {name!r}")
        return _hf_tokenizer_from_config(name, source, where)
    raise ValueError(f"{where}tokenizer.type must be 'bytes' or 'hf', got {kind!r}"[:300])


def _hf_tokenizer_from_config(name: str, source, where: str) -> "HFTokenizer":
    candidates = [Path(name)]
    if source is not None and not Path(name).is_absolute():
        candidates.insert(0, Path(source).parent / name)
    folder = next((c for c in candidates if c.is_dir()), None)
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ValueError(f"{where}tokenizer.type 'hf' needs transformers: pip install transformers") from e
    try:
        if folder is not None:
            hf = AutoTokenizer.from_pretrained(os.fspath(folder))
        else:
            hf = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:  # OSError (no such tokenizer), ValueError / JSON errors (damaged files), ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        what = (f"the folder {folder} holds no readable tokenizer" if folder is not None else
                f"{name!r} is not a folder (looked in {', '.join(map(str, candidates))}) nor a cached Hugging Face "
                "tokenizer")
        raise ValueError(f"{where}tokenizer.name: {what} ({type(e).__name__}: {first})") from e
    tok = HFTokenizer(hf)
    tok.name = name
    return tok
