"""Each delivery fault as an operator sees it, against a real local endpoint.

Every fault must show in `GET /v1/tenants/{t}/status` as a failed attempt with a specific
`error`, `attempts` counting up, `next_attempt_at` following the backoff, and must not touch a
healthy tenant delivering at the same time. The endpoint is then mended and the operator's
Retry delivers the same webhook. test_delivery.py covers the delivery rules themselves; this
file is about what each fault looks like from the outside.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.conftest import (
    Daemon,
    Receiver,
    StartDaemon,
    free_port,
    stop_server,
    tenant,
    wait_for,
    write_config,
)
from webhookd.records import Failure

EVENT = "CHECK_COMPLETED"
BASE = 0.2  # the faulty tenant's retry_base
# A healthy local delivery takes milliseconds; this bound is for a loaded 2-core machine.
PROMPT = 2.0
# Every specific sentence sender.describe_error gives a connection that breaks mid-exchange.
BROKEN_EXCHANGE = {
    "connection closed before a response",
    "response body incomplete",
    "connection reset",
}

Delay = Callable[[int], float]


def backoff(attempt: int) -> float:
    """The wait after failed attempt `attempt` (retry_base × 2^(n−1); 12 doublings by default)."""
    return BASE * 2.0 ** (attempt - 1)


def epoch(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Awaitable[Any]:
    """`wait_for` with this file's longer default timeout."""
    return wait_for(check, timeout)


# -- the operator's view of one fault ------------------------------------------------------------


async def start_pair(
    start_daemon: StartDaemon, receiver: Receiver, endpoint: str, **options: Any
) -> Daemon:
    """A daemon with the tenant under test (`faulty`) and a `healthy` one beside it."""
    faulty = tenant(endpoint, **{"retry_base": BASE, **options})
    return await start_daemon(
        tenants={"faulty": faulty, "healthy": tenant(receiver.url("/healthy"))}
    )


def delivered_count(receiver: Receiver, path: str, count: int) -> Callable[[], bool]:
    return lambda: len(receiver.at(path, ok_only=True)) >= count


async def healthy_delivers(daemon: Daemon, receiver: Receiver, count: int = 3) -> None:
    """Each webhook for the healthy tenant reaches its endpoint promptly, one after another."""
    for _ in range(count):
        before = len(receiver.at("/healthy", ok_only=True))
        await daemon.ingest("healthy", {"event": EVENT})
        await wait_for(delivered_count(receiver, "/healthy", before + 1), PROMPT)


async def stalled_status(daemon: Daemon, failures: int, delay: Delay) -> dict[str, Any]:
    """Poll the faulty tenant's status until `failures` failed attempts show; check each view.

    The fault is still there, so every poll sees the head in backoff or in flight: `attempts`
    always equals the number of failures listed, newest first.
    """

    async def check() -> dict[str, Any] | None:
        status = await daemon.status("faulty")
        listed = status["recent_failures"]
        assert status["attempts"] == len(listed), status
        assert [f["attempt"] for f in listed] == list(range(len(listed), 0, -1)), status
        return status if len(listed) >= failures else None

    status: dict[str, Any] = await eventually(check)
    assert status["queue"] == "stalled", status
    assert status["waiting"] == 1, status
    for failure in status["recent_failures"]:
        assert (failure["first_sequence"], failure["last_sequence"], failure["count"]) == (1, 1, 1)
    # Status shows whole seconds: next_attempt_at − at is the delay, give or take the rounding.
    newest = status["recent_failures"][0]
    wait = delay(newest["attempt"])
    assert status["next_attempt_at"] is not None, status
    gap = epoch(status["next_attempt_at"]) - epoch(newest["at"])
    assert math.floor(wait) <= gap <= math.floor(wait) + 1, (wait, status)
    return status


def assert_backoff_kept(daemon: Daemon, delay: Delay) -> None:
    """Between two failed attempts the tenant waited the backoff, measured to the millisecond.

    These are the records status renders; status itself rounds them to whole seconds, too
    coarse for a 0.2 s backoff. An attempt ends at `at` and began `duration_ms` before it.
    """
    records: list[Failure] = list(reversed(daemon.service.workers["faulty"].failures))
    assert len(records) >= 2, records
    for earlier, later in itertools.pairwise(records):
        idle = later.at - later.duration_ms / 1000 - earlier.at
        wanted = delay(earlier.attempt)
        assert wanted - 0.01 <= idle < wanted + 1.5, (earlier.attempt, idle, wanted)


