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
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.conftest import Daemon, Receiver, free_port, tenant, wait_for, write_config
from tests.postgres import PostgresServer
from webhookd import config as config_mod
from webhookd import forward
from webhookd.config import Config, PostgresURL
from webhookd.serve import Server
from webhookd.service import Service
from webhookd.store.postgres.cluster import RENEW_CHUNK, PgCluster

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


async def test_a_lease_that_lapses_while_an_attempt_waits_to_start_sends_nothing(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    a = await start_instance(instance_config(path, postgres_url))
    await wait_for(lambda: held(a) == {"acme"}, timeout=5)
    worker = a.service.workers["acme"]
    # The attempt passed its lease check, then waits for the head (a skip holds it).
    async with worker._head_lock:
        await a.ingest("acme", items("x", 1))
        await wait_for(lambda: bool(worker._head_lock._waiters), timeout=5)
        worker._may_send = lambda name: False  # its lease lapsed meanwhile (a freeze)
    await asyncio.sleep(0.3)
    assert receiver.at("/acme") == []


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


async def test_small_webhooks_reach_the_owner_with_their_announcement_large_ones_are_read(
    tmp_path: Path,
    receiver: Receiver,
    postgres_url: str,
    start_instance: StartInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    owner = await start_instance(instance_config(path, postgres_url))
    await wait_for(lambda: held(owner) == {"acme"}, timeout=5)
    other = await start_instance(instance_config(path, postgres_url))
    reads: list[int] = []
    read_queue = owner.service.store.read_queue

    async def counted(tenant_name: str, after: int, limit: int) -> Any:
        reads.append(after)
        return await read_queue(tenant_name, after, limit)

    monkeypatch.setattr(owner.service.store, "read_queue", counted)

    # Text that JSON escapes, and text it does not: delivered byte for byte as ingested.
    small = {"quote": '"\\\n\t', "accents": "héllo ✓ 🚀", "nul": "\u0000", "n": 1.5e-7}
    await other.ingest("acme", [{"event": EVENT, "id": "small", "data": small}])
    await wait_for(lambda: receiver.sequences("/acme") == [1], timeout=5)
    [sent] = receiver.at("/acme")[0].webhooks
    assert (sent["id"], sent["data"]) == ("small", small)
    assert reads == []  # the announcement carried it

    # Larger than a notification may carry: announced by its sequence, read from the table.
    large = {"blob": "x" * 9000}
    await other.ingest("acme", [{"event": EVENT, "id": "large", "data": large}])
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2], timeout=5)
    assert receiver.at("/acme")[1].webhooks[0]["data"] == large
    assert reads == [1]


