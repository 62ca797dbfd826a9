"""bitnet: 1-bit and 1.58-bit (ternary) transformers.

Train with ordinary PyTorch (``BitLinear`` is a drop-in ``nn.Linear``), run packed 2-bit weights
with int8 activations on native CPU and Triton GPU kernels.
"""

from .convert import pack, replace_linears_in_hf
from .models import BitNetTransformer
from .nn import BitFeedForward, BitLinear, BitMGQA, PackedBitLinear, RMSNorm, set_quant_strength
from .quant import activation_quant, binary_weight_quant, ternary_weight_quant, weight_quant

__version__ = "0.1.0"

__all__ = [
    "BitFeedForward", "BitLinear", "BitMGQA", "BitNetTransformer", "PackedBitLinear", "RMSNorm",
    "pack",
    "activation_quant", "binary_weight_quant", "replace_linears_in_hf", "set_quant_strength",
    "ternary_weight_quant", "weight_quant",
]

# Hugging Face integration (transformers is optional): the HF names resolve lazily, importing bitnet.hf
# (which registers BitLlama with the Auto classes) on first use: ``bitnet.BitLlamaForCausalLM``, ...
HF_EXPORTS = ("BitLlamaConfig", "BitLlamaForCausalLM", "BitNetForCausalLM", "to_bitnet_transformer",
              "QuantWarmupCallback", "train_bpe_tokenizer")
"""The names of :mod:`bitnet.hf` that ``bitnet`` re-exports (its ``LAZY_EXPORTS``)."""


def __getattr__(name):
    if name in HF_EXPORTS:
        import importlib

        return getattr(importlib.import_module(".hf", __name__), name)
    raise AttributeError(f"module 'bitnet' has no attribute {name!r}")

# Checkpoints, tokenizer, generation and training (``bitnet.train.train`` / ``bitnet.generate.generate``
# stay in their subpackages: exporting them here would shadow the subpackage names).
from .generate import BitNetInference  # noqa: E402
from .io import load_model, save_checkpoint  # noqa: E402
from .loading import LoadedModel, load  # noqa: E402  (one loader for every MODEL kind: bitnet.load)
from .tokenizer import ByteTokenizer  # noqa: E402
from .train import TrainConfig  # noqa: E402

__all__ += ["BitNetInference", "ByteTokenizer", "LoadedModel", "TrainConfig", "load", "load_model", "save_checkpoint"]
