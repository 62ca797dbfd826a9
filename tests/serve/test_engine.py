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


def run_together(engine, prompts, params, start=False):
    """Submit every prompt (then start the engine, with ``start``: all are admitted at its first turn) and
    wait until each request ends."""
    done = [threading.Event() for _ in prompts]
    reqs = [engine.submit(Request(list(p), params, lambda ev, d=d: d.set() if ev[0] in ("done", "error") else None))
            for p, d in zip(prompts, done)]
    if start:
        engine.start()
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


def test_a_request_failing_while_admitted_ends_alone_and_the_loop_goes_on():
    """A seed manual_seed refuses (set after submit's checks, so that it reaches the engine thread, as it
    did through HTTP before seeds were validated) used to kill the thread and hang every request."""
    torch.manual_seed(0)
    model = BitNetTransformer(256, 32, 1, heads=2, max_seq_len=64).eval()
    engine = Engine(model, ByteTokenizer(), slots=2)
    events = {"bad": [], "good": []}
    bad = engine.submit(Request([1, 2, 3], SamplingParams(max_tokens=5, seed=1), events["bad"].append))
    good = engine.submit(Request([4, 5, 6], SamplingParams(max_tokens=5, temperature=0), events["good"].append))
    bad.params.seed = 1 << 64
    with pytest.raises(ValueError, match="seed"):
        engine.submit(Request([1], SamplingParams(seed=1 << 64), print))
    with engine:
        later = collect(engine, [7, 8], SamplingParams(max_tokens=4, temperature=0))
        assert later.output_ids == generate(model, [7, 8], 4, temperature=0)
        assert events["bad"][-1][0] == "error" and "Overflow" in events["bad"][-1][1]
        assert events["good"][-1] == ("done", "length")
        assert good.output_ids == generate(model, [4, 5, 6], 5, temperature=0)
        assert engine.health() == (True, None) and engine.stats()["failed"] == 1


def test_an_engine_warns_when_the_model_outputs_ids_its_tokenizer_cannot_decode(caplog):
    with caplog.at_level("WARNING", logger="bitnet.serve"):
        Engine(BitNetTransformer(300, 32, 1, heads=2, max_seq_len=16), ByteTokenizer(), slots=1)
    assert "the model outputs 300 token ids but its tokenizer knows 256" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="bitnet.serve"):
        Engine(BitNetTransformer(256, 32, 1, heads=2, max_seq_len=16), ByteTokenizer(), slots=1)
    assert "tokenizer knows" not in caplog.text


def test_a_row_failing_in_a_decode_step_ends_alone():
    """A model with 300 outputs and a 256-token tokenizer: outputs 256.. (zero head rows) cannot be
    decoded. A sampled request draws one mid-way and fails; the greedy rows decoded with it finish."""
    torch.manual_seed(2)
    model = BitNetTransformer(300, 64, 2, heads=4, max_seq_len=256).eval()
    with torch.no_grad():
        model.head.weight[256:] = 0
    greedy = [list(f"greedy row {i} ".encode()) for i in range(3)]
    alone = [generate(model, p, 30, temperature=0) for p in greedy]
    assert all(max(a) < 256 for a in alone)
    with Engine(model, ByteTokenizer(), slots=4) as engine:
        for seed in range(200):
            done, evs = threading.Event(), []
            reqs = [engine.submit(Request(p, SamplingParams(max_tokens=30, temperature=0), lambda ev: None))
                    for p in greedy]
            sampled = engine.submit(Request(list(b"Once upon"), SamplingParams(max_tokens=30, temperature=2.0, seed=seed),
                                            lambda ev: (evs.append(ev), ev[0] in ("done", "error") and done.set())))
            assert done.wait(60)
            for r in reqs:
                while r.finish_reason is None and engine.stats()["active"]:
                    threading.Event().wait(0.01)
            if evs[-1][0] == "error" and len(sampled.output_ids) > 1:
                break
        else:
            raise AssertionError("no seed made the sampled row fail mid-way")
        assert "outside the vocabulary" in evs[-1][1]
        assert [r.output_ids for r in reqs] == alone and all(r.finish_reason == "length" for r in reqs)
        assert engine.health() == (True, None)


