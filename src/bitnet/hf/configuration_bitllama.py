"""BitLlama configuration: a Llama whose decoder projections are 1.58-bit (ternary) or 1-bit BitLinear layers.

Self-contained on purpose (imports only ``transformers``): ``BitLlamaForCausalLM.save_pretrained`` copies
this file and ``modeling_bitllama.py`` into the checkpoint folder so that someone without the ``bitnet``
package can load it with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.
"""

from transformers.models.llama.configuration_llama import LlamaConfig

BITNET_TYPES = ("1.58b", "1b")


class BitLlamaConfig(LlamaConfig):
    """Llama configuration plus the quantisation of the decoder projections.

    Args:
        bitnet_type: ``"1.58b"`` (ternary absmean weights, 2402.17764) or ``"1b"`` (binary sign weights,
            2310.11453).
        bits: activation bits of the BitLinear layers (per-token absmax), 2..8, default 8.
        sub_norm: give ``o_proj`` and ``down_proj`` an RMSNorm on their input (SubLN, as BitNet b1.58);
            ``q/k/v/gate/up`` need none since Llama's pre-norms already normalise their input.
        **kwargs: every ``LlamaConfig`` argument (hidden_size, num_hidden_layers, ...).
    """

    model_type = "bitllama"

    def __init__(self, bitnet_type: str = "1.58b", bits: int = 8, sub_norm: bool = True, **kwargs):
        if bitnet_type not in BITNET_TYPES:
            raise ValueError(f"bitnet_type must be '1.58b' (ternary) or '1b' (binary), got {bitnet_type!r}")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8 (activations are stored as int8), got {bits!r}")
        self.bitnet_type = bitnet_type
        self.bits = bits
        self.sub_norm = bool(sub_norm)
        super().__init__(**kwargs)


__all__ = ["BITNET_TYPES", "BitLlamaConfig"]
