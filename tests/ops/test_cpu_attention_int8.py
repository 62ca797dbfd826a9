"""The int8 KV cache (kv_dtype "int8": csrc/attention.cpp BITNET_KV_I8, bitnet.nn.attention.quantize_kv):
each key/value vector is stored as int8 with one float32 scale, d = max|x| / 127, q = round(x / d).

Pinned here: the quantiser's bounds (hypothesis, odd head sizes); the native step writes exactly what
``quantize_kv`` gives for the rotated keys and the values; its attention is bit for bit the float32 cache's
attention over the dequantised entries (``q * d``), decode and prefill, any thread count; and it equals the
module path (``KVCache(dtype=torch.int8)`` + SDPA in float64) to float32 rounding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet.nn.attention import KVCache, dequantize_kv, quantize_kv
from bitnet.nn.rotary import RotaryEmbedding
from bitnet.ops import cpu as native

from .attention_probes import simd_and_portable_outputs
from .test_cpu_attention_fp16 import HEAD_DIMS, module_attention, with_threads

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=2), hd=st.integers(1, 130),
       log_scale=st.integers(-30, 30), zero_rows=st.booleans(), seed=st.integers(0, 999))
def test_quantize_kv_bounds(shape, hd, log_scale, zero_rows, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, hd, generator=g) * 2.0 ** log_scale
    if zero_rows and x.dim() > 1:
        x[0] = 0
    q, d = quantize_kv(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and d.dtype == torch.float32 and d.shape == x.shape[:-1]
    assert q.abs().max() <= 127
    assert torch.equal(d, x.abs().amax(-1) / 127)
    back = dequantize_kv(q, d)
    # |x - q d| <= d / 2, up to the roundings of x / d and q * d
    assert ((back - x).abs() <= d.unsqueeze(-1) * (0.5 + 1e-5) + 1e-38).all()
    big = d > 0
    assert torch.equal(q.abs().amax(-1)[big], torch.full_like(q.abs().amax(-1)[big], 127))   # the max -> +-127
    assert (q[~big] == 0).all() and (back[~big] == 0).all()


def int8_caches(b, hkv, max_len, hd, g):
    """An int8 cache with random earlier entries and scales, and its float32 twin holding them dequantised."""
    mine = KVCache(b, hkv, max_len, hd, dtype=torch.int8)
    for t in (mine.k, mine.v):
        t.copy_(torch.randint(-127, 128, t.shape, generator=g))
    for t in (mine.k_scale, mine.v_scale):
        t.copy_(torch.rand(t.shape, generator=g) * 0.05)
    twin = KVCache(b, hkv, max_len, hd)
    twin.k.copy_(dequantize_kv(mine.k, mine.k_scale))
    twin.v.copy_(dequantize_kv(mine.v, mine.v_scale))
    return mine, twin


def exact_qkv(rows, hq, hkv, hd, g):
    """qkv rows whose k and v heads survive int8 storage unchanged: integers in [-127, 127] times a power of
    two, with a +-127 in each head (so d = 127 * 2^e / 127 = 2^e exactly and q * d = x)."""
    qkv = torch.randn(rows, (hq + 2 * hkv) * hd, generator=g)
    kv = torch.randint(-127, 128, (rows, 2 * hkv, hd), generator=g).float()
    kv[:, :, 0] = 127 * (torch.randint(0, 2, (rows, 2 * hkv), generator=g) * 2 - 1)
    kv *= torch.exp2(torch.randint(-8, 2, (rows, 2 * hkv, 1), generator=g).float())
    qkv[:, hq * hd:] = kv.view(rows, -1)
    return qkv


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.integers(1, 3), hd=st.sampled_from(HEAD_DIMS),
       t=st.sampled_from([1, 1, 3, 8, 17]), start=st.lists(st.integers(0, 40), min_size=3, max_size=3),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 999))
def test_int8_attention_is_float32_attention_of_the_dequantised_cache(b, hkv, group, hd, t, start, threads, seed):
    """Identity rotary tables (cos 1, sin 0: k is stored as given) and new k/v that int8 holds exactly: the
    int8 cache and its float32 twin get the same entries, and the attention (decode loops for T < 8, the
    blocked prefill loops for T >= 8; per-row positions) is bit for bit the same."""
    g = torch.Generator().manual_seed(seed)
    hq, max_len = hkv * group, 64
    mine, twin = int8_caches(b, hkv, max_len, hd, g)
    cos, sin = torch.ones(max_len, hd), torch.zeros(max_len, hd)
    qkv = exact_qkv(b * t, hq, hkv, hd, g)
    pos = torch.tensor(start[:b], dtype=torch.int64)
    out8 = with_threads(threads, lambda: native.attention_step(qkv.clone(), b, hq, hkv, hd, cos, sin, mine.k, mine.v,
                                                               pos, mine.k_scale, mine.v_scale))
    out32 = with_threads(threads, lambda: native.attention_step(qkv.clone(), b, hq, hkv, hd, cos, sin, twin.k, twin.v,
                                                                pos))
    assert torch.equal(dequantize_kv(mine.k, mine.k_scale), twin.k)       # the new entries were stored exactly
    assert torch.equal(dequantize_kv(mine.v, mine.v_scale), twin.v)
    assert torch.equal(out8, out32)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.integers(1, 3), hd=st.sampled_from(HEAD_DIMS),
       t=st.sampled_from([1, 2, 9, 20]), start=st.integers(0, 30), scale=st.sampled_from([0.3, 4.0]),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 999))
def test_int8_cache_matches_the_module_path(b, hkv, group, hd, t, start, scale, threads, seed):
    """Real rotary, random k/v: the native step writes the int8 entries and scales of the module path's
    KVCache (quantize_kv of the rotated keys, bit for bit), and its attention equals the module path's
    (dequantised entries, float64 SDPA) to float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    hq, max_len = hkv * group, 64
    mine, _ = int8_caches(b, hkv, max_len, hd, g)
    ref = KVCache(b, hkv, max_len, hd, _storage=tuple(x.clone() for x in mine.tensors()))
    rot = RotaryEmbedding(hd, max_len)
    qkv = torch.randn(b * t, (hq + 2 * hkv) * hd, generator=g) * scale
    want = module_attention(qkv.clone(), b, t, hq, hkv, hd, rot, ref, start)
    out = with_threads(threads, lambda: native.attention_step(qkv, b, hq, hkv, hd, rot.cos, rot.sin, mine.k, mine.v,
                                                              torch.full((b,), start, dtype=torch.int64),
                                                              mine.k_scale, mine.v_scale))
    for x, y in zip(mine.tensors(), ref.tensors()):
        assert torch.equal(x, y)
    err = (out - want).abs().max() / want.abs().max()          # float32 rounding, relative to the outputs' size
    assert err < 4e-5, err


