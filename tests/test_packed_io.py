"""Packed checkpoints: saved 2-bit (or base-3) and loaded on the meta device without fp weights."""

import pytest
import torch

import bitnet
from bitnet import BitNetTransformer, PackedBitLinear, pack
from bitnet.io import load_model, save_checkpoint


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_packed_round_trip(tmp_path, compact, tie):
    torch.manual_seed(0)
    model = BitNetTransformer(num_tokens=60, dim=64, depth=2, heads=4, kv_heads=2, max_seq_len=64,
                              tie_embeddings=tie).eval()
    pack(model)
    tokens = torch.randint(0, 60, (1, 10))
    with torch.no_grad():
        expected = model(tokens)
    save_checkpoint(tmp_path / "run", model, compact=compact)
    size = (tmp_path / "run" / "model.safetensors").stat().st_size

    real_empty = torch.empty
    loaded = load_model(tmp_path / "run")
    assert torch.empty is real_empty
    assert all(not isinstance(m, bitnet.BitLinear) for m in loaded.modules())
    assert isinstance(loaded.layers[0].ffn.down, PackedBitLinear)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    if compact:
        save_checkpoint(tmp_path / "plain", model)
        assert size < (tmp_path / "plain" / "model.safetensors").stat().st_size


def test_compact_needs_packed_model(tmp_path):
    model = BitNetTransformer(num_tokens=20, dim=32, depth=1, heads=4)
    with pytest.raises(ValueError, match="packed model"):
        save_checkpoint(tmp_path / "run", model, compact=True)
