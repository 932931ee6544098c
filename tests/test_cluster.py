"""Several webhookd instances on one PostgreSQL database, in-process, with a real receiver:
ingest through any instance, each tenant delivered by one instance at a time (its lease),
a fair spread, a stopped instance's tenants taken over at once, a stale owner fenced off.

The same with instances as processes, killed and frozen at random, is
tests/test_cluster_crash.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from tests.conftest import Daemon, Receiver, free_port, tenant, wait_for, write_config
from webhookd import config as config_mod
from webhookd.config import Config, PostgresURL
from webhookd.serve import Server
from webhookd.service import Service

EVENT = "CHECK_COMPLETED"
LEASE_S = 2.0

StartInstance = Callable[[Config], Awaitable[Daemon]]


def instance_config(path: Path, url: str, **daemon: Any) -> Config:
    """The configuration at `path` on PostgreSQL, listening on a port of its own."""
    loaded = config_mod.load(path)
    changed = dataclasses.replace(
        loaded.daemon,
        database=PostgresURL(url),
        listen_port=free_port(),
        **{"lease_seconds": LEASE_S, **daemon},
    )
    return dataclasses.replace(loaded, daemon=changed)


@pytest.fixture
async def start_instance() -> AsyncIterator[StartInstance]:
    started: list[Daemon] = []
    session = aiohttp.ClientSession()

    async def start(config: Config) -> Daemon:
        server = Server(Service(config))
        try:
            await server.start()
        except BaseException:
            await server.stop()
            raise
        daemon = Daemon(server, session)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        await daemon.server.stop()  # idempotent: a test may have stopped it already
    await session.close()


def held(daemon: Daemon) -> set[str]:
    cluster = daemon.service.cluster
    assert cluster is not None
    return {name for name in daemon.service.workers if cluster.holds(name)}


def instance(daemon: Daemon) -> str:
    cluster = daemon.service.cluster
    assert cluster is not None
    return cluster.instance


def items(prefix: str, count: int) -> list[dict[str, Any]]:
    return [{"event": EVENT, "id": f"{prefix}-{n}", "data": {"n": n}} for n in range(count)]


async def test_ingest_through_any_instance_delivers_each_tenant_in_order_from_one(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    names = [f"t{n}" for n in range(10)]
    path = write_config(tmp_path, {name: tenant(receiver.url(f"/{name}")) for name in names})
    a = await start_instance(instance_config(path, postgres_url))
    b = await start_instance(instance_config(path, postgres_url))

    # Fair: five each, once the second has joined and the first handed five over.
    await wait_for(lambda: len(held(a)) == 5 and len(held(b)) == 5, timeout=4 * LEASE_S)
    assert held(a).isdisjoint(held(b))

    # Both instances ingest for every tenant at once: sequences stay consecutive.
    async def send(daemon: Daemon, name: str, round_: int) -> list[int]:
        body = await daemon.ingest(name, items(f"{daemon.base}-{round_}", 3))
        return [w["sequence"] for w in body["webhooks"]]

    answers = await asyncio.gather(
        *(send(d, name, r) for r in range(5) for name in names for d in (a, b))
    )
    assert sorted(s for seqs in answers for s in seqs) == sorted(
        s for _ in names for s in range(1, 31)
    )

    def delivered(count: int, *tenants: str) -> bool:
        return all(len(receiver.sequences(f"/{name}")) == count for name in tenants)

    await wait_for(lambda: delivered(30, *names), timeout=10)
    for name in names:
        assert receiver.sequences(f"/{name}") == list(range(1, 31))
        assert len(receiver.at(f"/{name}")) == 30  # each sent once


async def test_a_stopped_instance_hands_its_tenants_over_at_once(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    names = [f"t{n}" for n in range(6)]
    path = write_config(tmp_path, {name: tenant(receiver.url(f"/{name}")) for name in names})
    # A lease far longer than the test: only a hand-over can move the tenants in time.
    a = await start_instance(instance_config(path, postgres_url, lease_seconds=60.0))
    b = await start_instance(instance_config(path, postgres_url, lease_seconds=60.0))
    await wait_for(lambda: len(held(a)) == 3 and len(held(b)) == 3, timeout=10)
    gone = held(a)

    await a.server.stop()
    await wait_for(lambda: held(b) == set(names), timeout=5)
    for name in sorted(gone):
        await b.ingest(name, items(name, 2))
    await wait_for(lambda: all(receiver.sequences(f"/{n}") == [1, 2] for n in gone), timeout=5)


async def test_a_stale_owner_cannot_record_and_stops_that_tenant(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    a = await start_instance(instance_config(path, postgres_url))
    await wait_for(lambda: held(a) == {"acme"}, timeout=5)
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="ok")

    receiver.script("/acme", slow)
    await a.ingest("acme", items("x", 1))
    await asyncio.wait_for(arrived.wait(), 5)

    # Another instance claims the lease meanwhile (a newer fencing token), as after a
    # freeze longer than the lease.
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(
            "UPDATE leases SET owner = 'another', fence = fence + 1, "
            "expires_at = now() + interval '1 hour' WHERE tenant = 'acme'"
        )
        with capture_logs() as logs:
            release.set()  # the 200 arrives; recording it is refused
            await wait_for(
                lambda: any(e["event"] == "lease_lost" for e in logs), timeout=2 * LEASE_S
            )
        row = await conn.fetchrow("SELECT acked_sequence FROM tenant_state WHERE tenant = 'acme'")
    finally:
        await conn.close()
    assert row is not None and row["acked_sequence"] == 0  # nothing recorded
    assert held(a) == set()
    await a.ingest("acme", items("y", 1))
    await asyncio.sleep(LEASE_S)
    assert len(receiver.at("/acme")) == 1  # and nothing more sent from here


async def test_a_wake_up_lost_with_its_session_is_caught_up_by_the_next_tick(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    owner = await start_instance(instance_config(path, postgres_url))
    await wait_for(lambda: held(owner) == {"acme"}, timeout=5)
    other = await start_instance(instance_config(path, postgres_url))
    await other.ingest("acme", items("before", 1))
    await wait_for(lambda: receiver.sequences("/acme") == [1], timeout=5)

    conn = await asyncpg.connect(postgres_url)
    try:
        # The owner's LISTEN session ends; what the other queues meanwhile is announced to
        # no one. Ended before each ingest, so the session cannot be back in time.
        for n in range(3):
            await conn.execute(
                """SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
                   WHERE application_name LIKE 'webhookd cluster %'"""
            )
            await other.ingest("acme", items(f"lost{n}", 1))
    finally:
        await conn.close()
    # Within a tick or two (a third of the lease each), wherever the notification went.
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2, 3, 4], timeout=3 * LEASE_S)


async def test_a_generated_id_given_by_one_instance_is_a_duplicate_through_another(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    a = await start_instance(instance_config(path, postgres_url))
    b = await start_instance(instance_config(path, postgres_url))
    for daemon in (a, b, a):  # b has seen none of a's sequences when a's id comes back
        body = await daemon.ingest("acme", [{"event": EVENT, "data": {}}])
    [given] = body["webhooks"]
    [again] = (await b.ingest("acme", [{"event": EVENT, "id": given["id"], "data": {}}]))[
        "webhooks"
    ]
    assert (again["status"], again["sequence"]) == ("duplicate", 3)


async def test_each_instance_publishes_where_its_api_is_reached(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    a = await start_instance(instance_config(path, postgres_url))
    b = await start_instance(
        instance_config(path, postgres_url, advertise_url="http://node-b.internal:9999")
    )
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch("SELECT id, api_url FROM instances")
    finally:
        await conn.close()
    assert {r["id"]: r["api_url"] for r in rows} == {
        instance(a): a.base,
        instance(b): "http://node-b.internal:9999",
    }
