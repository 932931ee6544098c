"""Private endpoints (docs/configuration.md#allow_private_endpoints): refused at connect time
unless allow_private_endpoints.

A real receiver listens on 127.0.0.1:PORT throughout; with the flag off, nothing may ever
reach it, however the endpoint spells its way there.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Daemon,
    Receiver,
    StartDaemon,
    free_port,
    load_tenant,
    tenant,
    wait_for,
    webhook,
    write_config,
)
from webhookd import sender
from webhookd.sender import Sender

EVENT = "CHECK_COMPLETED"
BLOCKED = "blocked: resolves to private address"
PRIVATE = {"allow_private_endpoints": False}

# (endpoint with {port} for the receiver's, addresses the refusal may name)
ENDPOINTS = [
    ("http://127.0.0.1:{port}/hooks", {"127.0.0.1"}),
    ("http://localhost:{port}/hooks", {"127.0.0.1", "::1"}),
    ("http://[::1]:{port}/hooks", {"::1"}),
    ("http://10.0.0.1/hooks", {"10.0.0.1"}),
    ("http://192.168.1.1/hooks", {"192.168.1.1"}),
    ("http://172.16.0.1/hooks", {"172.16.0.1"}),
    ("http://169.254.169.254/latest/meta-data", {"169.254.169.254"}),
    ("http://[fe80::1]/hooks", {"fe80::1"}),
    ("http://[fd00::1]/hooks", {"fd00::1"}),
    ("http://[::ffff:127.0.0.1]:{port}/hooks", {"::ffff:127.0.0.1"}),
    ("http://[::ffff:10.0.0.1]/hooks", {"::ffff:10.0.0.1"}),
    ("http://0.0.0.0:{port}/hooks", {"0.0.0.0"}),
    ("http://100.64.0.1/hooks", {"100.64.0.1"}),
    ("http://224.0.0.1/hooks", {"224.0.0.1"}),
]

BLOCKED_ADDRESSES = [
    "127.0.0.1",
    "::1",
    "10.0.0.1",
    "192.168.1.1",
    "172.16.0.1",
    "169.254.169.254",
    "fe80::1",
    "fe80::1%eth0",
    "fd00::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "0.0.0.0",
    "::",
    "100.64.0.1",
    "224.0.0.1",
    "ff02::1",
    "64:ff9b::7f00:1",  # NAT64 for 127.0.0.1
]
PUBLIC_ADDRESSES = ["8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808"]


async def first_outcome(daemon: Daemon, name: str) -> dict[str, Any]:
    """The tenant's status once its head has either failed or been delivered."""

    async def settled() -> dict[str, Any] | None:
        status = await daemon.status(name)
        return status if status["recent_failures"] or not status["waiting"] else None

    status: dict[str, Any] = await wait_for(settled)
    return status


def assert_refused(status: dict[str, Any], addresses: set[str]) -> None:
    assert status["waiting"] >= 1, status
    assert status["queue"] == "stalled", status
    failure = status["recent_failures"][0]
    assert failure["status"] is None, failure
    error = failure["error"]
    assert error.startswith(BLOCKED), failure
    # It names the address it refused (IPv6 in its compressed form: ::ffff:7f00:1), and the
    # setting that would allow it.
    address, hint = error.removeprefix(BLOCKED).strip().split(" ", 1)
    assert hint == "(set allow_private_endpoints = true to allow)", failure
    named = ipaddress.ip_address(address)
    assert named in {ipaddress.ip_address(a) for a in addresses}, failure


# -- the address check itself --------------------------------------------------------------------


