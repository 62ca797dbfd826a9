"""CapturedDecoder: the fixed-shape decode step traces as one graph (torch.compile fullgraph) and
decodes exactly what the ordinary cached loop decodes, for fp and packed models."""

from __future__ import annotations

import pytest
import torch

import bitnet
from bitnet.generate.captured import CapturedDecoder
from bitnet.models import BitNetTransformer


def model(pack: bool):
    torch.manual_seed(0)
    m = BitNetTransformer(num_tokens=61, dim=64, depth=2, heads=4, kv_heads=2, max_seq_len=32).eval()
    return bitnet.pack(m) if pack else m


def reference_greedy(m, prompt, n):
    caches = m.new_caches(prompt.shape[0], 32)
    with torch.no_grad():
        logits = m(prompt, caches=caches, start_pos=0)[:, -1]
        out = [logits]
        for i in range(n):
            tok = logits.argmax(-1, keepdim=True)
            logits = m(tok, caches=caches, start_pos=prompt.shape[1] + i)[:, -1]
            out.append(logits)
    return torch.stack(out, 1)


@pytest.mark.parametrize("pack", [False, True])
def test_captured_step_is_one_graph_and_matches_the_loop(pack):
    m = model(pack)
    prompt = torch.randint(0, 61, (2, 5))
    want = reference_greedy(m, prompt, 6)
    torch._dynamo.reset()
    # backend="eager": dynamo captures the whole step (fullgraph: any graph break raises) without
    # needing a C++ toolchain for inductor; CUDA runs use inductor + CUDA graphs.
    dec = CapturedDecoder(m, batch=2, max_len=32, backend="eager")
    logits = dec.prefill(prompt)
    got = [logits]
    for _ in range(6):
        logits = dec.step(logits.argmax(-1, keepdim=True))
        got.append(logits)
    got = torch.stack(got, 1)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int8])
def test_captured_step_with_a_narrow_cache_follows_the_loop_on_the_same_cache(kv_dtype):
    m = model(True)
    prompt = torch.randint(0, 61, (2, 5))
    torch._dynamo.reset()
    dec = CapturedDecoder(m, batch=2, max_len=32, backend="eager", kv_dtype=str(kv_dtype).removeprefix("torch."))
    assert all(c.k.dtype == c.v.dtype == kv_dtype for c in dec.caches)
    caches = m.new_caches(2, 32, dtype=kv_dtype)                # the eager loop on a cache of that dtype
    with torch.no_grad():
        want = m(prompt, caches=caches, start_pos=0)[:, -1]
    got = dec.prefill(prompt)
    for i in range(4):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        tok = want.argmax(-1, keepdim=True)
        with torch.no_grad():
            want = m(tok, caches=caches, start_pos=prompt.shape[1] + i)[:, -1]
        got = dec.step(tok)
    with pytest.raises(ValueError, match="kv_dtype"):
        CapturedDecoder(m, kv_dtype="int4", compile=False)


def test_captured_decoder_errors():
    m = model(False)
    with pytest.raises(ValueError, match="batch"):
        CapturedDecoder(m, batch=0, compile=False)
    with pytest.raises(ValueError, match="max_len"):
        CapturedDecoder(m, max_len=64, compile=False)
    dec = CapturedDecoder(m, batch=1, max_len=4, compile=False)
    with pytest.raises(ValueError, match="tokens must have shape"):
        dec.prefill(torch.zeros(2, 3, dtype=torch.long))
    dec.prefill(torch.zeros(1, 3, dtype=torch.long))
    dec.step(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="caches are full"):
        dec.step(torch.zeros(1, 1, dtype=torch.long))
