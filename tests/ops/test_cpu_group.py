"""bitnet.ops.cpu.BitLinearGroup: several packed matrices behind one native call (q/k/v, gate/up),
with the optional RMSNorm before quantisation, against one call per matrix and the torch norm."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bitnet.ops as ops
from bitnet.nn import RMSNorm
from bitnet.ops import cpu as native
from bitnet.quant import pack_i2

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")


def make_group(k, sizes, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    ws = [pack_i2(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)) for n in sizes]
    scales = [torch.tensor(float(torch.rand((), generator=g)) + 0.01) for _ in sizes]
    biases = [torch.randn(n, generator=g) if bias else None for n in sizes]
    return ws, scales, biases


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 400), sizes=st.lists(st.integers(1, 70), min_size=1, max_size=3),
       bias=st.booleans(), threads=st.sampled_from([1, 2]), seed=st.integers(0, 999))
def test_group_equals_one_call_per_matrix(m, k, sizes, bias, threads, seed):
    ws, scales, biases = make_group(k, sizes, seed, bias)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)) * 3
    old = native.get_num_threads()
    native.set_num_threads(threads)
    try:
        y = native.BitLinearGroup(ws, scales, biases, k)(x)
    finally:
        native.set_num_threads(old)
    assert y.shape == (m, sum(sizes))
    want = torch.cat([ops.bitlinear_packed(x, w, s, k, b) for w, s, b in zip(ws, scales, biases)], dim=-1)
    assert torch.equal(y, want)                       # same quantisation, same kernel: bit for bit


@pytest.mark.parametrize("m,k", [(1, 2560), (3, 129), (6, 77)])
def test_group_norm_matches_rmsnorm_then_linear(m, k):
    ws, scales, biases = make_group(k, [40, 13], seed=k)
    norm = RMSNorm(k, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k) + 0.5)
    x = torch.randn(m, k) * 4 + 1
    group = native.BitLinearGroup(ws, scales, biases, k)
    y = group(x, norm.weight.detach(), norm.eps)
    with torch.no_grad():
        h = norm(x)
    want = torch.cat([ops.bitlinear_packed(h, w, s, k) for w, s in zip(ws, scales)], dim=-1)
    # the C norm may round an activation to the neighbouring int8 code: a tiny fraction of one step
    step = max(float(s) for s in scales) * h.abs().amax() / 127
    assert (y - want).abs().max() <= 2 * step
    q, kk = group.split(y)
    assert q.shape == (m, 40) and kk.shape == (m, 13)


def test_group_reads_scales_at_call_time_and_tracks_storage():
    ws, scales, biases = make_group(64, [8, 8])
    group = native.BitLinearGroup(ws, scales, biases, 64)
    x = torch.randn(2, 64)
    y1 = group(x)
    scales[0].mul_(2)                                 # in-place change: seen by the next call
    assert torch.allclose(group(x)[:, :8], 2 * y1[:, :8])
    assert group.valid_for(ws, scales)
    assert not group.valid_for([w.clone() for w in ws], scales)


def test_group_errors_name_the_argument():
    ws, scales, biases = make_group(64, [8])
    with pytest.raises(ValueError, match="equally long"):
        native.BitLinearGroup(ws, scales, [], 64)
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        native.BitLinearGroup([ws[0].to(torch.int8)], scales, biases, 64)
    with pytest.raises(ValueError, match=r"scales\[0\]"):
        native.BitLinearGroup(ws, [torch.ones(2)], biases, 64)
    group = native.BitLinearGroup(ws, scales, biases, 64)
    with pytest.raises(ValueError, match="x must be float32"):
        group(torch.randn(2, 63))


def test_prefetch_then_calls_of_changing_size_stay_exact():
    """Stress the pool: background prefetches interleaved with parallel calls of different task
    counts (a late worker must never claim a task of the wrong call)."""
    old = native.get_num_threads()
    native.set_num_threads(2)
    try:
        groups, inputs, wants = [], [], []
        for i, (k, sizes) in enumerate([(256, [300, 40]), (640, [1000]), (128, [16, 16, 16]), (2560, [64])]):
            ws, scales, biases = make_group(k, sizes, seed=i)
            g = native.BitLinearGroup(ws, scales, biases, k)
            x = torch.randn(1 + i % 2, k)
            groups.append(g)
            inputs.append(x)
            wants.append(g(x))
        for step in range(400):
            i = step % len(groups)
            groups[(i + 1) % len(groups)].prefetch()
            assert torch.equal(groups[i](inputs[i]), wants[i]), step
    finally:
        native.set_num_threads(old)
