"""uvicorn's HTTP protocol with a bound on the time a client may take to send a request's headers.

uvicorn closes idle keep-alive connections, but a connection that keeps sending a header line now
and then (slowloris) is never closed: a few hundred such connections exhaust the server's file
descriptors. Here every connection gets ``header_timeout`` seconds, from when it opens or its last
response completed, to finish the headers of its next request; past that it receives a 408 in
OpenAI's error shape and is closed. The body has its own bound (``body_timeout`` of the app).
"""

from __future__ import annotations

from .errors import APIError, json_bytes

DEFAULT_HEADER_TIMEOUT = 10.0


def header_timeout_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT):
    """A subclass of the protocol uvicorn picks (httptools if installed, else h11) enforcing ``header_timeout``."""
    if isinstance(header_timeout, bool) or not isinstance(header_timeout, (int, float)) or not header_timeout > 0:
        raise ValueError(f"header_timeout must be a number of seconds > 0, got {header_timeout!r}")
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    body = json_bytes(APIError(408, f"request headers not received within {header_timeout:g} s", None,
                               code="request_timeout").body())
    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class HeaderTimeoutProtocol(AutoHTTPProtocol):
        _header_timer = None

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            # the cycle current now: if it is still the current one when the timer fires, no new request's
            # headers arrived in time (uvicorn makes a new cycle when a request's headers are complete)
            self._header_timer = self.loop.call_later(header_timeout, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle_when_armed) -> None:
            self._header_timer = None
            if self.transport is None or self.transport.is_closing():
                return
            if self.cycle is not cycle_when_armed and self.cycle is not None:
                return                                    # a request is being served (its body has its own bound)
            self.transport.write(reply)                   # nothing was being answered: a whole response is safe
            self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            self._arm_header_timer()                      # before: a pipelined request may start inside
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    HeaderTimeoutProtocol.header_timeout = header_timeout
    return HeaderTimeoutProtocol
