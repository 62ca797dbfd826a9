"""The float16 KV cache of bitnet_attention_step (csrc/attention.cpp, kv_dtype BITNET_KV_F16): what it writes
is torch's ``Tensor.half()`` of the float32 keys/values bit for bit (round to nearest even, subnormals,
overflow to inf), its attention equals the module path's on the same float16 cache (the entries widened
exactly, float32 math), a row's result depends only on its own row, and the AVX-512 and portable loops
(BITNET_ATTN_PORTABLE=1) give the same bits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet.nn.attention import KVCache
from bitnet.nn.rotary import RotaryEmbedding
from bitnet.ops import cpu as native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")

HEAD_DIMS = [2, 6, 18, 34, 64, 66, 98]      # full 16-float vectors, a masked tail, only a tail


def module_attention(qkv, b, t, hq, hkv, hd, rot, cache, start_pos):
    """Rotary, KVCache.update (float16: stored rounded, returned widened to float32) and masked SDPA in
    float64, as the module path computes it."""
    q, k, v = qkv.view(b, t, -1).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
    q = rot.rotate(q.reshape(b, t, hq, hd).transpose(1, 2), start_pos)
    k = rot.rotate(k.reshape(b, t, hkv, hd).transpose(1, 2), start_pos)
    k, v = cache.update(k, v.reshape(b, t, hkv, hd).transpose(1, 2), start_pos)
    assert k.dtype == torch.float32                       # the cache widens what it returns
    tk = k.shape[2]
    if isinstance(start_pos, torch.Tensor):
        mask = (torch.arange(tk).view(1, -1) <= start_pos.view(-1, 1)).view(-1, 1, 1, tk)
    else:
        mask = torch.ones(t, tk, dtype=torch.bool).tril(diagonal=tk - t)
    g = hq // hkv
    out = F.scaled_dot_product_attention(q.double(), k.repeat_interleave(g, 1).double(),
                                         v.repeat_interleave(g, 1).double(), attn_mask=mask)
    return out.transpose(1, 2).reshape(b * t, hq * hd).float()


def half_caches(b, hkv, max_len, hd, g):
    """A float16 cache with random earlier entries, and an identical twin."""
    mine = KVCache(b, hkv, max_len, hd, dtype=torch.float16)
    mine.k.copy_(torch.randn(mine.k.shape, generator=g))
    mine.v.copy_(torch.randn(mine.v.shape, generator=g))
    return mine, KVCache(b, hkv, max_len, hd, _storage=(mine.k.clone(), mine.v.clone()))


def with_threads(n, fn):
    old = native.get_num_threads()
    native.set_num_threads(n)
    try:
        return fn()
    finally:
        native.set_num_threads(old)


def special_values(n: int, g: torch.Generator) -> torch.Tensor:
    """n float32 values that exercise every branch of the float16 rounding: ties at both parities, the
    largest finite value and just above it (overflow to inf), subnormals and their ties, below the
    smallest subnormal, infinities, signed zeros, and random magnitudes over float16's whole range."""
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, float("inf"), float("-inf"),
                          6.103515625e-05, 6.1e-05, 5.960464477539063e-08, 2.9802322387695312e-08,
                          2.98023224e-08 * 1.0001, 1e-9, -1e-9, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11,
                          2049.0, 2051.0, -3 * 2 ** -25, 3 * 2 ** -25, 5 * 2 ** -25])
    rand = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 17, (n,), generator=g).float())
    return torch.cat([edges, rand])[:n]


