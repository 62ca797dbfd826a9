"""Hugging Face integration: BitLlama (Auto classes, Trainer, generate), the official BitNet layout.

``import bitnet.hf`` imports transformers and registers BitLlama with its Auto classes (``AutoConfig``
for ``model_type`` "bitllama", ``AutoModelForCausalLM``; :mod:`.auto`), so that
``AutoModelForCausalLM.from_pretrained(folder)`` of a saved BitLlama works. ``import bitnet`` does not
import this package (transformers is optional): the Hugging Face names of ``bitnet``
(``bitnet.BitLlamaForCausalLM``, ...) import it when first used. The names below whose modules need
more of transformers (the official layout, Trainer callbacks, the tokenizer trainer) resolve lazily
(PEP 562).
"""

from __future__ import annotations

import importlib

try:
    import transformers  # noqa: F401
except ImportError as e:                       # the hf extra is not installed
    raise ImportError(f"bitnet.hf needs transformers ({e}): pip install \".[hf]\" (from a clone)") from e

from .auto import register_auto_classes
from .bitllama import BitLlamaForCausalLM
from .configuration_bitllama import BitLlamaConfig

register_auto_classes()

install = register_auto_classes
"""The former name of :func:`register_auto_classes` (kept: ``bitnet.hf.install()`` still works)."""

LAZY_EXPORTS = {
    "BitLlamaConfig": ".configuration_bitllama",
    "BitLlamaForCausalLM": ".bitllama",
    "BitNetForCausalLM": ".bitnet_official",
    "to_bitnet_transformer": ".bitnet_official",
    "QuantWarmupCallback": ".callbacks",
    "train_bpe_tokenizer": ".tokenizer",
}
"""The public names of this package and the module of each (``bitnet`` re-exports them on first use)."""


def __getattr__(name):
    if name in LAZY_EXPORTS:
        return getattr(importlib.import_module(LAZY_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(LAZY_EXPORTS))


__all__ = ["LAZY_EXPORTS", "install", "register_auto_classes", *LAZY_EXPORTS]
