"""The delivery HTTP/1.1 client (webhookd.http1) against real servers on 127.0.0.1.

Most tests talk to a bare TCP (or TLS) server that writes exact bytes, so each framing rule,
each malformed answer and each way a connection can end is produced on purpose and seen from
both sides: what the client returned or raised, and which connections and requests the
server saw. test_faults.py covers the same faults through the daemon; this file pins the
client's own rules (parsing, pooling, the one retry, timeouts, the idle sweep, closing TLS)
and how the sender hands it an endpoint's host name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import idna
import pytest
import trustme

from tests.conftest import Receiver, free_port, load_tenant, stop_server, wait_for, webhook
from webhookd import config as config_mod
from webhookd import http1
from webhookd.sender import Sender

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_RESPONSE = http1.Response(200, {"content-length": "2"})
# A peer reacts in milliseconds; this bounds every wait for one on a loaded 2-core machine.
PROMPT = 2.0


def allow_all(address: str) -> None:
    return None


def head(target: http1.Target, body: bytes) -> bytes:
    """The request head, built as sender.py builds it."""
    return (
        f"POST {target.path} HTTP/1.1\r\nHost: {target.authority}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()


def sent(target: http1.Target, body: bytes = b"{}") -> bytes:
    """The exact bytes a server receives for `post(client, target, body)`."""
    return head(target, body) + body


async def post(
    client: http1.Client, target: http1.Target, body: bytes = b"{}", source_address: str = ""
) -> http1.Response:
    # Bounded, so a client that waits for bytes that never come fails instead of hanging.
    async with asyncio.timeout(PROMPT):
        return await client.post(target, head(target, body), body, source_address)


# -- a raw TCP server ----------------------------------------------------------------------------


class Peer:
    """One accepted connection as the server sees it: the requests and how the client left."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.address: str = writer.get_extra_info("peername")[0]
        self.requests: list[bytes] = []
        self.end: str | None = None  # "eof" or "reset", once the client closed its side
        self.hung_up = False  # the server closed its side

    async def read_request(self) -> bool:
        """Read one whole request into `requests`; False when the client closed instead."""
        try:
            request_head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            assert exc.partial == b"", exc.partial
            self.end = "eof"
            return False
        except ConnectionResetError:
            self.end = "reset"
            return False
        length = next(
            int(line.split(b":", 1)[1])
            for line in request_head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        self.requests.append(request_head + await self.reader.readexactly(length))
        return True

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def trickle(self, data: bytes) -> None:
        """Send one byte per write (the server sets TCP_NODELAY: one segment each)."""
        for i in range(len(data)):
            await self.send(data[i : i + 1])

    async def until_closed(self) -> None:
        """Wait for the client to close the connection; a byte sent instead fails the test."""
        try:
            rest = await self.reader.read()
        except ConnectionResetError:
            self.end = "reset"
            return
        assert rest == b"", rest
        self.end = "eof"


Script = Callable[[Peer], Awaitable[None]]


class RawServer:
    """Connection n runs scripts[n] (the last script for every later one); then it is closed.

    `receive_buffer` sets SO_RCVBUF on the listener, which every accepted socket inherits: a
    small one keeps the kernel from taking in much of a body the script never reads. With a
    `context`, the server speaks TLS.
    """

    def __init__(
        self,
        scripts: tuple[Script, ...],
        receive_buffer: int | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.scripts = scripts
        self.receive_buffer = receive_buffer
        self.context = context
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self.receive_buffer is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        else:
            listener = socket.socket()  # the server owns it from here, and closes it
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            listener.bind(("127.0.0.1", 0))
            self._server = await asyncio.start_server(self._serve, sock=listener, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]

    def target(self, path: str = "/") -> http1.Target:
        scheme = "http" if self.context is None else "https"
        return http1.parse_target(f"{scheme}://127.0.0.1:{self.port}{path}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(reader, writer)
        self.peers.append(peer)
        script = self.scripts[min(len(self.peers), len(self.scripts)) - 1]
        try:
            await script(peer)
        except asyncio.CancelledError:
            # Teardown cancels scripts still waiting. Ended quietly, because on Python 3.11
            # asyncio.streams logs a cancelled connection handler as an unhandled error.
            pass
        except ConnectionError:
            pass  # the client aborted while the script was still writing
        except Exception as exc:
            self.errors.append(exc)  # a failed assertion in a script; teardown reports it
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            peer.hung_up = True
            self._tasks.discard(task)

    async def close(self) -> None:
        await stop_server(self._server, self._tasks)


StartServer = Callable[..., Awaitable[RawServer]]


@pytest.fixture
async def servers() -> AsyncIterator[StartServer]:
    made: list[RawServer] = []

    async def start(
        *scripts: Script,
        receive_buffer: int | None = None,
        context: ssl.SSLContext | None = None,
    ) -> RawServer:
        server = RawServer(scripts, receive_buffer, context)
        await server.start()
        made.append(server)
        return server

    yield start
    for server in made:
        await server.close()
    assert [server.errors for server in made] == [[] for _ in made]


@pytest.fixture
async def client() -> AsyncIterator[http1.Client]:
    http = http1.Client(ssl.create_default_context(), allow_all)
    yield http
    http.close()


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


def keep_alive(*responses: bytes) -> Script:
    """Answer each request with the next response (the last one repeats) until the client
    closes the connection."""

    async def script(peer: Peer) -> None:
        answered = 0
        while await peer.read_request():
            await peer.send(responses[min(answered, len(responses) - 1)])
            answered += 1

    return script


def answer_then_close(response: bytes) -> Script:
    """Answer one request, then close the connection (the server's side first)."""

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(response)

    return script


async def silent(peer: Peer) -> None:
    """Read the request, never answer, and wait for the client to go."""
    await peer.read_request()
    await peer.until_closed()


# -- parse_target --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com/x", http1.Target(False, "example.com", 80, "example.com", "/x")),
        ("http://example.com:80/x", http1.Target(False, "example.com", 80, "example.com", "/x")),
        ("https://example.com/x", http1.Target(True, "example.com", 443, "example.com", "/x")),
        ("https://example.com:443/x", http1.Target(True, "example.com", 443, "example.com", "/x")),
    ],
)
def test_parse_target_omits_a_default_port_from_the_authority(
    url: str, expected: http1.Target
) -> None:
    assert http1.parse_target(url) == expected


@pytest.mark.parametrize(
    ("url", "tls", "port", "authority"),
    [
        ("http://example.com:8080/x", False, 8080, "example.com:8080"),
        ("https://example.com:80/x", True, 80, "example.com:80"),
        ("http://example.com:443/x", False, 443, "example.com:443"),
    ],
)
def test_parse_target_keeps_an_explicit_port(
    url: str, tls: bool, port: int, authority: str
) -> None:
    assert http1.parse_target(url) == http1.Target(tls, "example.com", port, authority, "/x")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://[::1]:8080/x", http1.Target(False, "::1", 8080, "[::1]:8080", "/x")),
        ("https://[2001:db8::1]/x", http1.Target(True, "2001:db8::1", 443, "[2001:db8::1]", "/x")),
    ],
)
def test_parse_target_brackets_an_ipv6_literal_in_the_authority_only(
    url: str, expected: http1.Target
) -> None:
    assert http1.parse_target(url) == expected


