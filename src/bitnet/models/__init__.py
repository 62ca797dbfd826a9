"""Whole models."""

from .transformer import BitNetTransformer, TransformerBlock

__all__ = ["BitNetTransformer", "TransformerBlock"]
