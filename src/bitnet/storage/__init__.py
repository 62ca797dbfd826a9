"""Packed storage: the packed inference form of a model (:func:`pack`) and how its tensors are written
to disk (:mod:`.packed_io`: the I2 form, or base 3 at 1.6 bits per weight).

Sits between ``models`` and ``io`` (quant -> ops -> nn -> models -> storage -> io -> ...): the checkpoint
layer packs a meta-device model and expands compact tensors with it, and never imports ``convert``.
``bitnet.convert.pack`` and ``bitnet.convert.packed_io`` re-export these names.
"""

from .pack import HEADS, is_packed, pack, weight_bytes
from .packed_io import COMPACT_KEY, compact_tensors, expand_tensors, packed_in_features

__all__ = ["COMPACT_KEY", "HEADS", "compact_tensors", "expand_tensors", "is_packed", "pack", "packed_in_features",
           "weight_bytes"]
