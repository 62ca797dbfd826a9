import pytest
import torch

import bitnet
from bitnet.generate import BitNetInference, generate, stream_generate
from bitnet.io import save_checkpoint
from bitnet.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return bitnet.BitNetTransformer(256, 32, 2, heads=4, kv_heads=2, max_seq_len=48).eval()


def test_cached_and_uncached_logits_agree(model):
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_caches(2, 20)
        pre = model(tokens[:, :12], caches=caches, start_pos=0)
        steps = [model(tokens[:, i:i + 1], caches=caches, start_pos=i) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat([pre, *steps], dim=1), full, atol=1e-4, rtol=1e-4)


def test_greedy_is_deterministic_and_matches_uncached(model):
    prompt = list(b"The dog ")
    a = generate(model, prompt, 16, temperature=0)
    assert a == generate(model, prompt, 16, temperature=0)
    assert a == generate(model, torch.tensor([prompt]), 16, temperature=0, use_cache=False)
    assert len(a) == 16


def test_seed_reproduces_and_streams(model):
    prompt = list(b"abc")
    a = generate(model, prompt, 12, seed=7, top_k=20, top_p=0.9)
    seen = []
    assert generate(model, prompt, 12, seed=7, top_k=20, top_p=0.9, callback=seen.append) == a == seen
    assert a != generate(model, prompt, 12, seed=8, top_k=20, top_p=0.9)
    assert torch.is_grad_enabled()


def test_stops_at_stop_token_and_max_seq_len(model):
    prompt = list(b"xy")
    greedy = generate(model, prompt, 10, temperature=0)
    stream = stream_generate(model, prompt, 10, temperature=0, stop_tokens=[greedy[3]])
    out = list(stream)
    assert out == greedy[:greedy.index(greedy[3])] and stream.finish_reason == "stop"
    stream = stream_generate(model, list(range(40)), 100, temperature=0)
    assert len(list(stream)) == 8 and stream.finish_reason == "max_seq_len"     # 40 + 8 = max_seq_len 48
    stream = stream_generate(model, prompt, 5)
    assert len(list(stream)) == 5 and stream.finish_reason == "length"


def test_context_shift_continues_past_max_seq_len(model):
    prompt = list(range(30))
    cached = stream_generate(model, prompt, 60, temperature=0, context_overflow="shift")
    out = list(cached)
    assert len(out) == 60 and cached.finish_reason == "length"              # 30 + 60 > max_seq_len 48
    assert out == generate(model, prompt, 60, temperature=0, context_overflow="shift", use_cache=False)
    assert out[:18] == generate(model, prompt, 18, temperature=0)           # identical until the first shift
    long_prompt = list(range(100))                                         # longer than the context
    assert len(generate(model, long_prompt, 5, temperature=0, context_overflow="shift")) == 5
    with pytest.raises(ValueError, match="context_overflow"):
        generate(model, prompt, 5, context_overflow="wrap")


def test_prompt_errors(model):
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [1, 300], 5)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, list(range(48)), 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], -1)


def test_bitnet_inference_load_and_generate(model, tmp_path):
    save_checkpoint(tmp_path / "run", model, tokenizer=ByteTokenizer())
    inf = BitNetInference(device="cpu")
    with pytest.raises(RuntimeError, match="load_model"):
        inf.model
    inf.load_model(tmp_path / "run")
    assert isinstance(inf.model, bitnet.BitNetTransformer) and not inf.model.training
    text = inf.generate("The dog jumped over the ", 20, temperature=0)
    assert isinstance(text, str) and inf.finish_reason == "length"
    assert text == ByteTokenizer().decode(generate(model, list(b"The dog jumped over the "), 20, temperature=0))
    assert inf.generate("The dog jumped over the ", 20, temperature=0, include_prompt=True).startswith("The dog")
    assert "".join(inf.stream("The dog jumped over the ", 20, temperature=0)) == text
    assert inf.generate("hi", 100, seed=1, context_overflow="stop") == \
        inf.generate("hi", 100, seed=1, context_overflow="stop")
    assert inf.finish_reason == "max_seq_len"
    assert len(inf.generate("hi", 100, temperature=0).encode("utf-8")) >= 90    # default: sliding window
    assert inf.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt"):
        inf.generate("", 10)


def test_pack_option_is_explicit(model, monkeypatch):
    monkeypatch.delattr(bitnet, "pack", raising=False)
    with pytest.raises(RuntimeError, match="bitnet.pack"):
        BitNetInference(model, device="cpu", pack=True)
    calls = []
    monkeypatch.setattr(bitnet, "pack", lambda m: calls.append(m) or m, raising=False)
    inf = BitNetInference(model, device="cpu", pack=True)
    assert calls == [model] and inf.model is model


def test_packed_inference_matches_training_form(model):
    if not hasattr(bitnet, "pack"):
        pytest.skip("this build has no bitnet.pack")
    import copy

    inf = BitNetInference(copy.deepcopy(model), device="cpu", pack=True)
    assert any(type(m).__name__ == "PackedBitLinear" for m in inf.model.modules())
    prompt = list(b"The dog ")
    assert generate(inf.model, prompt, 12, temperature=0) == generate(model, prompt, 12, temperature=0)


def test_a_model_with_nan_weights_stops_generation_with_a_clear_error():
    from bitnet.generate.sampling import NonFiniteLogitsError

    torch.manual_seed(0)
    broken = bitnet.BitNetTransformer(256, 32, 1, heads=4, max_seq_len=32).eval()
    with torch.no_grad():
        broken.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"generating token 1 \(position 3\).*NaN logits"):
        generate(broken, [1, 2, 3], 5, temperature=1.0, seed=0)   # was: RuntimeError 'probability tensor ...'
    with pytest.raises(ValueError, match="seed"):
        generate(broken, [1, 2, 3], 5, seed=2 ** 64)
