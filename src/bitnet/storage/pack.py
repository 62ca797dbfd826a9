"""``bitnet.pack``: turn the BitLinear layers of a trained model into packed inference layers.

Lives in :mod:`bitnet.storage` (below the checkpoint layer :mod:`bitnet.io`, which packs a model built
on the meta device before assigning its 2-bit tensors); ``bitnet.convert.pack`` re-exports it."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..nn.bitlinear import BitLinear
from ..nn.int8_linear import Int8Linear
from ..nn.packed import PackedBitLinear

HEADS = ("int8", "fp")
"""Choices of ``pack(model, head=...)``."""


def pack(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None,
         head: str = "int8") -> nn.Module:
    """Replace every BitLinear of ``model`` by a :class:`PackedBitLinear` in place and return the model.

    The fp master weights are dropped: each layer keeps only its 2-bit packed weight, its scale, its
    bias and its input norm. Passing a single BitLinear returns its packed form. Layers on the meta
    device become empty packed layers, ready for ``load_state_dict(..., assign=True)`` (this is how
    packed checkpoints load without ever materialising fp weights).

    Args:
        filter_fn: ``filter_fn(module, name) -> bool``; only matching BitLinear layers are packed.
        head: ``"int8"`` (default): the model's ``head`` / ``lm_head`` nn.Linear becomes an
            :class:`~bitnet.nn.Int8Linear` (int8 weights, one scale per row: 4x fewer bytes than fp32 per
            decoded token; with tied embeddings the embedding table is kept for lookups); only done
            when at least one BitLinear is packed. ``"fp"`` leaves the head alone.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if isinstance(model, BitLinear):
        return PackedBitLinear.from_bitlinear(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, BitLinear) and (filter_fn is None or filter_fn(m, name))]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedBitLinear.from_bitlinear(layer))
    if head == "int8" and targets:
        for attr in ("head", "lm_head"):
            lin = getattr(model, attr, None)
            if type(lin) is nn.Linear:
                setattr(model, attr, Int8Linear.from_linear(lin))
    if isinstance(getattr(model, "config", None), dict) and targets:
        model.config["packed"] = True
    return model


def is_packed(model: nn.Module) -> bool:
    """True when ``model`` holds at least one PackedBitLinear."""
    return any(isinstance(m, PackedBitLinear) for m in model.modules())


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Resident bytes of the model's tensors, split into linear-layer weights and everything else."""
    linear = other = 0
    seen = set()
    for module in model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is None or t.data_ptr() in seen or t.device.type == "meta":
                continue
            seen.add(t.data_ptr())
            size = t.numel() * t.element_size()
            is_linear_weight = (isinstance(module, PackedBitLinear) and name in ("w_packed", "w_tq1", "w_scale")) or (
                isinstance(module, Int8Linear) and name in ("w_int8", "w_scale")
                and not _is_head(model, module)) or (
                isinstance(module, nn.Linear) and name == "weight" and not _is_head(model, module))
            if is_linear_weight:
                linear += size
            else:
                other += size
    return {"linear": linear, "other": other, "total": linear + other}


def _is_head(model: nn.Module, module: nn.Module) -> bool:
    return module is getattr(model, "head", None) or module is getattr(model, "lm_head", None)
