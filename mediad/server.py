"""The HTTP server's own limits: uvicorn's httptools protocol with the guards it lacks.

uvicorn times out only idle keep-alive connections. A client that sends its headers a byte a
second, or stops halfway through an upload, holds its connection (and the upload's temp file)
for ever, and httptools buffers a request head of any size. `GuardedHttpProtocol` adds:

- a deadline for a request's head (request line and headers): 408, connection closed;
- an idle deadline while a request body is arriving: 408, and the app's `receive()` reports a
  disconnect, so an upload cleans up as if the client had gone;
- the same deadline for a client that takes none of a response (a stopped or "slow read" client
  holding a download open): the connection is dropped;
- a cap on the bytes of a request's head: 431.

All three answer with problem+json like the app, and so does a malformed request (400), which
uvicorn would answer in plain text.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import Settings
from .errors import problem_body

_LINGER_S = 2.0  # how long a refused connection is drained before it closes


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; httptools wraps it in HttpParserError."""


def raw_problem(status: int, detail: str, slug: str) -> bytes:
    """A complete HTTP/1.1 problem+json response that closes the connection, for answers the
    protocol gives itself before (or instead of) the app."""
    body = json.dumps(problem_body(status, detail, slug)).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: Settings, **kwargs: Any) -> None:
        self.limits = limits
        super().__init__(*args, **kwargs)
        self._in_head = False  # between a request's first byte (or the connection) and its headers' end
        self._in_body = False  # headers done, body not complete
        self._head_started = 0.0
        self._head_bytes = 0  # of the request line and headers parsed so far
        self._head_received = 0  # bytes received while the head is still incomplete
        self._ended_in_read = False  # a request ended during the current read
        self._last_read = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._write_stall: asyncio.TimerHandle | None = None  # armed while the client reads nothing
        self._refusal: tuple[int, str, str] | None = None
        self._lingering = False  # refused and answered: draining until the close

    # Connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._begin_head()  # a connection that never sends a byte is a slow head too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._write_stall is not None:
            self._write_stall.cancel()
        self._in_head = self._in_body = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered and closing: what the client still sends is read and dropped
        self._last_read = self.loop.time()
        self._ended_in_read = False
        super().data_received(data)
        if self._in_head and not self._ended_in_read and not self.transport.is_closing():
            # A head still incomplete after this read: count what came, since httptools buffers a
            # header's value until the value ends and only then calls on_header. Not a read in
            # which a pipelined request ended: the head began after that request's bytes, and
            # its complete parts are counted by on_url and on_header all the same.
            self._head_received += len(data)
            if self._head_received > self.limits.max_header_bytes:
                self._refuse(431, self._too_large_detail(), "request-header-fields-too-large")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_stall is None:
            self._write_stall = self.loop.call_later(self.limits.body_timeout_s, self._reader_gone)

    def resume_writing(self) -> None:
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None
        super().resume_writing()

    def _reader_gone(self) -> None:
        """The client has not drained the response's buffer for body_timeout_s: a reader that
        stopped, or reads too little to matter. Drop it; what is buffered for it is discarded
        (close() would wait for it to be sent)."""
        self._write_stall = None
        self._end_cycle()
        self.transport.abort()

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begin_head()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True
        self._disarm()
        super().on_headers_complete()
        self._arm(self._last_read + self.limits.body_timeout_s)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._ended_in_read = True
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        status, detail, slug = self._refusal or (400, "the request is not valid HTTP/1.1", "malformed-request")
        self._refuse(status, detail, slug)

    # Deadlines

    def _begin_head(self) -> None:
        self._in_head, self._in_body = True, False
        self._head_bytes = self._head_received = 0
        self._head_started = self.loop.time()
        self._arm(self._head_started + self.limits.header_timeout_s)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.limits.max_header_bytes:
            self._refusal = (431, self._too_large_detail(), "request-header-fields-too-large")
            raise _Refused

    def _too_large_detail(self) -> str:
        return f"the request line and headers exceed {self.limits.max_header_bytes} bytes"

    def _arm(self, when: float) -> None:
        self._disarm()
        self._watchdog = self.loop.call_at(when, self._check_deadline)

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _check_deadline(self) -> None:
        self._watchdog = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._in_head:
            due = self._head_started + self.limits.header_timeout_s
            detail = f"the request headers did not arrive within {self.limits.header_timeout_s:g} s"
        elif self._in_body:
            # The app is not reading, or the client waits for its 100 Continue: not a stall.
            if self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue):
                self._last_read = now
            due = self._last_read + self.limits.body_timeout_s
            detail = f"the request body stalled: nothing received for {self.limits.body_timeout_s:g} s"
        else:
            return
        if now >= due:
            self._refuse(408, detail, "request-timeout")
        else:
            self._arm(due)

    def _refuse(self, status: int, detail: str, slug: str) -> None:
        """Answer `status` unless the app has started a response, and close the connection. The
        request's cycle is marked disconnected first so the app's receive() reports a disconnect
        and its own late response is dropped rather than written after ours."""
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete
        # A new request's head: answer unless an earlier (pipelined) response is still going out.
        # A request's body: answer unless the app has begun its own response.
        answer = not busy if self._in_head else busy and not cycle.response_started
        self._disarm()
        self._in_head = self._in_body = False
        self._end_cycle()
        if answer and not self.transport.is_closing():
            self.transport.write(raw_problem(status, detail, slug))
            self._linger()
            return
        self.transport.close()

    def _linger(self) -> None:
        """Close after the answer without a reset. Closing a socket whose receive buffer still holds
        the client's unread bytes makes the kernel send RST, which can destroy the answer before
        the client has read it. So: FIN after the answer, discard what still arrives, then close."""
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        with contextlib.suppress(RuntimeError):
            self.transport.resume_reading()  # keep draining, or a full buffer resets at close
        self.loop.call_later(_LINGER_S, self.transport.close)

    def _end_cycle(self) -> None:
        """The request in progress, if any, is over for the app: receive() reports a disconnect and
        send() drops what it is given (uvicorn's own handling of a lost connection)."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()


def guarded_protocol(settings: Settings) -> Callable[..., GuardedHttpProtocol]:
    """The protocol factory for uvicorn's `http=` with the limits in `settings`. A partial rather
    than a class made on the fly: it pickles, so uvicorn can hand it to spawned worker processes."""
    return functools.partial(GuardedHttpProtocol, limits=settings)


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> Any:
    """The uvicorn configuration `mediad serve` runs with; the tests' servers use it too."""
    import uvicorn

    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_config": None, "server_header": False,
        "timeout_graceful_shutdown": 30, "http": guarded_protocol(settings),
        "timeout_keep_alive": settings.keep_alive_s,
        "ws": "none",
        # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default and rewrites the client address;
        # mediad decides whom to trust itself (MEDIAD_TRUSTED_PROXIES, throttle.client_address).
        "proxy_headers": False,
    }
    return uvicorn.Config(app, **{**options, **overrides})
