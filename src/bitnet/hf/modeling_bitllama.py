"""BitLlama: Llama with every decoder projection (q/k/v/o, gate/up/down) a BitLinear.

Self-contained on purpose (imports only ``torch`` and ``transformers``, never ``bitnet``): this file is
copied beside the weights by ``save_pretrained`` for ``trust_remote_code=True`` loading. It therefore
carries its own small :class:`BitLinear`, numerically identical to ``bitnet.nn.BitLinear`` and with the
same parameter names; inside the ``bitnet`` package the model class is subclassed to use
``bitnet.nn.BitLinear`` itself (``bitnet.hf.BitLlamaForCausalLM``).

Layer placement: embeddings, norms and ``lm_head`` stay full precision. ``q/k/v_proj`` and
``gate/up_proj`` read the output of Llama's pre-norms (input_layernorm / post_attention_layernorm), so
their BitLinear has no norm; ``o_proj`` and ``down_proj`` read un-normalised activations, so (with
``config.sub_norm``, the default) their BitLinear normalises its input with an RMSNorm before
quantising it -- the SubLN placement of BitNet b1.58 (``attn_sub_norm`` / ``ffn_sub_norm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from .configuration_bitllama import BitLlamaConfig

EPS = 1e-5
WEIGHT_KIND = {"1.58b": "1.58", "1b": "1"}
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
SUB_NORMED = ("o_proj", "down_proj")


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _weight_quant(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scale): b1.58 ``round(W / mean|W|)`` clamped to [-1, 1], or b1 ``sign(W - mean W)``."""
    scale = w.detach().abs().float().mean()
    if kind == "1.58":
        return (w / (scale + EPS).to(w.dtype)).round().clamp(-1, 1), scale
    centred = w - w.detach().float().mean().to(w.dtype)
    return torch.where(centred >= 0, torch.ones_like(w), -torch.ones_like(w)), scale


def _ste(x: torch.Tensor, q: torch.Tensor, strength: float) -> torch.Tensor:
    return x + (q - x).detach() if strength == 1.0 else x + (strength * (q - x)).detach()


class BitLinear(nn.Linear):
    """Fake-quantised linear layer (straight-through estimator): ``y = Qw(W) @ Qx(Norm(x))``.

    Same constructor, parameter names and arithmetic as ``bitnet.nn.BitLinear``.
    """

    def __init__(self, in_features, out_features, bias=False, weight_kind="1.58", bits=8, norm=True,
                 norm_eps=1e-6, quant_strength=1.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_kind, self.bits, self.quant_strength = weight_kind, bits, float(quant_strength)
        self.norm = RMSNorm(in_features, eps=norm_eps, device=device, dtype=dtype) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        qp = 2 ** (self.bits - 1) - 1
        s = qp / x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=EPS)     # (..., 1)
        x = _ste(x, (x * s.to(x.dtype)).round().clamp(-qp - 1, qp) / s.to(x.dtype), self.quant_strength)
        q, scale = _weight_quant(self.weight, self.weight_kind)
        w = _ste(self.weight, q * scale.to(self.weight.dtype), self.quant_strength)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def bitify_llama(model: nn.Module, config: BitLlamaConfig, bitlinear_class=BitLinear) -> nn.Module:
    """Swap the decoder projections of a Llama model (``model.layers[i]``) for ``bitlinear_class``, in place.

    The original weight / bias parameters are kept (same tensors).
    """
    kind = WEIGHT_KIND[config.bitnet_type]
    for layer in model.layers:
        for parent, names in ((layer.self_attn, ATTN_PROJ), (layer.mlp, MLP_PROJ)):
            for name in names:
                lin = getattr(parent, name)
                bit = bitlinear_class(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      weight_kind=kind, bits=config.bits,
                                      norm=bool(config.sub_norm) and name in SUB_NORMED,
                                      norm_eps=config.rms_norm_eps, device=lin.weight.device,
                                      dtype=lin.weight.dtype)
                bit.weight = lin.weight
                if lin.bias is not None:
                    bit.bias = lin.bias
                setattr(parent, name, bit)
    return model


class BitLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with BitLinear decoder projections (see the module docstring)."""

    config_class = BitLlamaConfig
    bitlinear_class = BitLinear

    def __init__(self, config: BitLlamaConfig):
        super().__init__(config)
        bitify_llama(self.model, config, self.bitlinear_class)


__all__ = ["BitLinear", "BitLlamaConfig", "BitLlamaForCausalLM", "RMSNorm", "bitify_llama"]
