"""GGUF export (arch bitnet, TQ2_0 / TQ1_0): read back with gguf's reader, dequantise, compare."""

import copy

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


def _fields(path):
    return gguf.GGUFReader(str(path)).fields


def test_hidden_activation_key_only_for_relu2_and_gelu(tmp_path, recwarn):
    import warnings

    torch.manual_seed(0)
    silu = BitNetTransformer(num_tokens=256, dim=256, depth=1, heads=4, activation="silu", tie_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # no warning for silu
        path = export_gguf(silu, tmp_path / "silu.gguf")
    assert "bitnet.hidden_activation" not in _fields(path)              # the key makes one llama.cpp build abort
    for act in ("relu2", "gelu"):
        model = BitNetTransformer(num_tokens=256, dim=256, depth=1, heads=4, activation=act, tie_embeddings=True)
        with pytest.warns(UserWarning, match=f"'{act}'.*hard-code SiLU"):
            path = export_gguf(model, tmp_path / f"{act}.gguf")
        assert _fields(path)["bitnet.hidden_activation"].contents() == act


def test_byte_vocabulary_is_tokenised_by_llamacpp_as_our_bytes(tmp_path):
    path = export_gguf(tiny_transformer(), tmp_path / "b.gguf")
    f = _fields(path)
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    assert f["tokenizer.ggml.model"].contents() == "llama"
    assert tokens[32] == "\u2581" and types[32] == 1                    # llama.cpp's escaped space -> id 32
    assert all(tokens[i] == f"<0x{i:02X}>" and types[i] == 6 for i in range(256) if i != 32)
    for key in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        assert f[f"tokenizer.ggml.{key}"].contents() is False, key


@pytest.fixture(scope="module")
def cli_trained_silu(tmp_path_factory):
    """A silu model trained through ``bitnet train --tie-embeddings`` (dim 256: GGUF rows), and its GGUF."""
    from bitnet.cli import main
    from bitnet.io import load_model

    root = tmp_path_factory.mktemp("cli_train")
    data = root / "text.txt"
    data.write_text("In the beginning God created the heaven and the earth. And the earth was without form. " * 200)
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--steps", "60", "--dim", "256", "--depth", "1",
                 "--heads", "4", "--kv-heads", "2", "--ff-mult", "2", "--seq-len", "64", "--batch-size", "8",
                 "--lr", "3e-3", "--tie-embeddings", "--activation", "silu", "--eval-every", "60",
                 "--eval-batches", "1", "--no-progress", "--no-plot", "--device", "cpu", "--threads", "1"]) == 0
    model = load_model(run).eval()
    assert model.config["tie_embeddings"] is True and model.head.weight is model.embed.weight
    path = export_gguf(model, root / "trained.gguf", ftype="TQ2_0", embed_dtype="f32")
    return model, path


def test_cli_trained_model_exports_and_imports_exactly(cli_trained_silu):
    from bitnet import pack
    from bitnet.convert.gguf_import import load_gguf

    model, path = cli_trained_silu
    assert "bitnet.hidden_activation" not in _fields(path)
    got, tok = load_gguf(path, head="fp")
    ref = pack(copy.deepcopy(model), head="fp").eval()
    ids = torch.tensor([list(b"And the earth was without form")])
    with torch.no_grad():
        assert torch.equal(got(ids), ref(ids))
    assert tok.encode("And the") == list(b"And the")


LLAMA_CPP_SCRIPT = """
import json, sys
import numpy as np
import llama_cpp
path, text, out = sys.argv[1:4]
llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=1)
ids = llm.tokenize(text.encode())                      # as llama.cpp's completion does
llm.eval(ids)
np.save(out, np.array(llm.scores[: len(ids)], dtype=np.float32))
print(json.dumps({"ids": ids, "text": llm.detokenize(ids).decode()}))
"""


def test_llama_cpp_runs_the_trained_silu_model(cli_trained_silu, tmp_path):
    """The exported file in real llama.cpp (llama-cpp-python, when installed): our byte ids, close logits.
    llama.cpp runs in a child process: its bundled ggml / OpenMP runtime must not share a process with torch."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    from bitnet import pack

    model, path = cli_trained_silu
    text = "And the earth was without form"
    out = tmp_path / "scores.npy"
    run = subprocess.run([sys.executable, "-c", LLAMA_CPP_SCRIPT, str(path), text, str(out)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    ids = result["ids"]
    assert ids == list(text.encode())                                   # exactly our bytes: no BOS, no "▁"
    assert result["text"] == text
    theirs = torch.from_numpy(np.load(out))
    with torch.no_grad():
        ours = pack(copy.deepcopy(model), head="fp").eval()(torch.tensor([ids]))[0]
    rel = ((theirs - ours).norm() / ours.norm()).item()
    assert rel < 2e-2, rel                   # measured 4.5e-3: llama.cpp quantises activations per 256-block
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
