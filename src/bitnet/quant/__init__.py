"""Pure functions: quantisers, straight-through estimator, and the storage formats of ternary weights."""

from .packing import (
    I2_BLOCK,
    pack_base3,
    pack_i2,
    padded_in_features,
    ternary_matmul_reference,
    unpack_base3,
    unpack_i2,
    unpack_i2_codes,
)
from .quantizers import (
    EPS,
    WEIGHT_KINDS,
    activation_quant,
    activation_quant_int8,
    binary_weight_quant,
    check_bits,
    fake_quant_activation,
    fake_quant_weight,
    normalize_weight_kind,
    ste,
    ternary_weight_quant,
    weight_quant,
)

__all__ = [
    "I2_BLOCK", "pack_base3", "pack_i2", "padded_in_features", "ternary_matmul_reference",
    "unpack_base3", "unpack_i2", "unpack_i2_codes",
    "EPS", "WEIGHT_KINDS", "activation_quant", "activation_quant_int8", "binary_weight_quant",
    "check_bits", "fake_quant_activation", "fake_quant_weight", "normalize_weight_kind", "ste",
    "ternary_weight_quant", "weight_quant",
]
