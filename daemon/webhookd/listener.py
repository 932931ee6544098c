"""The API's listening side: how many clients, for how long, and refusals in JSON.

On its own, aiohttp's server keeps a connection that never finishes its request head for
an hour (its keep-alive default), takes clients until the process runs out of descriptors
(and then deliveries cannot open sockets either), and answers what its HTTP parser refuses
in text/plain. Here:

- a request head must arrive whole within `api_header_timeout` of the connection opening,
  or of its first byte after an idle spell; an idle kept-alive connection is closed after
  `api_idle_timeout`;
- at most `api_max_connections` clients at once, held below the descriptor limit less
  what deliveries need. At the cap a new client closes the longest-waiting connection that
  has no request in progress (an idle or trickling one); when every connection is busy
  with a request, the new one is answered 503 and closed;
- parser-level refusals, and errors raised outside the handlers, answer the documented
  JSON; a declared body over `max_body_bytes` is refused before any of it is read.

Closed and refused connections are counted for the metrics and logged, at most one line
per reason every LOG_WINDOW_S, so a flood of hostile clients is not a flood of log lines.

This reaches into aiohttp's RequestHandler (`_waiter`, `_request_count`, `_force_close`):
they are how it tells "waiting for a request" from "handling one", and no public API
says so. tests/test_listener.py pins the behaviour with real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from webhookd import logs
from webhookd.errors import CODES, for_status
from webhookd.responses import error_response, http_error_response

log = logs.get_logger("webhookd.api")

LOG_WINDOW_S = 10.0
# Descriptors the daemon needs besides outgoing connections and API clients: the database
# and its WAL, the listeners, logs, the threads' pipes.
DESCRIPTOR_MARGIN = 256
# Fewer API connections than this would lock the operator out; the warning says why.
MIN_API_CONNECTIONS = 16
# How long a body refused on its head is still read (and dropped) before the connection
# closes; a client waiting for "100 Continue" sends none.
REFUSED_BODY_LINGER_S = 1.0
# The kernel's own ceiling (net.core.somaxconn) caps it further.
MAX_BACKLOG = 4096

Preflight = Callable[[web.BaseRequest], Awaitable[web.StreamResponse | None]]

_REFUSED_BODY = (
    b'{"error":"too_many_connections","detail":"every API connection is busy with a '
    b'request; try again shortly"}'
)
# Written at once as bytes, before aiohttp sees the connection; status and Retry-After as the
# registry (errors.py) has them.
REFUSED = (
    b"HTTP/1.1 %d Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Retry-After: %d\r\n"
    b"Content-Length: %d\r\n\r\n%s"
    % (
        CODES["too_many_connections"].status,
        CODES["too_many_connections"].retry_after or 1,
        len(_REFUSED_BODY),
        _REFUSED_BODY,
    )
)


@dataclass(frozen=True)
class Limits:
    max_connections: int
    header_timeout: float
    idle_timeout: float
    max_body_bytes: int

    @property
    def backlog(self) -> int:
        """Room for a burst of new clients while the loop is busy: one per allowed client."""
        return max(128, min(self.max_connections, MAX_BACKLOG))


def connection_cap(configured: int, deliveries: int) -> int:
    """API clients allowed at once: `configured`, but never eating into the descriptors that
    `deliveries` outgoing connections need."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = sys.maxsize
    spare = soft - deliveries - DESCRIPTOR_MARGIN
    return max(MIN_API_CONNECTIONS, min(configured, spare))


