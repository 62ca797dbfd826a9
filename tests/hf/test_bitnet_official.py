"""Official BitNet layout: tiny checkpoints in the exact microsoft/bitnet-b1.58-2B-4T format, loaded by
bitnet and by transformers' own BitNet implementation, logits cross-checked; save back; packing."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from bitnet.convert.hf_bitnet import hf_to_i2, pack_hf_bitnet, unpack_hf_bitnet  # noqa: E402
from bitnet.quant import unpack_i2  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB = 64, 128, 2, 4, 2, 97
PROJ = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN // 2, HIDDEN),
        "self_attn.v_proj": (HIDDEN // 2, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def official_config(mode="offline"):
    return {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "hidden_act": "relu2",
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": mode},
    }


def write_official(folder, mode="offline", sharded=False, seed=0):
    """A random tiny checkpoint in the official layout; returns {proj name: (ternary, scale)}."""
    g = torch.Generator().manual_seed(seed)
    state, truth = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
                    "model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g)}, {}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for norm, dim in (("input_layernorm", HIDDEN), ("post_attention_layernorm", HIDDEN),
                          ("self_attn.attn_sub_norm", HIDDEN), ("mlp.ffn_sub_norm", INTER)):
            state[p + norm + ".weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        for name, shape in PROJ.items():
            if mode == "offline":
                t = torch.randint(-1, 2, shape, generator=g)
                scale = torch.rand(1, generator=g) + 0.5
                state[p + name + ".weight"] = pack_hf_bitnet(t)
                state[p + name + ".weight_scale"] = scale.to(torch.bfloat16)
                truth[p + name] = (t, scale.to(torch.bfloat16).float())
            else:
                state[p + name + ".weight"] = (0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    state = {k: (v if v.dtype in (torch.uint8, torch.bfloat16) else v.to(torch.bfloat16)) for k, v in state.items()}
    (folder / "config.json").write_text(json.dumps(official_config(mode)))
    if sharded:
        keys = sorted(state)
        half = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for fname, ks in half.items():
            save_file({k: state[k] for k in ks}, str(folder / fname), metadata={"format": "pt"})
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f for f, ks in half.items() for k in ks}}))
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return truth


@pytest.fixture(autouse=True)
def _no_dynamo():
    """transformers' BitNet layers are @torch.compile'd: run them eagerly (no C++ compile on CPU tests)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def load_transformers(folder):
    """transformers' own BitNetForCausalLM, in float32 (bf16 checkpoint values are exact in fp32)."""
    model = transformers.BitNetForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    return torch.nn.Module.float(model).eval()     # (PreTrainedModel.float refuses quantised models)


def test_hf_packing_layout_and_i2_conversion():
    t = torch.randint(-1, 2, (8, 5))
    packed = pack_hf_bitnet(t)
    assert packed.shape == (2, 5) and packed.dtype == torch.uint8
    # byte row r holds rows r, r+R, r+2R, r+3R at bits 1:0, 3:2, 5:4, 7:6 (R = 2), code = value + 1
    assert int(packed[1, 3]) == sum(int(t[1 + 2 * i, 3] + 1) << (2 * i) for i in range(4))
    assert torch.equal(unpack_hf_bitnet(packed), t.to(torch.int8))
    assert torch.equal(unpack_i2(hf_to_i2(packed), 5), t.to(torch.int8))
    from transformers.integrations.bitnet import pack_weights
    assert torch.equal(pack_weights(t.clone().float()), packed)      # transformers' own packer agrees
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_hf_bitnet(torch.zeros(6, 3))


@pytest.mark.parametrize("sharded", [False, True])
def test_offline_checkpoint_matches_transformers(tmp_path, sharded):
    from bitnet import BitNetForCausalLM
    from bitnet.hf.bitnet_official import HFPackedBitLinear

    truth = write_official(tmp_path, sharded=sharded)
    ours = BitNetForCausalLM.from_pretrained(tmp_path)
    layer = ours.model.layers[1].mlp.down_proj
    assert isinstance(layer, HFPackedBitLinear) and layer.norm is not None
    t, s = truth["model.layers.1.mlp.down_proj"]
    assert torch.equal(layer.ternary_weight(), t.to(torch.int8)) and float(layer.w_scale) == float(s)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_transformers(tmp_path)(ids).logits
        got = ours(ids).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 5e-3, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_online_bf16_checkpoint_matches_transformers(tmp_path):
    from bitnet import BitNetForCausalLM

    write_official(tmp_path, mode="online")
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = load_transformers(tmp_path)(ids).logits
        packed = BitNetForCausalLM.from_pretrained(tmp_path)(ids).logits
        trainable = BitNetForCausalLM.from_pretrained(tmp_path, trainable=True)(ids).logits
    for got in (packed, trainable):
        assert ((got - ref).norm() / ref.norm()).item() < 5e-3


