"""Configuration across several instances on one PostgreSQL database: tenants made through
the tenant API live in the database (any instance writes them, every instance delivers and
shows them, a restart reads them back, a lost notification is caught by the tick).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg

from tests import test_cluster
from tests.conftest import Daemon, Receiver, tenant, wait_for, write_config
from tests.test_cluster import LEASE_S, StartInstance, instance_config, items
from webhookd import config as config_mod

SECRET = "hunter2-api-secret"
start_instance = test_cluster.start_instance  # the fixture: in-process instances


def configured(daemon: Daemon) -> set[str]:
    return set(daemon.service.config.tenants)


async def put(daemon: Daemon, name: str, body: dict[str, Any]) -> tuple[int, Any]:
    return await daemon.request("PUT", f"/v1/tenants/{name}", json=body)


async def test_an_api_tenant_made_through_one_instance_is_shared_by_every_instance(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {"main": tenant(receiver.url("/main"))})
    a = await start_instance(instance_config(path, postgres_url))
    b = await start_instance(instance_config(path, postgres_url))

    status, body = await put(a, "acme", tenant(receiver.url("/acme"), secret=SECRET))
    assert status == 201, body
    assert body["source"] == "api" and body["secret"] == "***"
    # Known to the other instance within moments (its NOTIFY), with the secret kept.
    await wait_for(lambda: "acme" in configured(b), timeout=5)
    assert b.service.config.tenants["acme"].secret.reveal() == SECRET
    assert (await b.status("acme"))["queue"] == "empty"
    status, shown = await b.request("GET", "/v1/tenants/acme")
    assert (status, shown["source"], shown["secret"]) == (200, "api", "***")
    assert not (tmp_path / "tenants.d").exists()  # in the database, not tenants_dir

    # Delivered by whichever instance claims it, ingested through either.
    await wait_for(lambda: "acme" in held(a) | held(b), timeout=4 * LEASE_S)
    await b.ingest("acme", items("b", 2))
    await a.ingest("acme", items("a", 1))
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2, 3], timeout=5)
    assert all(r.json["secret"] == SECRET for r in receiver.at("/acme"))

    # Replaced through B: 200, and A applies the change.
    status, body = await put(b, "acme", {**tenant(receiver.url("/acme2")), "secret": "***"})
    assert status == 200, body
    await wait_for(lambda: a.service.config.tenants["acme"].endpoint.endswith("/acme2"), timeout=5)
    assert a.service.config.tenants["acme"].secret.reveal() == SECRET

    # A tenant of the main file cannot be made through the API, on any instance.
    status, body = await put(b, "main", tenant(receiver.url("/x")))
    assert (status, body["error"]) == (409, "conflict")

    # Deleted through B while a webhook waits (undeliverable): refused, counted from the
    # database whichever instance queued it; then discarded, and gone everywhere.
    receiver.always("/acme2", 503)
    await a.ingest("acme", items("w", 1))
    await wait_for(lambda: len(receiver.at("/acme2")) >= 1, timeout=5)
    status, body = await b.request("DELETE", "/v1/tenants/acme")
    assert (status, body["error"]) == (409, "queue_not_empty"), body
    assert "1 webhook is waiting" in body["detail"]
    status, body = await b.request("DELETE", "/v1/tenants/acme?discard=true")
    assert (status, body) == (200, {"tenant": "acme", "deleted": True, "discarded": 1})
    await wait_for(lambda: "acme" not in configured(a), timeout=5)
    sent = len(receiver.at("/acme2"))
    for daemon in (a, b):
        assert (await daemon.request("GET", "/v1/tenants/acme"))[0] == 404
        await daemon.ingest("acme", items("late", 1), expect=404)
    await asyncio.sleep(1.0)
    assert len(receiver.at("/acme2")) == sent  # no attempt since, on any instance


async def test_api_tenants_survive_a_restart_of_every_instance(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {})
    a = await start_instance(instance_config(path, postgres_url))
    b = await start_instance(instance_config(path, postgres_url))
    for name in ("acme", "globex"):
        status, body = await put(a, name, tenant(receiver.url(f"/{name}"), secret=SECRET))
        assert status == 201, body
    await wait_for(lambda: configured(b) == {"acme", "globex"}, timeout=5)
    await a.server.stop()
    await b.server.stop()

    c = await start_instance(instance_config(path, postgres_url))
    d = await start_instance(instance_config(path, postgres_url))
    for daemon in (c, d):
        assert configured(daemon) == {"acme", "globex"}
        assert daemon.service.config.tenants["acme"].secret.reveal() == SECRET
    await c.ingest("acme", items("after", 1))
    await d.ingest("globex", items("after", 1))
    await wait_for(
        lambda: receiver.sequences("/acme") == [1] and receiver.sequences("/globex") == [1],
        timeout=4 * LEASE_S,
    )


async def test_an_api_tenant_change_whose_notification_is_lost_is_caught_by_the_tick(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {})
    a = await start_instance(instance_config(path, postgres_url))
    b = await start_instance(instance_config(path, postgres_url))
    stored = config_mod.tenant_toml(tenant(receiver.url("/acme")))
    conn = await asyncpg.connect(postgres_url)
    try:
        # As an instance does, but without the NOTIFY: as if it was lost with a session.
        await conn.execute("INSERT INTO api_tenants (tenant, config) VALUES ('acme', $1)", stored)
        await conn.execute("INSERT INTO leases (tenant) VALUES ('acme')")
        await wait_for(
            lambda: "acme" in configured(a) and "acme" in configured(b), timeout=3 * LEASE_S
        )
        await b.ingest("acme", items("x", 1))
        await wait_for(lambda: receiver.sequences("/acme") == [1], timeout=4 * LEASE_S)

        await conn.execute("DELETE FROM api_tenants WHERE tenant = 'acme'")
        await wait_for(
            lambda: "acme" not in configured(a) and "acme" not in configured(b),
            timeout=3 * LEASE_S,
        )
    finally:
        await conn.close()


def held(daemon: Daemon) -> set[str]:
    cluster = daemon.service.cluster
    assert cluster is not None
    return {name for name in daemon.service.workers if cluster.holds(name)}
