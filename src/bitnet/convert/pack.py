"""``bitnet.convert.pack``: the names of :mod:`bitnet.storage.pack` (where ``pack`` lives, below ``io``) and
of :mod:`bitnet.runtime` (``native_decode``, ``torch_threads``), importable here as before."""

from ..runtime import native_decode, torch_threads  # noqa: F401
from ..storage.pack import HEADS, _is_head, is_packed, pack, weight_bytes  # noqa: F401

__all__ = ["HEADS", "is_packed", "native_decode", "pack", "torch_threads", "weight_bytes"]
