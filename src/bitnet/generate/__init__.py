"""Generation: samplers, the KV-cached decoding loop with streaming, and ``BitNetInference``."""

from .inference import BitNetInference
from .loop import FINISH_REASONS, TokenStream, generate, stream_generate
from .sampling import apply_repetition_penalty, sample_next_token, top_k_filter, top_p_filter

__all__ = [
    "BitNetInference", "FINISH_REASONS", "TokenStream", "apply_repetition_penalty", "generate",
    "sample_next_token", "stream_generate", "top_k_filter", "top_p_filter",
]
