"""Whole models."""

from .fused_block import fused_enabled, fused_path, native_block_calls, set_fused
from .transformer import BitNetTransformer, BlockSpec, TransformerBlock

__all__ = ["BitNetTransformer", "BlockSpec", "TransformerBlock", "fused_enabled", "fused_path", "native_block_calls",
           "set_fused"]
