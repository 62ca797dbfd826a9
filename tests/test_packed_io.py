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


def test_pack_command_writes_a_packed_run_that_generates(tmp_path, capsys):
    from bitnet.cli import main
    from bitnet.generate.inference import BitNetInference

    model = BitNetTransformer(num_tokens=256, dim=64, depth=1, heads=4, max_seq_len=64).eval()
    save_checkpoint(tmp_path / "run", model)
    assert main(["pack", str(tmp_path / "run"), "--out", str(tmp_path / "packed"), "--compact"]) == 0
    assert '"linear_weight_bytes_after"' in capsys.readouterr().out
    inf = BitNetInference(device="cpu").load_model(tmp_path / "packed")
    assert isinstance(inf.model.layers[0].attn.q_proj, PackedBitLinear)
    expected = BitNetInference(model=pack(model), device="cpu").generate("abc", 8, temperature=0)
    assert inf.generate("abc", 8, temperature=0) == expected
