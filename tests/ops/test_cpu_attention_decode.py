"""The decode attention of bitnet_attention_step (one token per row, csrc/attention.cpp attend_one)
against torch's scaled_dot_product_attention, and its batch invariance: a query's output depends only on
its own row (the same bits whatever the batch and the other rows' positions), and the AVX-512 and the
portable loops give the same bits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet.nn.attention import KVCache
from bitnet.nn.rotary import RotaryEmbedding
from bitnet.ops import cpu as native

from .attention_probes import simd_and_portable_outputs

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")

# head dims: the rotary needs an even one; 2..98 covers full 16-float vectors, a masked tail and only a tail
HEAD_DIMS = [2, 6, 18, 34, 50, 64, 66, 98]


def reference(qkv, hq, hkv, hd, rot, cache, positions):
    """Rotary, cache update and masked SDPA with the torch modules, for one token per row."""
    b = qkv.shape[0]
    q, k, v = qkv.view(b, 1, -1).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
    q = rot.rotate(q.reshape(b, 1, hq, hd).transpose(1, 2), positions)
    k = rot.rotate(k.reshape(b, 1, hkv, hd).transpose(1, 2), positions)
    k, v = cache.update(k, v.reshape(b, 1, hkv, hd).transpose(1, 2), positions)
    mask = (torch.arange(k.shape[2]).view(1, -1) <= positions.view(-1, 1)).view(-1, 1, 1, k.shape[2])
    g = hq // hkv
    out = F.scaled_dot_product_attention(q.double(), k.repeat_interleave(g, 1).double(),
                                         v.repeat_interleave(g, 1).double(), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, hq * hd).float()


def _setup(b, hkv, hd, max_len, positions, seed):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(b, hkv, max_len, hd)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    return g, cache


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.integers(1, 3), hd=st.sampled_from(HEAD_DIMS),
       n=st.lists(st.integers(1, 300), min_size=3, max_size=3), scale=st.sampled_from([0.5, 3.0]),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 999))
def test_decode_attention_matches_sdpa(b, hkv, group, hd, n, scale, threads, seed):
    """n keys per row (1..300, the new token included), rows at different positions."""
    hq, max_len = hkv * group, 300
    positions = torch.tensor(n[:b], dtype=torch.int64) - 1
    g, mine = _setup(b, hkv, hd, max_len, positions, seed)
    ref = KVCache(b, hkv, max_len, hd, _storage=(mine.k.clone(), mine.v.clone()))
    rot = RotaryEmbedding(hd, max_len)
    qkv = torch.randn(b, (hq + 2 * hkv) * hd, generator=g) * scale
    want = reference(qkv.clone(), hq, hkv, hd, rot, ref, positions)
    old = native.get_num_threads()
    native.set_num_threads(threads)
    try:
        out = native.attention_step(qkv, b, hq, hkv, hd, rot.cos, rot.sin, mine.k, mine.v, positions)
    finally:
        native.set_num_threads(old)
    assert torch.equal(mine.k, ref.k) and torch.equal(mine.v, ref.v)
    assert torch.allclose(out, want, atol=2e-5, rtol=1e-4), (out - want).abs().max()


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_is_batch_invariant(threads):
    """Each row of a batch of 16 (positions 0..299, GQA) gives the bits it gives alone."""
    b, hkv, hq, hd, max_len = 16, 2, 6, 66, 320
    positions = torch.randint(0, 300, (b,), generator=torch.Generator().manual_seed(1))
    g, cache = _setup(b, hkv, hd, max_len, positions, 2)
    rot = RotaryEmbedding(hd, max_len)
    qkv = torch.randn(b, (hq + 2 * hkv) * hd, generator=g)
    alone = [cache.row(r) for r in range(b)]
    alone = [KVCache(1, hkv, max_len, hd, _storage=(c.k.clone(), c.v.clone())) for c in alone]
    old = native.get_num_threads()
    native.set_num_threads(threads)
    try:
        out = native.attention_step(qkv.clone(), b, hq, hkv, hd, rot.cos, rot.sin, cache.k, cache.v, positions)
        for r in range(b):
            one = native.attention_step(qkv[r:r + 1].clone(), 1, hq, hkv, hd, rot.cos, rot.sin, alone[r].k,
                                        alone[r].v, positions[r:r + 1].contiguous())
            assert torch.equal(one[0], out[r]), f"row {r} (position {int(positions[r])})"
    finally:
        native.set_num_threads(old)


_PROBE = """
import torch
from bitnet.nn.rotary import RotaryEmbedding
from bitnet.ops import cpu
g = torch.Generator().manual_seed(5)
outs = []
for hd in {dims}:
    b, hkv, hq, L = 3, 2, 4, 260
    k, v = torch.randn(b, hkv, L, hd, generator=g), torch.randn(b, hkv, L, hd, generator=g)
    rot = RotaryEmbedding(hd, L)
    qkv = torch.randn(b, (hq + 2 * hkv) * hd, generator=g)
    outs.append(cpu.attention_step(qkv, b, hq, hkv, hd, rot.cos, rot.sin, k, v, torch.tensor([0, 99, 258])))
torch.save(outs, {path!r})
"""


def test_decode_attention_portable_loops_give_the_same_bits(tmp_path):
    """The AVX-512 intrinsics (where the CPU has them) and the portable loops (BITNET_ATTN_PORTABLE=1):
    the same operations in the same order, so the same bits."""
    got = simd_and_portable_outputs(_PROBE, HEAD_DIMS, tmp_path)
    for hd, a, b in zip(HEAD_DIMS, *got):
        assert torch.equal(a, b), f"head_dim {hd}"