async def test_an_instance_keeps_more_leases_than_one_renewal_commit_holds(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    # Leases are renewed RENEW_CHUNK to a commit (a renewal holds up those tenants'
    # outcomes until it commits): every chunk must be renewed, tick after tick.
    names = [f"t{n:04d}" for n in range(2 * RENEW_CHUNK + 100)]
    path = write_config(tmp_path, {name: tenant(receiver.url(f"/{name}")) for name in names})
    a = await start_instance(instance_config(path, postgres_url))
    await wait_for(lambda: len(held(a)) == len(names), timeout=30)
    cluster = a.service.cluster
    assert cluster is not None
    lost = cluster.lease_changes["lost"]
    await asyncio.sleep(2.5 * LEASE_S)  # several ticks, past the lease
    assert held(a) == set(names)
    assert cluster.lease_changes["lost"] == lost
    await a.ingest(names[-1], items("last", 1))  # the last chunk's tenant still delivers
    await wait_for(lambda: receiver.sequences(f"/{names[-1]}") == [1], timeout=5)


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


async def test_a_hand_over_cut_short_by_a_database_outage_leaves_no_tenant_undelivered(
    tmp_path: Path,
    receiver: Receiver,
    postgres_server: PostgresServer,
    postgres_url: str,
    start_instance: StartInstance,
) -> None:
    """The instance handing a tenant over waits for its attempt in flight; the database goes
    away meanwhile, so the lease can be neither freed nor the tenant's state read again.
    The tenant must not stay with an instance that no longer delivers it."""
    lease = 4.0  # longer than the outage: only a lease given up can move the tenant
    names = ["t0", "t1"]
    path = write_config(tmp_path, {n: tenant(receiver.url(f"/{n}")) for n in names})
    a = await start_instance(instance_config(path, postgres_url, lease_seconds=lease))
    await wait_for(lambda: held(a) == set(names), timeout=5)
    arrived = {n: asyncio.Event() for n in names}
    answer = asyncio.Event()

    def slow(name: str) -> Any:
        async def behaviour(request: web.Request) -> web.Response:
            arrived[name].set()
            await answer.wait()
            return web.Response(text="ok")

        return behaviour

    for name in names:  # an attempt in flight for each tenant
        receiver.script(f"/{name}", slow(name))
        await a.ingest(name, items(name, 1))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in arrived.values())), 5)

    pg = a.service.cluster
    assert isinstance(pg, PgCluster)
    with capture_logs() as logs:
        b = await start_instance(instance_config(path, postgres_url, lease_seconds=lease))
        await wait_for(lambda: any(v.releasing for v in pg.held.values()), timeout=lease)
        await asyncio.to_thread(postgres_server.stop)
        answer.set()  # the attempts end; the hand-over then finds the database away
        met = ("lease_not_handed_over", "delivery_not_recorded")
        await wait_for(lambda: any(e["event"] in met for e in logs), timeout=lease)
        await asyncio.to_thread(postgres_server.start)

    async def accepted(name: str) -> bool:
        status, _ = await b.request(
            "POST", f"/v1/tenants/{name}/webhooks", json=items(f"{name}-after", 1)
        )
        return status == 202

    for name in names:
        await wait_for(lambda n=name: accepted(n), timeout=10, interval=0.2)  # type: ignore[misc]
    # Every tenant delivered again, whoever owns it now: the one in flight, then the new one.
    await wait_for(
        lambda: all(receiver.sequences(f"/{n}")[-1:] == [2] for n in names), timeout=3 * lease
    )


async def test_healthz_says_so_while_the_leases_cannot_be_renewed(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    """The writer and the readers answer, but the lease session's ticks fail (here: its
    heartbeat waits for a lock past its statement timeout): this instance delivers nothing
    meanwhile, and /healthz must not say all is well."""
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    a = await start_instance(instance_config(path, postgres_url))
    await wait_for(lambda: held(a) == {"acme"}, timeout=5)
    status, body = await a.request("GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})

    conn = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT * FROM instances FOR UPDATE")

            async def unhealthy() -> Any:
                status, body = await a.request("GET", "/healthz")
                return body if status == 503 else None

            body = await wait_for(unhealthy, timeout=4 * LEASE_S, interval=0.1)
        assert body["error"] == "unhealthy"
        assert body["detail"].startswith("the database "), body
        assert "statement timeout" in body["detail"], body
        # The metrics say so too, from the same check (the database-unreachable alert).
        status, text = await a.request("GET", "/metrics")
        assert status == 200 and scraped(text)["webhookd_healthy"][()] == 0
    finally:
        await conn.close()

    async def healthy() -> bool:
        status, _ = await a.request("GET", "/healthz")
        return status == 200

    await wait_for(healthy, timeout=4 * LEASE_S, interval=0.1)


async def test_a_hand_over_records_the_attempt_in_flight_even_if_the_writer_reconnects_meanwhile(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    """A hand-over is not a lease lost: the attempt in flight ends and its outcome is
    recorded before the lease is freed, so the new owner does not send it again. Here
    the writer's session ends just as the attempt's 200 comes back: the record must wait
    for the writer to reconnect, not be dropped because the worker is stopping."""
    names = ["t0", "t1"]
    path = write_config(tmp_path, {n: tenant(receiver.url(f"/{n}")) for n in names})
    a = await start_instance(instance_config(path, postgres_url))
    await wait_for(lambda: held(a) == set(names), timeout=5)
    arrived = {n: asyncio.Event() for n in names}
    answer = asyncio.Event()

    def slow(name: str) -> Any:
        async def behaviour(request: web.Request) -> web.Response:
            arrived[name].set()
            await answer.wait()
            return web.Response(text="ok")

        return behaviour

    for name in names:  # an attempt in flight for each tenant
        receiver.script(f"/{name}", slow(name))
        await a.ingest(name, items(name, 1))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in arrived.values())), 5)

    pg = a.service.cluster
    assert isinstance(pg, PgCluster)
    b = await start_instance(instance_config(path, postgres_url))
    await wait_for(lambda: any(v.releasing for v in pg.held.values()), timeout=2 * LEASE_S)
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(
            """SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
               WHERE application_name LIKE 'webhookd writer %'"""
        )
    finally:
        await conn.close()
    answer.set()
    await wait_for(lambda: held(a) | held(b) == set(names) and len(held(b)) == 1, timeout=10)

    async def accepted(name: str) -> bool:
        status, _ = await b.request(
            "POST", f"/v1/tenants/{name}/webhooks", json=items(f"{name}-after", 1)
        )
        return status == 202

    for name in names:  # the instances' writers reconnect (both ended: one process here)
        await wait_for(lambda n=name: accepted(n), timeout=10, interval=0.1)  # type: ignore[misc]
    await wait_for(
        lambda: all(receiver.sequences(f"/{n}")[-1:] == [2] for n in names), timeout=4 * LEASE_S
    )
    for name in names:
        assert receiver.sequences(f"/{name}", ok_only=False) == [1, 2], name  # none sent twice


