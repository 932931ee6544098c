"""Build and send one delivery request; classify what came back. No SQL, no scheduling."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import hmac
import ipaddress
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import orjson

from webhookd import __version__, http1, logs, policy
from webhookd.config import CONTROL_CHARACTERS, ProxyConfig, TenantConfig
from webhookd.records import Webhook

log = logs.get_logger("webhookd.sender")

USER_AGENT = f"webhookd/{__version__}"
NAT64 = ipaddress.ip_network("64:ff9b::/96")
RESET = (errno.ECONNRESET, errno.EPIPE)
UNSENDABLE_ID = "the webhook id holds a control character: it cannot be sent as webhook-id"


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


ALLOW_PRIVATE_HINT = "set allow_private_endpoints = true to allow"


def blocked_error(address: str) -> str:
    """The error of an attempt refused by the private-address rule: it names the setting, so
    a development setup (an endpoint on 127.0.0.1) knows what to change."""
    return f"blocked: resolves to private address {address} ({ALLOW_PRIVATE_HINT})"


def encode_body(tenant: TenantConfig, webhooks: Sequence[Webhook], *, batched: bool) -> bytes:
    """The exact request body: stored `data` JSON text is spliced in, not re-encoded per send."""
    secret = orjson.dumps(tenant.secret.reveal()).decode()
    # Field order as docs/wire-format.md#the-webhook-object shows it. `event` is a validated
    # catalogue name: no escaping.
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
    """Sends delivery requests through one keep-alive client (webhookd.http1)."""

    def __init__(
        self,
        *,
        max_connections: int = 1000,
        source_address: str = "",
        allow_private: bool = False,
        ca_file: Path | None = None,
        proxy: ProxyConfig | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.source_address = source_address
        # [daemon] proxy, for tenants without their own; a reload replaces it (set_proxy).
        self.proxy = proxy
        # Read at connect time, so a reload that flips it applies to the next connection.
        self.allow_private = allow_private
        tls = ssl.create_default_context()
        if ca_file is not None:
            tls.load_verify_locations(cafile=str(ca_file))
        self._client = http1.Client(tls, self._check_address)
        # max_connections is for all tenants together, whatever their source address.
        self._slots = asyncio.Semaphore(max_connections)

    def set_allow_private(self, allow: bool) -> None:
        """Change the guard. Tightening it drops pooled connections: a kept-alive connection
        to a private address must not carry the next request past the new rule."""
        tightened = self.allow_private and not allow
        self.allow_private = allow
        if tightened:
            self._client.drop_pooled()

    def set_proxy(self, proxy: ProxyConfig | None) -> None:
        """Use `proxy` from the next connection on. Tunnels through the old one stay pooled
        under its key (proxy and credentials), unused, until they idle out."""
        self.proxy = proxy

    def _check_address(self, address: str) -> None:
        if not self.allow_private and is_blocked(address):
            raise BlockedAddress(errno.EACCES, blocked_error(address))

    async def close(self) -> None:
        self._client.close()

    async def send(self, tenant: TenantConfig, webhooks: Sequence[Webhook]) -> Outcome:
        """POST `webhooks` to the tenant's endpoint once; never raises for delivery errors."""
        batched = tenant.batching
        body = encode_body(tenant, webhooks, batched=batched)
        try:
            target = http1.parse_target(tenant.endpoint)
        except http1.HTTPError as exc:  # config checks hosts; this is the last guard
            return Outcome(False, None, str(exc), 0.0)
        # The whole head is one string. Config refuses secrets with control characters and
        # checks the endpoint's host, the path is %-encoded, and ingest refuses ids with
        # control characters, so nothing here can break a header line.
        head = (
            f"POST {target.path} HTTP/1.1\r\nHost: {target.authority}\r\n"
            f"User-Agent: {USER_AGENT}\r\nAccept: */*\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        )
        if tenant.authorization_header:
            head += f"Authorization: Bearer {tenant.secret.reveal()}\r\n"
        message_id = ""
        if tenant.signing_secret:
            if batched:
                message_id = f"{tenant.name}.{webhooks[0].sequence}-{webhooks[-1].sequence}"
            else:
                message_id = webhooks[0].id
                if CONTROL_CHARACTERS.search(message_id):  # queued before ingest refused them
                    return Outcome(False, None, UNSENDABLE_ID, 0.0)
        seconds = tenant.delivery.batch_timeout if batched else tenant.delivery.timeout
        source = tenant.source_address or self.source_address
        proxy = _client_proxy(tenant.proxy if tenant.proxy is not None else self.proxy)
        progress = http1.Progress()
        # A slot first, then the clock: waiting for a free connection (max_connections)
        # is the daemon's load, not the endpoint's slowness.
        async with self._slots:
            if tenant.signing_secret:
                # Signed once the slot is ours: webhook-timestamp is the send time, which
                # receivers hold against their clock (Standard Webhooks allow 5 minutes).
                now = int(time.time())
                signature = sign(tenant.signing_secret.reveal(), message_id, now, body)
                head += (
                    f"webhook-id: {message_id}\r\nwebhook-timestamp: {now}\r\n"
                    f"webhook-signature: {signature}\r\n"
                )
            request = (head + "\r\n").encode()
            started = time.perf_counter()
            try:
                async with asyncio.timeout(seconds):
                    response = await self._client.post(
                        target, request, body, source, proxy=proxy, progress=progress
                    )
            except TimeoutError:
                # Cut short while the proxy had yet to open the tunnel: the proxy's silence.
                prefix = f"proxy: {progress.proxy}: " if progress.proxy else ""
                return Outcome(False, None, f"{prefix}timeout after {seconds:g} s", _since(started))
            except (http1.HTTPError, OSError) as exc:
                return Outcome(False, None, describe_error(exc), _since(started))
            except Exception as exc:
                # Whatever the endpoint did, the attempt must end as an outcome to record.
                log.exception("send_crashed", tenant=tenant.name)
                error = f"unexpected error: {type(exc).__name__}"
                return Outcome(False, None, error, _since(started))
        duration = _since(started)
        status = response.status
        if policy.is_success(status, tenant.delivery.success_statuses):
            return Outcome(True, status, None, duration)
        if 300 <= status < 400:
            location = _as_sent(response.headers.get("location", ""))
            error = f"redirect to {_clip(location) or '(no Location)'} not followed (HTTP {status})"
        else:
            error = f"HTTP {status}"
        retry_after = policy.retry_after_seconds(response.headers.get("retry-after"), time.time())
        return Outcome(False, status, error, duration, retry_after)


@lru_cache(maxsize=256)
def _client_proxy(proxy: ProxyConfig | None) -> http1.Proxy | None:
    """The proxy as the HTTP client takes it (None: direct, as an empty `proxy` says)."""
    if proxy is None or not proxy.url:
        return None
    authorization = ""
    if proxy.username:
        pair = f"{proxy.username}:{proxy.password.reveal()}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    return http1.Proxy(proxy.host, proxy.port, authorization, proxy.checks_addresses)


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _as_sent(value: str) -> str:
    """A header value as its sender wrote it: UTF-8 when its bytes are UTF-8 (a Location with
    a non-ASCII path, say), else the Latin-1 characters that http1 read them as.

    Kept exact, controls and all: the error sentence is stored and answered in JSON as it
    is, and every text view, the command line and the logs escape it (webhookd.terminal)."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def describe_error(exc: BaseException) -> str:
    """A short, specific, secret-free sentence for a failed connection or exchange."""
    if isinstance(exc, http1.ConnectError):
        return _connect_error(exc.cause)
    if isinstance(exc, http1.HTTPError):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _certificate_error(exc)
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError):
        if isinstance(exc, ConnectionResetError | BrokenPipeError) or exc.errno in RESET:
            return "connection reset"
        return f"connection error: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _connect_error(cause: OSError) -> str:
    if isinstance(cause, BlockedAddress):
        return cause.strerror or f"blocked ({ALLOW_PRIVATE_HINT})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return _certificate_error(cause)
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {cause.reason or cause}"
    return f"cannot connect: {cause.strerror or cause}"


def _certificate_error(exc: BaseException) -> str:
    detail = getattr(exc, "verify_message", None)
    return "TLS: certificate verify failed" + (f" ({detail})" if detail else "")
