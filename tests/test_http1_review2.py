"""Second review of webhookd.http1 and its use in sender.py: each test shows one defect.

Every test here failed on the reviewed code (commit 2b536c1; fixed in the commit after
9e22f3e) and says in its docstring what an endpoint or an operator has to do to cause it.
Most are about TLS, which the first review and test_http1.py do not reach: there, every
server is plain TCP, and uvloop's TLS transport differs from its TCP transport in two ways
the client relies on (what close() waits for, and what get_write_buffer_size() counts).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import trustme
from aiohttp import web

from tests.conftest import Receiver, load_tenant, wait_for, webhook
from tests.test_delivery import SIGNING_SECRET
from tests.test_http1 import (
    OK,
    OK_RESPONSE,
    PROMPT,
    Peer,
    RawServer,
    Script,
    allow_all,
    keep_alive,
    post,
)
from webhookd import http1
from webhookd.sender import Sender

CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"


# -- TLS servers and connection accounting -------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, host: str = "127.0.0.1") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(context)
    return context


@pytest.fixture
async def tls_client(ca: trustme.CA) -> AsyncIterator[http1.Client]:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    http = http1.Client(context, allow_all)
    yield http
    http.close()


class TlsServer(RawServer):
    """test_http1's RawServer behind TLS (a certificate for 127.0.0.1 from `ca`)."""

    def __init__(
        self, scripts: tuple[Script, ...], context: ssl.SSLContext, sock: socket.socket | None
    ) -> None:
        super().__init__(scripts)
        self.context = context
        self.sock = sock

    async def start(self) -> None:
        if self.sock is None:
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        else:
            server = await asyncio.start_server(self._serve, sock=self.sock, ssl=self.context)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]

    def target(self, path: str = "/") -> http1.Target:
        return http1.parse_target(f"https://127.0.0.1:{self.port}{path}")


StartTlsServer = Callable[..., Awaitable[TlsServer]]


@pytest.fixture
async def tls_servers(ca: trustme.CA) -> AsyncIterator[StartTlsServer]:
    made: list[TlsServer] = []

    async def start(*scripts: Script, sock: socket.socket | None = None) -> TlsServer:
        server = TlsServer(scripts, server_context(ca), sock)
        await server.start()
        made.append(server)
        return server

    yield start
    for server in made:
        await server.close()
    assert [server.errors for server in made] == [[] for _ in made]


class Sockets:
    """Every client Connection made, and those whose transport is gone (connection_lost)."""

    def __init__(self) -> None:
        self.made: list[http1.Connection] = []
        self.lost: list[http1.Connection] = []

    @property
    def open(self) -> list[http1.Connection]:
        return [c for c in self.made if c not in self.lost]


@pytest.fixture
def sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sockets]:
    seen = Sockets()
    connection_made = http1.Connection.connection_made
    connection_lost = http1.Connection.connection_lost

    def record_made(self: http1.Connection, transport: asyncio.BaseTransport) -> None:
        seen.made.append(self)
        connection_made(self, transport)

    def record_lost(self: http1.Connection, exc: Exception | None) -> None:
        seen.lost.append(self)
        connection_lost(self, exc)

    monkeypatch.setattr(http1.Connection, "connection_made", record_made)
    monkeypatch.setattr(http1.Connection, "connection_lost", record_lost)
    yield seen
    for connection in seen.open:
        connection.abort()  # what a failed test left behind, so the next test starts clean


async def stop_reading(peer: Peer) -> None:
    """Stop reading the connection (the TLS layer too), keep it open, and wait."""
    # uvloop's transports are not asyncio.Transport subclasses, only alike.
    cast(asyncio.Transport, peer.writer.transport).pause_reading()
    await asyncio.Event().wait()  # until teardown cancels the script


# -- 1. a TLS connection the client closes stays open until the peer answers close_notify ------


def answer_then_stop_reading(response: bytes) -> Script:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(response)
        await stop_reading(peer)

    return script