def test_save_back_loads_in_transformers_and_ours(tmp_path):
    from bitnet import BitNetForCausalLM

    src, dst, dst2 = tmp_path / "src", tmp_path / "dst", tmp_path / "dst2"
    src.mkdir()
    write_official(src)
    ours = BitNetForCausalLM.from_pretrained(src)
    ours.save_pretrained(dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "bitnet" and cfg["quantization_config"]["quantization_mode"] == "offline"
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expect = ours(ids).logits
        torch.testing.assert_close(BitNetForCausalLM.from_pretrained(dst)(ids).logits, expect)
        theirs = load_transformers(dst)(ids).logits
        assert ((theirs - expect).norm() / expect.norm()) < 5e-3 and torch.equal(theirs.argmax(-1), expect.argmax(-1))
    # trainable (offline -> master weights reproducing the same ternary values and scales), sharded save
    train = BitNetForCausalLM.from_pretrained(src, trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(train(ids).logits, expect, rtol=1e-4, atol=1e-4)
    train.save_pretrained(dst2, max_shard_size=20_000)
    assert (dst2 / "model.safetensors.index.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(BitNetForCausalLM.from_pretrained(dst2)(ids).logits, expect, rtol=1e-4, atol=1e-4)


def test_generate_and_hub_offline_error(tmp_path):
    from bitnet import BitNetForCausalLM

    write_official(tmp_path)
    model = BitNetForCausalLM.from_pretrained(tmp_path)
    out = model.generate(torch.tensor([[1, 4, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    with pytest.raises(OSError, match="offline or unreachable"):
        BitNetForCausalLM.from_pretrained("no-such-org/no-such-bitnet-model")


@pytest.mark.parametrize("head", ["fp", "int8"])
def test_official_model_as_bitnet_transformer_decodes_the_same(tmp_path, head):
    """to_bitnet_transformer: same logits as the HF-layout model, and the fused native decode path."""
    from bitnet import BitNetForCausalLM
    from bitnet.hf.bitnet_official import to_bitnet_transformer
    from bitnet.models.fused_block import FusedBlock

    write_official(tmp_path)
    hf = BitNetForCausalLM.from_pretrained(tmp_path)
    ours = to_bitnet_transformer(hf, head=head)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)                                              # uncached: grouped native projections
        caches = ours.new_caches(1, 16)
        steps = [ours(ids[:, :5], caches=caches, start_pos=0)] + \
            [ours(ids[:, t:t + 1], caches=caches, start_pos=t) for t in range(5, 9)]   # one native call per block
    tol = 5e-3 if head == "fp" else 3e-2                             # int8 head: per-row weight rounding
    for out in (got, torch.cat(steps, 1)):
        assert ((out - ref).norm() / ref.norm()).item() < tol
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert FusedBlock.for_block(ours.layers[0]).native is not None
    assert {layer.ffn.post_norm.eps for layer in ours.layers} == {hf.config.rms_norm_eps}   # ffn_sub_norm's eps
    with pytest.raises(ValueError, match="head"):
        to_bitnet_transformer(hf, head="bf16")


def threshold_weight(shape, generator):
    """bf16 master weights where half the entries sit just above half of mean|W|: transformers' rule
    (round(W / clamp(mean|W|))) sends them to +-1, the paper's W / (mean|W| + 1e-5) to 0."""
    n = shape[0] * shape[1]
    a, c = 2.0 ** -6, 0.046875                                   # mean|W| = (a + c) / 2 = 2a exactly ...
    mags = torch.full((n,), c)
    mags[: n // 2] = a
    lower = max(1, round(n * 1e-4 * 2 * a / 2.44140625e-4))      # ... lowered by ~1e-4 relative with c - 1 ulp
    mags[n // 2: n // 2 + lower] = c - 2.44140625e-4
    signs = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    perm = torch.randperm(n, generator=generator)
    return (mags * signs)[perm].reshape(shape).to(torch.bfloat16)


def test_online_checkpoint_quantises_as_transformers(tmp_path):
    """Weights at the rounding threshold: our logits equal transformers' to ~1e-5 (packed and trainable)."""
    from safetensors.torch import load_file

    from bitnet import BitNetForCausalLM
    from bitnet.quant import ternary_weight_quant

    write_official(tmp_path, mode="online")
    state = load_file(str(tmp_path / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    for i in range(LAYERS):
        for name, shape in PROJ.items():
            state[f"model.layers.{i}.{name}.weight"] = threshold_weight(shape, g)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    w = state["model.layers.0.mlp.down_proj.weight"].float()
    paper, _ = ternary_weight_quant(w)
    ours = BitNetForCausalLM.from_pretrained(tmp_path)
    hf_values = ours.model.layers[0].mlp.down_proj.ternary_weight()
    assert (paper.abs().sum() < 0.6 * hf_values.abs().sum())      # the two rules really differ here
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = load_transformers(tmp_path)(ids).logits
        for got in (ours(ids).logits, BitNetForCausalLM.from_pretrained(tmp_path, trainable=True)(ids).logits):
            assert ((got - ref).norm() / ref.norm()).item() < 2e-5
