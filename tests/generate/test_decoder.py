"""Decoder: the one prefill / batched-step object behind generation, the server engine, the captured
decoder and the decode benchmarks. Its results must equal a full uncached forward, a row's results must
not depend on the other rows of its batch, and it applies the thread policy."""

from __future__ import annotations

import pytest
import torch

import bitnet
from bitnet.generate import Decoder, generate
from bitnet.models import BitNetTransformer
from bitnet.models import fused_block
from bitnet.runtime import torch_threads
from bitnet.serve.engine import Engine, SamplingParams, collect
from bitnet.tokenizer import ByteTokenizer


def tiny(pack: bool, vocab: int = 61, max_seq_len: int = 48):
    torch.manual_seed(0)
    m = BitNetTransformer(num_tokens=vocab, dim=64, depth=2, heads=4, kv_heads=2, max_seq_len=max_seq_len).eval()
    return bitnet.pack(m) if pack else m


def full_logits(m, ids):
    with torch.inference_mode():
        return m(torch.tensor([ids]))[0]                                  # (T, vocab)


@pytest.mark.parametrize("pack", [False, True])
def test_prefill_then_steps_equal_the_uncached_forward(pack):
    m = tiny(pack)
    ids = torch.randint(0, 61, (20,)).tolist()
    want = full_logits(m, ids)
    dec = Decoder(m, rows=1, max_len=32)
    got = [dec.prefill(ids[:7])]
    for i in range(7, 20):
        got.append(dec.step([ids[i]])[0])
    got = torch.stack(got)
    torch.testing.assert_close(got, want[6:], rtol=2e-4, atol=2e-4)
    assert dec.positions == [20] and dec.room(0) == 12


@pytest.mark.parametrize("pack", [False, True])
def test_a_prompt_fed_in_pieces_equals_one_prefill(pack):
    m = tiny(pack)
    ids = torch.randint(0, 61, (12,)).tolist()
    one, pieces = Decoder(m, max_len=16), Decoder(m, max_len=16)
    a = one.prefill(ids)
    pieces.prefill(ids[:5])
    b = pieces.prefill(ids[5:])
    torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


def decode_alone(m, prompt, feed):
    dec = Decoder(m, rows=1, max_len=32)
    out = [dec.prefill(prompt)]
    out += [dec.step([t])[0] for t in feed]
    return torch.stack(out)


@pytest.mark.parametrize("pack", [False, True])
def test_rows_at_different_positions_decode_as_if_alone(pack):
    """Three rows with prompts of 3, 9 and 5 tokens step together (row 1 joins late, row 2 rides along
    unlisted for two steps): every row's logits equal the same row decoded on its own. On the packed
    native path they are bit for bit equal (integer matmuls; per-row epilogue)."""
    m = tiny(pack)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 9, 5)]
    feeds = [torch.randint(0, 61, (6,), generator=g).tolist() for _ in range(3)]
    dec = Decoder(m, rows=3, max_len=32)
    got = {r: [] for r in range(3)}
    got[0].append(dec.prefill(prompts[0], row=0))
    got[2].append(dec.prefill(prompts[2], row=2))
    for i in range(2):                                   # row 2 unlisted: rides along, unchanged
        got[0].append(dec.step([feeds[0][i]], rows=[0])[0])
    got[1].append(dec.prefill(prompts[1], row=1))
    for i in range(6):
        rows = [r for r in (2, 0, 1) if len(got[r]) - 1 < 6]
        toks = [feeds[r][len(got[r]) - 1] for r in rows]
        logits = dec.step(toks, rows=rows)
        for r, row_logits in zip(rows, logits):
            got[r].append(row_logits)
    for r in range(3):
        want = decode_alone(m, prompts[r], feeds[r])
        have = torch.stack(got[r][:7])
        if pack and bitnet.ops.backend("cpu") == "cpu":
            assert torch.equal(have, want), f"row {r} differs from the row decoded alone"
        else:
            torch.testing.assert_close(have, want, rtol=2e-4, atol=2e-4)


def test_step_runs_one_native_forward_for_all_rows():
    m = tiny(True)
    if bitnet.ops.backend("cpu") != "cpu":
        pytest.skip("native CPU backend not available")
    dec = Decoder(m, rows=4, max_len=16)
    for r in range(4):
        dec.prefill([1 + r, 2], row=r)
    before = fused_block.native_block_calls()
    dec.step([5, 6, 7, 8], rows=[0, 1, 2, 3])
    assert fused_block.native_block_calls() - before == len(m.layers)   # one block call per layer, not per row


@pytest.mark.parametrize("pack", [False, True])
def test_thread_policy_one_torch_thread_beside_native_kernels(pack):
    m = tiny(pack)
    seen = []
    hook = m.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(torch.get_num_threads()))
    try:
        dec = Decoder(m, rows=2, max_len=16)
        with torch_threads(2):
            dec.prefill([1, 2, 3], row=0)
            dec.step([4], rows=[0])
            assert torch.get_num_threads() == 2                          # restored after each call
    finally:
        hook.remove()
    native = pack and bitnet.ops.backend("cpu") == "cpu"
    assert dec.torch_threads == (1 if native else None)
    assert seen and all(n == (1 if native else 2) for n in seen), seen