class Guard:
    """What every API connection shares: the limits, the live connections, the counts."""

    def __init__(self, limits: Limits, preflight: Preflight | None = None) -> None:
        self.limits = limits
        self.preflight = preflight
        self.live: set[GuardedHandler] = set()
        self.closed: Counter[str] = Counter()  # reason -> connections, for the metrics
        self._pending: Counter[str] = Counter()
        self._window: asyncio.TimerHandle | None = None

    def admit(self, newcomer: GuardedHandler) -> bool:
        """Whether a new connection may stay; at the cap, make room if any can be made."""
        if len(self.live) >= self.limits.max_connections:
            idle = [h for h in self.live if h.waiting]
            if not idle:
                self.note("refused")
                return False
            min(idle, key=lambda h: h.since).cut("evicted")
        self.live.add(newcomer)
        return True

    def note(self, reason: str) -> None:
        self.closed[reason] += 1
        self._pending[reason] += 1
        if self._window is None:
            self._report()

    def _report(self) -> None:
        """Log what was closed since the last report; then hold further lines for a while."""
        self._window = None
        if not self._pending:
            return
        for reason, count in sorted(self._pending.items()):
            log.warning(
                "api_connections_closed",
                reason=reason,
                count=count,
                open=len(self.live),
                limit=self.limits.max_connections,
            )
        self._pending.clear()
        self._window = asyncio.get_running_loop().call_later(LOG_WINDOW_S, self._report)

    def close(self) -> None:
        if self._window is not None:
            self._window.cancel()
            self._window = None


class GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol, with the deadlines, the cap and JSON refusals."""

    __slots__ = ("_abandon", "_guard", "_head_timer", "since")

    def __init__(self, manager: web.Server, *, guard: Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self.since = 0.0  # when it last started waiting for a request
        self._abandon: asyncio.Task[Any] | None = None  # cancelled if the client leaves

    @property
    def waiting(self) -> bool:
        """Connected, with no request in progress: idle, or its head still arriving (a
        waiter already woken holds a request about to be handled: not idle)."""
        return self._waiter is not None and not self._waiter.done() and not self._force_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit(self):
            # Answer at once and hold nothing: never seen by aiohttp's server.
            transport.write(REFUSED)  # type: ignore[attr-defined]
            transport.close()
            return
        super().connection_made(transport)
        self.since = self._loop.time()
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.live.discard(self)
        self._disarm_head_timer()
        if self._abandon is not None:
            self._abandon.cancel()
            self._abandon = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._head_timer is None and self._waiter is not None:
            self._arm_head_timer()  # the first byte of a request on a kept-alive connection
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._disarm_head_timer()

    def log_access(self, request: Any, response: Any, time: float | None) -> None:
        # Called once each response is written: the connection waits for a request again.
        self.since = self._loop.time()
        super().log_access(request, response, time)

    def refuse_body(self) -> None:
        """The request was refused on its head: its body is read and dropped for at most
        REFUSED_BODY_LINGER_S (so the answer is not lost to a reset), not aiohttp's 10 s."""
        self._lingering_time = min(self._lingering_time, REFUSED_BODY_LINGER_S)

    def cut(self, reason: str) -> None:
        self._guard.note(reason)
        self.force_close()

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._guard.limits.header_timeout, self._head_late)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.waiting:
            self.cut("header_timeout")

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """What the HTTP parser refused (and the rare error outside any handler), as JSON.

        The detail names the problem without quoting the request: the bytes were a
        client's, and may be anything.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already under way; the connection is closed")
        if isinstance(exc, HttpProcessingError):
            status, detail = _parse_refusal(exc)
            log.debug("request_refused", status=status, reason=type(exc).__name__)
        elif status == 500:
            log.error("request_failed", error=logs.one_line(exc) if exc else "")
            detail = "an internal error occurred; see the daemon log"
        else:
            detail = "the request could not be handled"
        response = error_response(for_status(status), detail)
        response.force_close()
        return response


# The start of a request line as aiohttp's Python parser quotes it: a method, a space, a target.
_REQUEST_LINE = re.compile(rb"[A-Z]+ (/|\*|https?://)")


def _request_line_too_long(exc: LineTooLong) -> bool:
    """Whether the line too long was the request line (414) rather than a header (431).

    aiohttp's message no longer says which line it was ("Got more than N bytes when reading:
    <line>"), so the quoted line tells: its C parser quotes a too-long target as a bytearray
    and a header value as bytes; its Python parser quotes the whole line, which for the
    request line starts with a method and a space (no header line can: names hold no space).
    """
    line = exc.args[0] if exc.args else b""
    if isinstance(line, bytearray):
        return True
    return isinstance(line, bytes) and _REQUEST_LINE.match(line) is not None


def _parse_refusal(exc: HttpProcessingError) -> tuple[int, str]:
    if isinstance(exc, LineTooLong):
        if _request_line_too_long(exc):
            return 414, "the request line (method and target) is too long"
        return 431, "a request header line, or the headers together, are too long"
    if isinstance(exc, BadHttpMethod):
        return 400, "this is not an HTTP/1.1 request (TLS to a plain-HTTP port?)"
    name = type(exc).__name__
    what = {
        "BadStatusLine": "the request line is malformed",
        "InvalidHeader": "a header is malformed",
        "InvalidURLError": "the request target is not a valid URL path",
        "TransferEncodingError": "the chunked body is malformed",
        "ContentLengthError": "the body is shorter than its Content-Length",
    }.get(name, "the request is not valid HTTP/1.1")
    return 400, f"{what} ({name})"


@contextlib.contextmanager
def abandoned_if_client_leaves(request: web.BaseRequest) -> Iterator[None]:
    """Within this block, the client hanging up cancels the request's handler.

    For work nobody would read the answer of, and that holds what other requests wait for
    (a large body's parse: a thread, or the one worker process). A client that sends its
    body and leaves holds no connection, so the connection cap does not bound it; this
    does. aiohttp's own `handler_cancellation` would cancel any handler at any await, a
    tenant file written but not applied included; this cancels only here.
    """
    protocol = request.protocol
    task = asyncio.current_task()
    if not isinstance(protocol, GuardedHandler) or task is None:
        yield
        return
    if protocol.transport is None:  # gone already
        raise asyncio.CancelledError
    protocol._abandon = task
    try:
        yield
    finally:
        protocol._abandon = None


class Listener(web.Server):
    """aiohttp's server with GuardedHandler connections and a guarded request path."""

    def __init__(self, handler: Any, *, guard: Guard, **kwargs: Any) -> None:
        super().__init__(self._guarded(handler, guard), **kwargs)
        self._guard = guard

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, guard=self._guard, **self._kwargs)

    @staticmethod
    def _guarded(handler: Any, guard: Guard) -> Any:
        max_body = guard.limits.max_body_bytes

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            declared = request.content_length
            if declared is not None and declared > max_body:
                # Refused before reading any of it (and without "100 Continue").
                response = error_response(
                    "too_large",
                    f"the body is {declared} bytes; the limit is {max_body} (max_body_bytes)",
                )
                return _refused(request, response)
            if guard.preflight is not None and "Expect" in request.headers:
                refusal = await guard.preflight(request)
                if refusal is not None:
                    return _refused(request, refusal)
            try:
                return await handler(request)  # type: ignore[no-any-return]
            except web.HTTPException as exc:
                # Raised outside the middlewares (aiohttp's Expect handling): still JSON.
                if exc.status < 400:
                    raise
                return http_error_response(request, exc)

        return handle


def _refused(request: web.BaseRequest, response: web.StreamResponse) -> web.StreamResponse:
    response.force_close()
    if isinstance(request.protocol, GuardedHandler):
        request.protocol.refuse_body()
    return response


class Runner(web.AppRunner):
    """An AppRunner whose server is a Listener."""

    def __init__(self, app: web.Application, *, guard: Guard, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=guard.limits.idle_timeout, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's start-up and freezes it
        return Listener(
            plain.request_handler,
            guard=self.guard,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **plain._kwargs,
        )

    async def cleanup(self) -> None:
        self.guard.close()
        await super().cleanup()
