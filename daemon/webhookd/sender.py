"""Build and send one delivery request; classify what came back. No SQL, no scheduling."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import hmac
import ipaddress
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from webhookd import __version__, logs, policy
from webhookd.config import TenantConfig
from webhookd.store import Webhook

log = logs.get_logger("webhookd.sender")

USER_AGENT = f"webhookd/{__version__}"
# Responses are read to the end (so the connection can be reused and the whole exchange is
# inside the timeout) but never kept: a receiver's body means nothing to us.
READ_CHUNK = 65536
NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    status: int | None
    error: str | None
    duration_ms: float
    retry_after: float | None = None


class BlockedAddress(OSError):
    """A connection target that is not a public address, refused before connecting."""


def is_blocked(address: str) -> bool:
    """True for loopback, private, link-local, multicast and other non-global addresses."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return not ip.is_global or ip.is_multicast


def encode_body(tenant: TenantConfig, webhooks: Sequence[Webhook], *, batched: bool) -> bytes:
    """The exact request body: stored `data` JSON text is spliced in, not re-encoded per send."""
    secret = orjson.dumps(tenant.secret.reveal()).decode()
    # Field order as SPEC §3 shows it. `event` is a validated catalogue name: no escaping.
    parts = [
        f'{{"id":{orjson.dumps(w.id).decode()},"sequence":{w.sequence},"event":"{w.event}",'
        f'"secret":{secret},"timestamp":{w.timestamp},"data":{w.data}}}'
        for w in webhooks
    ]
    text = "[" + ",".join(parts) + "]" if batched else parts[0]
    return text.encode()


def sign(signing_secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks `webhook-signature`: v1,base64(HMAC-SHA256(key, id.ts.body))."""
    key = base64.b64decode(signing_secret.removeprefix("whsec_"))
    signed = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Sender:
    """Owns the outgoing HTTP client: one connection pool per source address."""

    def __init__(
        self,
        *,
        max_connections: int = 1000,
        source_address: str = "",
        allow_private: bool = False,
        ca_file: Path | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.source_address = source_address
        # Read at connect time, so a reload that flips it applies to the next connection.
        self.allow_private = allow_private
        self._ssl = ssl.create_default_context()
        if ca_file is not None:
            self._ssl.load_verify_locations(cafile=str(ca_file))
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        # max_connections is for all tenants together, across every source address's pool.
        self._slots = asyncio.Semaphore(max_connections)
        self._closing: set[asyncio.Task[None]] = set()

    def set_allow_private(self, allow: bool) -> None:
        """Change the guard. Tightening it drops pooled connections: a kept-alive connection
        to a private address must not carry the next request past the new rule."""
        tightened = self.allow_private and not allow
        self.allow_private = allow
        if tightened and self._sessions:
            old, self._sessions = list(self._sessions.values()), {}
            for session in old:
                task = asyncio.create_task(session.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def _socket(self, addr_info: Any) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        if not self.allow_private and is_blocked(sockaddr[0]):
            raise BlockedAddress(
                errno.EACCES, f"blocked: resolves to private address {sockaddr[0]}"
            )
        return socket.socket(family, kind, proto)

    def _session(self, source_address: str) -> aiohttp.ClientSession:
        session = self._sessions.get(source_address)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                limit_per_host=0,
                ssl=self._ssl,
                local_addr=(source_address, 0) if source_address else None,
                socket_factory=self._socket,
                ttl_dns_cache=60,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                # Each request runs under our own asyncio.timeout (the whole exchange, to the
                # last body byte); aiohttp's default 300 s timer would be a second per request.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=None),
                trust_env=False,
                headers={"User-Agent": USER_AGENT},
                auto_decompress=False,
            )
            self._sessions[source_address] = session
        return session

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def send(self, tenant: TenantConfig, webhooks: Sequence[Webhook]) -> Outcome:
        """POST `webhooks` to the tenant's endpoint once; never raises for delivery errors."""
        batched = tenant.batching
        body = encode_body(tenant, webhooks, batched=batched)
        headers = {"Content-Type": "application/json"}
        if tenant.authorization_header:
            headers["Authorization"] = "Bearer " + tenant.secret.reveal()
        if tenant.signing_secret:
            message_id = (
                f"{tenant.name}.{webhooks[0].sequence}-{webhooks[-1].sequence}"
                if batched
                else webhooks[0].id
            )
            now = int(time.time())
            headers["webhook-id"] = message_id
            headers["webhook-timestamp"] = str(now)
            headers["webhook-signature"] = sign(
                tenant.signing_secret.reveal(), message_id, now, body
            )
        seconds = tenant.delivery.batch_timeout if batched else tenant.delivery.timeout
        session = self._session(tenant.source_address or self.source_address)
        # A slot first, then the clock: waiting for a free connection (max_connections,
        # shared by every pool) is the daemon's load, not the endpoint's slowness.
        async with self._slots:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(seconds):
                    async with session.post(
                        tenant.endpoint, data=body, headers=headers, allow_redirects=False
                    ) as response:
                        while await response.content.read(READ_CHUNK):
                            pass
                        status = response.status
                        location = response.headers.get("Location", "")
                        retry_header = response.headers.get("Retry-After")
            except TimeoutError:
                return Outcome(False, None, f"timeout after {seconds:g} s", _since(started))
            except (aiohttp.ClientError, OSError) as exc:
                return Outcome(False, None, describe_error(exc), _since(started))
            except Exception as exc:
                # Whatever the endpoint did, the attempt must end as an outcome to record.
                log.exception("send_crashed", tenant=tenant.name)
                error = f"unexpected error: {type(exc).__name__}"
                return Outcome(False, None, error, _since(started))
        duration = _since(started)
        if policy.is_success(status, tenant.delivery.success_statuses):
            return Outcome(True, status, None, duration)
        if 300 <= status < 400:
            error = f"redirect to {_clip(location) or '(no Location)'} not followed (HTTP {status})"
        else:
            error = f"HTTP {status}"
        retry_after = policy.retry_after_seconds(retry_header, time.time())
        return Outcome(False, status, error, duration, retry_after)


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def describe_error(exc: BaseException) -> str:
    """A short, specific, secret-free sentence for a failed connection or exchange."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return _certificate_error(exc.certificate_error)
    if isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        return f"TLS: {_reason(exc)}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"DNS: cannot resolve {exc.host}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _connect_error(exc)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed before a response"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "response body incomplete"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"bad response: {exc.message}"
    if isinstance(exc, ConnectionResetError) or (
        isinstance(exc, OSError) and exc.errno == errno.ECONNRESET
    ):
        return "connection reset"
    if isinstance(exc, aiohttp.ClientOSError):
        return f"connection error: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _connect_error(exc: aiohttp.ClientConnectorError) -> str:
    cause = exc.os_error
    if isinstance(cause, BlockedAddress):
        return cause.strerror or "blocked: resolves to private address"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, socket.gaierror):
        return f"DNS: cannot resolve {exc.host}"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return _certificate_error(cause)
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {cause.reason or cause}"
    return f"cannot connect: {cause.strerror or cause}"


def _certificate_error(exc: BaseException) -> str:
    detail = getattr(exc, "verify_message", None)
    return "TLS: certificate verify failed" + (f" ({detail})" if detail else "")


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "os_error", None) or exc.__cause__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return _certificate_error(cause).removeprefix("TLS: ")
    return str(getattr(cause, "reason", None) or cause)