async def test_a_lease_claimed_while_the_instance_stops_starts_no_worker_it_would_not_stop(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    """A tick may be claiming leases (another instance just left) when this one begins to
    stop: a tenant gained after the drain has begun must not get a worker the drain never
    stops (the stop then waited for it forever); its lease goes back instead."""
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    a = await start_instance(instance_config(path, postgres_url))
    await wait_for(lambda: held(a) == {"acme"}, timeout=5)
    service = a.service
    draining = asyncio.create_task(service.drain())
    await asyncio.sleep(0)  # the drain has begun
    with pytest.raises(Exception, match="stopping"):
        await service.gained("acme")
    await draining
    worker = service.workers["acme"]
    assert worker.task is None or worker.task.done()
    await asyncio.wait_for(a.server.stop(), 10)


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


# -- control from any instance -------------------------------------------------------------


async def two_instances(
    tmp_path: Path,
    receiver: Receiver,
    postgres_url: str,
    start_instance: StartInstance,
    *,
    tenants: int = 2,
    **overrides: Any,
) -> tuple[Daemon, Daemon, str]:
    """Instances A and B sharing the tenants t0…; and a tenant A holds (B does not)."""
    names = [f"t{n}" for n in range(tenants)]
    path = write_config(
        tmp_path, {name: tenant(receiver.url(f"/{name}"), **overrides) for name in names}
    )
    a = await start_instance(instance_config(path, postgres_url))
    b = await start_instance(instance_config(path, postgres_url))
    share = tenants // 2
    await wait_for(lambda: len(held(a)) == share and len(held(b)) == share, timeout=4 * LEASE_S)
    return a, b, sorted(held(a))[0]


async def test_pause_and_resume_through_another_instance_act_on_the_owner(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    a, b, name = await two_instances(tmp_path, receiver, postgres_url, start_instance)

    status, body = await b.request("POST", f"/v1/tenants/{name}/pause")
    assert (status, body["paused"], body["queue"]) == (200, True, "paused")
    assert a.service.workers[name].row.paused  # the owner's worker, not B's copy
    await b.ingest(name, items("p", 2))
    await asyncio.sleep(LEASE_S / 2)
    assert receiver.at(f"/{name}") == []  # A holds it, paused

    status, body = await b.request("POST", f"/v1/tenants/{name}/resume")
    assert (status, body["paused"]) == (200, False)
    await wait_for(lambda: receiver.sequences(f"/{name}") == [1, 2], timeout=5)
    assert held(a) >= {name}  # delivered by its owner all along


async def test_retry_and_refresh_through_another_instance_act_on_the_owner(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    # A backoff of a minute: only a retry makes the next attempt in time.
    a, b, name = await two_instances(
        tmp_path, receiver, postgres_url, start_instance, retry_base=60.0
    )
    receiver.script(f"/{name}", 503)
    await b.ingest(name, items("r", 1))
    await wait_for(lambda: a.service.workers[name].queue_state == "stalled", timeout=5)

    status, body = await b.request("POST", f"/v1/tenants/{name}/retry")
    assert (status, body["retrying"], body["queue"]) == (200, True, "waiting")
    await wait_for(lambda: receiver.sequences(f"/{name}") == [1], timeout=5)

    assert len(a.service.workers[name].failures) == 1
    status, body = await b.request("POST", f"/v1/tenants/{name}/refresh")
    assert (status, body) == (200, {"tenant": name, "cleared": 1})
    assert len(a.service.workers[name].failures) == 0


async def test_skip_peek_parked_and_requeue_through_another_instance(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    a, b, name = await two_instances(
        tmp_path, receiver, postgres_url, start_instance, retry_base=60.0
    )
    receiver.script(f"/{name}", 500)
    await b.ingest(name, items("s", 2))
    await wait_for(lambda: a.service.workers[name].queue_state == "stalled", timeout=5)

    # Reads come from the database, on any instance.
    status, body = await b.request("GET", f"/v1/tenants/{name}/webhooks?limit=5")
    assert (status, [w["sequence"] for w in body["webhooks"]]) == (200, [1, 2])

    status, body = await b.request("POST", f"/v1/tenants/{name}/skip")
    assert (status, body["parked"]) == (200, {"id": "s-0", "sequence": 1})
    await wait_for(lambda: receiver.sequences(f"/{name}") == [2], timeout=5)  # A went on

    status, body = await b.request("GET", f"/v1/tenants/{name}/parked")
    assert (status, [w["id"] for w in body["parked"]]) == (200, ["s-0"])
    status, body = await b.request("POST", f"/v1/tenants/{name}/parked/s-0/requeue")
    assert (status, body) == (200, {"tenant": name, "id": "s-0", "sequence": 3})
    await wait_for(lambda: receiver.sequences(f"/{name}") == [2, 3], timeout=5)
    assert a.service.workers[name].parked == 0


async def test_a_forwarded_control_is_never_forwarded_again(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    a, b, name = await two_instances(tmp_path, receiver, postgres_url, start_instance)
    marked = {"X-Webhookd-Forwarded-By": "elsewhere"}

    # At a non-owner (the lease moved while the call was on its way): said, not passed on.
    status, body = await b.request("POST", f"/v1/tenants/{name}/pause", headers=marked)
    assert (status, body["error"]) == (503, "owner_changed")
    assert instance(a) in body["detail"]
    assert not a.service.workers[name].row.paused

    # At the owner: done there.
    status, body = await a.request("POST", f"/v1/tenants/{name}/pause", headers=marked)
    assert (status, body["paused"]) == (200, True)


async def test_an_owner_whose_api_does_not_answer_is_503_owner_unreachable(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    # The owner's lease is live, but nothing answers where it says its API is.
    silent = f"http://127.0.0.1:{free_port()}"
    a = await start_instance(instance_config(path, postgres_url, advertise_url=silent))
    await wait_for(lambda: held(a) == {"acme"}, timeout=5)
    b = await start_instance(instance_config(path, postgres_url))

    for control in ("pause", "retry", "skip"):
        status, body = await b.request("POST", f"/v1/tenants/acme/{control}")
        assert (status, body["error"]) == (503, "owner_unreachable")
        assert instance(a) in body["detail"] and silent in body["detail"]
    assert not a.service.workers["acme"].row.paused


async def test_an_owner_that_accepts_but_never_answers_is_503_after_the_forwarding_timeout(
    tmp_path: Path,
    receiver: Receiver,
    postgres_url: str,
    start_instance: StartInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(forward, "FORWARD_TIMEOUT_S", 0.5)
    # Where the owner says its API is, a server takes connections and never answers (a
    # frozen process, a proxy stuck upstream): the forwarded call must not wait forever.
    accepted: list[asyncio.StreamWriter] = []

    async def hang(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    hung = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    try:
        path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
        a = await start_instance(
            instance_config(path, postgres_url, advertise_url=f"http://127.0.0.1:{port}")
        )
        await wait_for(lambda: held(a) == {"acme"}, timeout=5)
        b = await start_instance(instance_config(path, postgres_url))

        pause = asyncio.create_task(b.request("POST", "/v1/tenants/acme/pause"))
        await wait_for(lambda: len(accepted) == 1, timeout=5)
        # Meanwhile B answers everything else at once.
        status, _ = await b.request("GET", "/healthz")
        assert status == 200
        status, body = await asyncio.wait_for(pause, timeout=5)
        assert (status, body["error"]) == (503, "owner_unreachable")
        assert "no answer within 0.5 s" in body["detail"]
        assert not a.service.workers["acme"].row.paused
    finally:
        for writer in accepted:
            writer.close()
        hung.close()
        await hung.wait_closed()


async def test_a_control_for_a_tenant_no_one_holds_claims_it_here(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    names = ["t0", "t1", "t2"]
    path = write_config(tmp_path, {name: tenant(receiver.url(f"/{name}")) for name in names})
    a = await start_instance(instance_config(path, postgres_url, lease_seconds=60.0))
    await wait_for(lambda: held(a) == set(names), timeout=5)
    # A third instance that never claims: the fair share is one each, so one tenant is
    # left without an owner once A has handed two over and B taken its one.
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(
            "INSERT INTO instances (id, host, pid, heartbeat_at) "
            "VALUES ('ghost', 'nowhere', 1, now() + interval '1 hour')"
        )
        b = await start_instance(instance_config(path, postgres_url, lease_seconds=60.0))
        await wait_for(lambda: len(held(a)) == 1 and len(held(b)) == 1, timeout=10)
        [free] = set(names) - held(a) - held(b)
        assert await conn.fetchval("SELECT owner FROM leases WHERE tenant = $1", free) is None

        status, body = await b.request("POST", f"/v1/tenants/{free}/pause")
        assert (status, body["paused"]) == (200, True)
        assert free in held(b)
        assert await conn.fetchval("SELECT owner FROM leases WHERE tenant = $1", free) == (
            instance(b)
        )
        assert await conn.fetchval("SELECT paused FROM tenant_state WHERE tenant = $1", free)
    finally:
        await conn.close()


async def test_retry_all_through_one_instance_retries_every_instances_tenants(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    a, b, _ = await two_instances(tmp_path, receiver, postgres_url, start_instance, retry_base=60.0)
    for name in ("t0", "t1"):
        receiver.script(f"/{name}", 503)
        await a.ingest(name, items(name, 1))

    def stalled() -> bool:
        return all(d.service.workers[n].queue_state == "stalled" for d in (a, b) for n in held(d))

    await wait_for(stalled, timeout=5)
    status, body = await b.request("POST", "/v1/retry")
    assert (status, body) == (200, {"retrying": ["t0", "t1"], "count": 2, "unreachable": []})
    await wait_for(lambda: receiver.sequences("/t0") == receiver.sequences("/t1") == [1], 5)


# -- status and metrics from any instance --------------------------------------------------


async def test_status_through_either_instance_shows_the_same_owners_and_instances(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    a, b, name = await two_instances(
        tmp_path, receiver, postgres_url, start_instance, tenants=4, retry_base=60.0
    )
    [other] = sorted(held(a) - {name})
    # Ingested through B for tenants A delivers: B's own copy of them would say these
    # still wait (it never sees A's acknowledgements).
    await b.ingest(other, items("ok", 3))
    await wait_for(lambda: receiver.sequences(f"/{other}") == [1, 2, 3], timeout=5)
    receiver.script(f"/{name}", 503)
    await b.ingest(name, items("stuck", 2))
    await wait_for(lambda: a.service.workers[name].queue_state == "stalled", timeout=5)

    views = []
    for daemon in (a, b):
        status, body = await daemon.request("GET", "/v1/status")
        assert status == 200, body
        views.append(body)
    for view in views:
        owners = {t["tenant"]: t["owner"] for t in view["tenants"]}
        assert owners == {n: instance(a) for n in held(a)} | {n: instance(b) for n in held(b)}
        instances = [(i["id"], i["api_url"], i["tenants"]) for i in view["totals"]["instances"]]
        assert instances == sorted([(instance(a), a.base, 2), (instance(b), b.base, 2)])
        tenants = {t["tenant"]: t for t in view["tenants"]}
        assert tenants[other]["waiting"] == 0
        assert tenants[other]["last_processed_at"] is not None
        stuck = tenants[name]
        assert (stuck["queue"], stuck["waiting"], stuck["attempts"]) == ("stalled", 2, 1)
        assert stuck["oldest_waiting_at"] is not None
        assert [f["status"] for f in stuck["recent_failures"]] == [503]
        assert view["totals"]["waiting"] == 2

    status, one = await b.request("GET", f"/v1/tenants/{name}/status")
    assert (status, one["owner"], one["queue"], one["waiting"]) == (
        200,
        instance(a),
        "stalled",
        2,
    )
    status, text = await b.request("GET", "/v1/status?format=text")
    assert status == 200
    assert "OWNER" in text and "INSTANCE" in text and a.base in text and b.base in text
    status, text = await b.request("GET", f"/v1/tenants/{name}/status?format=text")
    assert status == 200 and instance(a) in text


def scraped(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Prometheus text as {sample name: {labels: value}}."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


async def test_metrics_are_per_instance_and_sum_without_double_counting(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    a, b, _ = await two_instances(
        tmp_path, receiver, postgres_url, start_instance, tenants=4, retry_base=60.0
    )
    for n in range(4):
        receiver.always(f"/t{n}", 503)
        await (a if n % 2 else b).ingest(f"t{n}", items(f"m{n}", n + 1))  # 10 in all

    def stalled() -> bool:
        return all(d.service.workers[n].queue_state == "stalled" for d in (a, b) for n in held(d))

    await wait_for(stalled, timeout=5)
    await wait_for(lambda: a.service.cluster and a.service.cluster.live_instances == 2, 5)
    await wait_for(lambda: b.service.cluster and b.service.cluster.live_instances == 2, 5)
    metrics = []
    for daemon in (a, b):
        status, text = await daemon.request("GET", "/metrics")
        assert status == 200
        metrics.append(scraped(text))

    depths = [m["webhookd_queue_depth"] for m in metrics]
    # Each tenant on exactly one instance, its own; summed, the real total.
    assert [{dict(k)["tenant"] for k in d} for d in depths] == [held(a), held(b)]
    assert sum(v for d in depths for v in d.values()) == 10
    assert sum(m["webhookd_tenants_stalled"][()] for m in metrics) == 4
    assert [m["webhookd_leases"][()] for m in metrics] == [2, 2]
    assert [m["webhookd_cluster_instances"][()] for m in metrics] == [2, 2]
    assert [m["webhookd_cluster_tenants"][()] for m in metrics] == [4, 4]
    assert [m["webhookd_healthy"][()] for m in metrics] == [1, 1]
    changes = [
        {dict(k)["change"]: v for k, v in m["webhookd_lease_changes_total"].items()}
        for m in metrics
    ]
    # A claimed all four alone, then handed two over to B when it joined.
    assert changes == [
        {"gained": 4, "lost": 0, "released": 2},
        {"gained": 2, "lost": 0, "released": 0},
    ]
