"""Reading a request body safely: media type, size and time bounds, strict JSON, bounded nesting.

Every refusal is an :class:`~bitnet.serve.errors.APIError` in OpenAI's shape:
415 for a body that is not ``application/json`` (a browser can send ``text/plain`` cross-site without
a CORS preflight; requiring JSON closes that door), 413 for a body over the size limit, 408 for a
body that does not arrive in time, 400 for invalid UTF-8 or JSON, NaN/Infinity, nesting deeper than
:data:`MAX_JSON_DEPTH`, or a string holding a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but
no valid text: it cannot be encoded to UTF-8, so no tokenizer can take it).
"""

from __future__ import annotations

import asyncio
import json
import re

from .errors import APIError

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024     # a 128k-token prompt is ~0.5 MB of text: room to spare
DEFAULT_BODY_TIMEOUT = 30.0                   # seconds for the whole body once the headers are in
MAX_JSON_DEPTH = 64                           # OpenAI bodies nest 4-5 levels deep

_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogate(text: str) -> bool:
    """True when ``text`` holds a lone UTF-16 surrogate (it cannot be encoded as UTF-8)."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def check_content_type(content_type: str | None) -> None:
    """415 unless the media type is ``application/json`` (charset, if given, utf-8)."""
    media, _, params = (content_type or "").partition(";")
    media = media.strip().lower()
    charset = None
    for p in params.split(";"):
        key, _, value = p.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if media != "application/json" or charset not in (None, "utf-8", "utf8"):
        got = repr(content_type) if content_type else "none"
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json' (got {got})",
                       None, code="unsupported_media_type")


LINGER_BYTES = 1 << 20     # of a refused body, read and dropped before answering (see read_body)
LINGER_SECONDS = 1.0


async def read_body(request, max_bytes: int, timeout: float) -> bytes:
    """The raw body of ``request`` (a starlette Request): 413 past ``max_bytes``, 408 after ``timeout`` s.

    A body refused as too large is still read and dropped for up to :data:`LINGER_BYTES` /
    :data:`LINGER_SECONDS` before the 413 goes out: closing a socket with unread data makes the kernel
    send a reset, which can destroy the answer before the client reads it."""
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise APIError(400, f"invalid Content-Length header {length!r}", None, code="invalid_request")
    declared = int(length) if length is not None else 0
    chunks = request.stream()

    async def collect() -> bytes:
        if declared > max_bytes:
            raise too_large(declared, max_bytes)
        parts, size = [], 0
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise too_large(size, max_bytes)
            parts.append(chunk)
        return b"".join(parts)

    async def linger() -> None:
        dropped = 0
        async for chunk in chunks:
            dropped += len(chunk)
            if dropped > LINGER_BYTES:
                break

    try:
        return await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", None,
                       code="request_timeout") from None
    except APIError as e:
        if e.status == 413:
            try:
                await asyncio.wait_for(linger(), LINGER_SECONDS)
            except (asyncio.TimeoutError, Exception):
                pass
        raise


def too_large(size: int, max_bytes: int) -> APIError:
    return APIError(413, f"the request body has {'at least ' if size else ''}{size} bytes; this server accepts at "
                    f"most {max_bytes} (bitnet serve --max-body-bytes)", None, code="request_too_large")


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def parse_object(raw: bytes) -> dict:
    """The JSON object in ``raw``; 400 ``invalid_json`` naming what is wrong (see the module docstring)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})", None, code="invalid_json") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "request body is nested too deeply to parse", None, code="invalid_json") from None
    except ValueError as e:                 # JSONDecodeError, NaN/Infinity, integers over Python's digit limit
        raise APIError(400, f"request body must be valid JSON: {e}", None, code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", None, code="invalid_json")
    check_tree(body)
    return body


def check_tree(body) -> None:
    """400 for nesting deeper than :data:`MAX_JSON_DEPTH` or a lone surrogate in any string or key.

    Iterative (an explicit stack), so no depth can make it recurse; ``param`` names the place, e.g.
    ``messages[0].content``."""
    stack = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if has_surrogate(value):
                raise APIError(400, f"'{path}' contains a lone UTF-16 surrogate (e.g. \\ud800), which is not text",
                               path or None, code="invalid_string")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels (at '{path}')",
                           path or None, code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if has_surrogate(key):
                    raise APIError(400, f"a key in '{path or 'the body'}' contains a lone UTF-16 surrogate",
                                   path or None, code="invalid_string")
                stack.append((item, where, depth + 1))
        else:
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