@pytest.mark.parametrize("how", ["connection-close", "idle-sweep"])
async def test_a_tls_connection_the_client_is_done_with_is_closed_at_once(
    how: str,
    tls_client: http1.Client,
    tls_servers: StartTlsServer,
    sockets: Sockets,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connection.close() calls transport.close(), which on a TLS transport is a graceful
    shutdown: it sends close_notify and keeps the socket until the peer's close_notify comes
    back, or uvloop's ssl_shutdown_timeout (30 s) passes. An endpoint that answers `200`
    with `Connection: close` (or keeps a connection until the idle sweep) and then simply
    does not answer close_notify keeps every such socket open for 30 s after its delivery
    ended and its max_connections slot was released. One tenant with a queue delivers
    tens of webhooks a second, so a few hundred sockets pile up outside max_connections
    ("outgoing connections, all tenants together") and RLIMIT_NOFILE (1024 by default),
    until accept() on the API, SQLite and every other tenant's connect fail with EMFILE.
    aiohttp, which this client replaced, aborts TLS connections it closes (its
    ssl_shutdown_timeout defaults to 0) for this reason."""
    if how == "idle-sweep":
        monkeypatch.setattr(http1, "IDLE_S", 0.1)
        monkeypatch.setattr(http1, "SWEEP_S", 0.05)
    server = await tls_servers(answer_then_stop_reading(CLOSE if how == "connection-close" else OK))
    for n in range(3):
        response = await post(tls_client, server.target(f"/{n}"))
        assert response.status == 200
        if how == "idle-sweep":
            await wait_for(lambda: not tls_client._idle, PROMPT)  # swept
    assert len(sockets.made) == 3
    await wait_for(lambda: not sockets.open, PROMPT)


# -- 2. TLS: a body still being sent does not show in get_write_buffer_size() -------------------


async def test_a_tls_connection_answered_before_its_body_was_sent_is_not_pooled(
    tls_client: http1.Client, tls_servers: StartTlsServer, sockets: Sockets
) -> None:
    """The first review's early-answer fix (closing, or aborting when bytes are unsent)
    and `Connection.reusable` both ask transport.get_write_buffer_size() whether the
    request went out. On a TLS transport that counts only bytes not yet encrypted; the
    ciphertext waits in the TCP transport below, uncounted. So over https (most endpoints),
    a large body (a batch; a webhook up to max_body_bytes, 10 MiB) to an endpoint that
    answers `200` after the head and stops reading is still "fully sent": the connection
    goes back to the pool in the middle of its request with megabytes queued. The next
    delivery to that endpoint is written behind them and waits out its whole timeout (a
    failed attempt the endpoint never saw); until then the socket and the body stay."""

    async def answer_early_then_stall(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.send(OK)
        await stop_reading(peer)

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted sockets too
    listener.bind(("127.0.0.1", 0))
    server = await tls_servers(answer_early_then_stall, keep_alive(OK), sock=listener)
    assert await post(tls_client, server.target("/1"), b"x" * (16 << 20)) == OK_RESPONSE
    # The next delivery goes out on a new connection and is answered...
    assert await post(tls_client, server.target("/2")) == OK_RESPONSE
    assert len(server.peers) == 2
    # ...and the connection with the unsent body is gone, not kept for later.
    await wait_for(lambda: sockets.made[0] in sockets.lost, PROMPT)


# -- 3. an endpoint host written with its trailing dot ------------------------------------------


async def test_an_https_endpoint_with_a_fully_qualified_trailing_dot_verifies(
    tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """config accepts a host name ending in a dot (`https://hooks.example.com./x`, the
    fully-qualified spelling; its _HOST pattern allows it on purpose), but http1 passes the
    name with the dot as server_hostname, and Python's ssl matches it against the
    certificate as it is: no certificate names `hooks.example.com.`, so every delivery to
    such an endpoint fails "TLS: certificate verify failed (Hostname mismatch ...)" and the
    tenant stalls forever. aiohttp, whose TLS verification README promises is unchanged,
    strips the dot (as curl and browsers do): the name is the same host."""
    host = "hooks.example"
    context = server_context(ca, host)
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(OK)
            await writer.drain()
            await reader.read()
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo

    async def resolve_test_host(name: str, port: int, **kwargs: Any) -> list[Any]:
        if name.rstrip(".") != host:
            return await resolve(name, port, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]

    monkeypatch.setattr(loop, "getaddrinfo", resolve_test_host)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    acme = load_tenant(tmp_path, f"https://{host}.:{port}/hooks")  # config takes it
    sender = Sender(allow_private=True, ca_file=ca_file)
    try:
        outcome = await sender.send(acme, [webhook()])
    finally:
        await sender.close()
        server.close()
        await server.wait_closed()
    assert (outcome.ok, outcome.error) == (True, None)
    assert len(received) == 1


# -- 4. the signature's timestamp is taken before the wait for a connection slot ---------------


async def test_webhook_timestamp_is_the_send_time_not_the_time_before_waiting_for_a_slot(
    tmp_path: Path, receiver: Receiver
) -> None:
    """SPEC §8: `webhook-timestamp` is the send time. Sender.send signs (and stamps) the
    request, then waits for one of max_connections slots, so the timestamp is as old as
    that wait. When more tenants are busy than there are slots (an operator's
    max_connections below the tenant count, slow or hanging endpoints each holding a slot
    up to their 5-10 s timeout), the wait grows with the queue of tenants; receivers using
    the Standard Webhooks libraries refuse a timestamp more than 5 minutes old, answer 401,
    and the retry is stamped before the same wait again."""
    sender = Sender(max_connections=1, allow_private=True)
    slow_started, release = asyncio.Event(), asyncio.Event()
    arrivals: list[tuple[float, dict[str, str]]] = []

    async def hold(request: web.Request) -> web.Response:
        slow_started.set()
        await release.wait()
        return web.Response(text="ok")

    async def record(request: web.Request) -> web.Response:
        arrivals.append((time.time(), dict(request.headers)))
        return web.Response(text="ok")

    receiver.always("/slow", hold)
    receiver.always("/signed", record)
    slow = load_tenant(tmp_path, receiver.url("/slow"))
    signed = load_tenant(tmp_path, receiver.url("/signed"), signing_secret=SIGNING_SECRET)
    try:
        holding = asyncio.create_task(sender.send(slow, [webhook("slow-1")]))
        await asyncio.wait_for(slow_started.wait(), PROMPT)  # the only slot is taken
        built = time.time()
        waiting = asyncio.create_task(sender.send(signed, [webhook("signed-1")]))
        # The slot stays busy for two seconds (a short stand-in for a long queue of tenants):
        # the time passing is what is under test.
        await wait_for(lambda: time.time() >= built + 2, 5.0)
        release.set()
        outcomes = await asyncio.wait_for(asyncio.gather(holding, waiting), PROMPT)
    finally:
        release.set()
        await sender.close()
    assert [outcome.ok for outcome in outcomes] == [True, True]
    [(arrived, headers)] = arrivals
    assert arrived - int(headers["webhook-timestamp"]) < 2, (arrived, headers)
