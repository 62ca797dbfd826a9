"""BitLlama in transformers' Auto classes: ``AutoConfig`` knows ``model_type`` "bitllama" and
``AutoModelForCausalLM`` builds :class:`~bitnet.hf.BitLlamaForCausalLM` for a :class:`BitLlamaConfig`.

Called once by ``import bitnet.hf`` (a plain function call: no import hook).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .bitllama import BitLlamaForCausalLM
from .configuration_bitllama import BitLlamaConfig


def register_auto_classes() -> None:
    """Register BitLlama with ``AutoConfig`` and ``AutoModelForCausalLM`` (idempotent)."""
    AutoConfig.register(BitLlamaConfig.model_type, BitLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(BitLlamaConfig, BitLlamaForCausalLM, exist_ok=True)


def registered() -> bool:
    """True when both Auto classes map BitLlama to this package's classes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return (BitLlamaConfig.model_type in CONFIG_MAPPING and CONFIG_MAPPING[BitLlamaConfig.model_type] is BitLlamaConfig
            and MODEL_FOR_CAUSAL_LM_MAPPING.get(BitLlamaConfig, None) is BitLlamaForCausalLM)
