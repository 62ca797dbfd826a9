"""Generation: samplers, the one KV-cache :class:`Decoder` (prefill / batched step), the decoding loop
with streaming, and ``BitNetInference``."""

from .decoder import Decoder
from .inference import BitNetInference
from .loop import FINISH_REASONS, TokenStream, generate, stream_generate
from .sampling import apply_repetition_penalty, sample_next_token, top_k_filter, top_p_filter

__all__ = [
    "BitNetInference", "Decoder", "FINISH_REASONS", "TokenStream", "apply_repetition_penalty", "generate",
    "sample_next_token", "stream_generate", "top_k_filter", "top_p_filter",
]