def test_prefill_groups_pad_little_and_cover_every_prompt():
    from bitnet.serve.engine import prefill_groups

    assert prefill_groups([5, 6, 7, 5]) == [[0, 3, 1, 2]]          # similar lengths: one forward
    assert prefill_groups([1, 100]) == [[0], [1]]                   # padding 1 to 100: apart
    assert prefill_groups([]) == []
    lengths = [3, 40, 41, 7, 8, 200, 9, 44, 1, 1]
    groups = prefill_groups(lengths, max_tokens=128)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        padded = len(g) * max(lengths[i] for i in g)
        assert len(g) == 1 or (padded <= 128 and padded - sum(lengths[i] for i in g) <= 0.25 * padded)


def test_prompts_admitted_together_prefill_in_one_forward_and_a_bad_one_ends_alone():
    """Four requests admitted at once share a prefill; one with a token id outside the model's
    vocabulary makes that forward fail, so each is prefilled alone: only the bad one ends with an error
    and the others decode what generate() gives them alone."""
    torch.manual_seed(0)
    model = pack(BitNetTransformer(256, 64, 2, heads=4, max_seq_len=64).eval())
    engine = Engine(model, ByteTokenizer(), slots=4)
    prompts = [list(b"abcd"), list(b"efgh"), [1, 2, 999, 3], list(b"ijk")]
    events = [[] for _ in prompts]
    reqs = [engine.submit(Request(p, SamplingParams(max_tokens=6, temperature=0), ev.append))
            for p, ev in zip(prompts, events)]
    with engine:
        for ev in events:
            for _ in range(600):
                if ev and ev[-1][0] in ("done", "error"):
                    break
                threading.Event().wait(0.05)
    assert events[2][-1][0] == "error" and "token ids must lie" in events[2][-1][1]
    for i in (0, 1, 3):
        assert events[i][-1] == ("done", "length")
        assert reqs[i].output_ids == generate(model, prompts[i], 6, temperature=0)
    good = [list(b"abcd"), list(b"efgh"), list(b"ijk")]
    engine = Engine(model, ByteTokenizer(), slots=4)
    got = [engine.submit(Request(p, SamplingParams(max_tokens=6, temperature=0), lambda ev: None)) for p in good]
    with engine:
        for _ in range(3000):
            if engine.finished == 3:
                break
            threading.Event().wait(0.02)
    assert engine.prefills == 1                                     # admitted together: one forward
    assert [r.output_ids for r in got] == [generate(model, p, 6, temperature=0) for p in good]


def test_a_group_of_adjacent_slots_is_prefilled_in_slot_order():
    """Prompts of different lengths admitted together into slots 0..3 reach Decoder.prefill_rows in slot
    order (rows 0, 1, 2, 3: prefilled in place, no scratch copy), whatever order their lengths give, and
    decode what generate() gives each alone."""
    torch.manual_seed(4)
    model = pack(BitNetTransformer(256, 64, 2, heads=4, kv_heads=2, max_seq_len=64).eval())
    engine = Engine(model, ByteTokenizer(), slots=4)
    seen = []
    prefill_rows = engine.decoder.prefill_rows
    engine.decoder.prefill_rows = lambda prompts, rows: (seen.append(list(rows)), prefill_rows(prompts, rows))[1]
    prompts = [list(b"nine char"), list(b"sevench"), list(b"eight ch"), list(b"six ch")]
    reqs = run_together(engine, prompts, SamplingParams(max_tokens=6, temperature=0), start=True)
    engine.stop()
    assert seen == [[0, 1, 2, 3]] and engine.prefills == 1
    assert [r.output_ids for r in reqs] == [generate(model, p, 6, temperature=0) for p in prompts]
