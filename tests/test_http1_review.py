"""Review of webhookd.http1 and its use in sender.py: each test shows one defect.

Every test here failed on the reviewed code (commit f066634; fixed in 9767046 and 8e0ff2b)
and says in its docstring what an endpoint, a producer or an operator has to do to cause it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Receiver, tenant, wait_for, write_config
from tests.test_http1 import OK, PROMPT, allow_all
from tests.test_http1 import head as request_head
from webhookd import config as config_mod
from webhookd import http1
from webhookd.config import TenantConfig
from webhookd.sender import UNSENDABLE_ID, Sender
from webhookd.store import Webhook


@pytest.fixture
async def client() -> AsyncIterator[http1.Client]:
    http = http1.Client(ssl.create_default_context(), allow_all)
    yield http
    http.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler, sock: socket.socket | None = None) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 running `handler` per connection; yields its port."""
    tasks: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    if sock is None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
    else:
        server = await asyncio.start_server(serve, sock=sock)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def answer(response: bytes) -> Handler:
    """Read one request head, write `response`, then wait for the client to go."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        await reader.read()

    return handler


async def post(client: http1.Client, port: int, body: bytes = b"{}") -> http1.Response:
    target = http1.parse_target(f"http://127.0.0.1:{port}/")
    async with asyncio.timeout(PROMPT):
        return await client.post(target, request_head(target, body), body)


def load_tenant(tmp_path: Path, endpoint: str, **overrides: Any) -> TenantConfig:
    path = write_config(tmp_path, {"acme": tenant(endpoint, **overrides)})
    return config_mod.load(path).tenants["acme"]


def webhook(webhook_id: str = "evt-1") -> Webhook:
    return Webhook(1, webhook_id, "CHECK_COMPLETED", time.time(), '{"n":1}')


SIGNING_SECRET = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="


# -- 1. a Content-Length too long for int() escapes the parser -----------------------------------


async def test_a_content_length_of_thousands_of_digits_is_a_bad_response(
    client: http1.Client,
) -> None:
    """int() refuses more than 4300 decimal digits (sys.get_int_max_str_digits) with a
    ValueError, which is not an HTTPError: it leaves data_received, the event loop logs
    "Fatal error on transport" with a traceback, and the attempt is recorded as "connection
    closed before a response" although a complete head came."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n"
    async with raw_server(answer(response)) as port:
        with pytest.raises(http1.BadResponse) as caught:
            await post(client, port)
    assert str(caught.value) == "bad response: invalid Content-Length"


# -- 2. obs-fold --------------------------------------------------------------------------------


async def test_a_folded_header_line_is_read_not_refused(client: http1.Client) -> None:
    """RFC 9112 section 5.2: a user agent that receives obs-fold in a response MUST replace
    it with SP. The client refuses the whole 200 as "invalid header line" (so the webhook is
    sent again and again); aiohttp's client, which this one replaced, reads it."""
    response = b"HTTP/1.1 200 OK\r\nX-Note: a\r\n  b\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answer(response)) as port:
        result = await post(client, port)
    assert result.status == 200


# -- 3. an early answer leaves a connection that never closes ------------------------------------


