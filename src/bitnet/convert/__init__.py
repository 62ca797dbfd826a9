"""Conversion of existing models: module swap, packing for inference, foreign formats."""

from .pack import is_packed, pack, weight_bytes
from .replace import count_bitlinear, replace_linears_in_hf

__all__ = ["count_bitlinear", "is_packed", "pack", "replace_linears_in_hf", "weight_bytes"]
