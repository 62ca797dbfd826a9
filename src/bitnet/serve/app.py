"""OpenAI-compatible HTTP API on FastAPI around the continuous-batching :class:`Engine`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream`` true/false; streams
are server-sent events of OpenAI chunk objects ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, and a chat page at ``GET /``.

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 ``invalid_request_error``
naming the parameter, 429 when the waiting queue is full, 500 when generation fails.
Extensions beyond OpenAI's parameters: ``top_k`` and ``repetition_penalty``.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections import deque

from fastapi import Request as HTTPRequest

from ..chat import format_chat, stop_token_ids
from .engine import Engine, QueueFullError, Request, SamplingParams

DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------- validation

def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind}, got {value!r}", name, code="invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        raise APIError(400, f"'{name}' must be in {lo_s}, {hi}], got {value!r}", name, code="invalid_value")
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
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}", "seed", code="invalid_type")
    return SamplingParams(
        max_tokens=min(DEFAULT_MAX_TOKENS, room) if max_tokens is None else max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
        top_k=_number(body, "top_k", None, 1, 1 << 31, integer=True),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0, 100, lo_open=True)),
        seed=seed,
        stop=stop,
    )


def _stream_flag(body: dict) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {stream!r}", "stream", code="invalid_type")
    return stream


# --------------------------------------------------------------------------------------------- app

def create_app(engine: Engine, model_name: str = "bitnet", owns_engine: bool = True):
    """The FastAPI application serving ``engine`` (started and stopped with the app when ``owns_engine``)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .page import CHAT_PAGE

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
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), None, kind).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        err = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        return JSONResponse(APIError(400, err.get("msg", "invalid request"), param).body(), status_code=400)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return CHAT_PAGE.replace("{{MODEL}}", model_name)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "bitnet",
             "context_length": engine.context}]}

    async def read_body(request: HTTPRequest) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "request body must be valid JSON", None, code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", None, code="invalid_json")
        return body

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

    def submit(prompt_ids: list[int], params: SamplingParams):
        """Queue a request; returns (request, asyncio.Queue of its events)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            with outbox_lock:
                outbox.append((events, ev))
                first = len(outbox) == 1
            if first:
                loop.call_soon_threadsafe(deliver)

        try:
            req = engine.submit(Request(prompt_ids, params, emit))
        except QueueFullError as e:
            raise APIError(429, str(e), None, "rate_limit_error", "queue_full") from None
        except ValueError as e:
            raise APIError(400, str(e), None) from None
        return req, events

    async def run_to_end(request: HTTPRequest, req: Request, events: asyncio.Queue) -> str:
        """Wait for a non-streamed request, cancelling it if the client disconnects."""
        text = []
        loop = asyncio.get_running_loop()
        next_check = loop.time() + 0.25
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    ev = None
                if loop.time() >= next_check:                 # events may never pause: check on a clock
                    next_check = loop.time() + 0.25
                    if await request.is_disconnected():
                        req.cancel()
                        raise APIError(499, "client disconnected", None, "cancelled")
                if ev is None:
                    continue
                if ev[0] == "text":
                    text.append(ev[1])
                elif ev[0] == "done":
                    return "".join(text)
                else:
                    raise APIError(500, f"generation failed: {ev[1]}", None, "server_error")
        finally:
            req.cancel()                            # no-op when finished; frees the slot otherwise

    def usage(req: Request) -> dict:
        p, c = len(req.prompt_ids), len(req.output_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream_response(req: Request, events: asyncio.Queue, make_chunk, include_usage: bool, first=None):
        async def gen():
            try:
                if first is not None:
                    yield sse(first)
                backlog: deque = deque()
                while True:
                    ev = backlog.popleft() if backlog else await events.get()
                    while not events.empty():
                        backlog.append(events.get_nowait())
                    if ev[0] == "text":
                        # a slow reader gets the text that piled up in one chunk (fewer writes under load)
                        text = [ev[1]]
                        while backlog and backlog[0][0] == "text":
                            text.append(backlog.popleft()[1])
                        yield sse(make_chunk(text="".join(text), finish=None))
                    elif ev[0] == "done":
                        yield sse(make_chunk(text=None, finish=ev[1]))
                        break
                    else:
                        yield sse(APIError(500, f"generation failed: {ev[1]}", None, "server_error").body())
                        break
                if include_usage:
                    yield sse(make_chunk(text=None, finish=None, usage=usage(req)))
                yield "data: [DONE]\n\n"
            finally:
                req.cancel()                        # client gone (generator closed) or finished

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def stream_options(body: dict) -> bool:
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options", code="invalid_type")
        return bool(opts.get("include_usage", False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read_body(request)
        stream = _stream_flag(body)
        try:
            prompt, stops = format_chat(body.get("messages"), tokenizer)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        ids = tokenizer.encode(prompt)
        params = sampling_from(body, len(ids), engine.context, "messages")
        params.stop = list(params.stop) + [s for s in stops if s not in params.stop]
        params.stop_token_ids = stop_token_ids(tokenizer)         # eos and the chat template's end of turn
        include_usage = stream_options(body) if stream else False
        req, events = submit(ids, params)
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
            return stream_response(req, events, chunk, include_usage, first=chunk(None, None, role=True))
        text = await run_to_end(request, req, events)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": req.finish_reason}],
                "usage": usage(req)}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read_body(request)
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
        if not isinstance(echo, bool):
            raise APIError(400, f"'echo' must be a boolean, got {echo!r}", "echo", code="invalid_type")
        params = sampling_from(body, len(ids), engine.context, "prompt")
        include_usage = stream_options(body) if stream else False
        req, events = submit(ids, params)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        if stream:
            def chunk(text, finish, usage=None):
                return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [] if usage else [{"index": 0, "text": text or "", "logprobs": None,
                                                      "finish_reason": finish}],
                        **({"usage": usage} if usage else {})}
            first = chunk(prompt, None) if echo else None
            return stream_response(req, events, chunk, include_usage, first=first)
        text = await run_to_end(request, req, events)
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "text": (prompt + text) if echo else text, "logprobs": None,
                             "finish_reason": req.finish_reason}],
                "usage": usage(req)}

    return app
