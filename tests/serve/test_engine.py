"""The continuous-batching engine without HTTP: packed checkpoints, context limit, validation, stop strings."""

import threading

import pytest
import torch

from bitnet import BitNetTransformer, pack
from bitnet.generate import generate
from bitnet.io import save_checkpoint
from bitnet.serve import Engine, QueueFullError, Request, SamplingParams, collect
from bitnet.serve.engine import _hold_back
from bitnet.serve.server import load_engine
from bitnet.tokenizer import ByteTokenizer


def run_together(engine, prompts, params):
    done = [threading.Event() for _ in prompts]
    reqs = [engine.submit(Request(list(p), params, lambda ev, d=d: d.set() if ev[0] in ("done", "error") else None))
            for p, d in zip(prompts, done)]
    for d in done:
        assert d.wait(60)
    return reqs


def test_packed_checkpoint_serves_like_the_generate_loop(tmp_path):
    torch.manual_seed(3)
    model = pack(BitNetTransformer(256, 64, 2, heads=4, kv_heads=2, max_seq_len=128).eval())
    save_checkpoint(tmp_path / "packed", model, tokenizer=ByteTokenizer())
    prompts = [list(f"packed prompt {i} ".encode()) * (1 + i % 3) for i in range(6)]
    alone = [generate(model, p, 20, temperature=0) for p in prompts]
    engine = load_engine(tmp_path / "packed", slots=3)
    with engine:
        reqs = run_together(engine, prompts, SamplingParams(max_tokens=20, temperature=0))
    assert [r.output_ids for r in reqs] == alone
    assert engine.max_batch_seen == 3


def test_context_limit_and_validation():
    torch.manual_seed(0)
    model = BitNetTransformer(256, 32, 1, heads=2, max_seq_len=64).eval()
    with Engine(model, ByteTokenizer(), slots=2, max_queue=1, context=16) as engine:
        r = collect(engine, list(range(60, 70)), SamplingParams(max_tokens=100, temperature=0))
        assert r.finish_reason == "length" and len(r.prompt_ids) + len(r.output_ids) == 16
        assert r.output_ids == generate(model, list(range(60, 70)), 6, temperature=0)
        with pytest.raises(ValueError, match="context holds 16"):
            engine.submit(Request(list(range(16)), SamplingParams(), print))
        with pytest.raises(ValueError, match="max_tokens"):
            engine.submit(Request([1], SamplingParams(max_tokens=0), print))
        with pytest.raises(ValueError, match="top_p"):
            engine.submit(Request([1], SamplingParams(top_p=0.0), print))
    with pytest.raises(ValueError, match="context must be"):
        Engine(model, ByteTokenizer(), context=65)
    with pytest.raises(ValueError, match="slots"):
        Engine(model, ByteTokenizer(), slots=0)


def test_queue_bound_counts_free_slots():
    model = BitNetTransformer(256, 32, 1, heads=2, max_seq_len=64).eval()
    engine = Engine(model, ByteTokenizer(), slots=2, max_queue=1)             # not started: nothing moves
    for _ in range(3):
        engine.submit(Request([1, 2], SamplingParams(), lambda ev: None))
    with pytest.raises(QueueFullError, match="max_queue=1"):
        engine.submit(Request([1, 2], SamplingParams(), lambda ev: None))


def test_stop_token_and_stop_string():
    torch.manual_seed(0)
    model = BitNetTransformer(256, 32, 1, heads=2, max_seq_len=64).eval()
    free = generate(model, [72, 105], 30, temperature=0)
    with Engine(model, ByteTokenizer(), slots=2) as engine:
        r = collect(engine, [72, 105], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[free[5]]))
        assert r.finish_reason == "stop" and r.output_ids == free[:free.index(free[5])]
        text = bytes(free).decode("latin-1")
        if text.isascii():
            stop = text[7:9]
            r = collect(engine, [72, 105], SamplingParams(max_tokens=30, temperature=0, stop=[stop]))
            assert r.finish_reason == "stop" and r.text == text[:text.find(stop)]


def test_hold_back():
    assert _hold_back("abc\nUs", ["\nUser:"]) == 3
    assert _hold_back("abc", ["\nUser:"]) == 0
    assert _hold_back("abc\n", ["\nUser:", "c\n"]) == 1