def test_int8_cache_arguments_are_checked():
    rot = RotaryEmbedding(8, 16)
    qkv = torch.randn(1, 6 * 8)
    c = KVCache(1, 2, 16, 8, dtype=torch.int8)
    pos = torch.tensor([0])
    with pytest.raises(ValueError, match=r"k_scale must be the int8 cache's contiguous float32 scales of shape "
                                         r"\(1, 2, 16\), got None"):
        native.attention_step(qkv, 1, 2, 2, 8, rot.cos, rot.sin, c.k, c.v, pos)
    with pytest.raises(ValueError, match=r"v_scale must be .* got torch.float16 \(1, 2, 16\)"):
        native.attention_step(qkv, 1, 2, 2, 8, rot.cos, rot.sin, c.k, c.v, pos, c.k_scale, c.v_scale.half())
    with pytest.raises(ValueError, match=r"k_scale must be .* got torch.float32 \(1, 2, 8\)"):
        native.attention_step(qkv, 1, 2, 2, 8, rot.cos, rot.sin, c.k, c.v, pos, c.k_scale[:, :, :8], c.v_scale)
    f = KVCache(1, 2, 16, 8)
    with pytest.raises(ValueError, match="k_scale/v_scale belong to an int8 cache; this one is torch.float32"):
        native.attention_step(qkv, 1, 2, 2, 8, rot.cos, rot.sin, f.k, f.v, pos, c.k_scale, c.v_scale)


def test_int8_kv_cache_module_api():
    """KVCache(dtype=torch.int8): storage, row views that share it, update returning dequantised float32."""
    c = KVCache(3, 2, 10, 4, dtype=torch.int8)
    assert c.quantized and [t.shape for t in c.tensors()] == [(3, 2, 10, 4)] * 2 + [(3, 2, 10)] * 2
    r = c.row(1)
    k = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]]).view(1, 2, 1, 4)
    keys, values = r.update(k, -k, 3)
    assert keys.dtype == torch.float32 and keys.shape == (1, 2, 4, 4)
    assert torch.equal(c.k[1, :, 3], quantize_kv(k)[0][0, :, 0]) and torch.equal(c.k_scale[1, :, 3], quantize_kv(k)[1][0, :, 0])
    assert torch.equal(keys[0, :, 3], dequantize_kv(*quantize_kv(k[0, :, 0])))
    assert torch.allclose(keys[0, :, 3], k[0, :, 0], atol=4 / 127 / 2 + 1e-6) and (keys[0, 1, 3] == 0).all()
    assert torch.equal(values[0, :, 3], -keys[0, :, 3])
    static = KVCache(2, 1, 6, 4, dtype=torch.int8, static=True)
    ks, _ = static.update(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4), torch.tensor([0, 5]))
    assert ks.shape == (2, 1, 6, 4) and ks[0, 0, 0].eq(1).all() and ks[1, 0, 5].eq(1).all() and ks[0, 0, 5].eq(0).all()


_PROBE = """
import torch
from bitnet.nn.attention import KVCache
from bitnet.nn.rotary import RotaryEmbedding
from bitnet.ops import cpu
g = torch.Generator().manual_seed(5)
outs = []
for hd in {dims}:
    for T in (1, 9):
        b, hkv, hq, L = 3, 2, 4, 270
        c = KVCache(b, hkv, L, hd, dtype=torch.int8)
        for t in (c.k, c.v):
            t.copy_(torch.randint(-127, 128, t.shape, generator=g))
        for t in (c.k_scale, c.v_scale):
            t.copy_(torch.rand(t.shape, generator=g))
        rot = RotaryEmbedding(hd, L)
        qkv = torch.randn(b * T, (hq + 2 * hkv) * hd, generator=g) * 3
        qkv[0, hq * hd:(hq + 1) * hd] = 0                                 # a zero key: scale 0
        outs.append(cpu.attention_step(qkv, b, hq, hkv, hd, rot.cos, rot.sin, c.k, c.v, torch.tensor([0, 99, 258]),
                                       c.k_scale, c.v_scale))
        outs += list(c.tensors())
torch.save(outs, {path!r})
"""


def test_int8_cache_portable_loops_give_the_same_bits(tmp_path):
    """AVX-512 (quantiser and loads, where the CPU has it) and the portable loops (BITNET_ATTN_PORTABLE=1):
    the same int8 entries and scales written and the same attention output, bit for bit, decode and prefill."""
    simd, portable = simd_and_portable_outputs(_PROBE, HEAD_DIMS, tmp_path)
    assert len(simd) == len(portable) == 5 * 2 * len(HEAD_DIMS)
    for i, (a, b) in enumerate(zip(simd, portable)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i}"
