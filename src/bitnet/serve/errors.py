"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and its HTTP response."""

from __future__ import annotations

import json


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape (``type`` ``invalid_request_error`` unless told)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def json_bytes(obj) -> bytes:
    """``obj`` as JSON bytes that always encode: ASCII with escapes, so that text a client sent (a lone
    surrogate quoted in an error message, say) can never make rendering fail."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


# the body of the request was not read to its end: the connection cannot carry another request
CLOSE_AFTER = (408, 413)


def error_response(exc: APIError):
    """The starlette response for ``exc``."""
    from starlette.responses import Response

    headers = {"connection": "close"} if exc.status in CLOSE_AFTER else None
    return Response(json_bytes(exc.body()), status_code=exc.status, media_type="application/json", headers=headers)


def server_error(message: str, status: int = 500) -> APIError:
    """A failure on the server's side (500 ``server_error``, or 503 when the engine is not serving)."""
    return APIError(status, message, None, "server_error", "engine_unavailable" if status == 503 else None)
