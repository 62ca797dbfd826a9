"""The server under attack, against real uvicorn servers: bad numbers, bad text, bad JSON, foreign media
types, unknown models, oversized and slow requests, big prompts, failures inside the engine, and a
dead or stuck engine. Every error is OpenAI's shape; nothing stops the server for the next client."""

import json
import socket
import threading
import time

import pytest
import torch

from bitnet import BitNetTransformer
from bitnet.generate import generate
from bitnet.serve import Engine
from bitnet.tokenizer import ByteTokenizer

from .conftest import Gate, GatedModel, GatedTokenizer, http_parts

httpx = pytest.importorskip("httpx")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
JSON = {"content-type": "application/json"}


def post(srv, path, body, headers=JSON, timeout=30, **kw):
    """POST ``body`` (a dict, serialised with ASCII escapes so lone surrogates survive, or raw bytes)."""
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(srv.url + path, content=content, headers=headers, timeout=timeout, **kw)


def assert_error(r, status, param="any", code="any"):
    """``r`` is ``status`` with exactly OpenAI's error shape (and the given param / code)."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if param != "any":
        assert err["param"] == param, err
    if code != "any":
        assert err["code"] == code, err
    return err


def assert_serving(srv):
    """/health is 200 and one small greedy request is answered."""
    h = httpx.get(srv.url + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok", h.text
    r = post(srv, COMPLETIONS, {"prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sse_events(raw: str) -> list:
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), raw[:300]
    assert events[-1] == "data: [DONE]", raw[-300:]
    return [json.loads(e[6:]) for e in events[:-1]]


# --------------------------------------------------------------------------------------------- numbers

def test_seed_beyond_manual_seed_is_400_and_nothing_hangs(server):
    """The issue's request: it used to raise in the engine thread and hang every later request."""
    msgs = [{"role": "user", "content": "hi"}]
    for stream in (False, True):
        r = post(server, CHAT, {"messages": msgs, "temperature": 1, "seed": 18446744073709551616, "stream": stream,
                                "max_tokens": 3})
        assert_error(r, 400, "seed", "invalid_value")
    assert_serving(server)
    for seed in (0, 18446744073709551615, -(1 << 63)):                     # manual_seed's whole range works
        r = post(server, CHAT, {"messages": msgs, "temperature": 1, "seed": seed, "max_tokens": 3})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("field, value", [
    ("seed", -(1 << 63) - 1), ("seed", 1.5), ("seed", "7"), ("seed", 10 ** 400),
    ("temperature", 1e-300), ("temperature", 1e-5), ("temperature", 10 ** 30), ("temperature", 10 ** 400),
    ("top_p", 10 ** 400), ("top_p", -0.0), ("top_k", 1.5), ("top_k", 10 ** 400), ("top_k", -3),
    ("max_tokens", 10 ** 400), ("max_tokens", True), ("n", 10 ** 400), ("n", 0),
    ("presence_penalty", 10 ** 400), ("frequency_penalty", 1e300), ("repetition_penalty", 1e-300),
    ("repetition_penalty", 0), ("max_completion_tokens", -1),
])
def test_every_numeric_field_is_checked_against_what_the_engine_takes(server, field, value):
    for path, base in ((COMPLETIONS, {"prompt": "hi"}), (CHAT, {"messages": [{"role": "user", "content": "hi"}]})):
        r = post(server, path, {**base, "max_tokens": 2, field: value})
        assert_error(r, 400, field)
    assert_serving(server)


def test_nan_and_infinity_literals_are_invalid_json(server):
    for literal in ("NaN", "Infinity", "-Infinity"):
        r = post(server, COMPLETIONS, '{"prompt": "hi", "temperature": %s}' % literal)
        assert_error(r, 400, None, "invalid_json")
    r = post(server, COMPLETIONS, '{"prompt": "hi", "seed": 1%s}' % ("0" * 5000))       # over Python's digit limit
    assert_error(r, 400, None, "invalid_json")
    r = post(server, COMPLETIONS, '{"prompt": "hi", "temperature": 1e400}')            # parses as inf
    assert_error(r, 400, "temperature", "invalid_type")


# --------------------------------------------------------------------------------------------- text and JSON