def test_parse_target_parses_an_endpoint_once_not_per_delivery() -> None:
    """sender.py parses the tenant's endpoint on every send: the hot path needs the cache."""
    http1.parse_target.cache_clear()
    for _ in range(3):
        http1.parse_target("https://hooks.example/once")
    assert (http1.parse_target.cache_info().misses, http1.parse_target.cache_info().hits) == (1, 2)


def test_parse_target_keeps_the_query_and_drops_the_fragment() -> None:
    target = http1.parse_target("http://example.com/hooks?tenant=a&x=1#top")
    assert target.path == "/hooks?tenant=a&x=1"


@pytest.mark.parametrize("url", ["http://example.com", "http://example.com/"])
def test_parse_target_sends_an_empty_path_as_slash(url: str) -> None:
    assert http1.parse_target(url).path == "/"


def test_parse_target_sends_a_query_without_a_path_after_slash() -> None:
    assert http1.parse_target("http://example.com?a=1").path == "/?a=1"


def test_parse_target_percent_encodes_spaces_and_non_ascii_in_path_and_query() -> None:
    target = http1.parse_target("http://example.com/a b/ü?q=x y&n=é")
    assert target.path == "/a%20b/%C3%BC?q=x%20y&n=%C3%A9"


def test_parse_target_leaves_existing_percent_escapes_alone() -> None:
    assert http1.parse_target("http://example.com/a%20b?q=%2F").path == "/a%20b?q=%2F"


def test_parse_target_encodes_an_idna_host() -> None:
    target = http1.parse_target("https://bücher.example:8443/x")
    assert target == http1.Target(
        True, "xn--bcher-kva.example", 8443, "xn--bcher-kva.example:8443", "/x"
    )


# -- framing -------------------------------------------------------------------------------------


async def test_content_length_response_is_returned_and_its_connection_reused(
    client: http1.Client, servers: StartServer
) -> None:
    response = (
        b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-Request-ID:  abc \r\n"
        b"Retry-After: 1\r\nRetry-After: 7\r\n\r\nhello"
    )
    server = await servers(keep_alive(response))
    first, second = server.target("/1"), server.target("/2")
    expected = http1.Response(
        201, {"content-length": "5", "x-request-id": "abc", "retry-after": "7"}
    )
    assert await post(client, first) == expected
    assert await post(client, second, b'{"n":2}') == expected
    assert len(server.peers) == 1
    assert server.peers[0].requests == [sent(first), sent(second, b'{"n":2}')]


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n"
    b"6\r\n world\r\n"
    b'A;a=1;b="q"\r\n0123456789\r\n'
    b"0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n"
)
CHUNKED_RESPONSE = http1.Response(200, {"transfer-encoding": "chunked", "x-kind": "chunked"})


async def test_chunked_response_with_extensions_and_trailers_is_parsed_and_reused(
    client: http1.Client, servers: StartServer
) -> None:
    server = await servers(keep_alive(CHUNKED))
    first, second = server.target("/1"), server.target("/2")
    # Trailers are read and ignored: they do not show among the headers.
    assert await post(client, first) == CHUNKED_RESPONSE
    assert await post(client, second) == CHUNKED_RESPONSE
    assert len(server.peers) == 1
    assert server.peers[0].requests == [sent(first), sent(second)]


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (OK, OK_RESPONSE),
        (CHUNKED, CHUNKED_RESPONSE),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, OK_RESPONSE),
    ],
    ids=["content-length", "chunked", "interim-then-final"],
)
async def test_a_response_written_one_byte_at_a_time_still_parses(
    response: bytes, expected: http1.Response, client: http1.Client, servers: StartServer
) -> None:
    async def trickling(peer: Peer) -> None:
        while await peer.read_request():
            await peer.trickle(response)

    server = await servers(trickling)
    assert await post(client, server.target("/1")) == expected
    assert await post(client, server.target("/2")) == expected
    assert len(server.peers) == 1
    assert server.peers[0].requests == [sent(server.target("/1")), sent(server.target("/2"))]


