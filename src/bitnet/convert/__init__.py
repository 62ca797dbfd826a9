"""Conversion of existing models: module swap, packing for inference, foreign formats."""

from .replace import count_bitlinear, replace_linears_in_hf

__all__ = ["count_bitlinear", "replace_linears_in_hf"]
