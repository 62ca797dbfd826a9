"""OpenAI-compatible HTTP API on FastAPI around the continuous-batching :class:`Engine`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream`` true/false; streams
are server-sent events of OpenAI chunk objects ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, and a chat page at ``GET /``.

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 ``invalid_request_error``
naming the parameter (bad values, bad JSON, lone surrogates, nesting too deep), 404 ``model_not_found``
for a ``model`` this server does not serve, 408 for a body that does not arrive in time, 413 for a body
over the size limit, 415 for a body that is not ``application/json``, 429 when the waiting queue is
full, 500 when generation fails for that request, 503 when the engine is not running. A stream that
fails before its first token gets the same HTTP error; later, an ``{"error": ...}`` event then
``data: [DONE]``. Parsing, validation and tokenisation run in worker threads, off the event loop.
Extensions beyond OpenAI's parameters: ``top_k`` and ``repetition_penalty``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from typing import Sequence

from fastapi import Request as HTTPRequest

from ..chat import format_chat, stop_token_ids
from .body import (DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES, check_content_type, has_surrogate as _has_surrogate,
                   parse_object, read_body)
from .engine import SEED_MAX, SEED_MIN, Engine, EngineDeadError, QueueFullError, Request, SamplingParams
from .errors import APIError, error_response, json_bytes, server_error

log = logging.getLogger("bitnet.serve")

DEFAULT_MAX_TOKENS = 256
POLL_SECONDS = 0.25          # how often a waiting request checks its client and the engine


# --------------------------------------------------------------------------------------------- validation

MIN_TEMPERATURE = 1e-3       # below this, logits / temperature can overflow float32 (the sampler's inf/nan)
MIN_REPETITION_PENALTY = 1e-2


def _show(value, limit: int = 60) -> str:
    """A short repr of a client's value for an error message."""
    try:
        text = repr(value)
    except ValueError:                                  # an int beyond Python's str() digit limit
        text = f"<int with more than {4300} digits>"
    return text if len(text) <= limit else text[:limit] + "..."


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind}, got {_show(value)}", name, code="invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        raise APIError(400, f"'{name}' must be in {lo_s}, {hi}], got {_show(value)}", name, code="invalid_value")
    return value


def sampling_from(body: dict, n_prompt: int, context: int, prompt_param: str) -> SamplingParams:
    """Validated :class:`SamplingParams` from an OpenAI request body (APIError 400 naming the parameter)."""
    if n_prompt >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                       f"{n_prompt} tokens, leaving no room for the completion. Shorten the {prompt_param}.",
                       prompt_param, code="context_length_exceeded")
    room = context - n_prompt
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None, 1, 1 << 31, integer=True)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{n_prompt + max_tokens} tokens ({n_prompt} in the {prompt_param}, {max_tokens} in the "
                       f"completion). Reduce the {prompt_param} or '{name}'.", name, code="context_length_exceeded")
    n = _number(body, "n", 1, 1, 1, integer=True)
    del n
    for name_ in ("presence_penalty", "frequency_penalty"):
        if _number(body, name_, 0, -2, 2) != 0:
            raise APIError(400, f"'{name_}' is not supported (use 'repetition_penalty'); send 0 or leave it out",
                           name_, code="unsupported_parameter")
    if body.get("logprobs") not in (None, False, 0):
        raise APIError(400, "'logprobs' is not supported", "logprobs", code="unsupported_parameter")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 non-empty strings", "stop",
                       code="invalid_value")
    seed = _number(body, "seed", None, SEED_MIN, SEED_MAX, integer=True)      # what manual_seed takes
    temperature = float(_number(body, "temperature", 1.0, 0, 2))
    if 0 < temperature < MIN_TEMPERATURE:
        raise APIError(400, f"'temperature' must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2], got {temperature!r}",
                       "temperature", code="invalid_value")
    return SamplingParams(
        max_tokens=min(DEFAULT_MAX_TOKENS, room) if max_tokens is None else max_tokens,
        temperature=temperature,
        top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
        top_k=_number(body, "top_k", None, 1, 1 << 31, integer=True),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, MIN_REPETITION_PENALTY, 100)),
        seed=seed,
        stop=stop,
    )


