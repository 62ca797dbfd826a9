"""Random request bodies (hypothesis) against the real server: never a 5xx, every 4xx in OpenAI's error
shape, every 200 a well-formed answer, and the server healthy afterwards."""

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# any JSON value, with the awkward ones made likely: lone surrogates, huge and negative numbers,
# non-finite floats (sent as the NaN / Infinity literals Python writes), nesting
nasty_text = st.sampled_from(["a\ud800b", "\udfff", "\ud83d\ude00", "", "../../etc/passwd", "\x00", "tiny"])
scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.sampled_from([10 ** 400, -(1 << 63) - 1])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | nasty_text)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                          max_size=3), max_leaves=6)


def field(valid):
    """Usually a plausible value of the field, sometimes any JSON value."""
    return st.one_of(valid, valid, values)


text = st.text(max_size=12) | nasty_text
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "wizard"]),
                                 "content": field(text | st.lists(st.fixed_dictionaries(
                                     {"type": st.just("text"), "text": text}), max_size=2))})
common = {
    "model": field(st.sampled_from(["tiny", "tiny-run"])),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "temperature": field(st.floats(0, 2)),
    "top_p": field(st.floats(0, 1)),
    "top_k": field(st.integers(-2, 300)),
    "seed": field(st.integers(-(1 << 64), 1 << 65)),
    "n": field(st.integers(0, 2)),
    "stop": field(text | st.lists(text, max_size=5)),
    "repetition_penalty": field(st.floats(0, 3)),
    "presence_penalty": field(st.floats(-2, 2)),
    "logprobs": field(st.booleans()),
    "max_completion_tokens": field(st.integers(-1, 4)),
}
# max_tokens is always there and small when valid, so that good requests end fast
max_tokens = st.integers(-1, 4) | values.filter(lambda v: v is not None)
chat_bodies = st.fixed_dictionaries({"max_tokens": max_tokens, "messages": field(st.lists(message, max_size=3))},
                                    optional=common)
completion_bodies = st.fixed_dictionaries(
    {"max_tokens": max_tokens, "prompt": field(text | st.lists(st.integers(-1, 300), max_size=4) | st.lists(text, max_size=2))},
    optional={**common, "echo": field(st.booleans())})
requests = st.one_of(st.tuples(st.just("/v1/chat/completions"), chat_bodies),
                     st.tuples(st.just("/v1/completions"), completion_bodies))


def check_answer(r, path, stream):
    if stream:
        events = [e for e in r.text.split("\n\n") if e]
        assert events and events[-1] == "data: [DONE]", r.text[-300:]
        for e in events[:-1]:
            assert e.startswith("data: ")
            obj = json.loads(e[6:])
            assert "error" not in obj, obj                         # no request here may fail in the engine
            assert obj["object"] in ("chat.completion.chunk", "text_completion")
    else:
        obj = r.json()
        assert obj["object"] == ("chat.completion" if path.endswith("chat/completions") else "text_completion")
        assert obj["usage"]["completion_tokens"] >= 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(req=requests)
def test_random_bodies_never_break_the_server(server, req):
    path, body = req
    raw = json.dumps(body)                                      # ASCII escapes: lone surrogates travel as \ud800
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, (r.status_code, r.text[:300], raw[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    else:
        assert r.status_code == 200
        check_answer(r, path, body.get("stream") is True)
    health = httpx.get(server.url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["active"] <= server.engine.slots
