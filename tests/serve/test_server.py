"""The OpenAI-compatible server, end to end: a real uvicorn server and the official ``openai`` client."""

import json
import threading
import time

import pytest

from bitnet.chat import format_chat
from bitnet.generate import generate
from bitnet.serve import Request, SamplingParams

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def client(srv, **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)


def expected(inference, prompt: str, max_tokens: int, stop=()) -> str:
    """What the plain KV-cached generate loop gives for ``prompt`` alone (greedy), cut at a stop string."""
    tok = inference.tokenizer
    text = tok.decode(generate(inference.model, tok.encode(prompt), max_tokens, temperature=0))
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(cuts)] if cuts else text


def test_health_models_and_page(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "<html" in page.text


def test_completion_greedy_matches_the_generate_loop(server, inference):
    c = client(server)
    r = c.completions.create(model="tiny", prompt="The dog jumped", max_tokens=24, temperature=0)
    assert r.choices[0].text == expected(inference, "The dog jumped", 24)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len("The dog jumped") and r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    echo = c.completions.create(model="tiny", prompt="The dog jumped", max_tokens=24, temperature=0, echo=True)
    assert echo.choices[0].text == "The dog jumped" + r.choices[0].text


def test_completion_stream_equals_non_stream(server):
    c = client(server)
    full = c.completions.create(model="tiny", prompt="In the beginning", max_tokens=30, temperature=0)
    chunks = list(c.completions.create(model="tiny", prompt="In the beginning", max_tokens=30, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 30 and chunks[-1].choices == []
    assert all(ch.object == "text_completion" and ch.id == chunks[0].id for ch in chunks)


def test_chat_non_stream_and_stream(server, inference):
    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    prompt, stops = format_chat(messages, inference.tokenizer)
    assert prompt == "System: Be brief.\nUser: Hello there\nAssistant:"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected(inference, prompt, 40, stops)
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(prompt)

    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_raw_sse_format(server):
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings_end_the_answer(server, inference):
    c = client(server)
    free = c.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0).choices[0].text
    stop = free[10:12]
    assert stop and free.find(stop) >= 0
    r = c.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == free[:free.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0, stop=stop,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text


def test_concurrent_clients_get_exactly_what_each_gets_alone(server, inference):
    prompts = [f"Prompt number {i}: {'xyz' * i}" for i in range(10)]
    alone = [expected(inference, p, 32) for p in prompts]
    assert len(set(alone)) == len(alone)                          # distinct, so mixing would show
    results, errors = [None] * len(prompts), []

    def worker(i):
        try:
            c = client(server)
            if i % 2:
                results[i] = "".join(ch.choices[0].text for ch in c.completions.create(
                    model="tiny", prompt=prompts[i], max_tokens=32, temperature=0, stream=True))
            else:
                results[i] = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=32,
                                                  temperature=0).choices[0].text
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    before = httpx.get(server.url + "/health").json()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == alone
    assert server.engine.max_batch_seen > 1                       # rows really were decoded together
    after = httpx.get(server.url + "/health").json()               # the counters load_test.py reports
    steps, rows = after["steps"] - before["steps"], after["decoded_rows"] - before["decoded_rows"]
    assert 1 <= after["prefills"] - before["prefills"] <= len(prompts)
    assert steps < rows <= steps * len(prompts)                   # > 1 row per step on average


def test_seeded_sampling_is_reproducible_under_load(server):
    c = client(server)
    kw = dict(model="tiny", max_tokens=20, temperature=1.0, top_p=0.9, top_k=50)
    alone = c.completions.create(prompt="Seeded", seed=123, extra_body={"top_k": 50}, **{k: v for k, v in kw.items()
                                                                                         if k != "top_k"})
    out = [None] * 6

    def worker(i):
        out[i] = client(server).completions.create(prompt="Seeded", seed=123 if i % 2 == 0 else i,
                                                   extra_body={"top_k": 50},
                                                   **{k: v for k, v in kw.items() if k != "top_k"})
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [o.choices[0].text for o in out[::2]] == [alone.choices[0].text] * 3


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10_000}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_k": 0}, "top_k"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "stop": [1, 2]}, "stop"),
    ({"prompt": "x" * 300}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
])
def test_bad_completion_requests_get_400_naming_the_parameter(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_bad_chat_requests_through_the_openai_client(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "y" * 400}])
    assert e.value.body["param"] == "messages" and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], top_p=0)
    assert e.value.body["param"] == "top_p"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_full_queue_answers_429(inference):
    from bitnet.serve import Engine

    from bitnet.serve.app import create_app
    from bitnet.serve.server import ServerThread

    engine = Engine(inference.model, inference.tokenizer, slots=1, max_queue=1)       # never started
    with ServerThread(create_app(engine, "tiny", owns_engine=False)) as srv:
        held = [engine.submit(Request([65, 66], SamplingParams(max_tokens=5), lambda ev: None)) for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as e:
            client(srv).completions.create(model="tiny", prompt="hi", max_tokens=5)
        assert e.value.status_code == 429
        assert e.value.body["code"] == "queue_full" and e.value.body["type"] == "rate_limit_error"
        for r in held:
            r.cancel()


def test_disconnected_streaming_client_frees_its_slot(slow_server):
    engine = slow_server.engine
    body = {"model": "slow", "prompt": "Hello", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", slow_server.url + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(4)]                    # a few events, then hang up
        assert any(x.startswith("data: ") for x in got)
        assert engine.stats()["active"] == 1
    wait_for(lambda: engine.stats()["active"] == 0, what="slot to be freed")
    assert engine.stats()["cancelled"] == 1 and engine.stats()["finished"] == 0
    # the freed slot serves the next client
    r = client(slow_server).completions.create(model="slow", prompt="Hi", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_disconnected_non_streaming_client_frees_its_slot(slow_server):
    engine = slow_server.engine
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 200}, timeout=0.5)
    wait_for(lambda: engine.stats()["active"] == 0, what="slot to be freed")
    assert engine.stats()["cancelled"] == 1, engine.stats()
