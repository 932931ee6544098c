"""Egress through a proxy: every delivery through a CONNECT tunnel of a real proxy
(tests/proxy.py on 127.0.0.1), the private-address rule held before the proxy is asked,
proxy failures told apart from the endpoint's, and the proxy's password never shown."""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from structlog.testing import capture_logs

from tests.conftest import Daemon, Receiver, StartDaemon, free_port, tenant, wait_for, write_config
from tests.proxy import Proxy

PASSWORD = "pr0xy-pa55word"
EVENT = "CHECK_COMPLETED"


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    server = Proxy(user="hooks", password=PASSWORD)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def tls_receiver(tmp_path: Path) -> AsyncIterator[tuple[Receiver, Path]]:
    """An https receiver on 127.0.0.1 with a certificate for `localhost`; its CA's file."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/{path:.*}", recv.handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    recv.port = runner.addresses[0][1]
    yield recv, ca_path
    await runner.cleanup()


def password_file(tmp_path: Path, password: str = PASSWORD) -> Path:
    path = tmp_path / "proxy-password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def through(proxy: Proxy, tmp_path: Path, **more: Any) -> dict[str, Any]:
    """[daemon] keys that send every delivery through `proxy`, with its credentials."""
    return {"proxy": proxy.url, "proxy_password_file": str(password_file(tmp_path)), **more}


async def first_failure(daemon: Daemon, name: str = "acme") -> dict[str, Any]:
    async def failed() -> dict[str, Any] | None:
        status = await daemon.status(name)
        return status["recent_failures"][0] if status["recent_failures"] else None

    failure: dict[str, Any] = await wait_for(failed)
    return failure


# -- deliveries through the tunnel ---------------------------------------------------------------


async def test_https_endpoint_is_delivered_through_a_tunnel_to_a_checked_address(
    tmp_path: Path, proxy: Proxy, tls_receiver: tuple[Receiver, Path], start_daemon: StartDaemon
) -> None:
    recv, ca_path = tls_receiver
    endpoint = f"https://localhost:{recv.port}/hooks"
    daemon = await start_daemon(
        tenants={"acme": tenant(endpoint)},
        daemon=through(proxy, tmp_path, ca_file=str(ca_path)),
    )
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: recv.sequences("/hooks") == [1], timeout=10)
    # The proxy was asked for a tunnel, to an address webhookd resolved and checked (never
    # the name), with the user of the URL and the password of the file.
    assert proxy.requests and all(r.startswith("CONNECT ") for r in proxy.requests)
    assert proxy.targets[-1] == f"127.0.0.1:{recv.port}", proxy.targets
    assert set(proxy.targets) <= {f"127.0.0.1:{recv.port}", f"[::1]:{recv.port}"}
    assert set(proxy.credentials) == {f"hooks:{PASSWORD}"}
    # Inside the tunnel: TLS to `localhost` (SNI, verified), and the endpoint's Host.
    assert recv.requests[0].headers["Host"] == f"localhost:{recv.port}"


async def test_http_endpoint_goes_through_a_tunnel_too_and_the_tunnel_is_reused(
    tmp_path: Path, proxy: Proxy, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/hooks"))}, daemon=through(proxy, tmp_path)
    )
    delivered: list[int] = []
    for sequence in (1, 2, 3):
        delivered.append(sequence)
        await daemon.ingest("acme", {"event": EVENT})
        await wait_for(lambda: receiver.sequences("/hooks") == delivered)
    # The proxy saw one CONNECT and no plain request: the three went through one tunnel.
    assert proxy.requests == [f"CONNECT 127.0.0.1:{receiver.port} HTTP/1.1"]
    assert receiver.sequences("/hooks") == [1, 2, 3]


async def test_per_tenant_proxy_wins_and_an_empty_one_goes_direct(
    tmp_path: Path, proxy: Proxy, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    own = Proxy()
    await own.start()
    try:
        daemon = await start_daemon(
            tenants={
                "daemons": tenant(receiver.url("/daemons")),
                "own": tenant(receiver.url("/own"), proxy=own.url),
                "direct": tenant(receiver.url("/direct"), proxy=""),
            },
            daemon=through(proxy, tmp_path),
        )
        for name in ("daemons", "own", "direct"):
            await daemon.ingest(name, {"event": EVENT})
        await wait_for(
            lambda: all(receiver.sequences(p) == [1] for p in ("/daemons", "/own", "/direct"))
        )
        target = f"127.0.0.1:{receiver.port}"
        assert (proxy.targets, own.targets) == ([target], [target])
        assert own.authorizations == [None]  # its URL names no user
    finally:
        await own.stop()


# -- the private-address rule --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_private_endpoint_is_refused_before_the_proxy_is_asked(
    host: str, tmp_path: Path, proxy: Proxy, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    endpoint = f"http://{host}:{receiver.port}/hooks"
    daemon = await start_daemon(
        tenants={"acme": tenant(endpoint)},
        daemon=through(proxy, tmp_path, allow_private_endpoints=False),
    )
    await daemon.ingest("acme", {"event": EVENT})
    failure = await first_failure(daemon)
    assert failure["error"].startswith("blocked: resolves to private address"), failure
    assert proxy.requests == []  # the proxy never heard of it
    assert receiver.requests == []


async def test_proxy_checks_addresses_hands_the_proxy_the_name(
    tmp_path: Path, proxy: Proxy, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """With proxy_checks_addresses = true the proxy resolves the name (and is trusted to
    refuse private addresses: ours here does not, so a private endpoint gets through, which
    is the trade-off the setting makes). An address written in the URL is still checked."""
    daemon = await start_daemon(
        tenants={
            "named": tenant(f"http://localhost:{receiver.port}/named"),
            "literal": tenant(receiver.url("/literal")),
        },
        daemon=through(proxy, tmp_path, allow_private_endpoints=False, proxy_checks_addresses=True),
    )
    await daemon.ingest("named", {"event": EVENT})
    await daemon.ingest("literal", {"event": EVENT})
    await wait_for(lambda: receiver.sequences("/named") == [1], timeout=10)
    assert proxy.targets == [f"localhost:{receiver.port}"]
    failure = await first_failure(daemon, "literal")
    assert failure["error"].startswith("blocked: resolves to private address 127.0.0.1"), failure
    assert receiver.sequences("/literal") == []


# -- proxy failures ------------------------------------------------------------------------------


async def test_wrong_password_is_the_proxys_407_then_a_fixed_file_and_a_reload_deliver(
    tmp_path: Path, proxy: Proxy, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    secret_file = tmp_path / "proxy-password"
    config = write_config(
        tmp_path,
        {"acme": tenant(receiver.url("/hooks"), retry_base=0.2)},
        daemon={"proxy": proxy.url, "proxy_password_file": str(secret_file)},
    )
    secret_file.write_text("not-the-password\n")
    daemon = await start_daemon(config)
    await daemon.ingest("acme", {"event": EVENT})
    failure = await first_failure(daemon)
    shown = f"127.0.0.1:{proxy.port}"
    assert failure == {**failure, "status": None}
    assert failure["error"] == f"proxy: 407 Proxy Authentication Required from {shown}"
    # Retried with backoff like any connection failure, never reaching the endpoint.
    await wait_for(lambda: daemon.service.workers["acme"].row.attempts >= 2, timeout=10)
    assert receiver.requests == []

    secret_file.write_text(PASSWORD + "\n")
    assert await daemon.service.reload()
    code, body = await daemon.request("POST", "/v1/tenants/acme/retry")
    assert code == 200, body
    await wait_for(lambda: receiver.sequences("/hooks") == [1], timeout=10)
    assert proxy.credentials[-1] == f"hooks:{PASSWORD}"


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        ({"refuse": 403}, "proxy: 403 Forbidden from {shown}"),
        ({"refuse": 502}, "proxy: 502 Bad Gateway from {shown}"),
        ({"close": True}, "proxy: {shown} closed the connection before answering CONNECT"),
    ],
    ids=["403", "502", "closed"],
)
async def test_a_proxy_refusal_is_the_proxys_error_not_the_endpoints(
    setup: dict[str, Any],
    error: str,
    tmp_path: Path,
    receiver: Receiver,
    start_daemon: StartDaemon,
) -> None:
    refusing = Proxy(**setup)
    await refusing.start()
    try:
        daemon = await start_daemon(
            tenants={"acme": tenant(receiver.url("/hooks"))}, daemon={"proxy": refusing.url}
        )
        await daemon.ingest("acme", {"event": EVENT})
        failure = await first_failure(daemon)
        assert failure["error"] == error.format(shown=f"127.0.0.1:{refusing.port}"), failure
        assert failure["status"] is None
        assert receiver.requests == []
    finally:
        await refusing.stop()


async def test_a_tunnel_closed_during_the_tls_handshake_is_the_proxys_error(
    tmp_path: Path, tls_receiver: tuple[Receiver, Path], start_daemon: StartDaemon
) -> None:
    recv, ca_path = tls_receiver
    closing = Proxy(close_tunnel=True)
    await closing.start()
    try:
        daemon = await start_daemon(
            tenants={"acme": tenant(f"https://localhost:{recv.port}/hooks")},
            daemon={"proxy": closing.url, "ca_file": str(ca_path)},
        )
        await daemon.ingest("acme", {"event": EVENT})
        failure = await first_failure(daemon)
        shown = f"127.0.0.1:{closing.port}"
        assert failure["error"] == f"proxy: tunnel through {shown} closed during the TLS handshake"
        assert recv.requests == []
    finally:
        await closing.stop()


async def test_a_proxy_silent_until_the_timeout_is_the_proxys_timeout(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    silent = Proxy(silent=True)
    await silent.start()
    try:
        daemon = await start_daemon(
            tenants={"acme": tenant(receiver.url("/hooks"), timeout=0.5)},
            daemon={"proxy": silent.url},
        )
        await daemon.ingest("acme", {"event": EVENT})
        failure = await first_failure(daemon)
        assert failure["error"] == f"proxy: 127.0.0.1:{silent.port}: timeout after 0.5 s"
    finally:
        await silent.stop()


async def test_a_proxy_that_is_down_cannot_be_connected_to(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    port = free_port()
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/hooks"), retry_base=0.1)},
        daemon={"proxy": f"http://127.0.0.1:{port}"},
    )
    await daemon.ingest("acme", {"event": EVENT})
    failure = await first_failure(daemon)
    assert failure["error"] == f"proxy: cannot connect to 127.0.0.1:{port} (connection refused)"
    await wait_for(lambda: daemon.service.workers["acme"].row.attempts >= 2, timeout=10)


# -- the password stays secret -------------------------------------------------------------------


async def test_the_proxy_password_is_never_shown(
    tmp_path: Path, proxy: Proxy, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    proxy.refuse = 407  # a failure too: its sentence must not carry the password either
    config = write_config(
        tmp_path,
        {"acme": tenant(receiver.url("/hooks"), proxy=proxy.url, proxy_password_file="pw")},
        daemon=through(proxy, tmp_path),
    )
    password_file(tmp_path).rename(tmp_path / "pw")
    (tmp_path / "proxy-password").write_text(PASSWORD + "\n")
    with capture_logs() as logs:
        daemon = await start_daemon(config)
        await daemon.ingest("acme", {"event": EVENT})
        await first_failure(daemon)
        shown = [repr(logs), repr(daemon.service.config)]
        for path in ("/v1/tenants/acme/status", "/v1/tenants/acme", "/v1/status", "/metrics"):
            _code, body = await daemon.request("GET", path)
            shown.append(str(body))
        assert await daemon.service.reload()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "webhookd",
        "check",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    shown += [output.decode(), repr(logs)]
    assert f"hooks:{PASSWORD}" in proxy.credentials  # it was sent...
    for text in shown:
        assert PASSWORD not in text  # ...and never shown
