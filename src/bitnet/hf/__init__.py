"""Hugging Face integration: BitLlama (Auto classes, Trainer, generate), the official BitNet layout.

Nothing here imports ``transformers`` until a class is first used, so ``import bitnet`` does not
require it; the names below resolve lazily (PEP 562).
"""

from __future__ import annotations

import importlib

from ._register import flush, install

LAZY_EXPORTS = {
    "BitLlamaConfig": ".configuration_bitllama",
    "BitLlamaForCausalLM": ".bitllama",
    "BitNetForCausalLM": ".bitnet_official",
    "to_bitnet_transformer": ".bitnet_official",
    "QuantWarmupCallback": ".callbacks",
    "train_bpe_tokenizer": ".tokenizer",
}


def __getattr__(name):
    if name in LAZY_EXPORTS:
        value = getattr(importlib.import_module(LAZY_EXPORTS[name], __name__), name)
        flush()                               # Auto-class registration deferred during that import
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(LAZY_EXPORTS))


__all__ = ["LAZY_EXPORTS", "install", *LAZY_EXPORTS]
