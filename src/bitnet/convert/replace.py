"""Module swap: turn the ``nn.Linear`` layers of any model into BitLinear, keeping their weights."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..nn.bitlinear import BitLinear


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a dotted module name equals a pattern or ends with ``.pattern``."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def replace_linears_in_hf(
    model: nn.Module,
    exclude: Iterable[str] = (),
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    weight_kind: str = "1.58",
    bits: int = 8,
    norm: bool = False,
    quant_strength: float = 1.0,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (any module tree, e.g. a Hugging Face model) by a BitLinear.

    The new layers keep the original weight and bias (same tensors, same device and dtype) and are
    put in place; the model is returned.

    Args:
        exclude: module names to keep in full precision; a name matches when it equals the full dotted
            name or its last components (``"classifier"``, ``"lm_head"``, ``"attention.output.dense"``).
        filter_fn: ``filter_fn(module, name) -> bool``; only layers for which it returns True are swapped.
        weight_kind, bits, quant_strength: passed to BitLinear.
        norm: give each BitLinear its own input RMSNorm. Off by default because a pretrained model's
            linears expect un-normalised inputs (the weights are kept).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    exclude = tuple(exclude) if not isinstance(exclude, str) else (exclude,)
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and not _matches(name, exclude)
        and (filter_fn is None or filter_fn(module, name))
    ]
    for name, linear in targets:
        bit = BitLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        weight_kind=weight_kind, bits=bits, norm=norm, quant_strength=quant_strength,
                        device="meta")
        bit.weight = linear.weight                      # keep the trained parameters themselves
        if linear.bias is not None:
            bit.bias = linear.bias
        if bit.norm is not None:
            bit.norm = type(bit.norm)(linear.in_features, eps=bit.norm.eps,
                                      device=linear.weight.device, dtype=linear.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, bit)
    if not targets and isinstance(model, nn.Linear):
        raise ValueError("model is itself an nn.Linear; build a BitLinear directly or wrap it in a module")
    return model


@torch.no_grad()
def count_bitlinear(model: nn.Module) -> int:
    """Number of BitLinear layers in ``model``."""
    return sum(isinstance(m, BitLinear) for m in model.modules())