@pytest.mark.parametrize("address", BLOCKED_ADDRESSES)
def test_non_public_addresses_are_blocked(address: str) -> None:
    assert sender.is_blocked(address)


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_are_not_blocked(address: str) -> None:
    assert not sender.is_blocked(address)


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "addresses"), ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
async def test_private_endpoint_is_refused_and_never_reached(
    template: str, addresses: set[str], receiver: Receiver, start_daemon: StartDaemon
) -> None:
    endpoint = template.format(port=receiver.port)
    daemon = await start_daemon(
        tenants={"acme": tenant(endpoint, retry_base=0.1, timeout=2.0)}, daemon=PRIVATE
    )
    await daemon.ingest("acme", {"event": EVENT})
    status = await first_outcome(daemon, "acme")
    assert_refused(status, addresses)
    # Retries are refused the same way, and the receiver on 127.0.0.1:PORT never hears a thing.
    await wait_for(lambda: daemon.service.workers["acme"].row.attempts >= 2, timeout=5)
    status = await daemon.status("acme")
    for failure in status["recent_failures"]:
        assert failure["error"].startswith(BLOCKED), failure
    assert receiver.requests == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_allowed_private_endpoint_is_delivered_to(
    host: str, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        tenants={"acme": tenant(f"http://{host}:{receiver.port}/hooks")},
        daemon={"allow_private_endpoints": True},
    )
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: receiver.sequences("/hooks") == [1], timeout=5)
    status = await first_outcome(daemon, "acme")
    assert status["recent_failures"] == [], status


# -- reload flips it live ------------------------------------------------------------------------


async def rewrite(daemon: Daemon, path: Path, tenants: dict[str, Any], allow: bool) -> None:
    """Write the configuration again with only the flag changed, and reload it."""
    listen = daemon.service.config.daemon.listen  # unchanged: no restart-only key moves
    write_config(
        path.parent,
        tenants,
        daemon={"listen": listen, "allow_private_endpoints": allow},
        name=path.name,
    )
    assert await daemon.service.reload()
    assert daemon.service.config.daemon.allow_private_endpoints is allow


async def test_reload_allowing_private_endpoints_lets_the_blocked_tenant_deliver(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    tenants = {"acme": tenant(receiver.url("/hooks"), retry_base=30)}
    config = write_config(
        tmp_path, tenants, daemon={"listen": f"127.0.0.1:{free_port()}", **PRIVATE}
    )
    daemon = await start_daemon(config)
    await daemon.ingest("acme", {"event": EVENT})
    assert_refused(await first_outcome(daemon, "acme"), {"127.0.0.1"})
    assert receiver.requests == []

    await rewrite(daemon, config, tenants, allow=True)
    code, body = await daemon.request("POST", "/v1/tenants/acme/retry")
    assert code == 200 and body["retrying"], body
    await wait_for(lambda: receiver.sequences("/hooks") == [1], timeout=5)
    status = await wait_for(lambda: _empty(daemon))
    assert status["attempts"] == 0, status


async def test_reload_forbidding_private_endpoints_blocks_the_next_attempt(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """The other way round: refused from the next attempt on, not from the next connection.

    A kept-alive connection from the delivery before the reload must not carry the next one.
    """
    tenants = {"acme": tenant(receiver.url("/hooks"), retry_base=30)}
    config = write_config(tmp_path, tenants, daemon={"listen": f"127.0.0.1:{free_port()}"})
    daemon = await start_daemon(config)
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: receiver.sequences("/hooks") == [1], timeout=5)
    await wait_for(lambda: _empty(daemon))

    await rewrite(daemon, config, tenants, allow=False)
    await daemon.ingest("acme", {"event": EVENT})
    status = await first_outcome(daemon, "acme")
    assert receiver.sequences("/hooks") == [1], "delivered to 127.0.0.1 after the reload forbade it"
    assert_refused(status, {"127.0.0.1"})


async def test_tightening_allow_private_during_a_connect_keeps_its_connection_out_of_the_pool(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Sender.set_allow_private(False) bumps the client's generation so that no connection
    to a private address carries another request. A connection whose address was checked
    before that, and which is made after it (the reload lands during the connect, one RTT),
    belongs to the generation of its check: if it took the new one, it would be pooled, and
    the next delivery to the private address would go through it instead of failing as
    blocked."""
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


async def _empty(daemon: Daemon) -> dict[str, Any] | None:
    status = await daemon.status("acme")
    return status if status["queue"] == "empty" else None