def test_bad_arguments_name_what_is_allowed():
    m = tiny(False, max_seq_len=8)
    with pytest.raises(ValueError, match="rows must be an integer >= 1"):
        Decoder(m, rows=0)
    with pytest.raises(ValueError, match=r"max_len must be an integer in \[1, 8\]"):
        Decoder(m, max_len=9)
    dec = Decoder(m, rows=2, max_len=4)
    with pytest.raises(ValueError, match=r"row must be an integer in \[0, 1\]"):
        dec.prefill([1], row=2)
    with pytest.raises(ValueError, match="at least one token"):
        dec.prefill([], row=0)
    with pytest.raises(ValueError, match="exceed max_len=4"):
        dec.prefill([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="one token per row"):
        dec.step([1, 2], rows=[0])
    with pytest.raises(ValueError, match="distinct"):
        dec.step([1, 2], rows=[1, 1])
    dec.prefill([1, 2, 3, 4])
    with pytest.raises(ValueError, match="row 0 is full"):
        dec.step([1], rows=[0])
    dec.reset(0)
    assert dec.positions == [0, 0]


def test_generation_and_the_engine_run_through_the_decoder():
    """The same greedy continuation from generate() (one row) and from the engine (a slot of a batch)."""
    m = tiny(True, vocab=256, max_seq_len=48)
    tok = ByteTokenizer()
    prompt = tok.encode("abc")
    want = generate(m, prompt, 10, temperature=0)
    with Engine(m, tok, slots=3) as engine:
        assert isinstance(engine.decoder, Decoder) and engine.decoder.rows == 3
        req = collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0))
    assert req.output_ids == want


@pytest.mark.parametrize("kv_dtype", [None, "float16", "int8"])
@pytest.mark.parametrize("pack", [False, True])
def test_prefill_rows_equals_each_prompt_prefilled_alone(pack, kv_dtype):
    """Prompts of 3, 17, 9, 1 and 30 tokens into rows 4, 0, 2, 5, 1 in one right-padded forward: the
    logits after each prompt, and of the next step, equal the prompt prefilled alone (bit for bit on the
    packed native path), and the rows' positions are the prompt lengths."""
    m = tiny(pack, max_seq_len=64)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 17, 9, 1, 30)]
    rows = [4, 0, 2, 5, 1]
    dec = Decoder(m, rows=6, max_len=64, kv_dtype=kv_dtype)
    dec.prefill([9] * 40, row=0)                         # stale contents: prefill_rows starts rows afresh
    before = fused_block.native_block_calls()
    got = dec.prefill_rows(prompts, rows)
    native = pack and bitnet.ops.backend("cpu") == "cpu"
    if native:
        assert fused_block.native_block_calls() - before == len(m.layers)   # one forward for all prompts
    assert [dec.positions[r] for r in rows] == [3, 17, 9, 1, 30]
    nxt = dec.step([7] * 5, rows=rows)
    for i, p in enumerate(prompts):
        alone = Decoder(m, 1, 64, kv_dtype=kv_dtype)        # (the padded prefill's scratch caches: this dtype too)
        want = torch.stack([alone.prefill(p), alone.step([7])[0]])
        have = torch.stack([got[i], nxt[i]])
        if native:
            assert torch.equal(have, want), f"prompt {i} differs from its prefill alone"
        else:
            torch.testing.assert_close(have, want, rtol=2e-4, atol=2e-4)


