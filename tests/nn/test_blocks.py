"""BitFeedForward and BitMGQA: call forms, attention weights, causal masking, KV cache, errors."""

import pytest
import torch

from bitnet import BitFeedForward, BitLinear, BitMGQA
from bitnet.nn import KVCache


def test_feedforward_call_form():
    ff = BitFeedForward(512, 512, 4, swish=True, post_act_ln=True, dropout=0.1)
    assert ff(torch.randn(10, 512)).shape == (10, 512)
    assert all(isinstance(m, BitLinear) for m in (ff.up, ff.down))


def test_feedforward_variants():
    x = torch.randn(2, 3, 32)
    assert BitFeedForward(32, 16, 2)(x).shape == (2, 3, 16)
    glu = BitFeedForward(32, glu=True, activation="relu2")
    assert glu(x).shape == (2, 3, 32) and glu.gate is not None
    fp = BitFeedForward(32, weights="fp")
    assert type(fp.up) is torch.nn.Linear
    with pytest.raises(ValueError, match="activation"):
        BitFeedForward(32, activation="tanh")


def test_mgqa_call_form_and_weights():
    x = torch.randn(1, 10, 512)
    out, attn = BitMGQA(512, 8, 4)(x, x, x, need_weights=True)
    assert out.shape == (1, 10, 512)
    assert attn.shape == (1, 8, 10, 10)
    assert torch.allclose(attn.sum(-1), torch.ones(1, 8, 10), atol=1e-5)
    out2, none = BitMGQA(512, 8, 4)(x, x, x)
    assert out2.shape == (1, 10, 512) and none is None


def test_mgqa_causal_mask_and_sdpa_path_agree():
    torch.manual_seed(0)
    attn = BitMGQA(64, 4, 2).eval()
    x = torch.randn(2, 6, 64)
    out_w, w = attn(x, x, x, need_weights=True, is_causal=True)
    out_fast, _ = attn(x, x, x, is_causal=True)
    assert torch.allclose(out_w, out_fast, atol=1e-5)
    assert torch.all(w.triu(diagonal=1) == 0)                        # no look-ahead
    # a later token does not change earlier outputs
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert torch.allclose(attn(x2, x2, x2, is_causal=True)[0][:, :-1], out_fast[:, :-1], atol=1e-5)


def test_mgqa_kv_cache_matches_full_pass():
    torch.manual_seed(0)
    attn = BitMGQA(64, 4, 2, rotary=True, max_seq_len=32).eval()
    x = torch.randn(1, 9, 64)
    full, _ = attn(x, x, x, is_causal=True)
    cache = KVCache(1, 2, 16, 16)
    parts = [attn(x[:, :5], x[:, :5], x[:, :5], is_causal=True, cache=cache, start_pos=0)[0]]
    for t in range(5, 9):
        xt = x[:, t:t + 1]
        parts.append(attn(xt, xt, xt, is_causal=True, cache=cache, start_pos=t)[0])
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    assert cache.length == 9


@pytest.mark.parametrize("per_row", [False, True])
def test_half_kv_cache_stores_rounded_and_returns_float32(per_row):
    """A float16 cache beside float32 k/v: the entries are .half() of them, update returns them widened,
    the attention over it stays close to the float32 cache's (the only difference: the rounding)."""
    torch.manual_seed(1)
    attn = BitMGQA(64, 4, 2, rotary=True, max_seq_len=32).eval()
    x = torch.randn(2, 9, 64)
    caches = {dt: KVCache(2, 2, 16, 16, dtype=dt) for dt in (torch.float32, torch.float16)}
    outs = {}
    for dt, cache in caches.items():
        parts = [attn(x[:, :5], x[:, :5], x[:, :5], is_causal=True, cache=cache, start_pos=0)[0]]
        for t in range(5, 9):
            xt, pos = x[:, t:t + 1], (torch.tensor([t, t]) if per_row else t)
            parts.append(attn(xt, xt, xt, is_causal=True, cache=cache, start_pos=pos)[0])
        outs[dt] = torch.cat(parts, 1)
    half, full = caches[torch.float16], caches[torch.float32]
    assert half.k.dtype == torch.float16 and torch.equal(half.k, full.k.half()) and torch.equal(half.v, full.v.half())
    k, v = half.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), 9)
    assert k.dtype == v.dtype == torch.float32 and torch.equal(k[:, :, :9], full.k[:, :, :9].half().float())
    assert outs[torch.float16].dtype == torch.float32
    assert torch.allclose(outs[torch.float16], outs[torch.float32], atol=5e-3, rtol=5e-3)
    assert not torch.equal(outs[torch.float16], outs[torch.float32])


def test_kv_dtype_names_and_errors():
    from bitnet.nn.attention import kv_dtype

    assert kv_dtype("float16") is torch.float16 and kv_dtype(torch.float32) is torch.float32 and kv_dtype(None) is None
    assert kv_dtype("int8") is kv_dtype(torch.int8) is torch.int8
    for bad in ("fp16", "half", torch.int16, torch.uint8, 16):
        with pytest.raises(ValueError, match=r"kv_dtype must be one of float32, float16, bfloat16, int8 .*got"):
            kv_dtype(bad)
    for bad in (torch.int16, torch.uint8, torch.bool):
        with pytest.raises(ValueError, match="dtype must be a floating torch.dtype .* or torch.int8"):
            KVCache(1, 2, 4, 8, dtype=bad)
    with pytest.raises(ValueError, match=r"an int8 cache's storage is \(k, v, k_scale, v_scale\)"):
        KVCache(1, 2, 4, 8, _storage=(torch.zeros(1, 2, 4, 8, dtype=torch.int8),) * 2)


def test_mgqa_errors_name_the_argument():
    with pytest.raises(ValueError, match="query_heads=7 .*embed_dim=512"):
        BitMGQA(512, 7, 1)
    with pytest.raises(ValueError, match="kv_heads=3 .*query_heads=8"):
        BitMGQA(512, 8, 3)
    with pytest.raises(ValueError, match="query"):
        BitMGQA(64, 4, 2)(torch.randn(1, 3, 32), torch.randn(1, 3, 64), torch.randn(1, 3, 64))