def _stream_flag(body: dict) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {_show(stream)}", "stream", code="invalid_type")
    return stream


def _stream_options(body: dict, stream: bool) -> bool:
    """``stream_options.include_usage`` (only meaningful with ``stream``)."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options", code="invalid_type")
    usage = opts.get("include_usage", False)
    if usage is not None and not isinstance(usage, bool):
        raise APIError(400, f"'stream_options.include_usage' must be a boolean, got {_show(usage)}",
                       "stream_options.include_usage", code="invalid_type")
    return bool(usage) and stream


def _check_model(body: dict, accepted: tuple[str, ...]) -> None:
    """404 ``model_not_found`` for a ``model`` this server does not serve (an omitted model is fine)."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise APIError(400, f"'model' must be a string, got {_show(model)}", "model", code="invalid_type")
    if model not in accepted:
        raise APIError(404, f"The model {_show(model)} does not exist; this server serves {accepted[0]!r}",
                       "model", code="model_not_found")


# --------------------------------------------------------------------------------------------- app

def _event_error(engine: Engine, message: str) -> APIError:
    """The HTTP error for an engine ``("error", message)`` event."""
    if message == "cancelled":
        return APIError(499, "request cancelled", None, "cancelled")
    if engine.dead:
        return server_error(f"the engine is not serving: {message}", 503)
    return server_error(f"generation failed: {message}")


