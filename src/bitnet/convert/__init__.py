"""Conversion of existing models: module swap, packing for inference, foreign formats."""

from .pack import is_packed, pack, weight_bytes
from .replace import count_bitlinear, replace_linears_in_hf

__all__ = ["count_bitlinear", "is_packed", "pack", "replace_linears_in_hf", "weight_bytes"]

# Foreign formats (no optional dependency is imported here: gguf is imported inside export_gguf).
from .gguf_export import export_gguf  # noqa: E402
from .hf_bitnet import hf_to_i2, pack_hf_bitnet, unpack_hf_bitnet  # noqa: E402
from .hf_convert import convert_hf_to_bitnet, quant_strength_at  # noqa: E402

__all__ += ["convert_hf_to_bitnet", "export_gguf", "hf_to_i2", "pack_hf_bitnet", "quant_strength_at",
            "unpack_hf_bitnet"]
