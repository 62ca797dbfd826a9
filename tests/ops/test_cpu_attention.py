"""bitnet.ops.cpu.attention_step (rotary + KV-cache append + causal attention in one native call)
against the torch modules it replaces: RotaryEmbedding, KVCache and scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet.nn.attention import KVCache
from bitnet.nn.rotary import RotaryEmbedding
from bitnet.ops import cpu as native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")


def reference(qkv, b, t, hq, hkv, hd, rot, cache, start_pos):
    q, k, v = qkv.view(b, t, -1).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
    q = q.reshape(b, t, hq, hd).transpose(1, 2)
    k = k.reshape(b, t, hkv, hd).transpose(1, 2)
    v = v.reshape(b, t, hkv, hd).transpose(1, 2)
    q, k = rot.rotate(q, start_pos), rot.rotate(k, start_pos)
    k, v = cache.update(k, v, start_pos)
    tk = k.shape[2]
    if isinstance(start_pos, torch.Tensor):
        mask = (torch.arange(tk).view(1, -1) <= start_pos.view(-1, 1)).view(-1, 1, 1, tk)
    else:
        mask = torch.ones(t, tk, dtype=torch.bool).tril(diagonal=tk - t)
    g = hq // hkv
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
    return out.transpose(1, 2).reshape(b * t, hq * hd)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 6), hkv=st.integers(1, 3), group=st.integers(1, 3),
       hd=st.sampled_from([2, 6, 16, 34, 64]), start=st.integers(0, 20), per_row=st.booleans(),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 999))
def test_attention_step_matches_torch(b, t, hkv, group, hd, start, per_row, threads, seed):
    g = torch.Generator().manual_seed(seed)
    hq, max_len = hkv * group, 32
    rot = RotaryEmbedding(hd, max_len)
    if per_row:
        t = 1
        start_pos = torch.randint(0, 20, (b,), generator=g)
        positions = start_pos.clone()
    else:
        start_pos, positions = start, torch.full((b,), start, dtype=torch.int64)
    # earlier tokens already in the cache: random contents, identical in both caches
    mine = KVCache(b, hkv, max_len, hd)
    mine.k.normal_(generator=g)
    mine.v.normal_(generator=g)
    ref = KVCache(b, hkv, max_len, hd, _storage=(mine.k.clone(), mine.v.clone()))
    qkv = torch.randn(b * t, (hq + 2 * hkv) * hd, generator=g)
    want = reference(qkv.clone(), b, t, hq, hkv, hd, rot, ref, start_pos)
    old = native.get_num_threads()
    native.set_num_threads(threads)
    try:
        out = native.attention_step(qkv, b, hq, hkv, hd, rot.cos, rot.sin, mine.k, mine.v, positions)
    finally:
        native.set_num_threads(old)
    assert torch.equal(mine.k, ref.k)                  # rotary in the torch operation order: bit for bit
    assert torch.equal(mine.v, ref.v)
    assert torch.allclose(out, want, atol=2e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), t=st.integers(8, 40), hkv=st.integers(1, 3), group=st.integers(1, 3),
       hd=st.sampled_from([2, 6, 16, 34, 64, 128]), start=st.integers(0, 20), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 999))
def test_prefill_blocks_match_torch(b, t, hkv, group, hd, start, threads, seed):
    """T >= 8 runs the blocked prefill path (16 queries of one head per block, partial last block)."""
    g = torch.Generator().manual_seed(seed)
    hq, max_len = hkv * group, 64
    rot = RotaryEmbedding(hd, max_len)
    mine = KVCache(b, hkv, max_len, hd)
    mine.k.normal_(generator=g)
    mine.v.normal_(generator=g)
    ref = KVCache(b, hkv, max_len, hd, _storage=(mine.k.clone(), mine.v.clone()))
    qkv = torch.randn(b * t, (hq + 2 * hkv) * hd, generator=g) * 2
    want = reference(qkv.clone(), b, t, hq, hkv, hd, rot, ref, start)
    old = native.get_num_threads()
    native.set_num_threads(threads)
    try:
        out = native.attention_step(qkv, b, hq, hkv, hd, rot.cos, rot.sin, mine.k, mine.v,
                                    torch.full((b,), start, dtype=torch.int64))
    finally:
        native.set_num_threads(old)
    assert torch.equal(mine.k, ref.k) and torch.equal(mine.v, ref.v)
    assert torch.allclose(out, want, atol=2e-5, rtol=1e-4)


def test_attention_step_long_context_uses_threads_and_matches():
    torch.manual_seed(0)
    b, t, hq, hkv, hd, max_len = 1, 40, 8, 2, 64, 512
    rot = RotaryEmbedding(hd, max_len)
    mine = KVCache(b, hkv, max_len, hd)
    mine.k.normal_()
    mine.v.normal_()
    ref = KVCache(b, hkv, max_len, hd, _storage=(mine.k.clone(), mine.v.clone()))
    qkv = torch.randn(b * t, (hq + 2 * hkv) * hd)
    want = reference(qkv.clone(), b, t, hq, hkv, hd, rot, ref, 400)
    out = native.attention_step(qkv, b, hq, hkv, hd, rot.cos, rot.sin, mine.k, mine.v, torch.tensor([400]))
    assert torch.allclose(out, want, atol=2e-5, rtol=1e-4)


def test_attention_step_errors():
    rot = RotaryEmbedding(8, 16)
    cache = KVCache(1, 2, 16, 8)
    qkv = torch.randn(2, 6 * 8)
    with pytest.raises(RuntimeError, match="position beyond the cache"):
        native.attention_step(qkv, 1, 2, 2, 8, rot.cos, rot.sin, cache.k, cache.v, torch.tensor([15]))
    with pytest.raises(ValueError, match="positions"):
        native.attention_step(qkv, 1, 2, 2, 8, rot.cos, rot.sin, cache.k, cache.v, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="qkv must have shape"):
        native.attention_step(qkv[:, :40].contiguous(), 1, 2, 2, 8, rot.cos, rot.sin, cache.k, cache.v, torch.tensor([0]))
    with pytest.raises(ValueError, match="k_cache"):
        native.attention_step(qkv, 1, 2, 2, 8, rot.cos, rot.sin, cache.k.double(), cache.v, torch.tensor([0]))
