"""``repack_tq1``: opt-in, in-memory switch of a packed model's linears to the experimental 1.6-bit TQ1
layout (:mod:`bitnet.quant.tq1`, :class:`bitnet.nn.tq1_linear.PackedTQ1BitLinear`)."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..nn.packed import PackedBitLinear
from ..nn.tq1_linear import PackedTQ1BitLinear


def repack_tq1(model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Replace every I2 :class:`PackedBitLinear` of ``model`` (packed with :func:`bitnet.pack`) by its TQ1
    form in place and return the model: same outputs, 0.8x the ternary weight bytes.

    Experimental and in memory only (checkpoints stay I2). The fused native block path runs the repacked
    blocks too (one weight format per q|k|v and gate|up set). ``filter_fn(module, name) -> bool`` limits
    the layers repacked. Raises ValueError if there is no packed layer to repack.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is PackedBitLinear:
        return PackedTQ1BitLinear.from_packed(model)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is PackedBitLinear and (filter_fn is None or filter_fn(m, name))]
    if not targets:
        raise ValueError("model has no I2 PackedBitLinear layer to repack (pack it first: bitnet.pack(model))")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedTQ1BitLinear.from_packed(layer))
    return model