def prefill_rows_through_scratch(dec, prompts, rows):
    """prefill_rows as it was first written: one padded forward into a scratch cache of the prompts'
    length, then an index_put of the scratch rows into the rows (the reference of the test below)."""
    g, t = len(rows), max(map(len, prompts))
    ids = torch.zeros(g, t, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    scratch = dec.model.new_caches(g, t, **dec._cache_args)
    with torch.inference_mode(), torch_threads(dec.torch_threads):
        logits = dec.model(ids, caches=scratch, start_pos=0, logits_at=torch.tensor([len(p) - 1 for p in prompts]))
        at = torch.tensor(rows)
        for c, s in zip(dec.caches, scratch):
            for mine, theirs in zip(c.tensors(), s.tensors()):      # k, v (and an int8 cache's scales)
                mine[at, :, :t] = theirs
    for r, p in zip(rows, prompts):
        dec.positions[r] = len(p)
    return logits[:, 0]


@pytest.mark.parametrize("kv_dtype", [None, "float16", "int8"])
@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("rows", [[2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6], [5, 1, 2, 6, 0], [3, 4, 0, 1], [6, 4, 2]],
                         ids=["in-place", "all-rows", "runs", "two-runs", "scattered"])
def test_prefill_rows_writes_the_caches_the_scratch_copy_wrote(pack, kv_dtype, rows):
    """Rows in increasing order without gaps are prefilled in place, others copied from the scratch cache
    one slice per run of consecutive rows: caches (every entry, padding and untouched rows included),
    logits and positions are bit for bit those of the scratch + index_put copy it replaces."""
    m = tiny(pack, max_seq_len=64)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (7, 19, 3, 12, 19, 1, 8)[:len(rows)]]
    decs = [Decoder(m, rows=7, max_len=64, kv_dtype=kv_dtype) for _ in range(2)]
    for d in decs:                                       # stale contents everywhere, the same in both
        for i, c in enumerate(d.caches):
            noise = torch.randn(c.k.shape, generator=torch.Generator().manual_seed(i)) * 50
            c.k.copy_(noise)
            c.v.copy_(-noise)
            if c.quantized:
                c.k_scale.copy_(noise[..., 0].abs())
                c.v_scale.copy_(noise[..., 1].abs())
        d.positions = [33] * 7
    got = decs[0].prefill_rows(prompts, rows)
    want = prefill_rows_through_scratch(decs[1], prompts, rows)
    assert torch.equal(got, want)
    assert decs[0].positions == decs[1].positions
    for a, b in zip(decs[0].caches, decs[1].caches):
        assert len(a.tensors()) == (4 if kv_dtype == "int8" else 2)
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def test_runs_of_consecutive_rows():
    from bitnet.generate.decoder import _runs

    assert _runs([5, 1, 2, 6, 0]) == [(0, 1), (1, 3), (3, 4), (4, 5)]
    assert _runs([3, 4, 5]) == [(0, 3)]
    assert _runs([4, 3]) == [(0, 1), (1, 2)]
    assert _runs([7]) == [(0, 1)]


# kv dtype -> (worst, median) relative logit change allowed. Measured on this random model: float16 (rounding
# 2^-12 relative) 2.6-3.0e-2 worst, 1.5-1.7e-2 median; int8 (error <= scale / 2 per entry) 4.5-4.7e-2 and
# 2.4-2.7e-2: both move some int8 activation codes of the next layers, the same greedy tokens
NARROW_KV_TOLERANCE = {"float16": (6e-2, 3e-2), "int8": (1e-1, 5e-2)}


@pytest.mark.parametrize("kv_dtype", list(NARROW_KV_TOLERANCE))
@pytest.mark.parametrize("pack", [False, True])
def test_narrow_kv_cache_decode_stays_close_to_the_uncached_forward(pack, kv_dtype):
    """kv_dtype="float16" (half the bytes per step) or "int8" (a quarter, one float32 scale per key/value
    vector): keys/values rounded when written; prefill + steps stay within the rounding's reach of the float32
    uncached forward, with the same greedy tokens, on the module path and the fused native path."""
    m = tiny(pack)
    ids = torch.randint(0, 61, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    want = full_logits(m, ids)
    dec = Decoder(m, rows=1, max_len=32, kv_dtype=kv_dtype)
    dtype = getattr(torch, kv_dtype)
    assert all(c.k.dtype == c.v.dtype == dtype for c in dec.caches) and dec.kv_dtype is dtype
    assert all(c.quantized == (dtype == torch.int8) for c in dec.caches)
    got = [dec.prefill(ids[:9])]
    got += [dec.step([ids[i]])[0] for i in range(9, 30)]
    got = torch.stack(got)                                                # (22, vocab)
    err = (got - want[8:]).abs().amax(-1) / want[8:].abs().amax(-1)
    worst, median = NARROW_KV_TOLERANCE[kv_dtype]
    assert err.max() < worst and err.median() < median, err
    assert (got.argmax(-1) == want[8:].argmax(-1)).float().mean() >= 0.9
    f32 = Decoder(m, rows=1, max_len=32)
    assert f32.caches[0].k.dtype == torch.float32 and not torch.equal(f32.prefill(ids[:9]), got[0])


def test_bad_kv_dtype_names_the_argument():
    with pytest.raises(ValueError, match=r"kv_dtype must be one of float32, float16, bfloat16, int8 .*got 'fp8'"):
        Decoder(tiny(False), kv_dtype="fp8")
    with pytest.raises(ValueError, match=r"kv_dtype must be one of .*got torch.int32"):
        Engine(tiny(False), ByteTokenizer(), slots=1, kv_dtype=torch.int32)


def test_prefill_rows_rejects_bad_groups():
    dec = Decoder(tiny(False, max_seq_len=8), rows=3, max_len=8)
    with pytest.raises(ValueError, match="one prompt per distinct row"):
        dec.prefill_rows([[1], [2]], [0, 0])
    with pytest.raises(ValueError, match=r"1\.\.8 tokens"):
        dec.prefill_rows([[1], []], [0, 1])
    with pytest.raises(ValueError, match="logits_at must lie"):
        dec.model(torch.zeros(2, 3, dtype=torch.int64), logits_at=torch.tensor([0, 3]))

