"""``bitnet.convert.packed_io``: the names of :mod:`bitnet.storage.packed_io` (the on-disk forms of packed
weights, below ``io``), importable here as before."""

from ..storage.packed_io import COMPACT_KEY, compact_tensors, expand_tensors, packed_in_features  # noqa: F401

__all__ = ["COMPACT_KEY", "compact_tensors", "expand_tensors", "packed_in_features"]
