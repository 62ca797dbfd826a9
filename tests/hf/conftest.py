"""Shared tiny configurations for the Hugging Face tests (skipped when transformers is missing)."""

import pytest


def tiny_bitllama_config(**overrides):
    from bitnet import BitLlamaConfig

    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    return BitLlamaConfig(**kwargs)


@pytest.fixture
def tiny_config():
    """Factory of tiny BitLlamaConfig objects: ``tiny_config(bitnet_type="1b")``."""
    return tiny_bitllama_config