@pytest.mark.parametrize(
    "size", [16 << 20, 64 << 10], ids=["transport-buffers-the-rest", "kernel-holds-the-rest"]
)
async def test_a_connection_answered_before_its_body_was_sent_is_closed(
    client: http1.Client, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A large body (a batch, or one big webhook: max_body_bytes is 10 MiB) to an endpoint
    that answers after the head and then stops reading: the response is complete while the
    transport still buffers the body, so _exchange calls connection.close(), which waits
    for that buffer to drain, which never happens. Each such delivery keeps a socket and
    megabytes of body for as long as the endpoint keeps the connection open. (Added after
    the fix: a body small enough for the kernel's send queue left the transport's buffer
    empty, and the half-sent connection was pooled.)"""
    made: list[http1.Connection] = []
    lost: list[http1.Connection] = []
    connection_made, connection_lost = (
        http1.Connection.connection_made,
        http1.Connection.connection_lost,
    )

    def record_made(self: http1.Connection, transport: asyncio.BaseTransport) -> None:
        made.append(self)
        connection_made(self, transport)

    def record_lost(self: http1.Connection, exc: Exception | None) -> None:
        lost.append(self)
        connection_lost(self, exc)

    monkeypatch.setattr(http1.Connection, "connection_made", record_made)
    monkeypatch.setattr(http1.Connection, "connection_lost", record_lost)

    async def answer_early_then_stall(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(3600)  # keeps the connection open, reads nothing more

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted sockets too
    listener.bind(("127.0.0.1", 0))
    try:
        async with raw_server(answer_early_then_stall, listener) as port:
            assert await post(client, port, b"x" * size) == http1.Response(
                200, {"content-length": "2"}
            )
            try:
                await wait_for(lambda: all(c in lost for c in made), PROMPT)
            finally:
                for connection in made:
                    connection.abort()  # for the next tests
    finally:
        listener.close()


# -- 4. a connection whose connect began before drop_pooled is pooled after it ------------------


async def test_tightening_allow_private_during_a_connect_keeps_its_connection_out_of_the_pool(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Sender.set_allow_private(False) bumps the client's generation so that no connection
    to a private address carries another request. But Connection takes the generation when
    the connection is made (the protocol factory, after `await sock_connect`), not when its
    address was checked: a reload that lands during the connect (one RTT) gets the
    connection the new generation, it is pooled, and the next delivery to the private
    address goes through it instead of failing as blocked."""
    sender = Sender(allow_private=True)
    acme = load_tenant(tmp_path, receiver.url("/acme"))
    client = sender._client
    check = client._check_address
    loop = asyncio.get_running_loop()

    def check_then_reload(address: str) -> None:
        check(address)  # passes: private endpoints are allowed right now
        loop.call_soon(sender.set_allow_private, False)  # the reload, mid-connect

    client._check_address = check_then_reload
    try:
        first = await sender.send(acme, [webhook("evt-1")])
        assert first.ok  # its address was checked under the rule of that moment
        assert not sender.allow_private
        second = await sender.send(acme, [webhook("evt-2")])
        assert (second.ok, second.error) == (
            False,
            "blocked: resolves to private address 127.0.0.1 "
            "(set allow_private_endpoints = true to allow)",
        )
    finally:
        await sender.close()


# -- 5. a producer's webhook id is written into the request head as it is -----------------------


async def test_a_webhook_id_with_a_line_break_cannot_add_a_header(
    tmp_path: Path, receiver: Receiver
) -> None:
    """With signing on, `webhook-id` is the producer's own id (api.py accepts any string of
    1 to 255 characters), and sender.py puts it in the head unescaped: CR LF in an ingested
    id adds headers (or ends the head) of the request the tenant's endpoint receives.
    aiohttp's client, before this change, refused header values with CR or LF."""
    sender = Sender(allow_private=True)
    acme = load_tenant(tmp_path, receiver.url("/acme"), signing_secret=SIGNING_SECRET)
    try:
        outcome = await sender.send(acme, [webhook("evt-1\r\nX-Injected: by the producer")])
    finally:
        await sender.close()
    assert [r.headers.get("X-Injected") for r in receiver.requests] in ([], [None])
    # Ingest refuses such ids now; one queued before that is a failed attempt, never sent.
    assert (outcome.ok, outcome.error) == (False, UNSENDABLE_ID)
    assert receiver.requests == []


# -- 6. an endpoint host the IDNA codec refuses ---------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "ü" + "a" * 64 + ".example",  # parse_target's IDNA encoding raises
        "a" * 64 + ".example",  # getaddrinfo raises UnicodeError
    ],
    ids=["non-ascii", "ascii"],
)
async def test_an_endpoint_host_with_a_label_over_63_characters_is_refused_then_a_failed_attempt(
    tmp_path: Path, host: str
) -> None:
    """config refuses such a host (also through the tenant API), naming it; handed one all
    the same, Sender.send must still end in an outcome ("never raises for delivery
    errors"), not raise before its try or record "unexpected error"."""
    endpoint = f"http://{host}/hooks"
    with pytest.raises(config_mod.ConfigError) as refused:
        load_tenant(tmp_path, endpoint)
    assert "tenants.acme.endpoint: " in str(refused.value)
    assert "is not a valid host name" in str(refused.value)
    sender = Sender(allow_private=True)
    acme = dataclasses.replace(load_tenant(tmp_path, "http://example.com/hooks"), endpoint=endpoint)
    try:
        outcome = await sender.send(acme, [webhook()])
    finally:
        await sender.close()
    assert not outcome.ok
    assert outcome.error is not None
    assert outcome.error.startswith("DNS: cannot resolve "), outcome.error