def test_lone_surrogates_are_400_naming_the_field(server):
    cases = [
        (CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
         "messages[0].content[0].text"),
        (COMPLETIONS, {"prompt": "x\udc80"}, "prompt"),
        (COMPLETIONS, {"prompt": "hi", "stop": ["\ud83d"]}, "stop[0]"),
        (COMPLETIONS, {"prompt": "hi", "model": "\ud800"}, "model"),
        (COMPLETIONS, {"prompt": "hi", "\ud800": 1}, None),
    ]
    for path, body, param in cases:
        for stream in (False, True):
            assert_error(post(server, path, {**body, "stream": stream, "max_tokens": 2}), 400, param, "invalid_string")
    # a valid surrogate pair is one character, not an error
    r = post(server, COMPLETIONS, {"prompt": "smile \U0001F600", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len("smile \U0001F600".encode()), r.text
    assert_serving(server)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_400(server, depth):
    body = '{"prompt": "hi", "messages": ' + "[" * depth + "]" * depth + "}"
    assert_error(post(server, CHAT, body), 400, code="invalid_json")
    body = '{"prompt": "hi", "logit_bias": ' + '{"a":' * depth + "1" + "}" * depth + "}"
    assert_error(post(server, COMPLETIONS, body), 400, code="invalid_json")
    assert_serving(server)


def test_invalid_utf8_and_non_object_bodies_are_400(server):
    assert_error(post(server, COMPLETIONS, b'{"prompt": "\xff\xfe"}'), 400, None, "invalid_json")
    assert_error(post(server, COMPLETIONS, b"[1, 2]"), 400, None, "invalid_json")
    assert_error(post(server, COMPLETIONS, b""), 400, None, "invalid_json")


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                          "application/jsonp"])
def test_only_application_json_is_accepted(server, content_type):
    """A page on any site may POST text/plain cross-site without a CORS preflight: it must not be served."""
    headers = {} if content_type is None else {"content-type": content_type}
    body = json.dumps({"prompt": "hi", "max_tokens": 2})
    for path in (COMPLETIONS, CHAT):
        r = httpx.post(server.url + path, content=body, headers=headers, timeout=30)
        assert_error(r, 415, None, "unsupported_media_type")
    assert server.engine.stats()["active"] == 0


def test_json_media_type_with_utf8_charset_is_accepted(server):
    for ctype in ("application/json; charset=utf-8", "Application/JSON;charset=\"UTF-8\""):
        r = post(server, COMPLETIONS, {"prompt": "hi", "max_tokens": 2}, headers={"content-type": ctype})
        assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------------------- model ids

def test_unknown_model_is_404_model_not_found(server):
    for path, base in ((COMPLETIONS, {"prompt": "hi"}), (CHAT, {"messages": [{"role": "user", "content": "hi"}]})):
        for model in ("../../etc/passwd", "gpt-4o", "TINY", ""):
            for stream in (False, True):
                r = post(server, path, {**base, "model": model, "max_tokens": 2, "stream": stream})
                assert_error(r, 404, "model", "model_not_found")
        assert_error(post(server, path, {**base, "model": 5}), 400, "model", "invalid_type")
        for model in ("tiny", "tiny-run", None):                          # served id, its alias, left out
            body = {**base, "max_tokens": 2} if model is None else {**base, "model": model, "max_tokens": 2}
            r = post(server, path, body)
            assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
    assert httpx.get(server.url + "/v1/models/tiny").json()["id"] == "tiny"
    assert_error(httpx.get(server.url + "/v1/models/..%2F..%2Fetc"), 404, "model", "model_not_found")


# --------------------------------------------------------------------------------------------- size and time

@pytest.fixture
def limited_server(inference):
    """Small limits: 4 KiB bodies, 0.5 s for the headers and 0.5 s for the body."""
    create_app, ServerThread = http_parts()
    engine = Engine(inference.model, inference.tokenizer, slots=2, max_queue=4)
    app = create_app(engine, "tiny", max_body_bytes=4096, body_timeout=0.5)
    with ServerThread(app, header_timeout=0.5) as srv:
        srv.engine = engine
        yield srv


def test_body_over_the_limit_is_413(limited_server):
    srv = limited_server
    ok = {"prompt": "x" * 100, "max_tokens": 2}
    assert post(srv, COMPLETIONS, ok).status_code == 200
    big = json.dumps({"prompt": "x" * 5000, "max_tokens": 2})
    assert_error(post(srv, COMPLETIONS, big), 413, None, "request_too_large")

    def chunks():                                                     # no Content-Length: counted as it arrives
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000].encode()
    r = httpx.post(srv.url + CHAT, content=chunks(), headers=JSON, timeout=30)
    assert_error(r, 413, None, "request_too_large")
    assert_serving(srv)


