"""Modules: BitLinear (training form), norms, feed-forward, attention with KV cache, rotary."""

from .attention import BitMGQA, KVCache
from .bitlinear import BitLinear, set_quant_strength
from .feedforward import BitFeedForward
from .int8_linear import Int8Linear
from .layers import WEIGHTS_CHOICES, check_weights, make_linear
from .norm import RMSNorm
from .packed import PackedBitLinear
from .rotary import RotaryEmbedding

__all__ = [
    "BitLinear", "BitMGQA", "BitFeedForward", "Int8Linear", "KVCache", "PackedBitLinear", "RMSNorm", "RotaryEmbedding",
    "WEIGHTS_CHOICES", "check_weights", "make_linear", "set_quant_strength",
]