class _Events:
    """The events of one request on the HTTP side, with a watch on the client and on the engine."""

    def __init__(self, engine: Engine, req: Request, queue: asyncio.Queue, request: HTTPRequest | None):
        self.engine, self.req, self.queue, self.request = engine, req, queue, request
        self.next_check = 0.0

    async def next(self) -> tuple:
        """The next event; APIError 499 when the client hung up (``request`` given), 503 when the engine
        died without a last event for this request."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                ev = await asyncio.wait_for(self.queue.get(), timeout=POLL_SECONDS)
            except asyncio.TimeoutError:
                ev = None
            if self.request is not None and loop.time() >= self.next_check:   # events may never pause
                self.next_check = loop.time() + POLL_SECONDS
                if await self.request.is_disconnected():
                    self.req.cancel()
                    raise APIError(499, "client disconnected", None, "cancelled")
            if ev is not None:
                return ev
            if self.engine.dead:              # it emits a last event to every request it holds: give it a moment
                try:
                    return await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    raise server_error(f"the engine is not serving: {self.engine.health()[1]}", 503) from None


def create_app(engine: Engine, model_name: str = "bitnet", owns_engine: bool = True, *,
               aliases: Sequence[str] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout: float = DEFAULT_BODY_TIMEOUT):
    """The FastAPI application serving ``engine`` (started and stopped with the app when ``owns_engine``).

    Args:
        model_name: the id ``/v1/models`` lists; a request's ``model`` must be it or one of ``aliases``
            (or be left out), else 404 ``model_not_found``.
        aliases: other accepted ids (``bitnet serve`` passes the checkpoint's name when ``--model-name``
            renames it).
        max_body_bytes: larger request bodies get 413.
        body_timeout: seconds a request body may take to arrive once its headers are in (408 after).
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .page import CHAT_PAGE

    for name, value in (("model_name", model_name), *((f"aliases[{i}]", a) for i, a in enumerate(aliases))):
        if not isinstance(value, str) or not value or _has_surrogate(value):
            raise ValueError(f"{name} must be a non-empty text string, got {value!r}")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an integer >= 1, got {max_body_bytes!r}")
    if isinstance(body_timeout, bool) or not isinstance(body_timeout, (int, float)) or not body_timeout > 0:
        raise ValueError(f"body_timeout must be a number of seconds > 0, got {body_timeout!r}")
    accepted = (model_name, *dict.fromkeys(a for a in aliases if a != model_name))

    @asynccontextmanager
    async def lifespan(app):
        if owns_engine:
            engine.start()
        yield
        if owns_engine:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="bitnet", lifespan=lifespan)
    app.state.engine = engine
    created = int(time.time())
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        resp = error_response(APIError(exc.status_code, str(exc.detail), None, kind))
        resp.headers.update(exc.headers or {})
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        err = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        return error_response(APIError(400, err.get("msg", "invalid request"), param))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):              # a bug: still OpenAI's shape, never a plain-text 500
        log.error("unexpected error serving %s", request.url.path, exc_info=exc)
        return error_response(server_error(f"internal error ({type(exc).__name__})"))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return CHAT_PAGE.replace("{{MODEL}}", model_name)

    @app.get("/health")
    async def health():
        """200 while the engine runs and makes progress; 503 with a ``reason`` when it is not started,
        stopped, dead, or stuck (requests waiting or running, no progress for its ``stall_timeout``)."""
        ok, reason = engine.health()
        body = {"status": "ok" if ok else "unavailable", "model": model_name, **engine.stats(),
                "max_body_bytes": max_body_bytes}
        if ok:
            return body
        return JSONResponse({**body, "reason": reason}, status_code=503)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "bitnet",
                "context_length": engine.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model({"model": model_id}, accepted)
        return model_card()

    async def raw_body(request: HTTPRequest) -> bytes:
        check_content_type(request.headers.get("content-type"))
        return await read_body(request, max_body_bytes, body_timeout)

    # Events cross from the engine thread to the event loop in batches: one loop wake-up per decode
    # step for all slots, instead of one per token.
    outbox: list = []
    outbox_lock = threading.Lock()

    def deliver():
        with outbox_lock:
            items = outbox[:]
            outbox.clear()
        for queue, ev in items:
            queue.put_nowait(ev)

    def submit(request: HTTPRequest, prompt_ids: list[int], params: SamplingParams) -> _Events:
        """Queue a request; its events, watched for a client that hangs up."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            with outbox_lock:
                outbox.append((queue, ev))
                first = len(outbox) == 1
            if first:
                loop.call_soon_threadsafe(deliver)

        try:
            req = engine.submit(Request(prompt_ids, params, emit))
        except QueueFullError as e:
            raise APIError(429, str(e), None, "rate_limit_error", "queue_full") from None
        except EngineDeadError as e:
            raise server_error(str(e), 503) from None
        except ValueError as e:
            raise APIError(400, str(e), None) from None
        return _Events(engine, req, queue, request)

    async def first_event(events: _Events) -> tuple:
        """The first event of a request; its failure before any text is an HTTP error (streams too)."""
        try:
            ev = await events.next()
            if ev[0] == "error":
                raise _event_error(engine, ev[1])
            return ev
        except BaseException:
            events.req.cancel()
            raise

    async def run_to_end(events: _Events) -> str:
        """Wait for a non-streamed request, cancelling it if the client disconnects."""
        text = []
        try:
            ev = await first_event(events)
            while True:
                if ev[0] == "text":
                    text.append(ev[1])
                elif ev[0] == "done":
                    return "".join(text)
                else:
                    raise _event_error(engine, ev[1])
                ev = await events.next()
        finally:
            events.req.cancel()                     # no-op when finished; frees the slot otherwise

    def usage(req: Request) -> dict:
        p, c = len(req.prompt_ids), len(req.output_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_response(events: _Events, make_chunk, include_usage: bool, first=None):
        """A server-sent-event stream of the request's chunks. Until its first event it is an ordinary
        request (an early failure is an HTTP error); later failures are an ``{"error": ...}`` event
        followed by ``data: [DONE]``."""
        ev = await first_event(events)
        events.request = None                       # from here the streaming response notices a hang-up
        req = events.req

        async def gen():
            pending = deque([ev])
            try:
                if first is not None:
                    yield sse(first)
                while True:
                    if not pending:
                        pending.append(await events.next())
                    while not events.queue.empty():
                        pending.append(events.queue.get_nowait())
                    cur = pending.popleft()
                    if cur[0] == "text":
                        # a slow reader gets the text that piled up in one chunk (fewer writes under load)
                        text = [cur[1]]
                        while pending and pending[0][0] == "text":
                            text.append(pending.popleft()[1])
                        yield sse(make_chunk(text="".join(text), finish=None))
                    elif cur[0] == "done":
                        yield sse(make_chunk(text=None, finish=cur[1]))
                        if include_usage:
                            yield sse(make_chunk(text=None, finish=None, usage=usage(req)))
                        break
                    else:
                        raise _event_error(engine, cur[1])
            except APIError as e:
                yield f"data: {json_bytes(e.body()).decode()}\n\n"
            finally:
                req.cancel()                        # client gone (generator closed) or finished
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def prepare_chat(raw: bytes):
        """Parse, validate and tokenise a chat request (in a worker thread: big prompts take a while)."""
        body = parse_object(raw)
        _check_model(body, accepted)
        stream = _stream_flag(body)
        try:
            prompt, stops = format_chat(body.get("messages"), tokenizer)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        except Exception as e:
            if type(e).__module__.startswith("jinja2"):             # the chat template refused the messages
                raise APIError(400, f"the model's chat template refused the messages: {e}", "messages") from None
            raise
        ids = tokenizer.encode(prompt)
        params = sampling_from(body, len(ids), engine.context, "messages")
        params.stop = list(params.stop) + [s for s in stops if s not in params.stop]
        params.stop_token_ids = stop_token_ids(tokenizer)         # eos and the chat template's end of turn
        return ids, params, stream, _stream_options(body, stream)

    def prepare_completion(raw: bytes):
        """Parse, validate and tokenise a completion request (in a worker thread)."""
        body = parse_object(raw)
        _check_model(body, accepted)
        stream = _stream_flag(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            ids = tokenizer.encode(prompt)
            if not ids:
                raise APIError(400, "'prompt' encodes to no tokens", "prompt")
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = tokenizer.vocab_size
            if any(t < 0 or t >= vocab for t in prompt):
                raise APIError(400, f"token ids in 'prompt' must lie in [0, {vocab - 1}]", "prompt")
            ids = list(prompt)
            prompt = tokenizer.decode(ids)
        else:
            raise APIError(400, "'prompt' must be a non-empty string, a list with one string, or a list of token ids "
                           "(one prompt per request)", "prompt")
        echo = body.get("echo", False)
        if echo is None:
            echo = False
        if not isinstance(echo, bool):
            raise APIError(400, f"'echo' must be a boolean, got {_show(echo)}", "echo", code="invalid_type")
        params = sampling_from(body, len(ids), engine.context, "prompt")
        return ids, params, stream, _stream_options(body, stream), prompt if echo else None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        ids, params, stream, include_usage = await asyncio.to_thread(prepare_chat, await raw_body(request))
        events = submit(request, ids, params)
        req = events.req
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if stream:
            def chunk(text, finish, usage=None, role=False):
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", "content": ""}
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "system_fingerprint": None,
                        "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish}],
                        **({"usage": usage} if usage else {})}
            return await stream_response(events, chunk, include_usage, first=chunk(None, None, role=True))
        text = await run_to_end(events)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": req.finish_reason}],
                "usage": usage(req)}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        ids, params, stream, include_usage, echo = await asyncio.to_thread(prepare_completion,
                                                                           await raw_body(request))
        events = submit(request, ids, params)
        req = events.req
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        if stream:
            def chunk(text, finish, usage=None):
                return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [] if usage else [{"index": 0, "text": text or "", "logprobs": None,
                                                      "finish_reason": finish}],
                        **({"usage": usage} if usage else {})}
            first = chunk(echo, None) if echo is not None else None
            return await stream_response(events, chunk, include_usage, first=first)
        text = await run_to_end(events)
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "text": (echo + text) if echo is not None else text, "logprobs": None,
                             "finish_reason": req.finish_reason}],
                "usage": usage(req)}

    return app
