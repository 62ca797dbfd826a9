"""GGUF export (arch bitnet, TQ2_0 / TQ1_0): read back with gguf's reader, dequantise, compare."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from bitnet import BitNetTransformer  # noqa: E402
from bitnet.convert.gguf_export import export_gguf, read_gguf_linear  # noqa: E402


def tiny_transformer(dim=256, **kw):
    torch.manual_seed(0)
    return BitNetTransformer(num_tokens=256, dim=dim, depth=2, heads=4, kv_heads=2, ff_mult=2, max_seq_len=64,
                             activation="relu2", tie_embeddings=True, **kw)


@pytest.mark.parametrize("ftype", ["TQ2_0", "TQ1_0"])
def test_bitnet_transformer_roundtrip(tmp_path, ftype):
    model = tiny_transformer()
    path = export_gguf(model, tmp_path / "m.gguf", ftype=ftype, embed_dtype="f32")
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields

    def field(key):
        f = fields[key]
        return bytes(f.parts[f.data[0]]).decode() if f.types[0] == gguf.GGUFValueType.STRING else f.parts[f.data[0]][0]

    assert field("general.architecture") == "bitnet"
    assert field("bitnet.hidden_activation") == "relu2"
    assert field("bitnet.block_count") == 2 and field("bitnet.embedding_length") == 256
    assert field("bitnet.feed_forward_length") == 512 and field("bitnet.attention.head_count_kv") == 2
    assert field("general.file_type") == {"TQ2_0": 37, "TQ1_0": 36}[ftype]
    assert field("tokenizer.ggml.model") == "llama"
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and {"token_embd.weight", "output_norm.weight",
                                             "blk.1.attn_sub_norm.weight", "blk.1.ffn_sub_norm.weight"} <= names
    qtype = getattr(gguf.GGMLQuantizationType, ftype)
    assert {t.tensor_type for t in reader.tensors if t.name.endswith("ffn_down.weight")} == {qtype}
    pairs = {"attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.out_proj",
             "ffn_gate": "ffn.gate", "ffn_up": "ffn.up", "ffn_down": "ffn.down"}
    for i in range(2):
        for g, ours in pairs.items():
            values, scale = read_gguf_linear(path, f"blk.{i}.{g}")
            q, gamma = model.layers[i].get_submodule(ours).quantized_weight()
            assert values.shape == tuple(q.shape)
            np.testing.assert_array_equal(values, q.detach().numpy())              # exact ternary values
            np.testing.assert_allclose(values * scale, (q * gamma).detach().numpy(), rtol=1e-6)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(np.asarray(emb.data).reshape(256, 256), model.embed.weight.detach().numpy())


def test_rows_must_be_multiple_of_256_and_tied_head(tmp_path):
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight.*multiple of 256"):
        export_gguf(tiny_transformer(dim=128), tmp_path / "x.gguf")
    torch.manual_seed(0)
    untied = BitNetTransformer(num_tokens=256, dim=256, depth=1, heads=4)
    with pytest.raises(ValueError, match="tie"):
        export_gguf(untied, tmp_path / "y.gguf")
    with pytest.raises(ValueError, match="ftype"):
        export_gguf(tiny_transformer(), tmp_path / "z.gguf", ftype="Q4_0")


def test_bitllama_export(tmp_path):
    pytest.importorskip("transformers")
    from bitnet import BitLlamaConfig, BitLlamaForCausalLM

    torch.manual_seed(0)
    cfg = BitLlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         hidden_act="relu2")
    model = BitLlamaForCausalLM(cfg)
    path = export_gguf(model, tmp_path / "bl.gguf", ftype="TQ2_0")
    values, scale = read_gguf_linear(path, "blk.0.attn_output")
    q, gamma = model.model.layers[0].self_attn.o_proj.quantized_weight()
    np.testing.assert_allclose(values * scale, (q * gamma).detach().numpy(), rtol=1e-6)
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "blk.0.attn_sub_norm.weight" in names and "blk.0.ffn_sub_norm.weight" in names


def test_official_bitnet_packed_export(tmp_path):
    pytest.importorskip("transformers")
    from bitnet import BitNetForCausalLM
    from bitnet.quant import pack_i2

    torch.manual_seed(0)
    model = BitNetForCausalLM({"vocab_size": 300, "hidden_size": 256, "intermediate_size": 512,
                               "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2})
    model.tie_weights()
    layer = model.model.layers[0].mlp.down_proj
    t = torch.randint(-1, 2, (256, 512), dtype=torch.int8)
    layer.w_packed.copy_(pack_i2(t))
    layer.w_scale.fill_(0.75)
    path = export_gguf(model, tmp_path / "official.gguf", ftype="TQ1_0")
    values, scale = read_gguf_linear(path, "blk.0.ffn_down")
    np.testing.assert_array_equal(values, t.float().numpy())
    assert scale == 0.75
