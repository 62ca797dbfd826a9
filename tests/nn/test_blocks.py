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


def test_mgqa_errors_name_the_argument():
    with pytest.raises(ValueError, match="query_heads=7 .*embed_dim=512"):
        BitMGQA(512, 7, 1)
    with pytest.raises(ValueError, match="kv_heads=3 .*query_heads=8"):
        BitMGQA(512, 8, 3)
    with pytest.raises(ValueError, match="query"):
        BitMGQA(64, 4, 2)(torch.randn(1, 3, 32), torch.randn(1, 3, 64), torch.randn(1, 3, 64))
