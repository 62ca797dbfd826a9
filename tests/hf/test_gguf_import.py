"""GGUF import (arch bitnet): export -> import gives the same packed integers, scales and logits; files in
llama.cpp's converter style (per-block scales, no .scale tensors, f16 embeddings); tokenizers; bad files."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from bitnet import BitNetTransformer, pack  # noqa: E402
from bitnet.convert.gguf_export import export_gguf  # noqa: E402
from bitnet.convert.gguf_import import GGUFImportError, load_gguf, ternary_and_scale_of  # noqa: E402
from bitnet.tokenizer import ByteTokenizer  # noqa: E402

LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ffn.gate", "ffn.up", "ffn.down")


def tiny(activation="silu", vocab=300, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("norm_eps", 1e-5)
    return BitNetTransformer(num_tokens=vocab, dim=256, depth=2, heads=4, kv_heads=2, ff_mult=2, max_seq_len=64,
                             activation=activation, tie_embeddings=True, **kw).eval()


def fix_post_norm_eps(model):
    """BitFeedForward builds its post_norm with eps 1e-6 whatever norm_eps says; GGUF has one eps for all norms."""
    for layer in model.layers:
        layer.ffn.post_norm.eps = model.config["norm_eps"]
    return model


@pytest.mark.parametrize("ftype", ["TQ2_0", "TQ1_0"])
@pytest.mark.parametrize("activation", ["silu", "relu2"])
def test_export_import_same_packed_model_and_logits(tmp_path, ftype, activation):
    model = fix_post_norm_eps(pack(tiny(activation), head="fp"))
    path = export_gguf(model, tmp_path / "m.gguf", ftype=ftype, embed_dtype="f32")
    got, tok = load_gguf(path, head="fp")
    assert isinstance(got, BitNetTransformer) and got.config["activation"] == activation
    assert got.config["kv_heads"] == 2 and got.head.weight is got.embed.weight
    for i in range(2):
        for name in LINEARS:
            a, b = model.layers[i].get_submodule(name), got.layers[i].get_submodule(name)
            assert torch.equal(a.w_packed, b.w_packed), name                   # the same packed integers
            assert a.w_scale.item() == b.w_scale.item(), name                   # the same fp32 scale
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(got(ids), model(ids))
        # cached decode (the fused native path on CPU) gives the same logits as the source model
        ca, cb = model.new_caches(1, 16), got.new_caches(1, 16)
        for t in range(6):
            assert torch.equal(got(ids[:1, t:t + 1], caches=cb, start_pos=t), model(ids[:1, t:t + 1], caches=ca, start_pos=t))
    assert isinstance(tok, ByteTokenizer)


def test_int8_head_default_and_fused_native_path(tmp_path):
    from bitnet import ops
    from bitnet.models.fused_block import FusedBlock
    from bitnet.nn import Int8Linear

    model = fix_post_norm_eps(tiny("relu2"))
    path = export_gguf(model, tmp_path / "m.gguf", ftype="TQ2_0", embed_dtype="f32")
    got, _ = load_gguf(path)
    assert isinstance(got.head, Int8Linear)
    ref = pack(model)                                                          # int8 head, as bitnet.pack does
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(got(ids), ref(ids))
    if ops.backend("cpu") == "cpu":
        assert FusedBlock.for_block(got.layers[0]).native is not None


def test_llamacpp_converter_style_file(tmp_path):
    """llama.cpp's convert_hf_to_gguf writes ternary x mean|W| into each TQ block (d = the scale in f16), no
    .scale tensors, no hidden_activation key (silu), f16 token_embd: read back exactly."""
    model = pack(tiny("silu"), head="fp")
    path = tmp_path / "llamacpp.gguf"
    write_converter_style(model, path)
    got, tok = load_gguf(path, head="fp")
    assert got.config["activation"] == "silu" and tok is None                 # SentencePiece-style vocab: no tokenizer
    expect = fix_post_norm_eps(model)
    with torch.no_grad():
        expect.embed.weight.copy_(expect.embed.weight.half().float())
        for layer in expect.layers:
            for name in LINEARS:
                lin = layer.get_submodule(name)
                lin.w_scale.fill_(float(np.float16(lin.w_scale.item())))       # d is stored as f16
        ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(3))
        assert torch.equal(got(ids), expect(ids))
    assert torch.equal(got.layers[1].ffn.down.w_packed, model.layers[1].ffn.down.w_packed)


def write_converter_style(model, path, arch="bitnet", skip=(), two_scales=None, vocab="spm", name=None):
    """A GGUF written the way llama.cpp's converter does for a BitNet checkpoint (values = ternary * scale)."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    if name:
        w.add_name(name)
    cfg = model.config
    w.add_context_length(cfg["max_seq_len"])
    w.add_embedding_length(cfg["dim"])
    w.add_block_count(cfg["depth"])
    w.add_feed_forward_length(model.layers[0].ffn.up.out_features)
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv_heads"])
    w.add_layer_norm_rms_eps(cfg["norm_eps"])
    w.add_rope_freq_base(cfg["rope_base"])
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(1.0)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_TQ2_0))
    if vocab == "spm":                                   # a SentencePiece vocabulary (not ours)
        tokens = ["<unk>", "<s>", "</s>"] + [f"\u2581t{i}" for i in range(cfg["num_tokens"] - 3)]
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([float(-i) for i in range(len(tokens))])
    tensors = {"token_embd.weight": model.embed.weight.detach().numpy().astype(np.float16),
               "output_norm.weight": model.norm.weight.detach().numpy()}
    gnames = {"attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
              "attn_output": "attn.out_proj", "ffn_gate": "ffn.gate", "ffn_up": "ffn.up", "ffn_down": "ffn.down"}
    norms = {"attn_norm": "attn_norm", "attn_sub_norm": "attn.sub_norm", "ffn_norm": "ffn_norm",
             "ffn_sub_norm": "ffn.post_norm"}
    for i, layer in enumerate(model.layers):
        for g, ours in norms.items():
            tensors[f"blk.{i}.{g}.weight"] = layer.get_submodule(ours).weight.detach().numpy()
        for g, ours in gnames.items():
            lin = layer.get_submodule(ours)
            values = lin.unpacked_weight().numpy()                                 # ternary * scale
            if two_scales == f"blk.{i}.{g}":
                values[: values.shape[0] // 2] *= 2
            tensors[f"blk.{i}.{g}.weight"] = (values, gguf.GGMLQuantizationType.TQ2_0)
    for name, value in tensors.items():
        if name in skip:
            continue
        if isinstance(value, tuple):
            w.add_tensor(name, gguf.quants.quantize(value[0], value[1]), raw_dtype=value[1])
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_2b4t_file_without_activation_key_is_relu2(tmp_path):
    """llama.cpp's converter writes no activation key for microsoft's 2B4T (a relu2 model): named after it."""
    model = pack(tiny("relu2"), head="fp")
    path = write_converter_style(model, tmp_path / "2b4t.gguf", name="bitnet-b1.58-2B-4T")
    assert load_gguf(path)[0].config["activation"] == "relu2"
    assert load_gguf(path, activation="silu")[0].config["activation"] == "silu"
    with pytest.raises(GGUFImportError, match="activation 'tanh'"):
        load_gguf(path, activation="tanh")


def test_ternary_and_scale_recovery():
    v = np.array([[0.5, -0.5, 0.0], [0.0, 0.5, 0.5]], dtype=np.float32)
    t, d = ternary_and_scale_of(v, "x", "f.gguf")
    assert d == 0.5 and t.tolist() == [[1, -1, 0], [0, 1, 1]] and t.dtype == np.int8
    assert ternary_and_scale_of(np.zeros((2, 2), np.float32), "z", "f.gguf")[1] == 0.0
    with pytest.raises(GGUFImportError, match=r"f\.gguf: tensor x is not ternary x one scale"):
        ternary_and_scale_of(np.array([0.5, 0.25], np.float32), "x", "f.gguf")


def test_bad_files_name_the_path(tmp_path):
    model = pack(tiny(), head="fp")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(GGUFImportError, match=r"notes\.gguf: not a GGUF file"):
        load_gguf(not_gguf)
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        load_gguf(tmp_path / "nowhere.gguf")
    llama = write_converter_style(model, tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(GGUFImportError, match=r"llama\.gguf: general\.architecture is 'llama'"):
        load_gguf(llama)
    missing = write_converter_style(model, tmp_path / "missing.gguf", skip={"blk.1.ffn_up.weight"})
    with pytest.raises(GGUFImportError, match=r"missing\.gguf: missing tensor 'blk\.1\.ffn_up\.weight'"):
        load_gguf(missing)
    mixed = write_converter_style(model, tmp_path / "mixed.gguf", two_scales="blk.0.attn_k")
    with pytest.raises(GGUFImportError, match=r"mixed\.gguf: tensor blk\.0\.attn_k\.weight is not ternary x one scale"):
        load_gguf(mixed)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(export_path(model, tmp_path).read_bytes()[:200])
    with pytest.raises(GGUFImportError, match=r"cut\.gguf"):
        load_gguf(truncated)
    with pytest.raises(ValueError, match="head"):
        load_gguf(export_path(model, tmp_path), head="bf16")


def export_path(model, tmp_path):
    path = tmp_path / "ok.gguf"
    if not path.exists():
        export_gguf(model, path)
    return path


def test_byte_tokenizer_with_special_tokens_round_trips(tmp_path):
    tok = ByteTokenizer(("<eos>", "<pad>"))
    model = pack(tiny(vocab=260), head="fp")
    path = export_gguf(model, tmp_path / "t.gguf", tokenizer=tok)
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens[0x20] == "\u2581" and tokens[0x41] == "<0x41>" and tokens[256:259] == ["<eos>", "<pad>", "<extra_258>"]
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 256
    _, back = load_gguf(path)
    assert isinstance(back, ByteTokenizer) and back.special_tokens[:2] == ("<eos>", "<pad>") and back.eos_id == 256
    assert back.encode("a b\n") == tok.encode("a b\n") == [97, 32, 98, 10]


def test_bpe_tokenizer_round_trips(tmp_path):
    pytest.importorskip("transformers")
    from bitnet.hf import train_bpe_tokenizer
    from bitnet.tokenizer import HFTokenizer

    text = "In the beginning God created the heaven and the earth. And the earth was without form.\n" * 30
    (tmp_path / "corpus.txt").write_text(text)
    hf = train_bpe_tokenizer(str(tmp_path / "corpus.txt"), vocab_size=300, save_dir=tmp_path / "tok")
    model = pack(tiny(vocab=300), head="fp")
    path = export_gguf(model, tmp_path / "bpe.gguf", tokenizer=hf)
    _, back = load_gguf(path)
    assert isinstance(back, HFTokenizer)
    sample = "And God said, Let there be light: ünïcödé ✓"
    ids = hf(sample, add_special_tokens=False).input_ids
    assert back.encode(sample) == ids and back.decode(ids) == sample
    assert back.eos_id == hf.eos_token_id
