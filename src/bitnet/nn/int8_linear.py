"""Int8Linear: a linear layer with int8 weights (one float32 scale per output row) and int8 per-token
activations, for the output head of packed models.

At batch-1 decode the head of a large-vocabulary model is the largest single read of a token
(BitNet-b1.58-2B-4T: 128256 x 2560 = 1.3 GB in fp32, more than all its ternary layers). In int8 it
reads 4x fewer bytes, and the product is exact in integers (:mod:`bitnet.ops.int8`)::

    y = (x_q @ W_q^T) * w_scale[n] / x_scale (+ bias)

``bitnet.pack(model)`` converts the model's ``head`` / ``lm_head`` nn.Linear to this layer (``head="int8"``,
the default; ``head="fp"`` keeps it). With tied embeddings the embedding table stays as it is (lookups
read one row per token) and only the head becomes int8.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import int8 as _int8


class Int8Linear(nn.Module):
    """Inference-only linear layer with int8 weights.

    Buffers: ``w_int8`` int8 (out_features, in_features), ``w_scale`` float32 (out_features,),
    ``bias`` float32 (out_features,) or None. Build it with :meth:`from_linear` (meta layers give empty
    buffers, filled by ``load_state_dict(..., assign=True)``). A state dict holding a float ``weight``
    instead (a checkpoint packed before heads were int8) is quantised on load.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bits: int = 8, device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("w_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._register_load_state_dict_pre_hook(self._accept_float_weight)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int = 8) -> "Int8Linear":
        """Quantise ``linear.weight`` per output row (absmax, int8 in [-127, 127])."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=bits,
                    device=w.device)
        if w.device.type == "meta":
            return layer
        layer.w_int8, layer.w_scale = _int8.quantize_weight_int8(w)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    @staticmethod
    def _accept_float_weight(state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and prefix + "w_int8" not in state_dict:
            w_q, scale = _int8.quantize_weight_int8(state_dict.pop(key))
            state_dict[prefix + "w_int8"], state_dict[prefix + "w_scale"] = w_q, scale
            if prefix + "bias" in state_dict and state_dict[prefix + "bias"] is not None:
                state_dict[prefix + "bias"] = state_dict[prefix + "bias"].float()

    def dequantized_weight(self) -> torch.Tensor:
        """``W_q * w_scale`` (out, in) float32."""
        return self.w_int8.float() * self.w_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expects {self.in_features} input features, got {x.shape[-1]}")
        y = _int8.int8_linear(x, self.w_int8, self.w_scale, self.bias, self.bits)
        return y.to(x.dtype) if x.dtype != y.dtype else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}")
