"""A small HTTP/1.1 client for deliveries: keep-alive pools, one write per request.

Deliveries are all the same shape (a POST of a body we already hold, a short answer we only
need the status line and two headers of), so the client is built for that and nothing else:
no redirects, no cookies, no decompression, no streaming uploads. The one kind of proxy it
knows is an http:// egress proxy taking CONNECT: every endpoint, http:// ones too, is reached
through a tunnel, so the proxy sees host and port and nothing else. aiohttp's
client spent 164-210 µs of CPU per request on the 2-core bench machine (50 connections to
an aiohttp server, uvloop); this one 83-94 µs, and delivery requests are most of what the
daemon does under load (bench/: the sustained scenario and the unbatched drains).

What it guards: the address check runs on every resolved address before a socket connects
(docs/configuration.md#allow_private_endpoints, so DNS cannot point a public name at a private
address), TLS is always verified, a response must be complete (its length or chunked framing)
before it counts, and a connection is pooled again only when its last exchange ended cleanly.
Through a proxy the check holds as well: the endpoint's name is resolved and its addresses checked
here, and the proxy is asked for a tunnel to a checked address (an IP literal), never to the name;
only a proxy that checks addresses itself (`Proxy.checks_addresses`) is given the name.
"""

from __future__ import annotations

import asyncio
import fcntl
import re
import socket
import ssl
import struct
import termios
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple, cast
from urllib.parse import quote, urlsplit

import aiohappyeyeballs
import idna

# A response head (status line and headers) larger than this is refused.
MAX_HEAD = 64 * 1024
# An idle pooled connection older than this is closed rather than reused: servers close
# theirs after 5 s (Node.js) to 75 s (nginx); a stale one costs a failed write and a retry.
IDLE_S = 4.0
SWEEP_S = 2.0
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CHUNK_LINE = re.compile(rb"[0-9A-Fa-f]+")
# Headers whose repeats are one comma-separated list (the others: the last one counts).
_LIST_HEADERS = frozenset({"connection", "transfer-encoding"})
# RFC 8305's delay before trying the next address (IPv6 then IPv4, interleaved).
HAPPY_EYEBALLS_S = 0.25
# The ioctl for a socket's bytes not yet acknowledged by the peer (Linux: SIOCOUTQ).
_OUTQ = getattr(termios, "TIOCOUTQ", None)
# Path and query bytes sent as they are; anything else (spaces, non-ASCII) is %-encoded.
_URL_SAFE = "/?&=%:@!$'()*+,;-._~[]"


class HTTPError(Exception):
    """A request that ended without a usable response; str() is a short sentence."""


class ClosedBeforeResponse(HTTPError):
    def __init__(self) -> None:
        super().__init__("connection closed before a response")


class IncompleteBody(HTTPError):
    def __init__(self) -> None:
        super().__init__("response body incomplete")


class BadResponse(HTTPError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"bad response: {reason}")


class ResolveError(HTTPError):
    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__(f"DNS: cannot resolve {host}")


class ConnectError(HTTPError):
    """No address of the target could be connected to; `cause` is the first reason."""

    def __init__(self, cause: OSError) -> None:
        self.cause = cause
        super().__init__(str(cause))


class ProxyError(HTTPError):
    """The proxy, not the endpoint, failed: it could not be reached, refused the tunnel or
    closed it. str() starts with "proxy: " and names the proxy (never its credentials)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"proxy: {reason}")


@dataclass(frozen=True)
class Proxy:
    """An http:// proxy that opens CONNECT tunnels. Part of a pool's key: a tunnel is reused
    only for the same endpoint through the same proxy with the same credentials."""

    host: str  # for DNS (IDNA-encoded, no brackets)
    port: int
    # `Basic …` for Proxy-Authorization, or "": a secret, kept out of repr().
    authorization: str = field(default="", repr=False)
    # True: the proxy refuses private addresses itself (smokescreen), so it is given the
    # endpoint's name; False: it is given an address this client resolved and checked.
    checks_addresses: bool = False

    @property
    def shown(self) -> str:
        """host:port, as error sentences name the proxy."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Progress:
    """How far one request got, for a caller whose timeout cut it short: `proxy` names the
    proxy while the tunnel is not yet open (its silence, not the endpoint's)."""

    __slots__ = ("proxy",)

    def __init__(self) -> None:
        self.proxy = ""


