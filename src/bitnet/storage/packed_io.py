"""Tensors of packed models on disk: the native I2 form, or the compact base-3 form (1.6 bits/weight).

A packed model's state dict holds ``<layer>.w_packed`` (uint8, I2 layout). With ``compact=True``
each of them is stored instead as ``<layer>.w_base3`` (uint8, 5 weights per byte) and its shape
(out_features, in_features) is recorded in the file metadata under ``bitnet.compact``; loading
expands them back to I2. Both conversions are exact.
"""

from __future__ import annotations

import json

import torch

from ..quant import pack_base3, pack_i2, unpack_base3, unpack_i2

COMPACT_KEY = "bitnet.compact"
"""Metadata key: JSON {tensor name: [out_features, in_features]} of base-3 packed weights."""


def compact_tensors(tensors: dict[str, torch.Tensor], in_features: dict[str, int]) -> tuple[dict, dict[str, str]]:
    """Replace each ``*.w_packed`` by its base-3 form.

    Args:
        tensors: a packed model's state dict.
        in_features: {layer name: in_features} of the packed layers (I2 rows carry padding).
    Returns:
        (tensors, metadata) to write with safetensors.
    """
    out, shapes = {}, {}
    for name, t in tensors.items():
        if name.endswith(".w_packed"):
            layer = name[: -len(".w_packed")]
            k = in_features[layer]
            shapes[layer + ".w_base3"] = [t.shape[0], k]
            out[layer + ".w_base3"] = pack_base3(unpack_i2(t, k))       # (ceil(N*K/5),)
        else:
            out[name] = t
    return out, {COMPACT_KEY: json.dumps(shapes)}


def expand_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compact_tensors`: base-3 weights back to I2 ``*.w_packed`` tensors."""
    shapes = json.loads(metadata.get(COMPACT_KEY, "{}"))
    out = {}
    for name, t in tensors.items():
        if name in shapes:
            n, k = shapes[name]
            out[name[: -len(".w_base3")] + ".w_packed"] = pack_i2(unpack_base3(t, (n, k)))
        elif name.endswith(".w_base3"):
            raise ValueError(f"tensor {name!r} is base-3 packed but the file metadata has no shape for it")
        else:
            out[name] = t
    return out


def packed_in_features(model: torch.nn.Module) -> dict[str, int]:
    """{layer name: in_features} of every PackedBitLinear in ``model``."""
    from ..nn.packed import PackedBitLinear

    return {name: m.in_features for name, m in model.named_modules() if isinstance(m, PackedBitLinear)}