def assert_arrivals_spaced(arrivals: list[float], delay: Delay) -> None:
    """Seen from the endpoint: attempt n+1 arrives at least the backoff after attempt n."""
    assert len(arrivals) >= 2, arrivals
    for attempt, (first, second) in enumerate(itertools.pairwise(arrivals), start=1):
        assert second - first >= delay(attempt) - 0.01, (attempt, arrivals)


async def fault_shows(
    daemon: Daemon,
    receiver: Receiver,
    *,
    failures: int = 2,
    delay: Delay = backoff,
    slow_attempt_started: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Queue one webhook for `faulty` and watch the fault from the outside.

    Returns the faulty tenant's status once `failures` attempts have failed, after checking
    its counts and backoff, and that the healthy tenant delivered promptly throughout.
    """
    answer = await daemon.ingest("faulty", {"event": EVENT, "id": "fault-1"})
    assert answer["webhooks"][0]["sequence"] == 1
    if slow_attempt_started is not None:
        # While the faulty tenant's slow attempt is in flight, the healthy one goes by.
        await wait_for(slow_attempt_started, PROMPT)
        await healthy_delivers(daemon, receiver, count=1)
        during = await daemon.status("faulty")
        assert during["in_flight"] and during["attempts"] == 0, during
    else:
        await healthy_delivers(daemon, receiver, count=1)
    status = await stalled_status(daemon, failures, delay)
    assert_backoff_kept(daemon, delay)
    # And while it backs off.
    await healthy_delivers(daemon, receiver, count=3)
    healthy = await daemon.status("healthy")
    assert healthy["recent_failures"] == [], healthy
    assert healthy["attempts"] == 0, healthy
    assert receiver.sequences("/healthy") == [1, 2, 3, 4], receiver.sequences("/healthy")
    return status


def errors(status: dict[str, Any]) -> set[str]:
    return {f["error"] for f in status["recent_failures"]}


async def retry_delivers(daemon: Daemon) -> dict[str, Any]:
    """The operator's Retry, once the endpoint is mended: the head goes and the queue empties."""
    code, body = await daemon.request("POST", "/v1/tenants/faulty/retry")
    assert code == 200, body

    async def delivered() -> dict[str, Any] | None:
        status = await daemon.status("faulty")
        return status if status["waiting"] == 0 else None

    status: dict[str, Any] = await eventually(delivered)
    assert status["queue"] == "empty", status
    assert status["attempts"] == 0, status
    assert status["next_attempt_at"] is None, status
    assert status["last_processed_at"] is not None, status
    return status


# -- endpoints that misbehave below HTTP ---------------------------------------------------------

Misbehave = Callable[[asyncio.StreamWriter], Awaitable[None]]


class RawEndpoint:
    """A bare TCP server: reads each HTTP request whole, then misbehaves as told.

    Once `healed`, it answers a plain 200 (keeping the connection alive, as a server would).
    It records when each request had fully arrived and the webhook it carried.
    """

    def __init__(self, misbehave: Misbehave) -> None:
        self.misbehave = misbehave
        self.healed = False
        self.arrivals: list[float] = []
        self.webhooks: list[dict[str, Any]] = []
        self.answered_ok = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/raw"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.arrivals.append(time.monotonic())
                self.webhooks.append(json.loads(body))
                if not self.healed:
                    await self.misbehave(writer)
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                self.answered_ok += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the daemon gave up on this connection
        finally:
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        await stop_server(self._server, self._tasks)


@pytest.fixture
async def raw_endpoints() -> AsyncIterator[Callable[[Misbehave], Awaitable[RawEndpoint]]]:
    made: list[RawEndpoint] = []

    async def make(misbehave: Misbehave) -> RawEndpoint:
        endpoint = RawEndpoint(misbehave)
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in made:
        await endpoint.close()


def reset_on_close(writer: asyncio.StreamWriter) -> None:
    """SO_LINGER 0: closing sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def partial_status_line(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 O")
    await writer.drain()


async def headers_then_close(writer: asyncio.StreamWriter) -> None:
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{"partial')
    await writer.drain()


async def reset_after_request(writer: asyncio.StreamWriter) -> None:
    reset_on_close(writer)


async def serve(
    recv: Receiver, port: int = 0, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Serve another recording receiver (the fixture's serves plain HTTP on a port of its own)."""
    app = web.Application()
    app.router.add_post("/{path:.*}", recv.handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context)
    await site.start()
    recv.port = runner.addresses[0][1]
    return runner


def recording(status: int, arrivals: list[float], **headers: str) -> Any:
    async def answer(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        return web.Response(status=status, headers=headers)

    return answer


# -- HTTP answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [500, 404, 400])
async def test_error_status_is_a_failed_attempt_named_by_its_code(
    code: int, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    arrivals: list[float] = []
    receiver.always("/faulty", recording(code, arrivals))
    daemon = await start_pair(start_daemon, receiver, receiver.url("/faulty"))
    status = await fault_shows(daemon, receiver)
    assert errors(status) == {f"HTTP {code}"}, status
    assert {f["status"] for f in status["recent_failures"]} == {code}
    assert_arrivals_spaced(arrivals, backoff)

    receiver.always("/faulty", 200)
    await retry_delivers(daemon)
    delivered = receiver.at("/faulty", ok_only=True)
    assert [r.webhooks[0]["id"] for r in delivered] == ["fault-1"]
    assert {w["sequence"] for r in receiver.at("/faulty") for w in r.webhooks} == {1}


@pytest.mark.parametrize("code", [301, 302])
async def test_redirect_is_a_failed_attempt_and_never_followed(
    code: int, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    arrivals: list[float] = []
    location = receiver.url("/elsewhere")
    receiver.always("/faulty", recording(code, arrivals, Location=location))
    daemon = await start_pair(start_daemon, receiver, receiver.url("/faulty"))
    status = await fault_shows(daemon, receiver)
    assert errors(status) == {f"redirect to {location} not followed (HTTP {code})"}, status
    assert {f["status"] for f in status["recent_failures"]} == {code}
    assert_arrivals_spaced(arrivals, backoff)
    assert receiver.at("/elsewhere") == []

    receiver.always("/faulty", 200)
    await retry_delivers(daemon)
    assert receiver.at("/elsewhere") == []


async def test_429_retry_after_outweighs_a_shorter_backoff(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    arrivals: list[float] = []
    receiver.always("/faulty", recording(429, arrivals, **{"Retry-After": "1"}))
    daemon = await start_pair(start_daemon, receiver, receiver.url("/faulty"), retry_base=0.05)

    def delay(attempt: int) -> float:
        return max(0.05 * 2.0 ** (attempt - 1), 1.0)

    status = await fault_shows(daemon, receiver, delay=delay)
    assert errors(status) == {"HTTP 429"}, status
    assert_arrivals_spaced(arrivals, delay)
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(arrivals)), arrivals

    receiver.always("/faulty", 200)
    await retry_delivers(daemon)


async def test_hang_past_the_timeout_is_a_timeout(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    arrivals: list[float] = []

    async def hang(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        await asyncio.sleep(3600)  # cancelled when the daemon gives up
        return web.Response()

    receiver.always("/faulty", hang)
    daemon = await start_pair(start_daemon, receiver, receiver.url("/faulty"), timeout=0.3)
    status = await fault_shows(daemon, receiver, slow_attempt_started=lambda: bool(arrivals))
    assert errors(status) == {"timeout after 0.3 s"}, status
    for failure in status["recent_failures"]:
        assert failure["status"] is None
        # uvloop's timers count whole milliseconds: one may fire up to 1 ms early.
        assert 299 <= failure["duration_ms"] < 1500, failure
    # The endpoint saw attempt n+1 one timeout plus the backoff after attempt n.
    assert_arrivals_spaced(arrivals, lambda n: 0.3 + backoff(n))

    receiver.always("/faulty", 200)
    await retry_delivers(daemon)
    assert [r.webhooks[0]["id"] for r in receiver.at("/faulty", ok_only=True)] == ["fault-1"]


async def test_huge_response_body_is_still_a_success(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    chunk = b"x" * (1 << 20)

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(20 * len(chunk))})
        await response.prepare(request)
        for _ in range(20):
            await response.write(chunk)
        await response.write_eof()
        return response

    receiver.always("/huge", huge)
    daemon = await start_daemon(tenants={"huge": tenant(receiver.url("/huge"))})
    await daemon.ingest("huge", [{"event": EVENT}, {"event": EVENT}])
    await wait_for(lambda: daemon.service.workers["huge"].waiting == 0, timeout=10)
    status = await daemon.status("huge")
    assert status["queue"] == "empty", status
    assert status["recent_failures"] == [], status
    assert receiver.sequences("/huge") == [1, 2]


# -- connections that break ----------------------------------------------------------------------


async def test_connection_refused(receiver: Receiver, start_daemon: StartDaemon) -> None:
    port = free_port()  # nothing listens here until the endpoint is "mended" below
    mended = Receiver()
    daemon = await start_pair(start_daemon, receiver, f"http://127.0.0.1:{port}/faulty")
    status = await fault_shows(daemon, receiver)
    assert errors(status) == {"connection refused"}, status
    assert {f["status"] for f in status["recent_failures"]} == {None}

    runner = await serve(mended, port)
    try:
        await retry_delivers(daemon)
    finally:
        await runner.cleanup()
    assert mended.sequences("/faulty") == [1]


@pytest.mark.parametrize(
    ("misbehave", "expected"),
    [
        (partial_status_line, "connection closed before a response"),
        (headers_then_close, "response body incomplete"),
        (reset_after_request, "connection reset"),
    ],
    ids=["partial-status-line", "200-headers-then-close", "rst"],
)
async def test_connection_broken_mid_exchange(
    misbehave: Misbehave,
    expected: str,
    receiver: Receiver,
    start_daemon: StartDaemon,
    raw_endpoints: Callable[[Misbehave], Awaitable[RawEndpoint]],
) -> None:
    endpoint = await raw_endpoints(misbehave)
    daemon = await start_pair(start_daemon, receiver, await endpoint.start())
    status = await fault_shows(daemon, receiver)
    # A specific sentence, never "unexpected error: …".
    assert errors(status) <= BROKEN_EXCHANGE, status
    assert errors(status) == {expected}, status
    assert_arrivals_spaced(endpoint.arrivals, backoff)
    assert {w["sequence"] for w in endpoint.webhooks} == {1}

    endpoint.healed = True
    await retry_delivers(daemon)
    assert endpoint.answered_ok == 1
    assert endpoint.webhooks[-1]["id"] == "fault-1"


async def test_slow_drip_body_is_a_timeout_not_a_success_and_is_sent_again(
    receiver: Receiver,
    start_daemon: StartDaemon,
    raw_endpoints: Callable[[Misbehave], Awaitable[RawEndpoint]],
) -> None:
    dripped: list[int] = []

    async def drip(writer: asyncio.StreamWriter) -> None:
        # A 200 whose promised 1000 bytes come one every 50 ms: 50 s, far past the timeout.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await writer.drain()
        dripped.append(0)
        for _ in range(1000):
            await asyncio.sleep(0.05)
            writer.write(b"x")
            await writer.drain()  # raises once the daemon has closed the connection
            dripped[-1] += 1

    endpoint = await raw_endpoints(drip)
    daemon = await start_pair(start_daemon, receiver, await endpoint.start(), timeout=1.0)
    status = await fault_shows(
        daemon, receiver, slow_attempt_started=lambda: bool(dripped and dripped[0] >= 2)
    )
    assert errors(status) == {"timeout after 1 s"}, status
    assert {f["status"] for f in status["recent_failures"]} == {None}
    assert_arrivals_spaced(endpoint.arrivals, lambda n: 1.0 + backoff(n))
    # The status line said 200 and the body was flowing, yet the same webhook went again.
    assert len(endpoint.webhooks) >= 2
    assert {(w["id"], w["sequence"]) for w in endpoint.webhooks} == {("fault-1", 1)}
    assert dripped[0] >= 5, dripped

    endpoint.healed = True
    await retry_delivers(daemon)
    assert endpoint.answered_ok == 1


# -- TLS and DNS ---------------------------------------------------------------------------------


async def test_untrusted_certificate_fails_then_ca_file_delivers(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    secure = Receiver()
    runner = await serve(secure, ssl_context=server_context)
    try:
        endpoint = f"https://127.0.0.1:{secure.port}/tls"
        daemon = await start_pair(start_daemon, receiver, endpoint)
        status = await fault_shows(daemon, receiver)
        for error in errors(status):
            assert error.startswith("TLS: certificate verify failed"), status
        assert secure.requests == []  # the handshake failed: no request was ever made

        # ca_file is read at start: restart on the same database with the CA added.
        await daemon.server.stop()
        ca_path = tmp_path / "private-ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        config = write_config(
            tmp_path,
            {
                "faulty": tenant(endpoint, retry_base=BASE),
                "healthy": tenant(receiver.url("/healthy")),
            },
            daemon={"ca_file": str(ca_path)},
            name="config-with-ca.toml",
        )
        restarted = await start_daemon(config)
        await retry_delivers(restarted)
    finally:
        await runner.cleanup()
    assert [(r.path, r.webhooks[0]["id"]) for r in secure.requests] == [("/tls", "fault-1")]


async def test_unresolvable_name_is_a_dns_error(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_pair(start_daemon, receiver, "http://does-not-exist.invalid/hooks")
    status = await fault_shows(daemon, receiver)
    assert errors(status) == {"DNS: cannot resolve does-not-exist.invalid"}, status
    assert {f["status"] for f in status["recent_failures"]} == {None}
