"""Train a byte-level BPE tokenizer offline with ``tokenizers`` and save it for ``AutoTokenizer``."""

from __future__ import annotations

import os
from typing import Iterable

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def _texts(corpus, chunk_chars: int = 1 << 16) -> Iterable[str]:
    """Strings from a str (split into chunks), a path, or an iterable of strings / paths."""
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else corpus
    for item in items:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and len(item) < 4096 and os.path.isfile(item)):
            with open(item, encoding="utf-8", errors="replace") as f:
                while chunk := f.read(chunk_chars):
                    yield chunk
        else:
            for i in range(0, len(item), chunk_chars):
                yield item[i:i + chunk_chars]


def train_bpe_tokenizer(corpus, vocab_size: int = 8192, save_dir: str | os.PathLike | None = None,
                        min_frequency: int = 2, special_tokens=SPECIAL_TOKENS, model_max_length: int = 2048):
    """Train a byte-level BPE (GPT-2 style: every byte is a base token, nothing is unknown).

    Args:
        corpus: a text, a file path, or an iterable of texts / file paths.
        vocab_size: final vocabulary size including the 256 byte tokens and ``special_tokens``.
        save_dir: when given, ``save_pretrained`` there (next to a model's config.json) so that
            ``AutoTokenizer.from_pretrained(save_dir)`` loads it.
        special_tokens: the first is used as BOS/EOS (``<|endoftext|>``), the second as PAD.
    Returns:
        a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be an integer >= {256 + len(special_tokens)} (256 bytes + special tokens), "
                         f"got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_texts(corpus), trainer)
    eos = special_tokens[0] if special_tokens else None
    pad = special_tokens[1] if len(special_tokens) > 1 else eos
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=pad,
                                   unk_token=None, model_max_length=model_max_length)
    if save_dir is not None:
        fast.save_pretrained(os.fspath(save_dir))
    return fast


__all__ = ["SPECIAL_TOKENS", "train_bpe_tokenizer"]
