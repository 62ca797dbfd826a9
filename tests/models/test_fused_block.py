"""The fused native path of packed TransformerBlocks (bitnet.models.fused_block) gives the module
path's outputs, in prefill and cached decode, and is only taken when it may be."""

from __future__ import annotations

import pytest
import torch

import bitnet
import bitnet.models.transformer as transformer
import bitnet.ops as ops
from bitnet.models import BitNetTransformer
from bitnet.models.fused_block import FusedBlock, use_fused
from bitnet.ops import cpu as native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")


def packed_model(kv_heads=2, activation="silu", seed=0):
    torch.manual_seed(seed)
    m = BitNetTransformer(num_tokens=97, dim=128, depth=2, heads=8, kv_heads=kv_heads, max_seq_len=48,
                          activation=activation).eval()
    return bitnet.pack(m)


def module_path(monkeypatch):
    monkeypatch.setattr(transformer, "use_fused", lambda block, x: None)


@pytest.mark.parametrize("kv_heads,activation", [(2, "silu"), (8, "relu2")])
def test_fused_logits_equal_module_path(monkeypatch, kv_heads, activation):
    m = packed_model(kv_heads, activation)
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert use_fused(m.layers[0], m.embed(tokens)) is not None
        fused = m(tokens)
        module_path(monkeypatch)
        ref = m(tokens)
    assert (fused - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.parametrize("kv_heads,activation", [(2, "silu"), (8, "gelu"), (4, "relu2")])
def test_fused_cached_decode_equals_module_path(monkeypatch, kv_heads, activation):
    m = packed_model(kv_heads, activation)
    assert FusedBlock.for_block(m.layers[0]).native is not None       # the one-call native block
    prompt = torch.randint(0, 97, (1, 7))

    def decode():
        caches = m.new_caches(1, 20)
        out = [m(prompt, caches=caches, start_pos=0)[:, -1]]
        tok = out[0].argmax(-1, keepdim=True)
        for i in range(6):
            out.append(m(tok, caches=caches, start_pos=7 + i)[:, -1])
            tok = out[-1].argmax(-1, keepdim=True)
        return torch.stack(out)

    with torch.no_grad():
        fused = decode()
        module_path(monkeypatch)
        ref = decode()
    assert (fused - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_fused_path_only_when_allowed():
    m = packed_model()
    x = m.embed(torch.randint(0, 97, (1, 3))).detach()
    block = m.layers[0]
    assert use_fused(block, x) is not None
    assert use_fused(block, x.double()) is None                       # float32 only
    assert use_fused(block, x.clone().requires_grad_()) is None       # autograd needs the module path
    ops.set_backend("reference")
    try:
        assert use_fused(block, x) is None                            # another backend chosen
    finally:
        ops.set_backend("auto")
    block.train()
    assert use_fused(block, x) is None
    unpacked = BitNetTransformer(num_tokens=97, dim=128, depth=1, heads=8, max_seq_len=16).eval()
    assert FusedBlock.for_block(unpacked.layers[0]) is None           # BitLinear (training form)


def test_fused_runner_follows_reloaded_weights():
    m = packed_model()
    tokens = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        before = m(tokens)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        other = packed_model(seed=1)
        m.load_state_dict(other.state_dict(), assign=True)            # new storage everywhere
        assert torch.allclose(m(tokens), other(tokens))
        m.load_state_dict(state, assign=True)
        assert torch.allclose(m(tokens), before)


def test_fused_batched_rows_at_different_positions(monkeypatch):
    """Continuous batching: one token per row at per-row positions (the server's decode step)."""
    m = packed_model()
    caches = m.new_caches(3, 24)
    ref_caches = m.new_caches(3, 24)
    prompts = [torch.randint(0, 97, (1, n)) for n in (3, 6, 4)]
    with torch.no_grad():
        for i, p in enumerate(prompts):
            m(p, caches=[c.row(i) for c in caches], start_pos=0)
        pos = torch.tensor([3, 6, 4])
        tok = torch.randint(0, 97, (3, 1))
        fused = m(tok, caches=caches, start_pos=pos)
        module_path(monkeypatch)
        for i, p in enumerate(prompts):
            m(p, caches=[c.row(i) for c in ref_caches], start_pos=0)
        ref = m(tok, caches=ref_caches, start_pos=pos)
    assert (fused - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_fused_cache_overflow_names_the_limit():
    m = packed_model()
    caches = m.new_caches(1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache is full"):
        m(torch.randint(0, 97, (1, 5)), caches=caches, start_pos=0)


def test_block_hooks_still_run_with_a_cache():
    """The all-blocks native loop skips module calls, so a model with block hooks goes block by block."""
    m = packed_model()
    calls = []
    handle = m.layers[1].register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    caches = m.new_caches(1, 8)
    tokens = torch.randint(0, 97, (1, 3))
    with torch.no_grad():
        hooked = m(tokens, caches=caches, start_pos=0)
        handle.remove()
        plain = m(tokens, caches=m.new_caches(1, 8), start_pos=0)
    assert calls == [torch.Size([1, 3, 128])]
    assert torch.allclose(hooked, plain, atol=1e-6)
    assert caches[0].length == 3