async def test_bare_lf_line_endings_are_accepted(
    client: http1.Client, servers: StartServer
) -> None:
    server = await servers(keep_alive(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"))
    assert await post(client, server.target("/1")) == OK_RESPONSE
    assert await post(client, server.target("/2")) == OK_RESPONSE
    assert len(server.peers) == 1


@pytest.mark.parametrize(
    "status_line", [b"HTTP/1.0 200 OK", b"HTTP/1.1 200 OK"], ids=["http1.0", "http1.1"]
)
async def test_a_body_without_framing_ends_at_eof_and_its_connection_is_not_pooled(
    status_line: bytes, client: http1.Client, servers: StartServer
) -> None:
    closing = asyncio.Event()

    async def until_eof(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(status_line + b"\r\nX-A: b\r\n\r\nhello, and more")
        await closing.wait()

    server = await servers(until_eof, keep_alive(OK))
    first, second = server.target("/1"), server.target("/2")
    request = asyncio.create_task(post(client, first))
    await wait_for(lambda: server.peers and server.peers[0].requests, PROMPT)
    # Nothing to wait on here: the test is that the client keeps waiting, so give it a
    # moment in which a client that stopped at the end of the bytes would have finished.
    await asyncio.sleep(0.05)
    assert not request.done()
    closing.set()
    assert await request == http1.Response(200, {"x-a": "b"})
    assert await post(client, second) == OK_RESPONSE
    assert len(server.peers) == 2
    assert [peer.requests for peer in server.peers] == [[sent(first)], [sent(second)]]


async def test_connection_close_response_is_not_pooled(
    client: http1.Client, servers: StartServer
) -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    # The server would keep the connection open: closing it is the client's doing.
    server = await servers(keep_alive(closing))
    first, second = server.target("/1"), server.target("/2")
    assert await post(client, first) == http1.Response(
        200, {"connection": "close", "content-length": "2"}
    )
    await wait_for(lambda: server.peers[0].end, PROMPT)
    assert server.peers[0].end == "eof"
    assert await post(client, second) == http1.Response(
        200, {"connection": "close", "content-length": "2"}
    )
    assert len(server.peers) == 2
    assert [peer.requests for peer in server.peers] == [[sent(first)], [sent(second)]]


async def test_interim_responses_are_skipped_for_the_final_one(
    client: http1.Client, servers: StartServer
) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    )
    final = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\nX-Final: yes\r\n\r\nok"

    async def interim_then_final(peer: Peer) -> None:
        while await peer.read_request():
            await peer.send(interim)
            await peer.send(final)

    server = await servers(interim_then_final)
    expected = http1.Response(202, {"content-length": "2", "x-final": "yes"})
    assert await post(client, server.target("/1")) == expected
    assert await post(client, server.target("/2")) == expected
    assert len(server.peers) == 1


async def test_101_switching_protocols_is_a_bad_response(
    client: http1.Client, servers: StartServer
) -> None:
    server = await servers(
        answer_then_close(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    )
    with pytest.raises(http1.BadResponse) as caught:
        await post(client, server.target())
    assert str(caught.value) == "bad response: unexpected protocol switch (HTTP 101)"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", http1.Response(204, {})),
        (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n",
            http1.Response(304, {"content-length": "100"}),
        ),
    ],
    ids=["204", "304-with-content-length"],
)
async def test_a_status_without_a_body_completes_without_waiting(
    response: bytes, expected: http1.Response, client: http1.Client, servers: StartServer
) -> None:
    # The server keeps the connection open and sends nothing more: a client waiting for a
    # body would hang until the timeout.
    server = await servers(keep_alive(response))
    async with asyncio.timeout(PROMPT):
        assert await post(client, server.target("/1")) == expected
        assert await post(client, server.target("/2")) == expected
    assert len(server.peers) == 1


# -- bad responses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (b"FOO\r\n\r\n", "invalid status line"),
        (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", "invalid status line"),
        (b"HTTP/2 200\r\nContent-Length: 0\r\n\r\n", "invalid status line"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "invalid header line"),
        (b"HTTP/1.1 200 OK\r\n Folded: value\r\n\r\n", "invalid header line"),
        (b"HTTP/1.1 200 OK\r\nBad Name: value\r\n\r\n", "invalid header line"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            "invalid Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nok", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", "invalid chunk size"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX\r\n",
            "invalid chunk end",
        ),
    ],
    ids=[
        "garbage-status-line",
        "four-digit-status",
        "http2-version",
        "header-without-colon",
        "folded-header",
        "space-in-header-name",
        "two-content-lengths",
        "non-numeric-content-length",
        "negative-content-length",
        "content-length-list",
        "non-hex-chunk-size",
        "empty-chunk-size",
        "chunk-longer-than-its-size",
    ],
)
async def test_a_malformed_response_is_a_bad_response_and_the_connection_dropped(
    response: bytes, message: str, client: http1.Client, servers: StartServer
) -> None:
    async def malformed(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(response)
        await peer.until_closed()

    server = await servers(malformed)
    with pytest.raises(http1.BadResponse) as caught:
        await post(client, server.target())
    assert str(caught.value) == f"bad response: {message}"
    await wait_for(lambda: server.peers[0].end, PROMPT)
    assert server.peers[0].end == "eof"


async def test_a_content_length_of_thousands_of_digits_is_a_bad_response(
    client: http1.Client, servers: StartServer
) -> None:
    """int() refuses more than 4300 decimal digits (sys.get_int_max_str_digits) with a
    ValueError, which is not an HTTPError: let through, it would leave data_received, the
    event loop would log "Fatal error on transport" with a traceback, and the attempt would
    be recorded as "connection closed before a response" although a complete head came."""

    async def huge_length(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n")
        await peer.until_closed()

    server = await servers(huge_length)
    with pytest.raises(http1.BadResponse) as caught:
        await post(client, server.target())
    assert str(caught.value) == "bad response: invalid Content-Length"


def padded_head(size: int) -> bytes:
    """A status line and `X-Pad` header lines, together at least `size` bytes, unterminated."""
    pad = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    return b"HTTP/1.1 200 OK\r\n" + pad * (size // len(pad) + 1)


async def test_a_head_that_never_ends_is_refused_past_max_head(
    client: http1.Client, servers: StartServer
) -> None:
    async def endless_head(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(padded_head(4 * http1.MAX_HEAD))  # and never the blank line
        await peer.until_closed()

    server = await servers(endless_head)
    with pytest.raises(http1.BadResponse) as caught:
        await post(client, server.target())
    assert str(caught.value) == "bad response: response headers too large"


async def test_a_complete_head_larger_than_max_head_is_refused(
    client: http1.Client, servers: StartServer
) -> None:
    below = padded_head(http1.MAX_HEAD - 2048)
    assert len(below) < http1.MAX_HEAD
    rest = b"X-Last: " + b"b" * 4096 + b"\r\nContent-Length: 0\r\n\r\n"
    assert len(below) + len(rest) > http1.MAX_HEAD + 1024

    async def oversized_head(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(below)
        await peer.send(rest)  # the head ends here, past MAX_HEAD
        await peer.until_closed()

    server = await servers(oversized_head)
    with pytest.raises(http1.BadResponse) as caught:
        await post(client, server.target())
    assert str(caught.value) == "bad response: response headers too large"


async def test_bytes_on_an_idle_pooled_connection_keep_it_from_reuse(
    client: http1.Client, servers: StartServer
) -> None:
    pooled = asyncio.Event()

    async def answer_then_babble(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(OK)
        await pooled.wait()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await peer.until_closed()

    server = await servers(answer_then_babble, keep_alive(OK))
    first, second = server.target("/1"), server.target("/2")
    assert await post(client, first) == OK_RESPONSE
    pooled.set()
    await wait_for(lambda: server.peers[0].end, PROMPT)
    assert server.peers[0].end == "eof"
    assert await post(client, second) == OK_RESPONSE
    assert len(server.peers) == 2
    assert [peer.requests for peer in server.peers] == [[sent(first)], [sent(second)]]


async def test_bytes_after_a_complete_response_keep_its_connection_from_reuse(
    client: http1.Client, servers: StartServer
) -> None:
    server = await servers(keep_alive(OK + b"HTTP/1.1 200 OK\r\n"))
    first, second = server.target("/1"), server.target("/2")
    assert await post(client, first) == OK_RESPONSE
    assert await post(client, second) == OK_RESPONSE
    assert len(server.peers) == 2
    assert [peer.requests for peer in server.peers] == [[sent(first)], [sent(second)]]


# -- connections that end early ------------------------------------------------------------------


@pytest.mark.parametrize(
    "partial", [b"", b"HTTP/1.1 200 O", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"]
)
async def test_a_close_before_the_head_ends_is_closed_before_response(
    partial: bytes, client: http1.Client, servers: StartServer
) -> None:
    server = await servers(answer_then_close(partial))
    with pytest.raises(http1.ClosedBeforeResponse) as caught:
        await post(client, server.target())
    assert str(caught.value) == "connection closed before a response"
    # A new connection is not retried: the server may have acted on the request.
    assert len(server.peers) == 1
    assert server.peers[0].requests == [sent(server.target())]


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
    ],
    ids=["content-length", "mid-chunk", "before-last-chunk", "before-trailers-end"],
)
async def test_a_close_mid_body_is_an_incomplete_body(
    partial: bytes, client: http1.Client, servers: StartServer
) -> None:
    server = await servers(answer_then_close(partial))
    with pytest.raises(http1.IncompleteBody) as caught:
        await post(client, server.target())
    assert str(caught.value) == "response body incomplete"
    assert len(server.peers) == 1


async def test_a_pooled_connection_closed_while_idle_is_replaced(
    client: http1.Client, servers: StartServer
) -> None:
    idle = asyncio.Event()

    async def answer_then_close_when_idle(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(OK)
        await idle.wait()

    server = await servers(answer_then_close_when_idle, keep_alive(OK))
    first, second = server.target("/1"), server.target("/2")
    assert await post(client, first) == OK_RESPONSE
    idle.set()
    await wait_for(lambda: server.peers[0].hung_up, PROMPT)
    assert await post(client, second) == OK_RESPONSE
    assert len(server.peers) == 2
    assert [peer.requests for peer in server.peers] == [[sent(first)], [sent(second)]]


async def test_a_request_the_server_dropped_unanswered_on_a_pooled_connection_is_resent(
    client: http1.Client, servers: StartServer
) -> None:
    # The idle-close race as the client meets it: the request went out on the pooled
    # connection just as the server closed it, and not one byte came back.
    async def answer_then_drop(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(OK)
        await peer.read_request()

    server = await servers(answer_then_drop, keep_alive(OK))
    first, second = server.target("/1"), server.target("/2")
    assert await post(client, first) == OK_RESPONSE
    assert await post(client, second) == OK_RESPONSE
    assert len(server.peers) == 2
    assert [peer.requests for peer in server.peers] == [
        [sent(first), sent(second)],
        [sent(second)],
    ]


@pytest.mark.parametrize(
    ("partial", "error"),
    [
        (b"HTTP/1.1 200 O", http1.ClosedBeforeResponse),
        (b"HTTP/1.1 100 Continue\r\n\r\n", http1.ClosedBeforeResponse),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", http1.IncompleteBody),
    ],
    ids=["partial-status-line", "interim-only", "partial-body"],
)
async def test_a_partial_answer_on_a_pooled_connection_is_not_resent(
    partial: bytes, error: type[http1.HTTPError], client: http1.Client, servers: StartServer
) -> None:
    async def answer_then_break(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(OK)
        await peer.read_request()
        await peer.send(partial)

    server = await servers(answer_then_break, keep_alive(OK))
    first, second = server.target("/1"), server.target("/2")
    assert await post(client, first) == OK_RESPONSE
    with pytest.raises(error):
        await post(client, second)
    assert len(server.peers) == 1
    assert server.peers[0].requests == [sent(first), sent(second)]


# -- timeouts and the idle sweep -----------------------------------------------------------------


async def test_a_request_cut_by_a_timeout_aborts_its_connection(
    client: http1.Client, servers: StartServer
) -> None:
    server = await servers(silent, keep_alive(OK))
    first, second = server.target("/1"), server.target("/2")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await post(client, first)
    await wait_for(lambda: server.peers[0].end, PROMPT)
    assert server.peers[0].end == "eof"
    assert await post(client, second) == OK_RESPONSE
    assert len(server.peers) == 2
    assert [peer.requests for peer in server.peers] == [[sent(first)], [sent(second)]]


async def test_an_idle_pooled_connection_is_closed_by_the_sweep(
    client: http1.Client, servers: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http1, "IDLE_S", 0.2)
    monkeypatch.setattr(http1, "SWEEP_S", 0.1)
    server = await servers(keep_alive(OK))
    first, second = server.target("/1"), server.target("/2")
    started = time.monotonic()
    assert await post(client, first) == OK_RESPONSE
    await wait_for(lambda: server.peers[0].end, PROMPT)
    assert server.peers[0].end == "eof"
    # Not before IDLE_S (less uvloop's clock, which counts whole milliseconds).
    assert time.monotonic() - started >= 0.2 - 0.005
    assert await post(client, second) == OK_RESPONSE
    assert len(server.peers) == 2
    assert [peer.requests for peer in server.peers] == [[sent(first)], [sent(second)]]


async def test_a_connection_idle_longer_than_idle_s_is_not_reused_before_the_sweep(
    client: http1.Client, servers: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # http1: "An idle pooled connection older than [IDLE_S] is closed rather than reused".
    # The sweep runs only every SWEEP_S, so between two sweeps the pool itself must not hand
    # out a connection that has passed IDLE_S.
    monkeypatch.setattr(http1, "IDLE_S", 0.05)
    monkeypatch.setattr(http1, "SWEEP_S", 60.0)
    server = await servers(keep_alive(OK))
    first, second = server.target("/1"), server.target("/2")
    assert await post(client, first) == OK_RESPONSE
    await asyncio.sleep(0.1)  # the idle time itself is what is under test
    assert await post(client, second) == OK_RESPONSE
    assert len(server.peers) == 2
    assert [peer.requests for peer in server.peers] == [[sent(first)], [sent(second)]]


# -- connecting ----------------------------------------------------------------------------------


async def test_a_refused_address_is_never_connected_to(
    client: http1.Client, servers: StartServer
) -> None:
    refusal = PermissionError(errno.EACCES, "blocked: 127.0.0.1")
    checked: list[str] = []

    def refuse(address: str) -> None:
        checked.append(address)
        raise refusal

    server = await servers(keep_alive(OK))
    guarded = http1.Client(ssl.create_default_context(), refuse)
    try:
        with pytest.raises(http1.ConnectError) as caught:
            await post(guarded, server.target("/refused"))
    finally:
        guarded.close()
    assert caught.value.cause is refusal
    assert str(caught.value) == "[Errno 13] blocked: 127.0.0.1"
    assert checked == ["127.0.0.1"]
    # A connection the guarded client had made would be accepted before this one.
    assert await post(client, server.target("/allowed")) == OK_RESPONSE
    assert len(server.peers) == 1
    assert server.peers[0].requests == [sent(server.target("/allowed"))]


async def test_a_port_nobody_listens_on_is_a_connect_error(client: http1.Client) -> None:
    target = http1.parse_target(f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(http1.ConnectError) as caught:
        await post(client, target)
    assert isinstance(caught.value.cause, ConnectionRefusedError)
    assert caught.value.cause.errno == errno.ECONNREFUSED


async def test_drop_pooled_closes_idle_connections(
    client: http1.Client, servers: StartServer
) -> None:
    server = await servers(keep_alive(OK))
    first, second = server.target("/1"), server.target("/2")
    assert await post(client, first) == OK_RESPONSE
    client.drop_pooled()
    await wait_for(lambda: server.peers[0].end, PROMPT)
    assert server.peers[0].end == "eof"
    assert await post(client, second) == OK_RESPONSE
    assert len(server.peers) == 2
    assert [peer.requests for peer in server.peers] == [[sent(first)], [sent(second)]]


async def test_drop_pooled_keeps_a_connection_in_mid_exchange_from_the_pool(
    client: http1.Client, servers: StartServer
) -> None:
    answer = asyncio.Event()

    async def slow_then_keep_alive(peer: Peer) -> None:
        await peer.read_request()
        await answer.wait()
        await peer.send(OK)
        while await peer.read_request():
            await peer.send(OK)

    server = await servers(slow_then_keep_alive)
    first, second = server.target("/1"), server.target("/2")
    request = asyncio.create_task(post(client, first))
    await wait_for(lambda: server.peers and server.peers[0].requests, PROMPT)
    client.drop_pooled()  # e.g. allow_private_endpoints turned off by a reload
    answer.set()
    assert await request == OK_RESPONSE
    await wait_for(lambda: server.peers[0].end, PROMPT)
    assert await post(client, second) == OK_RESPONSE
    assert len(server.peers) == 2
    assert [peer.requests for peer in server.peers] == [[sent(first)], [sent(second)]]


async def test_source_address_binds_the_local_address_and_has_its_own_pool(
    client: http1.Client, servers: StartServer
) -> None:
    # 127.0.0.2 rather than 127.0.0.1: any connection to 127.0.0.1 comes from 127.0.0.1 when
    # nothing is bound, so only another loopback address shows that the bind happened.
    server = await servers(keep_alive(OK))
    first, second, third = server.target("/1"), server.target("/2"), server.target("/3")
    assert await post(client, first) == OK_RESPONSE
    assert await post(client, second, source_address="127.0.0.2") == OK_RESPONSE
    assert await post(client, third, source_address="127.0.0.2") == OK_RESPONSE
    assert [peer.address for peer in server.peers] == ["127.0.0.1", "127.0.0.2"]
    assert [peer.requests for peer in server.peers] == [
        [sent(first)],
        [sent(second), sent(third)],
    ]


async def test_a_large_request_body_arrives_intact(
    client: http1.Client, receiver: Receiver
) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    target = http1.parse_target(receiver.url("/large"))
    response = await post(client, target, body)
    assert response.status == 200
    assert response.headers["content-length"] == "2"
    assert len(receiver.requests) == 1
    assert receiver.requests[0].headers["Content-Length"] == str(1 << 20)
    assert receiver.requests[0].body == body


@pytest.mark.parametrize(
    "size", [16 << 20, 64 << 10], ids=["transport-buffers-the-rest", "kernel-holds-the-rest"]
)
async def test_a_connection_answered_before_its_body_was_sent_is_closed(
    client: http1.Client, servers: StartServer, sockets: Sockets, size: int
) -> None:
    """A large body (a batch, or one big webhook: max_body_bytes is 10 MiB) to an endpoint
    that answers after the head and then stops reading: the response is complete while the
    transport still buffers the body. A graceful close would wait for that buffer to drain,
    which never happens, so each such delivery would keep a socket and megabytes of body
    for as long as the endpoint keeps the connection open: it is aborted instead. A body
    small enough for the kernel's send queue leaves the transport's buffer empty, yet the
    request is still half sent: that connection is closed too, never pooled."""

    async def answer_early_then_stall(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.send(OK)
        await asyncio.Event().wait()  # keeps the connection open, reads nothing more

    server = await servers(answer_early_then_stall, receive_buffer=4096)
    assert await post(client, server.target(), b"x" * size) == OK_RESPONSE
    await wait_for(lambda: not sockets.open, PROMPT)


@pytest.mark.parametrize(
    ("response", "body"),
    [
        (b'HTTP/1.1 202 Accepted\r\nContent-Length: 11\r\n\r\n{"a": [1]}\n', b'{"a": [1]}\n'),
        (CHUNKED, b"hello world0123456789"),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", b"until the end"),
    ],
    ids=["content-length", "chunked", "until-eof"],
)
async def test_keep_bodies_returns_the_body_and_deliveries_do_not_keep_it(
    response: bytes, body: bytes, client: http1.Client, servers: StartServer
) -> None:
    keeping = http1.Client(ssl.create_default_context(), allow_all, keep_bodies=True)
    try:
        server = await servers(answer_then_close(response))
        kept = await post(keeping, server.target("/1"))
        thrown = await post(client, server.target("/2"))
    finally:
        keeping.close()
    assert kept.body == body
    assert thrown.body == b""
    assert (kept.status, kept.headers) == (thrown.status, thrown.headers)


# -- framing rules from RFC 9112 §6.3 and repeated list headers ---------------------------------


@pytest.mark.parametrize(
    ("response", "expected_headers"),
    [
        # chunked not last: the body runs to the close, whatever it looks like
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            {"transfer-encoding": "chunked, gzip"},
        ),
        # Transfer-Encoding beside Content-Length: chunked wins, the connection is not reused
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
            {"content-length": "99", "transfer-encoding": "chunked"},
        ),
        # a repeated Connection header: both values count
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\n"
            b"Content-Length: 2\r\n\r\nok",
            {"connection": "close, keep-alive", "content-length": "2"},
        ),
    ],
    ids=["chunked-not-last", "te-and-cl", "connection-twice"],
)
async def test_a_response_the_connection_cannot_be_trusted_after_is_not_pooled(
    response: bytes,
    expected_headers: dict[str, str],
    client: http1.Client,
    servers: StartServer,
) -> None:
    async def answer_then_wait(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(response)
        if b"gzip" in response:
            peer.writer.close()  # the end of a body that runs to the close
        await peer.until_closed()

    server = await servers(answer_then_wait, keep_alive(OK))
    assert await post(client, server.target("/1")) == http1.Response(200, expected_headers)
    await wait_for(lambda: server.peers[0].end, PROMPT)
    assert await post(client, server.target("/2")) == OK_RESPONSE
    assert len(server.peers) == 2


async def test_a_folded_header_continues_the_previous_value(
    client: http1.Client, servers: StartServer
) -> None:
    folded = b"HTTP/1.1 200 OK\r\nX-Note: a\r\n  b\r\n\tc\r\nContent-Length: 2\r\n\r\nok"
    server = await servers(keep_alive(folded))
    assert await post(client, server.target("/1")) == http1.Response(
        200, {"x-note": "a b c", "content-length": "2"}
    )


async def test_a_folded_header_line_is_read_not_refused(
    client: http1.Client, servers: StartServer
) -> None:
    """RFC 9112 section 5.2: a user agent that receives obs-fold in a response MUST replace
    it with SP. Refusing the whole 200 as "invalid header line" would send the webhook again
    and again; aiohttp's client, which this one replaced, reads it too."""
    folded = b"HTTP/1.1 200 OK\r\nX-Note: a\r\n  b\r\nContent-Length: 2\r\n\r\nok"
    server = await servers(keep_alive(folded))
    assert (await post(client, server.target())).status == 200


# -- connecting: addresses raced, not waited for one by one --------------------------------------


async def test_an_address_that_never_answers_costs_the_race_delay_not_the_timeout(
    client: http1.Client, servers: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A listener whose accept queue is full drops further SYNs silently: a connect to it
    # hangs, as one over a broken IPv6 route does.
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(0)
    filler: list[socket.socket] = []
    for _ in range(8):  # until a connect hangs: the queue is full (backlog + 1 on Linux)
        try:
            filler.append(socket.create_connection(black_hole.getsockname(), timeout=0.2))
        except TimeoutError:
            break
    else:
        pytest.fail("the accept queue never filled")
    server = await servers(keep_alive(OK))
    stream = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo
    target = http1.parse_target(f"http://raced.test:{server.port}/raced")

    async def two_addresses(host: str, port: int, **kwargs: Any) -> list[Any]:
        if host != "raced.test":  # uvloop's sock_connect resolves through this too
            return await resolve(host, port, **kwargs)
        return [(*stream, black_hole.getsockname()), (*stream, ("127.0.0.1", server.port))]

    monkeypatch.setattr(loop, "getaddrinfo", two_addresses)
    try:
        started = time.monotonic()
        assert await post(client, target) == OK_RESPONSE
        # Tried one after the other, the request would still be waiting at PROMPT.
        assert time.monotonic() - started < PROMPT
    finally:
        for sock in (*filler, black_hole):
            sock.close()
    assert server.peers[0].requests == [sent(target)]


# -- TLS ---------------------------------------------------------------------------------------
#
# uvloop's TLS transport differs from its TCP transport in two ways the client relies on: what
# close() waits for, and what get_write_buffer_size() counts.

CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"


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


@pytest.fixture
def tls_servers(ca: trustme.CA, servers: StartServer) -> StartServer:
    """`servers` behind TLS, with a certificate from `ca` for `host` (127.0.0.1 by default)."""

    async def start(*scripts: Script, host: str = "127.0.0.1", **options: Any) -> RawServer:
        return await servers(*scripts, context=server_context(ca, host), **options)

    return start


async def stop_reading(peer: Peer) -> None:
    """Stop reading the connection (the TLS layer too), keep it open, and wait."""
    # uvloop's transports are not asyncio.Transport subclasses, only alike.
    cast(asyncio.Transport, peer.writer.transport).pause_reading()
    await asyncio.Event().wait()  # until teardown cancels the script


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
    tls_servers: StartServer,
    sockets: Sockets,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """transport.close() on a TLS transport is a graceful shutdown: it sends close_notify and
    keeps the socket until the peer's close_notify comes back, or uvloop's
    ssl_shutdown_timeout (30 s) passes. An endpoint that answers `200` with `Connection:
    close` (or keeps a connection until the idle sweep) and then simply does not answer
    close_notify would keep every such socket open for 30 s after its delivery ended and
    its max_connections slot was released. One tenant with a queue delivers tens of
    webhooks a second, so a few hundred sockets would pile up outside max_connections
    ("outgoing connections, all tenants together") and RLIMIT_NOFILE (1024 by default),
    until accept() on the API, SQLite and every other tenant's connect failed with EMFILE.
    So the client aborts TLS connections it closes, as aiohttp (which it replaced) does:
    its ssl_shutdown_timeout defaults to 0 for this reason."""
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


async def test_a_tls_connection_answered_before_its_body_was_sent_is_not_pooled(
    tls_client: http1.Client, tls_servers: StartServer, sockets: Sockets
) -> None:
    """Whether a request went out cannot be asked of transport.get_write_buffer_size()
    alone: on a TLS transport it counts only bytes not yet encrypted, while the ciphertext
    waits in the TCP transport below, uncounted. Over https (most endpoints), a large body
    (a batch; a webhook up to max_body_bytes, 10 MiB) to an endpoint that answers `200`
    after the head and stops reading would look "fully sent", and the connection would go
    back to the pool in the middle of its request with megabytes queued: the next delivery
    to that endpoint would be written behind them and wait out its whole timeout (a failed
    attempt the endpoint never saw), the socket and the body kept until then."""

    async def answer_early_then_stall(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.send(OK)
        await stop_reading(peer)

    server = await tls_servers(answer_early_then_stall, keep_alive(OK), receive_buffer=4096)
    assert await post(tls_client, server.target("/1"), b"x" * (16 << 20)) == OK_RESPONSE
    # The next delivery goes out on a new connection and is answered...
    assert await post(tls_client, server.target("/2")) == OK_RESPONSE
    assert len(server.peers) == 2
    # ...and the connection with the unsent body is gone, not kept for later.
    await wait_for(lambda: sockets.made[0] in sockets.lost, PROMPT)


async def test_an_https_endpoint_with_a_fully_qualified_trailing_dot_verifies(
    tmp_path: Path, ca: trustme.CA, tls_servers: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """config accepts a host name ending in a dot (`https://hooks.example.com./x`, the
    fully-qualified spelling; its _HOST pattern allows it on purpose). Python's ssl matches
    server_hostname against the certificate as it is, and no certificate names
    `hooks.example.com.`: passed with its dot, every delivery to such an endpoint would
    fail "TLS: certificate verify failed (Hostname mismatch ...)" and the tenant would
    stall forever. aiohttp, whose TLS verification README promises is unchanged, strips
    the dot (as curl and browsers do): the name is the same host."""
    host = "hooks.example"
    server = await tls_servers(keep_alive(OK), host=host)
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo

    async def resolve_test_host(name: str, port: int, **kwargs: Any) -> list[Any]:
        if name.rstrip(".") != host:
            return await resolve(name, port, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]

    monkeypatch.setattr(loop, "getaddrinfo", resolve_test_host)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    acme = load_tenant(tmp_path, f"https://{host}.:{server.port}/hooks")  # config takes it
    sender = Sender(allow_private=True, ca_file=ca_file)
    try:
        outcome = await sender.send(acme, [webhook()])
    finally:
        await sender.close()
    assert (outcome.ok, outcome.error) == (True, None)
    assert [len(peer.requests) for peer in server.peers] == [1]


# -- endpoint host names, through the sender -----------------------------------------------------


@pytest.mark.parametrize("label", ["straße", "ς"], ids=["sharp-s", "final-sigma"])
async def test_an_internationalised_endpoint_host_is_the_configured_domain(
    tmp_path: Path, label: str
) -> None:
    """docs/wire-format.md#the-request: "Every delivery is `POST <endpoint>`": to the endpoint as
    configured.

    Python's "idna" codec is IDNA 2003: it maps `ß` to `ss` and `ς` to `σ`, so with it
    `https://straße.example/hook` would be delivered to `strasse.example`, another
    registrable domain (DENIC has registered `ß` names since 2010), with its Host header and
    TLS name, carrying the tenant's data and secret. IDNA 2008 / UTS #46 (browsers, curl,
    and yarl, i.e. the aiohttp client that http1 replaced) keep them:
    `xn--strae-oqa.example`. The name resolved is shown by the real sender's DNS error
    (`.example` never resolves)."""
    host = f"{label}.example"
    acme = load_tenant(tmp_path, f"https://{host}/hook")  # the configuration takes it
    expected = idna.encode(host, uts46=True).decode("ascii")

    target = http1.parse_target(acme.endpoint)
    sender = Sender(allow_private=True)
    try:
        outcome = await sender.send(acme, [webhook()])
    finally:
        await sender.close()
    assert not outcome.ok
    seen = (target.authority, target.host, outcome.error)
    assert seen == (expected, expected, f"DNS: cannot resolve {expected}")


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
    the same, Sender.send still ends in an outcome ("never raises for delivery errors"),
    neither raising before its try nor recording "unexpected error"."""
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


# -- CONNECT through a proxy ---------------------------------------------------------------------


async def test_connect_names_an_ipv6_target_in_brackets_and_refuses_bytes_after_its_2xx() -> None:
    """The proxy is given `[::1]:PORT` (RFC 9110 authority form), and a 2xx followed by
    bytes nobody asked for is not a tunnel to trust."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\nsurprise")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = http1.Proxy("127.0.0.1", port, "Basic aG9va3M6cHc=")
    client = http1.Client(ssl.create_default_context(), allow_all)
    target = http1.parse_target("http://[::1]:8080/hooks")
    try:
        with pytest.raises(http1.ProxyError) as caught:
            async with asyncio.timeout(PROMPT):
                await client.post(target, head(target, b"{}"), b"{}", proxy=proxy)
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    assert str(caught.value) == f"proxy: bytes after the answer to CONNECT from 127.0.0.1:{port}"
    assert heads == [
        b"CONNECT [::1]:8080 HTTP/1.1\r\nHost: [::1]:8080\r\n"
        b"Proxy-Authorization: Basic aG9va3M6cHc=\r\n\r\n"
    ]
    assert "aG9va3M6cHc" not in repr(proxy)
