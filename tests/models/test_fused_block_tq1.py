"""TQ1 weights (bitnet.convert.tq1.repack_tq1) through the fused native block: the same logits as the I2
fused block, bit for bit, on every ISA.

Both models run the native block (csrc/block.cpp) with the same norms, quantiser, attention, gate and
epilogue; only the linear sets' weight format differs (BITNET_WEIGHTS_I2 / _TQ1), and the integer
products are exact in both layouts. So nothing inexact differs between the two runs: torch.equal.
"""

from __future__ import annotations

import copy

import pytest
import torch

import bitnet
from bitnet.convert.tq1 import repack_tq1
from bitnet.models import BitNetTransformer, native_block_calls
from bitnet.models.fused_block import FusedBlock, unsupported
from bitnet.nn.packed import PackedBitLinear
from bitnet.nn.tq1_linear import PackedTQ1BitLinear
from bitnet.ops import cpu as native
from bitnet.ops import tq1 as tq1_ops

pytestmark = pytest.mark.skipif(not (native.available() and tq1_ops.available()),
                                reason=f"native TQ1 kernels not built: {native.LOAD_ERROR or tq1_ops.LOAD_ERROR}")

VOCAB = 97


def twin_models(kv_heads=2, activation="silu", dim=128, seed=0, bias=False):
    """(I2 packed model, its TQ1 repack): the same weights in both layouts."""
    torch.manual_seed(seed)
    m = BitNetTransformer(num_tokens=VOCAB, dim=dim, depth=2, heads=8, kv_heads=kv_heads, max_seq_len=64,
                          activation=activation).eval()
    i2 = bitnet.pack(m)
    if bias:                                            # biases on the projections: the epilogue adds them
        for layer in i2.modules():
            if type(layer) is PackedBitLinear:
                layer.bias = torch.nn.Parameter(torch.randn(layer.out_features) * 0.1, requires_grad=False)
    q1 = repack_tq1(copy.deepcopy(i2))
    assert {type(x) for x in q1.modules() if isinstance(x, PackedBitLinear)} == {PackedTQ1BitLinear}
    return i2, q1


def native_run(fn):
    """fn() with at least one native block call (else the fused path did not run)."""
    calls = native_block_calls()
    out = fn()
    assert native_block_calls() > calls, "the fused native block did not run"
    return out


def decode(model, prompt, steps, tokens=None):
    """Cached prefill of prompt (B, P), then `steps` one-token steps (greedy, or the given tokens
    (B, steps)): logits (B, steps + 1, V) and the tokens fed."""
    b, p = prompt.shape
    caches = model.new_caches(b, p + steps)
    out = [native_run(lambda: model(prompt, caches=caches, start_pos=0))[:, -1]]
    fed = []
    for i in range(steps):
        tok = out[-1].argmax(-1, keepdim=True) if tokens is None else tokens[:, i:i + 1]
        fed.append(tok)
        out.append(native_run(lambda: model(tok, caches=caches, start_pos=p + i))[:, -1])
    return torch.stack(out, 1), torch.cat(fed, 1) if fed else None


@pytest.mark.parametrize("activation,kv_heads", [("silu", 2), ("relu2", 2), ("silu", 8), ("gelu", 4)])
def test_tq1_fused_block_equals_i2_fused_block(isa, activation, kv_heads):
    """Prefill (7 tokens, 2 rows) and 12 cached greedy steps: identical logits, every ISA, GQA and MHA."""
    i2, q1 = twin_models(kv_heads, activation)
    assert unsupported(q1.layers[0].spec()) is None
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, fed = decode(i2, prompt, 12)
        got, _ = decode(q1, prompt, 12, fed)
        # the uncached scoring pass (scratch cache, 2 x 9 tokens) too
        full = torch.cat([prompt, fed[:, :2]], 1)
        assert torch.equal(native_run(lambda: q1(full)), native_run(lambda: i2(full)))
    assert torch.equal(got, want)
    assert all(g.format == 1 for g in FusedBlock.for_block(q1.layers[0]).groups.values())
    assert all(g.format == 0 for g in FusedBlock.for_block(i2.layers[0]).groups.values())


def test_batched_rows_at_different_positions(isa):
    """Rows prefilled alone to lengths 3, 9 and 5, then 10 one-token steps at per-row positions (the
    server's batched decode step, int64 positions): identical logits for I2 and TQ1."""
    i2, q1 = twin_models(kv_heads=2, activation="relu2", dim=320, bias=True)   # K = 320: one whole TQ1 block
    prompts = [torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 5)]
    results = []
    with torch.no_grad():
        for model in (i2, q1):
            caches = model.new_caches(3, 24)
            last = []
            for i, p in enumerate(prompts):
                rows = [c.row(i) for c in caches]
                last.append(native_run(lambda: model(p, caches=rows, start_pos=0))[0, -1])
            pos = torch.tensor([p.shape[1] for p in prompts])
            logits = [torch.stack(last)]
            for step in range(10):
                tok = torch.tensor([[(7 * step + r) % VOCAB] for r in range(3)])        # the same tokens in both
                logits.append(native_run(lambda: model(tok, caches=caches, start_pos=pos))[:, -1])
                pos = pos + 1
            results.append(torch.stack(logits, 1))
    assert torch.equal(results[1], results[0])


def test_tq1_group_equals_i2_group(isa):
    """The q|k|v set alone (norm + quantise once + three matrices): bit for bit, with biases."""
    i2, q1 = twin_models(dim=320, bias=True)
    g_i2 = FusedBlock.for_block(i2.layers[0]).groups["qkv"]
    g_q1 = FusedBlock.for_block(q1.layers[0]).groups["qkv"]
    assert isinstance(g_q1, tq1_ops.TQ1LinearGroup) and type(g_i2) is native.BitLinearGroup
    x = torch.randn(5, 320) * 3
    x[2] = 0.0                                                       # an all-zero token (scale clamp)
    w = i2.layers[0].attn_norm.weight.detach()
    assert torch.equal(g_q1(x, w, 1e-6), g_i2(x, w, 1e-6))
    assert torch.equal(g_q1(x), g_i2(x))


def test_mixed_formats_in_one_set_take_the_module_path():
    """q TQ1 and k, v I2: one native call reads one format, so the block says why it cannot run natively."""
    i2, _ = twin_models()
    repack_tq1(i2, filter_fn=lambda m, name: name.endswith("q_proj"))
    reason = unsupported(i2.layers[0].spec())
    assert reason is not None and "q|k|v mix weight formats" in reason
    with pytest.warns(UserWarning, match="mix weight formats"):      # said once per process, here
        assert FusedBlock.for_block(i2.layers[1]) is None


def test_tq1_group_rejects_i2_rows():
    i2, _ = twin_models()
    q = i2.layers[0].attn.q_proj
    with pytest.raises(ValueError, match="TQ1 rows"):
        tq1_ops.TQ1LinearGroup([q.w_packed], [q.w_scale], [None], q.in_features)
