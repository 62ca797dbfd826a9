"""The package form of BitLlama: the self-contained model of ``modeling_bitllama`` built on ``bitnet.nn.BitLinear``.

So ``bitnet.set_quant_strength``, ``bitnet.convert.count_bitlinear``, packing and export see its layers.
``save_pretrained`` also writes ``auto_map`` into config.json and copies the two self-contained source
files beside the weights, so the folder loads with ``trust_remote_code=True`` where ``bitnet`` is absent.
"""

from __future__ import annotations

import os
import shutil

from ..nn.bitlinear import BitLinear
from . import modeling_bitllama as _remote
from .configuration_bitllama import BitLlamaConfig

REMOTE_CODE_FILES = ("configuration_bitllama.py", "modeling_bitllama.py")
AUTO_MAP = {
    "AutoConfig": "configuration_bitllama.BitLlamaConfig",
    "AutoModelForCausalLM": "modeling_bitllama.BitLlamaForCausalLM",
}


class BitLlamaForCausalLM(_remote.BitLlamaForCausalLM):
    """Llama causal LM whose decoder projections are ``bitnet.nn.BitLinear`` (1.58-bit or 1-bit).

    Example::

        config = BitLlamaConfig(bitnet_type="1.58b", vocab_size=32000, hidden_size=512,
                                intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8)
        model = BitLlamaForCausalLM(config)   # train with transformers.Trainer, then
        model.save_pretrained("out")          # AutoModelForCausalLM.from_pretrained("out")
    """

    bitlinear_class = BitLinear

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` plus ``auto_map`` and the remote-code files."""
        self.config.auto_map = dict(AUTO_MAP)
        out = super().save_pretrained(save_directory, *args, **kwargs)
        src_dir = os.path.dirname(os.path.abspath(_remote.__file__))
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(save_directory, name))
        return out


__all__ = ["AUTO_MAP", "BitLlamaConfig", "BitLlamaForCausalLM", "REMOTE_CODE_FILES"]