@pytest.mark.parametrize("portable", ["0", "1"])
def test_written_entries_are_torch_half_of_the_float32_ones(tmp_path, portable):
    """The same step on a float32 and a float16 cache: the float16 entries written are ``.half()`` of the
    float32 ones, bit for bit (F16C/AVX-512 conversion, and the portable one)."""
    code = f"""
import torch
from bitnet.nn.rotary import RotaryEmbedding
from bitnet.ops import cpu
import importlib.util, sys
spec = importlib.util.spec_from_file_location("t", {__file__!r}); t = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t)
g = torch.Generator().manual_seed(1)
res = []
for hd, T in ((64, 1), (18, 1), (66, 3), (34, 9)):
    b, hq, hkv, L = 2, 4, 2, 16
    rot = RotaryEmbedding(hd, L)
    qkv = torch.randn(b * T, (hq + 2 * hkv) * hd, generator=g)
    qkv[:, (hq + hkv) * hd:] = t.special_values(b * T * hkv * hd, g).view(b * T, hkv * hd)   # the v heads
    qkv[:, hq * hd:(hq + hkv) * hd] *= torch.exp2(torch.randint(-28, 15, (b * T, hkv * hd), generator=g).float())
    k32, v32 = torch.zeros(b, hkv, L, hd), torch.zeros(b, hkv, L, hd)
    k16, v16 = k32.half(), v32.half()
    pos = torch.tensor([0, 5])
    cpu.attention_step(qkv.clone(), b, hq, hkv, hd, rot.cos, rot.sin, k32, v32, pos)
    cpu.attention_step(qkv.clone(), b, hq, hkv, hd, rot.cos, rot.sin, k16, v16, pos)
    res.append((k32, v32, k16, v16))
torch.save(res, {str(tmp_path / "res.pt")!r})
"""
    env = dict(os.environ, BITNET_ATTN_PORTABLE=portable)
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    for k32, v32, k16, v16 in torch.load(tmp_path / "res.pt", weights_only=True):
        assert k16.dtype == torch.float16
        assert torch.equal(k16.view(torch.int16), k32.half().view(torch.int16))
        assert torch.equal(v16.view(torch.int16), v32.half().view(torch.int16))
        subnormal = ((v16.view(torch.int16) & 0x7C00) == 0) & (v16 != 0)
        assert torch.isinf(v16).any() and subnormal.any()          # the edges were written


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.integers(1, 3), hd=st.sampled_from(HEAD_DIMS),
       n=st.lists(st.integers(1, 200), min_size=3, max_size=3), scale=st.sampled_from([0.5, 3.0]),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 999))
def test_decode_on_a_half_cache_matches_the_module_path(b, hkv, group, hd, n, scale, threads, seed):
    """One token per row at per-row positions (1..200 keys): the same float16 cache contents as the module
    path's KVCache writes, and the attention of the widened entries to float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    hq, max_len = hkv * group, 200
    positions = torch.tensor(n[:b], dtype=torch.int64) - 1
    mine, ref = half_caches(b, hkv, max_len, hd, g)
    rot = RotaryEmbedding(hd, max_len)
    qkv = torch.randn(b, (hq + 2 * hkv) * hd, generator=g) * scale
    want = module_attention(qkv.clone(), b, 1, hq, hkv, hd, rot, ref, positions)
    out = with_threads(threads, lambda: native.attention_step(qkv, b, hq, hkv, hd, rot.cos, rot.sin, mine.k, mine.v,
                                                              positions))
    assert torch.equal(mine.k.view(torch.int16), ref.k.view(torch.int16))
    assert torch.equal(mine.v.view(torch.int16), ref.v.view(torch.int16))
    assert torch.allclose(out, want, atol=2e-5, rtol=1e-4), (out - want).abs().max()


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), t=st.integers(2, 30), hkv=st.integers(1, 3), group=st.integers(1, 2),
       hd=st.sampled_from([2, 6, 34, 64]), start=st.integers(0, 20), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 999))
def test_prefill_on_a_half_cache_matches_the_module_path(b, t, hkv, group, hd, start, threads, seed):
    """T tokens per row from ``start`` (T >= 8: the blocked prefill loops; fewer: the decode loops)."""
    g = torch.Generator().manual_seed(seed)
    hq, max_len = hkv * group, 64
    mine, ref = half_caches(b, hkv, max_len, hd, g)
    rot = RotaryEmbedding(hd, max_len)
    qkv = torch.randn(b * t, (hq + 2 * hkv) * hd, generator=g) * 2
    want = module_attention(qkv.clone(), b, t, hq, hkv, hd, rot, ref, start)
    out = with_threads(threads, lambda: native.attention_step(qkv, b, hq, hkv, hd, rot.cos, rot.sin, mine.k, mine.v,
                                                              torch.full((b,), start, dtype=torch.int64)))
    assert torch.equal(mine.k.view(torch.int16), ref.k.view(torch.int16))
    assert torch.equal(mine.v.view(torch.int16), ref.v.view(torch.int16))
    assert torch.allclose(out, want, atol=2e-5, rtol=1e-4), (out - want).abs().max()


@pytest.mark.parametrize("threads", [1, 2])
def test_half_cache_decode_is_batch_invariant(threads):
    """Each row of a batch of 16 (positions 0..299, GQA, head_dim 66) gives the bits it gives alone."""
    b, hkv, hq, hd, max_len = 16, 2, 6, 66, 320
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 300, (b,), generator=g)
    cache, _ = half_caches(b, hkv, max_len, hd, g)
    rot = RotaryEmbedding(hd, max_len)
    qkv = torch.randn(b, (hq + 2 * hkv) * hd, generator=g)
    alone = [KVCache(1, hkv, max_len, hd, _storage=(cache.k[r:r + 1].clone(), cache.v[r:r + 1].clone()))
             for r in range(b)]

    def run():
        out = native.attention_step(qkv.clone(), b, hq, hkv, hd, rot.cos, rot.sin, cache.k, cache.v, positions)
        for r in range(b):
            one = native.attention_step(qkv[r:r + 1].clone(), 1, hq, hkv, hd, rot.cos, rot.sin, alone[r].k,
                                        alone[r].v, positions[r:r + 1].contiguous())
            assert torch.equal(one[0], out[r]), f"row {r} (position {int(positions[r])})"
            assert torch.equal(alone[r].k[0].view(torch.int16), cache.k[r].view(torch.int16))

    with_threads(threads, run)


_PROBE = """
import torch
from bitnet.nn.rotary import RotaryEmbedding
from bitnet.ops import cpu
g = torch.Generator().manual_seed(5)
outs = []
for hd in {dims}:
    for T in (1, 9):
        b, hkv, hq, L = 3, 2, 4, 270
        k, v = torch.randn(b, hkv, L, hd, generator=g).half(), torch.randn(b, hkv, L, hd, generator=g).half()
        rot = RotaryEmbedding(hd, L)
        qkv = torch.randn(b * T, (hq + 2 * hkv) * hd, generator=g)
        outs.append(cpu.attention_step(qkv, b, hq, hkv, hd, rot.cos, rot.sin, k, v, torch.tensor([0, 99, 258])))
        outs += [k, v]
