"""The API's listening side: deadlines for slow and idle clients, the connection cap kept
apart from what deliveries need, and JSON for every refusal, the HTTP parser's included.

Real sockets throughout: raw TCP clients that trickle, idle or send malformed requests
against an in-process daemon, and a subprocess daemon under a low descriptor limit.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from tests.conftest import (
    Daemon,
    Process,
    Receiver,
    StartDaemon,
    tenant,
    wait_for,
    write_config,
)

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


def port_of(daemon: Daemon) -> int:
    return int(daemon.server.addresses[0][1])


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a new connection; everything the daemon answers until it closes."""
    reader, writer = await connect(port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body) if body else None


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the daemon closes the connection (EOF or reset) within `timeout`."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except (ConnectionError, TimeoutError):
        return bool(reader.at_eof())


async def metric(daemon: Daemon, name: str) -> float:
    status, text = await daemon.request("GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def healthz_ms(daemon: Daemon) -> float:
    started = time.monotonic()
    status, _ = await daemon.request("GET", "/healthz")
    assert status == 200
    return (time.monotonic() - started) * 1000


# -- deadlines -----------------------------------------------------------------------------------


async def test_clients_that_trickle_their_request_head_are_cut_at_the_header_deadline(
    start_daemon: StartDaemon, receiver: Receiver
) -> None:
    daemon = await start_daemon(
        tenants={"t": tenant(receiver.url("/t"))}, daemon={"api_header_timeout": 0.6}
    )
    port = port_of(daemon)
    clients = [await connect(port) for _ in range(100)]
    head = b"POST /v1/tenants/t/webhooks HTTP/1.1\r\nHost: t\r\nX-Slow: "
    started = time.monotonic()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        for byte in head:
            if writer.is_closing():
                return
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    with capture_logs() as logs:
        tricklers = [asyncio.create_task(trickle(w)) for _, w in clients]
        # While they trickle, the API answers as usual.
        await daemon.ingest("t", {"event": "TASK_CREATED"})
        assert await healthz_ms(daemon) < 1000
        cut = await asyncio.gather(*(closed_within(r, 5.0) for r, _ in clients))
        elapsed = time.monotonic() - started
        for task in tricklers:
            task.cancel()
    assert all(cut), f"{cut.count(False)} of 100 tricklers were never cut"
    assert 0.5 < elapsed < 5.0
    assert await metric(daemon, 'webhookd_api_connections_closed_total{reason="header_timeout"}')
    assert any(
        e["event"] == "api_connections_closed" and e["reason"] == "header_timeout" for e in logs
    ), logs
    await wait_for(lambda: receiver.sequences("/t") == [1])
    for _, writer in clients:
        writer.close()


async def test_a_client_that_connects_and_sends_nothing_is_cut_at_the_header_deadline(
    start_daemon: StartDaemon, receiver: Receiver
) -> None:
    daemon = await start_daemon(
        tenants={"t": tenant(receiver.url("/t"))}, daemon={"api_header_timeout": 0.3}
    )
    reader, writer = await connect(port_of(daemon))
    assert await closed_within(reader, 3.0)
    writer.close()


async def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(
    start_daemon: StartDaemon, receiver: Receiver
) -> None:
    daemon = await start_daemon(
        tenants={"t": tenant(receiver.url("/t"))},
        daemon={"api_idle_timeout": 1.0, "api_header_timeout": 30.0},
    )
    reader, writer = await connect(port_of(daemon))
    for _ in range(2):  # kept alive between requests that come in time
        writer.write(HEALTHZ)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(parse(head)[1]["content-length"])
        await reader.readexactly(length)
        await asyncio.sleep(0.2)
    started = time.monotonic()
    assert await closed_within(reader, 5.0)
    assert time.monotonic() - started > 0.5
    writer.close()


async def test_the_header_deadline_restarts_for_each_request_on_a_kept_alive_connection(
    start_daemon: StartDaemon, receiver: Receiver
) -> None:
    """A kept-alive client that makes a request every 0.4 s is never cut by a 0.6 s head
    deadline counted from the connection's start."""
    daemon = await start_daemon(
        tenants={"t": tenant(receiver.url("/t"))},
        daemon={"api_header_timeout": 0.6, "api_idle_timeout": 5.0},
    )
    reader, writer = await connect(port_of(daemon))
    for _ in range(5):
        writer.write(HEALTHZ)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(int(parse(head)[1]["content-length"]))
        await asyncio.sleep(0.4)
    writer.close()


# -- the connection cap --------------------------------------------------------------------------


async def test_at_the_limit_a_new_client_closes_the_longest_waiting_idle_connection(
    start_daemon: StartDaemon, receiver: Receiver
) -> None:
    daemon = await start_daemon(
        tenants={"t": tenant(receiver.url("/t"))},
        daemon={"api_max_connections": 20, "api_header_timeout": 60.0},
    )
    port = port_of(daemon)
    idle = []
    for _ in range(20):
        idle.append(await connect(port))
        await asyncio.sleep(0.01)  # so "longest waiting" is well defined
    await wait_for(lambda: daemon.server.connections and len(daemon.server.connections.live) == 20)
    # The API still answers: each new client makes room by closing the oldest idle one.
    status, _, body = parse(await exchange(port, HEALTHZ[:-2] + b"Connection: close\r\n\r\n"))
    assert (status, body) == (200, {"status": "ok"})
    assert await closed_within(idle[0][0], 3.0)
    assert await metric(daemon, 'webhookd_api_connections_closed_total{reason="evicted"}') >= 1
    assert await metric(daemon, "webhookd_api_connections_limit") == 20
    for _, writer in idle:
        writer.close()


async def test_at_the_limit_with_every_connection_busy_a_new_client_gets_a_json_503(
    start_daemon: StartDaemon, receiver: Receiver
) -> None:
    daemon = await start_daemon(
        tenants={"t": tenant(receiver.url("/t"))}, daemon={"api_max_connections": 20}
    )
    port = port_of(daemon)
    busy = []
    for _ in range(20):  # each is in its handler, waiting for the rest of its body
        reader, writer = await connect(port)
        writer.write(
            b"POST /v1/tenants/t/webhooks HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        busy.append((reader, writer))
    await wait_for(
        lambda: (
            daemon.server.connections
            and sum(not h.waiting for h in daemon.server.connections.live) == 20
        )
    )
    with capture_logs() as logs:
        status, headers, body = parse(await exchange(port, HEALTHZ))
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert body["error"] == "too_many_connections"
    assert [e["reason"] for e in logs if e["event"] == "api_connections_closed"] == ["refused"]
    for _, writer in busy:
        writer.close()
    # Once they are gone, clients are served again.
    guard = daemon.server.connections
    assert guard is not None
    await wait_for(lambda: not guard.live)
    assert await healthz_ms(daemon) < 1000
    assert await metric(daemon, 'webhookd_api_connections_closed_total{reason="refused"}') == 1


async def test_api_clients_never_take_the_descriptors_deliveries_need(
    tmp_path: Path, process_factory: Callable[..., Process], receiver: Receiver
) -> None:
    """Under a 400-descriptor limit with max_connections = 50, the API takes at most
    400 - 50 - 256 = 94 clients: 300 tricklers neither starve deliveries of sockets nor
    lock the operator out."""

    async def close_after(request: web.Request) -> web.StreamResponse:
        response = web.Response(text="ok")
        response.force_close()  # so every delivery needs a new socket
        return response

    receiver.always("/t", close_after)
    path = write_config(
        tmp_path,
        {"t": tenant(receiver.url("/t"))},
        daemon={"max_connections": 50, "api_header_timeout": 60.0, "log_format": "json"},
    )
    daemon = process_factory(path, nofile=(400, 400))
    await asyncio.to_thread(daemon.start)
    port = daemon.config.daemon.listen_port
    tricklers = []
    for _ in range(300):
        _reader, writer = await connect(port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        tricklers.append(writer)
    async with aiohttp.ClientSession() as session:
        for n in range(20):
            async with session.post(
                f"{daemon.base}/v1/tenants/t/webhooks",
                json={"event": "TASK_CREATED", "data": {"n": n}},
            ) as response:
                assert response.status == 202, await response.text()
        async with session.get(f"{daemon.base}/healthz") as response:
            assert response.status == 200
        async with session.get(f"{daemon.base}/metrics") as response:
            metrics = await response.text()
    assert "webhookd_api_connections_limit 94.0" in metrics
    assert float(metrics.split("\nwebhookd_api_connections ")[1].split()[0]) <= 94
    await wait_for(lambda: receiver.sequences("/t") == list(range(1, 21)), timeout=20)
    for writer in tricklers:
        writer.close()
    assert await asyncio.to_thread(daemon.terminate) == 0
    assert "Too many open files" not in daemon.log()
    assert "api_connections_closed" in daemon.log()


# -- every refusal is JSON -----------------------------------------------------------------------

MARKER = "ZQXJ-marker"
MALFORMED = {
    "bad chunk size": (
        b"POST /v1/tenants/t/webhooks HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + MARKER.encode()
        + b"\r\n"
    ),
    "two Content-Lengths": (
        b"POST /v1/tenants/t/webhooks HTTP/1.1\r\nHost: t\r\n"
        b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
    ),
    "a 100 KB URL": b"GET /" + MARKER.encode() * 10_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
    "a 100 KB header": b"GET /healthz HTTP/1.1\r\nX-A: " + MARKER.encode() * 10_000 + b"\r\n\r\n",
    "Expect: bogus": (
        b"POST /v1/tenants/t/webhooks HTTP/1.1\r\nHost: t\r\nExpect: "
        + MARKER.encode()
        + b"\r\nContent-Length: 2\r\n\r\n"
    ),
    "TLS to the plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + MARKER.encode(),
    "not HTTP at all": MARKER.encode() + b" / HTTP/1.1\r\n\r\n",
    "a bad header line": b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + MARKER.encode() + b"\r\n\r\n",
    "a NUL in the target": b"GET /health\x00z HTTP/1.1\r\nHost: t\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "a bad version": b"GET /healthz HTTP/9.9\r\nHost: t\r\n\r\n",
    "a space before the colon": b"GET /healthz HTTP/1.1\r\nHost : t\r\n\r\n",
    "Content-Length with a sign": (
        b"POST /v1/tenants/t/webhooks HTTP/1.1\r\nHost: t\r\nContent-Length: +2\r\n\r\n{}"
    ),
    "chunked and Content-Length": (
        b"POST /v1/tenants/t/webhooks HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_every_refusal_of_the_http_parser_is_the_documented_json(
    start_daemon: StartDaemon, receiver: Receiver, name: str
) -> None:
    daemon = await start_daemon(tenants={"t": tenant(receiver.url("/t"))})
    answer = await exchange(port_of(daemon), MALFORMED[name])
    status, headers, body = parse(answer)
    assert 400 <= status < 500, answer[:200]
    assert headers["content-type"] == "application/json"
    assert set(body) == {"error", "detail"} and body["detail"], body
    assert MARKER not in answer.decode("latin-1"), "the refusal echoes the request"
    # ...and the connection was closed: `exchange` read to the end.


async def test_a_non_utf8_authorization_header_is_401_not_500(
    start_daemon: StartDaemon, receiver: Receiver
) -> None:
    """docs/http-api.md#authentication: "With `api_token` set, every path but `/healthz` needs
    `Authorization: Bearer <api_token>` (401 otherwise). Errors are JSON `{"error": "<code>",
    "detail": "<human sentence>"}`." README (Delivery guarantees): "any body, header or config gets
    a 4xx JSON error ..., never a 500".

    aiohttp hands over a header byte that is not UTF-8 surrogate-escaped: a token check
    that called `.encode()` on it would raise UnicodeEncodeError, a 500 "internal".
    """
    token = "tok-5d1c7e0b42"
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/acme"))}, daemon={"api_token": token}
    )
    for route in (b"/v1/status", b"/v1/tenants/acme/status"):
        request = (
            b"GET " + route + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff" + token.encode() + b"\r\n\r\n"
        )
        status, headers, body = parse(await exchange(port_of(daemon), request, timeout=10))
        assert status == 401, (route, status, body)
        assert headers.get("content-type", "").startswith("application/json"), headers
        assert set(body) == {"error", "detail"} and body["detail"], body
        assert body["error"] == "unauthorized", body


async def test_a_declared_body_over_the_limit_gets_413_at_once(
    start_daemon: StartDaemon, receiver: Receiver
) -> None:
    daemon = await start_daemon(tenants={"t": tenant(receiver.url("/t"))})
    started = time.monotonic()
    answer = await exchange(
        port_of(daemon),
        b"POST /v1/tenants/t/webhooks HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n",
        timeout=20,
    )
    status, _headers, body = parse(answer)
    assert status == 413
    assert body["error"] == "too_large" and "10485760" in body["detail"]
    assert time.monotonic() - started < 5  # not the 60 s body deadline


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        ("/v1/tenants/t/webhooks", b"Content-Length: 1000000000000\r\n", 413),
        ("/v1/tenants/nobody/webhooks", b"Content-Length: 2\r\n", 404),
        ("/v1/tenants/t/webhooks", b"Content-Length: 2\r\nContent-Type: text/csv\r\n", 415),
        ("/v1/nowhere", b"Content-Length: 2\r\n", 404),
        ("/healthz", b"Content-Length: 2\r\n", 405),
    ],
)
async def test_expect_100_continue_is_not_answered_for_a_request_that_will_be_refused(
    start_daemon: StartDaemon, receiver: Receiver, target: str, headers: bytes, status: int
) -> None:
    daemon = await start_daemon(tenants={"t": tenant(receiver.url("/t"))})
    answer = await exchange(
        port_of(daemon),
        f"POST {target} HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n".encode()
        + headers
        + b"\r\n",
    )
    assert b"100 Continue" not in answer
    code, response_headers, body = parse(answer)
    assert code == status, answer
    assert response_headers["content-type"] == "application/json" and body["error"]


async def test_expect_100_continue_without_the_token_gets_401_and_no_continue(
    start_daemon: StartDaemon, receiver: Receiver
) -> None:
    daemon = await start_daemon(
        tenants={"t": tenant(receiver.url("/t"))}, daemon={"api_token": "tok-123456"}
    )
    answer = await exchange(
        port_of(daemon),
        b"POST /v1/tenants/t/webhooks HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
        b"Content-Length: 2\r\n\r\n",
    )
    assert b"100 Continue" not in answer
    assert parse(answer)[0] == 401


async def test_expect_100_continue_for_a_good_request_continues_and_queues(
    start_daemon: StartDaemon, receiver: Receiver
) -> None:
    daemon = await start_daemon(tenants={"t": tenant(receiver.url("/t"))})
    body = json.dumps({"event": "TASK_CREATED", "data": {"a": 1}}).encode()
    reader, writer = await connect(port_of(daemon))
    writer.write(
        b"POST /v1/tenants/t/webhooks HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    )
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(body)
    status, _, answer = parse(await asyncio.wait_for(reader.read(), 5))
    writer.close()
    assert status == 202 and answer["webhooks"][0]["status"] == "queued"
    await wait_for(lambda: receiver.sequences("/t") == [1])


async def test_the_daemon_log_stays_json_lines_without_tracebacks_under_malformed_requests(
    tmp_path: Path, process_factory: Callable[..., Process], receiver: Receiver
) -> None:
    path = write_config(
        tmp_path,
        {"t": tenant(receiver.url("/t"))},
        daemon={"log_format": "json", "log_level": "debug"},
    )
    daemon = process_factory(path)
    await asyncio.to_thread(daemon.start)
    for request in MALFORMED.values():
        await exchange(daemon.config.daemon.listen_port, request)
    assert await asyncio.to_thread(daemon.terminate) == 0
    lines = daemon.log().splitlines()
    assert lines
    for line in lines:
        event = json.loads(line)  # every line is one JSON object
        assert "Traceback" not in line and 'File "' not in line, line
        assert MARKER not in line, line
        assert isinstance(event["event"], str)


@pytest.mark.parametrize(("cap", "backlog"), [(300, 300), (50, 128)])
async def test_the_listen_backlog_holds_a_burst_of_as_many_clients_as_are_allowed(
    start_daemon: StartDaemon, receiver: Receiver, cap: int, backlog: int
) -> None:
    """The kernel queues this many connections while the loop is busy (at least 128,
    the usual default); read back from the listening socket with `ss` (iproute2)."""
    daemon = await start_daemon(
        tenants={"t": tenant(receiver.url("/t"))}, daemon={"api_max_connections": cap}
    )
    shown = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port_of(daemon)}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert shown[0] == "LISTEN" and int(shown[2]) == backlog, shown