class Target(NamedTuple):
    """An endpoint URL taken apart once: where to connect and what to put in the request."""

    tls: bool
    host: str  # for DNS and TLS (IDNA-encoded, no brackets)
    port: int
    authority: str  # the Host header
    path: str  # the request target: path and query


def ascii_host(host: str) -> str:
    """The name DNS and TLS know a host by. An international one is encoded by IDNA 2008
    (UTS #46), as browsers, curl and yarl do: Python's own "idna" codec is IDNA 2003, which
    maps `straße.example` to another domain (`strasse.example`). UnicodeError if it has no
    such name."""
    if host.isascii():
        return host
    return str(idna.encode(host, uts46=True).decode("ascii"))


@lru_cache(maxsize=4096)  # once per endpoint, not per delivery
def parse_target(url: str) -> Target:
    """Split a configured endpoint (config.endpoint_url has validated it)."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    try:
        host = ascii_host(host)
    except UnicodeError:
        raise ResolveError(host) from None
    default = 443 if tls else 80
    port = parts.port or default
    shown = f"[{host}]" if ":" in host else host
    authority = shown if port == default else f"{shown}:{port}"
    path = quote(parts.path or "/", safe=_URL_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_URL_SAFE)
    return Target(tls, host, port, authority, path)


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes = b""  # only with Client(keep_bodies=True)


# -- one connection ------------------------------------------------------------------------------

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_EOF, _DONE = range(8)


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection carrying one exchange at a time.

    The response is parsed as it arrives and its body thrown away (unless asked): all a
    delivery needs is the status, a few headers and the certainty that the answer was
    complete.
    """

    def __init__(self, key: PoolKey, generation: int = 0, keep_body: bool = False) -> None:
        self.key = key
        self.generation = generation
        self._keep_body = keep_body
        self._body = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Response] | None = None
        self._buffer = bytearray()
        self._scanned = 0  # bytes at the buffer's start already searched for a line's end
        self._state = _DONE
        self._remaining = 0
        self._received = False  # any byte of the current response
        self._status = 0
        self._headers: dict[str, str] = {}
        self._keep_alive = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.abort()
            return
        self._received = True
        self._buffer += data
        try:
            self._parse()
        except HTTPError as exc:
            self._fail(exc)
            self.abort()
        except ValueError:  # a number int() will not take, a header latin-1 cannot hold...
            self._fail(BadResponse("unreadable response"))
            self.abort()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if exc is None and self._state == _UNTIL_EOF:
            self._keep_alive = False
            self._complete()
        elif isinstance(exc, OSError):
            self._fail(exc)  # reset, TLS alert, ...
        elif self._state == _HEAD:
            self._fail(ClosedBeforeResponse())
        else:
            self._fail(IncompleteBody())

    # -- the exchange ------------------------------------------------------------------------

    @property
    def reused_untouched(self) -> bool:
        """Nothing came back on this exchange: a pooled connection the server had dropped."""
        return not self._received

    def request(self, data: bytes, body: bytes) -> asyncio.Future[Response]:
        """Write one request (`data` is the head); the future resolves with its response."""
        assert self.transport is not None and self._state == _DONE
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._state = _HEAD
        self._received = False
        self._buffer.clear()
        self._scanned = 0
        self._body.clear()
        self._headers = {}
        if self.closed:
            waiter.set_exception(ClosedBeforeResponse())
            return waiter
        # One write: head and body in the same segment when they fit.
        self.transport.write(data + body if len(body) < 16384 else data)
        if len(body) >= 16384:
            self.transport.write(body)
        return waiter

    @property
    def reusable(self) -> bool:
        """Fit to carry another request; after an exchange `fully_sent` is asked as well
        (nothing is written to a connection while it waits in the pool)."""
        return (
            not self.closed
            and self._state == _DONE
            and self._keep_alive
            and not self._buffer
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close at once. TLS is aborted rather than shut down: a graceful close waits up to
        30 s for the peer's close_notify, holding the socket outside max_connections (our
        responses are framed, so the missing close_notify tells the peer nothing). Plain
        TCP is aborted when bytes are unsent (an endpoint that answered early and stopped
        reading would otherwise keep the body queued in the kernel)."""
        self.closed = True
        transport = self.transport
        if transport is not None:
            if self.key.tls or not self.fully_sent():
                transport.abort()
            else:
                transport.close()

    def fully_sent(self) -> bool:
        """Has the peer acknowledged every byte we wrote? Bytes may wait in the transport's
        buffer or in the kernel's send queue; a TLS transport's get_write_buffer_size()
        counts only what it has not yet encrypted, so the kernel is asked too."""
        transport = self.transport
        if transport is None or transport.get_write_buffer_size():
            return False
        sock = transport.get_extra_info("socket")
        if _OUTQ is None or sock is None:
            return True
        fd = sock.fileno()
        if fd < 0:
            return False  # closed
        try:
            (queued,) = struct.unpack("i", fcntl.ioctl(fd, _OUTQ, b"\0\0\0\0"))
        except OSError:
            return False
        return int(queued) == 0

    def _fail(self, exc: BaseException) -> None:
        self._state = _DONE
        self._keep_alive = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def _complete(self) -> None:
        self._state = _DONE
        if self._waiter is not None and not self._waiter.done():
            body = bytes(self._body) if self._keep_body else b""
            self._waiter.set_result(Response(self._status, self._headers, body))

    # -- parsing -----------------------------------------------------------------------------

    def _parse(self) -> None:
        # Each step consumes what it can of the buffer and says whether to go on.
        while self._buffer and _STEPS[self._state](self):
            pass

    def _step_head(self) -> bool:
        buffer = self._buffer
        # Search only what is new (less the 3 bytes an end may straddle): a head sent a byte
        # at a time must not be rescanned from its start on every byte.
        found = _HEAD_END.search(buffer, max(0, self._scanned - 3))
        # However TCP split it: a head too large when complete is refused as one still open.
        if (found.start() if found else len(buffer)) > MAX_HEAD:
            raise BadResponse("response headers too large")
        if found is None:
            self._scanned = len(buffer)
            return False
        self._scanned = 0
        head = bytes(buffer[: found.start()])
        del buffer[: found.end()]
        self._head(head)
        return True

    def _step_length(self) -> bool:
        self._skip()
        if not self._remaining:
            self._finish_body()
        return True

    def _step_chunk_size(self) -> bool:
        line = self._line(4096, "invalid chunk size")
        if line is None:
            return False
        size = line.split(b";", 1)[0].strip()
        if len(size) > 16 or not _CHUNK_LINE.fullmatch(size):
            raise BadResponse("invalid chunk size")
        self._remaining = int(size, 16)
        self._state = _CHUNK_DATA if self._remaining else _TRAILERS
        return True

    def _step_chunk_data(self) -> bool:
        self._skip()
        if not self._remaining:
            self._state = _CHUNK_END
        return True

    def _step_chunk_end(self) -> bool:
        line = self._line(2, "invalid chunk end")
        if line is None:
            return False
        if line:
            raise BadResponse("invalid chunk end")
        self._state = _CHUNK_SIZE
        return True

    def _step_trailers(self) -> bool:
        # Trailer lines end at an empty line; they are read and ignored.
        line = self._line(MAX_HEAD, "response trailers too large")
        if line is None:
            return False
        if not line:
            self._finish_body()
        return True

    def _step_until_eof(self) -> bool:
        if self._keep_body:
            self._body += self._buffer
        self._buffer.clear()
        return False

    def _step_done(self) -> bool:
        raise BadResponse("data after the response")

    def _skip(self) -> None:
        """Take body bytes, up to what the framing still expects (kept only if asked)."""
        taken = min(len(self._buffer), self._remaining)
        if self._keep_body:
            self._body += self._buffer[:taken]
        del self._buffer[:taken]
        self._remaining -= taken

    def _line(self, limit: int, error: str) -> bytes | None:
        """The next line without its CRLF (or LF); None until it is complete."""
        buffer = self._buffer
        end = buffer.find(b"\n", self._scanned)
        if end < 0:
            if len(buffer) > limit:
                raise BadResponse(error)
            self._scanned = len(buffer)
            return None
        self._scanned = 0
        line = bytes(buffer[:end]).removesuffix(b"\r")
        del buffer[: end + 1]
        return line

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\n")
        status_line = lines[0].rstrip(b"\r")
        version, _, rest = status_line.partition(b" ")
        code, _, _ = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or len(code) != 3:
            raise BadResponse("invalid status line")
        status = int(code)
        headers, lengths = _headers(lines[1:])
        if 100 <= status < 200:
            if status == 101:
                raise BadResponse("unexpected protocol switch (HTTP 101)")
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self._status = status
        self._headers = headers
        connection = headers.get("connection", "").lower()
        self._keep_alive = version == b"HTTP/1.1" and "close" not in connection
        codings = headers.get("transfer-encoding")
        if status in (204, 304):
            self._finish_body()
        elif codings is not None:
            # RFC 9112 §6.3: chunked only as the last coding; otherwise the body runs to the
            # close. With a Content-Length beside it, the connection is not trusted again.
            if lengths:
                self._keep_alive = False
            if codings.lower().rsplit(",", 1)[-1].strip() == "chunked":
                self._state = _CHUNK_SIZE
            else:
                self._keep_alive = False
                self._state = _UNTIL_EOF
        elif lengths:
            if len(lengths) > 1 or not all(
                length.isdigit() and len(length) <= 18 for length in lengths
            ):
                raise BadResponse("invalid Content-Length")
            self._remaining = int(lengths.pop())
            self._state = _LENGTH
            if not self._remaining:
                self._finish_body()
        else:
            self._keep_alive = False
            self._state = _UNTIL_EOF

    def _finish_body(self) -> None:
        if self._buffer:
            self._keep_alive = False  # more bytes than the framing promised
            self._buffer.clear()
        self._complete()


def _headers(lines: list[bytes]) -> tuple[dict[str, str], set[bytes]]:
    """Header lines as {lower-case name: value}, and the Content-Length values seen."""
    headers: dict[str, str] = {}
    lengths: set[bytes] = set()
    key = ""
    for raw in lines:
        line = raw.rstrip(b"\r")
        if line[:1] in (b" ", b"\t") and key:
            # obs-fold (RFC 9112 §5.2): a continuation of the previous value.
            headers[key] += " " + line.strip().decode("latin-1")
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b" " in name:
            raise BadResponse("invalid header line")
        key = name.decode("latin-1").lower()
        text = value.strip()
        if key == "content-length":
            lengths.add(text)
        if key in headers and key in _LIST_HEADERS:
            headers[key] += ", " + text.decode("latin-1")  # both count: "close", "chunked"
        else:
            headers[key] = text.decode("latin-1")
    return headers, lengths


_STEPS: dict[int, Callable[[Connection], bool]] = {
    _HEAD: Connection._step_head,
    _LENGTH: Connection._step_length,
    _CHUNK_SIZE: Connection._step_chunk_size,
    _CHUNK_DATA: Connection._step_chunk_data,
    _CHUNK_END: Connection._step_chunk_end,
    _TRAILERS: Connection._step_trailers,
    _UNTIL_EOF: Connection._step_until_eof,
    _DONE: Connection._step_done,
}


# -- the pools -----------------------------------------------------------------------------------


class PoolKey(NamedTuple):
    tls: bool
    host: str
    port: int
    source_address: str
    proxy: Proxy | None = None


# (address) -> None, or raises OSError: refuses an address before a socket is made for it.
AddressCheck = Callable[[str], None]
AddrInfo = aiohappyeyeballs.AddrInfoType
# What of a proxy's reason phrase an error sentence keeps: printable ASCII, this long.
_REASON = re.compile(r"[^ -~]")
_REASON_LIMIT = 60


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


async def _connect_request(
    sock: socket.socket, proxy: Proxy, host: str, port: int
) -> tuple[int, str]:
    """Ask `proxy` (connected on `sock`) for a tunnel to host:port; its status and reason.

    Done on the bare socket, before any transport exists: once it answers 2xx, the socket
    is the tunnel, and TLS to the endpoint (or plain HTTP) starts on it as on a direct one.
    The answer is read up to its blank line and no further; a proxy sends nothing after a
    2xx until the endpoint does, and bytes there are refused.
    """
    loop = asyncio.get_running_loop()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if proxy.authorization:
        request += f"Proxy-Authorization: {proxy.authorization}\r\n"
    try:
        await loop.sock_sendall(sock, (request + "\r\n").encode())
        answer = b""
        while (end := _HEAD_END.search(answer)) is None:
            if len(answer) > MAX_HEAD:
                raise ProxyError(f"answer to CONNECT too large from {proxy.shown}")
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ProxyError(f"{proxy.shown} closed the connection before answering CONNECT")
            answer += data
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ProxyError(f"connection to {proxy.shown} failed during CONNECT ({reason})") from None
    status_line = answer.split(b"\n", 1)[0].rstrip(b"\r")
    version, _, rest = status_line.partition(b" ")
    code, _, phrase = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or not code.isdigit() or len(code) != 3:
        raise ProxyError(f"invalid answer to CONNECT from {proxy.shown}")
    status = int(code)
    if 200 <= status < 300 and end.end() != len(answer):
        raise ProxyError(f"bytes after the answer to CONNECT from {proxy.shown}")
    reason = _REASON.sub("", phrase.decode("latin-1")).strip()[:_REASON_LIMIT]
    return status, reason


class Client:
    """Keep-alive connection pools per (scheme, host, port, source address).

    The number of connections is not limited here: the sender holds a slot of
    `max_connections` for each request, and an idle pooled connection is closed after
    IDLE_S, so the pools never hold more than the busiest moment needed.
    """

    def __init__(
        self, tls: ssl.SSLContext, check_address: AddressCheck, *, keep_bodies: bool = False
    ) -> None:
        # Deliveries throw answers away; keep_bodies is for callers that read them (the
        # benchmark's producer), with no size limit: use it only against a trusted server.
        self._keep_bodies = keep_bodies
        self._tls = tls
        self._check_address = check_address
        self._idle: dict[PoolKey, deque[Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        # Bumped by drop_pooled: a connection from an older generation is never pooled again.
        self._generation = 0

    async def post(
        self,
        target: Target,
        head: bytes,
        body: bytes,
        source_address: str = "",
        *,
        proxy: Proxy | None = None,
        progress: Progress | None = None,
    ) -> Response:
        """Send one request; raise HTTPError or OSError when no complete response came.

        A pooled connection that the server dropped while idle answers with nothing at
        all; the request is then sent once more on a new connection (the server cannot
        have acted on it: it sent no byte back). With a `proxy`, the request goes through
        a CONNECT tunnel, pooled per (proxy, endpoint) like a direct connection.
        """
        key = PoolKey(target.tls, target.host, target.port, source_address, proxy)
        connection = self._pooled(key)
        if connection is not None:
            try:
                return await self._exchange(connection, head, body)
            except (ClosedBeforeResponse, ConnectionResetError, BrokenPipeError):
                if not connection.reused_untouched:
                    raise
        connection = await self._connect(key, progress or Progress())
        try:
            return await self._exchange(connection, head, body)
        except ClosedBeforeResponse:
            if proxy is None or not connection.reused_untouched:
                raise
            # A new tunnel that ends without a byte: the proxy's doing as far as we can see.
            raise ProxyError(f"tunnel through {proxy.shown} closed before a response") from None

    async def _exchange(self, connection: Connection, head: bytes, body: bytes) -> Response:
        try:
            response = await connection.request(head, body)
        except BaseException:
            connection.abort()  # mid-exchange (timeout, cancel, error): never reused
            raise
        if (
            connection.reusable
            and connection.generation == self._generation
            and connection.fully_sent()  # an early answer leaves the request half-sent
        ):
            self._release(connection)
        else:
            connection.close()
        return response

    def _pooled(self, key: PoolKey) -> Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        # The sweep runs every SWEEP_S: between sweeps, the age is checked here.
        fresh_since = asyncio.get_running_loop().time() - IDLE_S
        while idle:
            connection = idle.pop()  # the most recently used: least likely to be stale
            if connection.reusable and connection.idle_since >= fresh_since:
                return connection
            connection.close()
        return None

    def _release(self, connection: Connection) -> None:
        loop = asyncio.get_running_loop()
        connection.idle_since = loop.time()
        idle = self._idle.get(connection.key)
        if idle is None:
            idle = self._idle[connection.key] = deque()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = loop.call_later(SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than IDLE_S; runs only while some are pooled."""
        loop = asyncio.get_running_loop()
        stale_before = loop.time() - IDLE_S
        for key, idle in list(self._idle.items()):
            # Oldest first: the deque is in release order.
            while idle and (idle[0].idle_since < stale_before or idle[0].closed):
                idle.popleft().close()
            if not idle:
                del self._idle[key]
        self._sweeper = loop.call_later(SWEEP_S, self._sweep) if self._idle else None

    async def _connect(self, key: PoolKey, progress: Progress) -> Connection:
        # The generation of the rule the addresses are checked under: if drop_pooled runs
        # while this connects, the connection serves this one request and is not pooled.
        generation = self._generation
        loop = asyncio.get_running_loop()
        proxy = key.proxy
        if proxy is None:
            sock = await self._open(await self._checked(key.host, key.port), key.source_address)
        elif proxy.checks_addresses:
            # The proxy resolves the name and refuses private addresses itself. An endpoint
            # written as an address involves no DNS: it is checked here all the same.
            if _is_ip(key.host):
                await self._checked(key.host, key.port)
            sock = await self._tunnel(proxy, [key.host], key.port, key.source_address, progress)
        else:
            # Resolved and checked here, before the proxy is asked; the proxy is given a
            # checked address, so no DNS answer can lead it to a private one.
            found = await self._checked(key.host, key.port)
            addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
            sock = await self._tunnel(proxy, addresses, key.port, key.source_address, progress)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _, connection = await loop.create_connection(
                lambda: Connection(key, generation, self._keep_bodies),
                sock=sock,
                ssl=self._tls if key.tls else None,
                # A fully-qualified name's trailing dot is not part of the name certificates
                # carry (aiohttp, curl and browsers strip it too).
                server_hostname=key.host.rstrip(".") if key.tls else None,
            )
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError) as exc:
            sock.close()
            if proxy is None:
                raise
            raise ProxyError(
                f"tunnel through {proxy.shown} closed during the TLS handshake"
            ) from exc
        except BaseException:
            sock.close()
            raise
        return connection

    async def _checked(self, host: str, port: int) -> list[AddrInfo]:
        """`host`'s addresses that pass the address check (ConnectError when none does)."""
        loop = asyncio.get_running_loop()
        try:
            found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise ResolveError(host) from None
        if not found:
            raise ResolveError(host)
        # The check comes before any socket exists: a refused address is never connected to.
        allowed: list[AddrInfo] = []
        refused = None
        for info in found:
            try:
                self._check_address(str(info[4][0]))
            except OSError as exc:
                refused = refused or exc
            else:
                allowed.append(info)
        if not allowed:
            assert refused is not None
            raise ConnectError(refused)
        return allowed

    async def _open(self, addresses: Sequence[AddrInfo], source_address: str) -> socket.socket:
        loop = asyncio.get_running_loop()
        local = None
        if source_address:
            local = await loop.getaddrinfo(
                source_address, 0, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        try:
            # Addresses raced RFC 8305 style: an address that drops packets silently (a
            # broken IPv6 route) costs 0.25 s, not the whole timeout.
            return await aiohappyeyeballs.start_connection(
                addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_S, local_addr_infos=local
            )
        except (OSError, RuntimeError) as exc:  # uvloop may raise RuntimeError
            raise ConnectError(exc if isinstance(exc, OSError) else OSError(str(exc))) from None

    async def _tunnel(
        self,
        proxy: Proxy,
        hosts: list[str],
        port: int,
        source_address: str,
        progress: Progress,
    ) -> socket.socket:
        """A socket to `proxy` with a CONNECT tunnel open to one of `hosts` (tried in turn
        while the proxy answers that it cannot reach one: 502, 503, 504)."""
        progress.proxy = proxy.shown
        loop = asyncio.get_running_loop()
        for number, host in enumerate(hosts, 1):
            # The proxy is the operator's choice, on whatever address: not checked.
            try:
                found = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError):
                raise ProxyError(f"cannot resolve {proxy.host}") from None
            try:
                sock = await self._open(found, source_address)
            except ConnectError as exc:
                reason = (
                    "connection refused"
                    if isinstance(exc.cause, ConnectionRefusedError)
                    else (exc.cause.strerror or str(exc.cause)).lower()
                )
                raise ProxyError(f"cannot connect to {proxy.shown} ({reason})") from None
            try:
                status, reason = await _connect_request(sock, proxy, host, port)
            except BaseException:
                sock.close()
                raise
            if 200 <= status < 300:
                progress.proxy = ""
                return sock
            sock.close()
            if status not in (502, 503, 504) or number == len(hosts):
                raise ProxyError(f"{status} {reason} from {proxy.shown}".replace("  ", " "))
        raise AssertionError("no host to tunnel to")  # callers give at least one

    def drop_pooled(self) -> None:
        """From now on, no connection made before this call carries another request: idle
        ones are closed here, those in the middle of an exchange when it ends."""
        self._generation += 1
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def close(self) -> None:
        self.drop_pooled()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