torch.save(outs, {path!r})
"""


def test_half_cache_portable_loops_give_the_same_bits(tmp_path):
    """AVX-512 (F16C conversions, where the CPU has them) and the portable loops (software conversions):
    the same entries written and the same attention output, bit for bit, decode and prefill."""
    from .attention_probes import simd_and_portable_outputs   # here: a probe below loads this file as a script

    got = simd_and_portable_outputs(_PROBE, HEAD_DIMS, tmp_path)
    assert len(got[0]) == len(got[1]) == 3 * 2 * len(HEAD_DIMS)
    for i, (a, b) in enumerate(zip(*got)):
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.float16 else a,
                           b.view(torch.int16) if b.dtype == torch.float16 else b), f"output {i}"


def test_kv_dtypes_table_and_bad_caches():
    assert native.KV_DTYPES == (torch.float32, torch.float16, torch.int8)
    rot = RotaryEmbedding(8, 16)
    qkv = torch.randn(1, 6 * 8)
    k = torch.zeros(1, 2, 16, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"k_cache and v_cache must both have one dtype of \['torch.float32', "
                                         r"'torch.float16', 'torch.int8'\], got torch.float16 and torch.float32"):
        native.attention_step(qkv, 1, 2, 2, 8, rot.cos, rot.sin, k, k.float(), torch.tensor([0]))
    with pytest.raises(ValueError, match="got torch.bfloat16 and torch.bfloat16"):
        native.attention_step(qkv, 1, 2, 2, 8, rot.cos, rot.sin, k.bfloat16(), k.bfloat16(), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"k_cache must have shape \(1, 2, max_len, 8\)"):
        native.attention_step(qkv, 1, 2, 2, 8, rot.cos, rot.sin, k[:, :1].contiguous(), k[:, :1].contiguous(),
                              torch.tensor([0]))
    with pytest.raises(RuntimeError, match="position beyond the cache"):
        native.attention_step(qkv, 1, 2, 2, 8, rot.cos, rot.sin, k, k.clone(), torch.tensor([16]))