def read_until_closed(sock, limit=30.0) -> bytes:
    """Everything the server sends until it closes the connection (AssertionError if it never does)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        raise AssertionError(f"the server kept the connection open for {limit} s; got {data[:200]!r}") from None
    except ConnectionResetError:          # closed while bytes we sent were unread: the kernel resets
        pass
    return data


def test_slowloris_headers_are_cut_off(limited_server):
    """A client that keeps sending header lines but never ends them is answered 408 and disconnected."""
    srv = limited_server
    host, port = srv.url[len("http://"):].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        stop = threading.Event()

        def drip():                                                   # a header line every 0.1 s, for ever
            try:
                while not stop.wait(0.1):
                    sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
        t = threading.Thread(target=drip, daemon=True)
        t.start()
        try:
            data = read_until_closed(sock)
        finally:
            stop.set()
    # closed; the 408 it wrote may be lost to the reset that our unread header lines cause
    assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:200]
    # a silent connection is cut off with a 408 in OpenAI's shape, and the server goes on serving
    with socket.create_connection((host, int(port))) as sock:
        data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert_serving(srv)


def test_keep_alive_connection_serves_several_requests(limited_server):
    with httpx.Client(base_url=limited_server.url, timeout=30) as c:
        for _ in range(3):
            r = c.post(COMPLETIONS, content=json.dumps({"prompt": "hi", "max_tokens": 2}), headers=JSON)
            assert r.status_code == 200


def test_slow_body_is_408(limited_server):
    srv = limited_server
    host, port = srv.url[len("http://"):].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\"")               # then nothing more
        data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout"
    assert_serving(srv)


def test_big_prompt_is_tokenised_off_the_event_loop(inference):
    """While an 8 MB prompt is being tokenised (held at a gate inside the real tokenizer), /health and
    other requests are answered; then the big one gets its 400 (it does not fit the context)."""
    create_app, ServerThread = http_parts()
    gate = Gate()
    engine = Engine(inference.model, GatedTokenizer(inference.tokenizer, gate), slots=2, max_queue=4)
    with ServerThread(create_app(engine, "tiny")) as srv:
        result = {}
        big = {"prompt": "y" * (8 << 20), "max_tokens": 2}

        def send():
            result["r"] = post(srv, COMPLETIONS, big, timeout=120)
        t = threading.Thread(target=send)
        t.start()
        try:
            assert gate.entered.wait(60), "the big prompt never reached the tokenizer"
            h = httpx.get(srv.url + "/health", timeout=30)                  # hangs if encode blocks the loop
            assert h.status_code == 200 and t.is_alive()
            r = post(srv, COMPLETIONS, {"prompt": "small", "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200 and t.is_alive()
        finally:
            gate.open()
            t.join(120)
        assert_error(result["r"], 400, "prompt", "context_length_exceeded")


# --------------------------------------------------------------------------------------------- engine failures

@pytest.fixture(scope="module")
def mismatched_server():
    """A real misconfiguration: the tokenizer knows 2 special tokens (ids 256, 257) the model's 256-row
    embedding does not have, so a prompt holding them makes the model raise inside the engine."""
    create_app, ServerThread = http_parts()
    torch.manual_seed(1)
    model = BitNetTransformer(256, 64, 2, heads=4, max_seq_len=256).eval()
    engine = Engine(model, ByteTokenizer(("<a>", "<b>")), slots=3, max_queue=8)
    with ServerThread(create_app(engine, "mm")) as srv:
        srv.engine, srv.model = engine, model
        yield srv


def test_a_request_the_model_fails_on_gets_500_and_the_others_go_on(mismatched_server):
    srv = mismatched_server
    prompts = [f"neighbour {i} " * 3 for i in range(3)]
    alone = [bytes(generate(srv.model, list(p.encode()), 40, temperature=0)).decode("utf-8", "replace")
             for p in prompts]
    out, errors = {}, []

    def neighbour(i):
        try:
            body = {"prompt": prompts[i], "max_tokens": 40, "temperature": 0, "stream": bool(i % 2)}
            r = post(srv, COMPLETIONS, body, timeout=120)
            assert r.status_code == 200, r.text
            out[i] = ("".join(e["choices"][0]["text"] for e in sse_events(r.text) if e["choices"])
                      if i % 2 else r.json()["choices"][0]["text"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=neighbour, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    failed_before = srv.engine.stats()["failed"]
    for stream in (False, True, False, True):
        r = post(srv, COMPLETIONS, {"prompt": [65, 257, 66], "max_tokens": 5, "stream": stream})
        err = assert_error(r, 500, None)
        assert err["type"] == "server_error" and "generation failed" in err["message"], err
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [out[i] for i in range(3)] == alone
    assert srv.engine.stats()["failed"] == failed_before + 4
    assert_serving(srv)


@pytest.fixture(scope="module")
def wide_head():
    """A model with 300 outputs served with a 256-token byte tokenizer: outputs 256..299 (logit exactly 0:
    their head rows are zero) are ids the tokenizer cannot decode. Greedy decoding never picks them (the
    best byte's logit is > 0); sampling at temperature 2 does, now and then, in the middle of a request."""
    torch.manual_seed(2)
    model = BitNetTransformer(300, 64, 2, heads=4, max_seq_len=256).eval()
    with torch.no_grad():
        model.head.weight[256:] = 0
    return model


def failing_seed(model, prompt, min_tokens=3):
    """A seed whose temperature-2 sample of ``prompt`` draws an undecodable id after >= ``min_tokens`` tokens."""
    from bitnet.serve import Request, SamplingParams

    with Engine(model, ByteTokenizer(), slots=1) as engine:
        for seed in range(200):
            done, events = threading.Event(), []
            req = Request(list(prompt), SamplingParams(max_tokens=60, temperature=2.0, seed=seed),
                          lambda ev: (events.append(ev), ev[0] in ("done", "error") and done.set()))
            engine.submit(req)
            assert done.wait(60)
            if events[-1][0] == "error" and len(req.output_ids) > min_tokens and req.text:
                return seed
    raise AssertionError("no failing seed found")


def test_stream_failing_mid_way_ends_with_an_error_event_and_done(wide_head):
    create_app, ServerThread = http_parts()
    prompt = b"Once upon a time"
    seed = failing_seed(wide_head, prompt)
    engine = Engine(wide_head, ByteTokenizer(), slots=3, max_queue=8)
    with ServerThread(create_app(engine, "wide")) as srv:
        neighbour = {"prompt": "steady greedy neighbour", "max_tokens": 50, "temperature": 0, "stream": True}
        alone = post(srv, COMPLETIONS, {**neighbour, "stream": False}).json()["choices"][0]["text"]
        result = {}
        t = threading.Thread(target=lambda: result.update(r=post(srv, COMPLETIONS, neighbour, timeout=120)))
        t.start()
        r = post(srv, COMPLETIONS, {"prompt": prompt.decode(), "max_tokens": 60, "temperature": 2.0, "seed": seed,
                                    "stream": True})
        t.join(120)
        assert r.status_code == 200                                   # text had been sent before the failure
        events = sse_events(r.text)
        assert any(e.get("choices") and e["choices"][0]["text"] for e in events[:-1])
        err = events[-1]["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
        assert "outside the vocabulary" in err["message"]
        got = "".join(e["choices"][0]["text"] for e in sse_events(result["r"].text) if e["choices"])
        assert got == alone
        # the same request without streaming: a 500, not a hang
        r = post(srv, COMPLETIONS, {"prompt": prompt.decode(), "max_tokens": 60, "temperature": 2.0, "seed": seed})
        assert_error(r, 500, None)
        assert_serving(srv)


# --------------------------------------------------------------------------------------------- health

def test_health_reports_a_stopped_or_unstarted_engine(inference):
    create_app, ServerThread = http_parts()
    engine = Engine(inference.model, inference.tokenizer, slots=1)
    with ServerThread(create_app(engine, "tiny", owns_engine=False)) as srv:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["reason"] == "engine not started"
        engine.start()
        assert_serving(srv)
        engine.stop()
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "unavailable" and "stopped" in h.json()["reason"]
        for stream in (False, True):
            r = post(srv, COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "stream": stream})
            assert_error(r, 503, None, "engine_unavailable")
        engine.start()                                                 # and it can come back
        assert_serving(srv)
        engine.stop()


def test_health_reports_a_stuck_engine(inference):
    create_app, ServerThread = http_parts()
    model = GatedModel(inference.model)
    engine = Engine(model, inference.tokenizer, slots=1, stall_timeout=0.3)
    with ServerThread(create_app(engine, "tiny")) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        model.gate = gate = Gate()
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=post(srv, COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "temperature": 0}, timeout=120)))
        t.start()
        try:
            assert gate.entered.wait(60)
            wait_for(lambda: httpx.get(srv.url + "/health").status_code == 503, what="health to report the stall")
            h = httpx.get(srv.url + "/health").json()
            assert "stuck" in h["reason"] and h["active"] == 1, h
        finally:
            model.gate = None
            gate.open()
            t.join(120)
        assert result["r"].status_code == 200
        assert_serving(srv)
