"""Turn a full-precision Hugging Face causal LM into a BitNet model for quantisation-aware fine-tuning.

``convert_hf_to_bitnet`` swaps every decoder linear (``nn.Linear``, and GPT-2's ``Conv1D`` after
transposing it into an ``nn.Linear``) for ``bitnet.nn.BitLinear`` keeping the trained weights, leaves
embeddings and the LM head in full precision, and starts the quantisation strength lambda at 0 when a
warm-up is asked for: the converted model then computes exactly what the original did, and lambda is
ramped 0 -> 1 over ``warmup_steps`` optimiser steps (``quant_strength_at`` /
``bitnet.hf.QuantWarmupCallback`` for transformers' Trainer), so the network adapts to its ternary
weights gradually instead of losing its pretrained behaviour at once.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..nn.bitlinear import BitLinear, set_quant_strength
from .replace import count_bitlinear, replace_linears_in_hf

DEFAULT_EXCLUDE = ("lm_head", "embed_out", "output", "score", "classifier")


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace GPT-2 style ``Conv1D`` layers (weight (in, out), ``y = x @ W + b``) by equivalent
    ``nn.Linear`` layers, in place. Returns how many were replaced."""
    targets = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Conv1D" and hasattr(m, "nf")]
    for name, conv in targets:
        w = conv.weight                                                   # (in, out)
        lin = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)   # (out, in)
        if conv.bias is not None:
            lin.bias = conv.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    return len(targets)


def quant_strength_at(step: int, warmup_steps: int) -> float:
    """Linear warm-up of lambda: 0 at step 0, 1 from ``warmup_steps`` on."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / warmup_steps))


def convert_hf_to_bitnet(
    model: nn.Module,
    warmup_steps: int = 0,
    weight_kind: str = "1.58",
    bits: int = 8,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    norm: bool = False,
) -> nn.Module:
    """Convert a full-precision causal LM (Llama-style ``nn.Linear`` or GPT-2 ``Conv1D``) in place.

    Args:
        warmup_steps: 0 quantises fully at once (lambda = 1); N > 0 starts at lambda = 0 (output equal
            to the original model) and expects a ramp over N steps (``QuantWarmupCallback``).
        weight_kind: ``"1.58"`` (ternary) or ``"1"`` (binary). bits: activation bits.
        exclude: module names kept in full precision (the LM head by default; embeddings are never
            linears). norm: give each BitLinear its own input RMSNorm (off: pretrained weights expect
            the un-normalised inputs they were trained on).
    Returns:
        the model, with ``model.bitnet_warmup_steps`` set (read by the callback).
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    conv1d_to_linear(model)
    replace_linears_in_hf(model, exclude=exclude, weight_kind=weight_kind, bits=bits, norm=norm,
                          quant_strength=quant_strength_at(0, warmup_steps))
    if count_bitlinear(model) == 0:
        raise ValueError("no linear layer was converted: check `exclude` and the model type")
    model.bitnet_warmup_steps = warmup_steps
    _drop_dequantized_gguf_quantizer(model)
    return model


def _drop_dequantized_gguf_quantizer(model: nn.Module) -> None:
    """A model loaded with ``from_pretrained(..., gguf_file=...)`` keeps transformers' GGUF quantizer although
    its weights were dequantised to plain float tensors at load; the Trainer then refuses to train it
    ("purely quantized model"). After conversion the weights are BitLinear master weights: drop it."""
    hq = getattr(model, "hf_quantizer", None)
    if hq is not None and type(hq).__name__ == "GgufHfQuantizer":
        model.hf_quantizer = None
        model.is_quantized = False
        if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
            model.config.quantization_config = None


@torch.no_grad()
def quantization_error(model: nn.Module) -> float:
    """Mean relative error ``|W - Wq*scale| / |W|`` over the BitLinear layers (a conversion diagnostic)."""
    errs = []
    for m in model.modules():
        if isinstance(m, BitLinear):
            q, s = m.quantized_weight()
            errs.append(float((m.weight - q * s).norm() / m.weight.norm()))
    return sum(errs) / max(1, len(errs))


__all__ = ["DEFAULT_EXCLUDE", "conv1d_to_linear", "convert_hf_to_bitnet", "quant_strength_at",
           "quantization_error", "set_quant_strength"]
