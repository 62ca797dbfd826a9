"""Batched decoding through the fused native blocks is batch invariant: a row decoded inside a batch of B
(rows at different positions) gives bitwise the logits and cache it gives decoded alone, on every ISA
the CPU has (the integer kernels differ with the batch size M: AMX panels at M >= 8, VNNI tiles below)."""

from __future__ import annotations

import pytest
import torch

from bitnet.bench import build_random_model
from bitnet.models import fused_block
from bitnet.nn.attention import KVCache
from bitnet.ops import cpu as native

from .kv_fill import fill_random

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")

MAX_LEN = 96


@pytest.fixture(scope="module")
def model():
    # dim 256 (two I2 block pairs), head_dim 34 (a 16-float tail), gated silu FFN
    return build_random_model(dict(dim=272, depth=2, heads=8, kv_heads=4, num_tokens=256), "packed",
                              max_seq_len=MAX_LEN, seed=3)


def _caches(model, batch, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    caches = model.new_caches(batch, MAX_LEN, dtype=dtype)
    fill_random(caches, g)
    return caches


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("isa", native.supported_isas())
@pytest.mark.parametrize("batch", [2, 5, 16])
def test_row_in_batch_equals_row_alone(model, isa, batch, kv_dtype):
    g = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, 256, (batch, 1), generator=g)
    positions = torch.randint(0, MAX_LEN - 1, (batch,), generator=g)
    caches = _caches(model, batch, seed=batch, dtype=kv_dtype)
    alone = [[KVCache(1, c.k.shape[1], MAX_LEN, c.k.shape[3], _storage=tuple(t[r:r + 1].clone() for t in c.tensors()))
              for c in caches] for r in range(batch)]
    old = native.default_isa()
    native.set_default_isa(isa)
    try:
        with torch.inference_mode():
            calls = fused_block.native_block_calls()
            logits = model(tokens, caches, positions)
            assert fused_block.native_block_calls() == calls + len(caches)     # the fused path ran
            for r in range(batch):
                one = model(tokens[r:r + 1], alone[r], positions[r:r + 1].clone())
                assert torch.equal(one[0], logits[r]), f"{isa}: row {r} of {batch} (position {int(positions[r])})"
                for c, a in zip(caches, alone[r]):
                    assert c.k.dtype == a.k.dtype == kv_dtype
                    assert all(torch.equal(x[r], y[0]) for x, y in zip(c.tensors(), a.tensors()))
    finally:
        native.set_default_isa(old)


def test_batched_logits_do_not_depend_on_the_isa(model):
    """The integer results are exact on every ISA, so the float logits agree bit for bit too."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (16, 1), generator=g)
    positions = torch.randint(0, MAX_LEN - 1, (16,), generator=g)
    old = native.default_isa()
    got = {}
    try:
        for isa in native.supported_isas():
            native.set_default_isa(isa)
            with torch.inference_mode():
                got[isa] = model(tokens, _caches(model, 16, seed=11), positions)
    finally:
        native.set_default_isa(old)
    first = next(iter(got.values()))
    for isa, logits in got.items():
        assert torch.equal(logits, first), isa
