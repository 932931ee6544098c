"""Failover between webhookd processes on one PostgreSQL database: an owner killed, frozen
past its lease or stopped with SIGTERM, and the database itself restarted under running
instances. The same faults at random, with an oracle over every delivery, are
tests/test_cluster_crash.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tests.conftest import Receiver, tenant, wait_for
from tests.postgres import PostgresServer
from tests.test_cluster_crash import LEASE_S, Instance, cluster, session, start_all

__all__ = ["cluster", "session"]  # fixtures, used here by name

EVENT = "CHECK_COMPLETED"
MakeCluster = Callable[..., list[Instance]]


def items(prefix: str, count: int) -> list[dict[str, Any]]:
    return [{"event": EVENT, "id": f"{prefix}-{n}", "data": {"n": n}} for n in range(count)]


async def owners(url: str) -> dict[str, int]:
    """Each tenant's owner, as the process id its instance name holds (host-pid-tag)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT tenant, owner FROM leases WHERE owner IS NOT NULL AND expires_at > now()"
        )
    finally:
        await conn.close()
    return {row["tenant"]: int(row["owner"].split("-")[-2]) for row in rows}


async def ingest(
    session: aiohttp.ClientSession, instance: Instance, name: str, body: Any
) -> tuple[int, Any]:
    async with session.post(f"{instance.base}/v1/tenants/{name}/webhooks", json=body) as response:
        return response.status, await response.json(content_type=None)


async def spread(url: str, instances: list[Instance], tenants: int) -> dict[str, int]:
    """Wait until every tenant is owned and each instance owns its share."""

    async def even() -> dict[str, int] | None:
        now = await owners(url)
        counts = [sum(1 for pid in now.values() if pid == i.pid) for i in instances]
        fair = len(now) == tenants and max(counts) - min(counts) <= 1
        return now if fair else None

    found: dict[str, int] = await wait_for(even, timeout=8 * LEASE_S, interval=0.1)
    return found


def first_arrivals(receiver: Receiver, path: str) -> list[float]:
    return [r.at for r in receiver.at(path)]


# -- an owner killed, frozen, stopped ------------------------------------------------------------


async def test_a_killed_owners_tenants_are_delivered_by_another_within_two_leases(
    receiver: Receiver,
    postgres_url: str,
    cluster: MakeCluster,
    session: aiohttp.ClientSession,
) -> None:
    names = [f"t{n}" for n in range(4)]
    a, b = cluster({n: tenant(receiver.url(f"/{n}")) for n in names}, 2)
    await start_all([a, b])
    leases = await spread(postgres_url, [a, b], len(names))
    gone = sorted(name for name, pid in leases.items() if pid == a.pid)
    assert gone

    a.kill9()
    killed = time.monotonic()
    for name in gone:  # queued through the survivor at once; only the lease is in the way
        status, body = await ingest(session, b, name, items(name, 1))
        assert status == 202, body
    await wait_for(lambda: all(receiver.at(f"/{n}") for n in gone), timeout=4 * LEASE_S)
    took = max(receiver.at(f"/{n}")[0].at for n in gone) - killed
    print(f"kill -9 to delivery by the other instance: {took:.2f} s (lease {LEASE_S} s)")
    assert took < 2 * LEASE_S
    assert all(pid == b.pid for pid in (await owners(postgres_url)).values())


async def test_a_frozen_owner_is_fenced_stops_and_the_new_owner_delivers_in_order(
    receiver: Receiver,
    postgres_url: str,
    cluster: MakeCluster,
    session: aiohttp.ClientSession,
) -> None:
    a, b = cluster({"acme": tenant(receiver.url("/acme"), retry_base=0.05)}, 2)
    await start_all([a, b])
    leases = await spread(postgres_url, [a, b], 1)
    owner, other = (a, b) if leases["acme"] == a.pid else (b, a)
    arrived, answer = asyncio.Event(), asyncio.Event()

    async def failing_late(request: web.Request) -> web.Response:
        arrived.set()
        await answer.wait()
        return web.Response(status=500, text="no")

    # The owner's first attempt hangs at the receiver; the owner is frozen meanwhile.
    receiver.script("/acme", failing_late)
    status, body = await ingest(session, other, "acme", items("first", 1))
    assert status == 202, body
    await asyncio.wait_for(arrived.wait(), 5)
    owner.signal(signal.SIGSTOP)
    try:
        # Past its lease, the other instance claims the tenant and sends the head again.
        await wait_for(lambda: len(receiver.at("/acme")) == 1, timeout=3 * LEASE_S)
        status, body = await ingest(session, other, "acme", items("second", 2))
        assert status == 202, body
        await wait_for(lambda: receiver.sequences("/acme") == [1, 2, 3], timeout=2 * LEASE_S)
        # The frozen owner's request is answered now (a failure it would record), then it
        # wakes up: the failure's record carries its old fencing token.
        answer.set()
        await wait_for(lambda: len(receiver.at("/acme")) == 4, timeout=5)
    finally:
        owner.signal(signal.SIGCONT)

    def lost() -> list[dict[str, Any]]:
        return [e for e in owner.events() if e.get("event") == "lease_lost"]

    await wait_for(lost, timeout=2 * LEASE_S)
    assert all(e["tenant"] == "acme" for e in lost())
    # Nothing of the stale owner's was recorded: no failure, no attempt counted.
    conn = await asyncpg.connect(postgres_url)
    try:
        state = await conn.fetchrow("SELECT * FROM tenant_state WHERE tenant = 'acme'")
        failures = await conn.fetchval("SELECT count(*) FROM failures WHERE tenant = 'acme'")
    finally:
        await conn.close()
    assert state is not None
    assert (state["acked_sequence"], state["attempts"], failures) == (3, 0, 0)
    # It stopped delivering acme: what comes next is delivered once, by the new owner.
    status, body = await ingest(session, owner, "acme", items("third", 2))
    assert status == 202, body
    await wait_for(lambda: receiver.sequences("/acme")[-2:] == [4, 5], timeout=2 * LEASE_S)
    await asyncio.sleep(LEASE_S)
    # (In the order answered: the frozen owner's 500 came after the new owner's 2 and 3.)
    assert receiver.sequences("/acme", ok_only=False) == [1, 2, 3, 1, 4, 5]
    assert (await owners(postgres_url))["acme"] == other.pid


async def test_sigterm_hands_the_leases_over_at_once(
    receiver: Receiver,
    postgres_url: str,
    cluster: MakeCluster,
    session: aiohttp.ClientSession,
) -> None:
    names = [f"t{n}" for n in range(4)]
    lease = 20.0  # far longer than the test: only a hand-over can move the tenants in time
    a, b = cluster({n: tenant(receiver.url(f"/{n}")) for n in names}, 2, lease_seconds=lease)
    await start_all([a, b])
    leases = await spread(postgres_url, [a, b], len(names))
    gone = sorted(name for name, pid in leases.items() if pid == a.pid)

    stopped = time.monotonic()
    assert await asyncio.to_thread(a.terminate) == 0
    for name in gone:
        status, body = await ingest(session, b, name, items(name, 1))
        assert status == 202, body
    await wait_for(lambda: all(receiver.at(f"/{n}") for n in gone), timeout=lease / 2)
    took = max(receiver.at(f"/{n}")[0].at for n in gone) - stopped
    print(f"SIGTERM to delivery by the other instance: {took:.2f} s (lease {lease} s)")
    assert any(e.get("event") == "leases_released" for e in a.events())


# -- the database restarted under running instances ----------------------------------------------


class Notifications:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET, read by a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []  # (monotonic, fields)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def since(self, at: float) -> list[dict[str, str]]:
        return [fields for when, fields in list(self.messages) if when >= at]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notifications(tmp_path: Path) -> Iterator[list[Notifications]]:
    made = [Notifications(tmp_path / f"notify{n}.sock") for n in range(2)]
    yield made
    for notify in made:
        notify.close()


async def test_a_postgres_restart_pauses_and_resumes_every_instance_with_health_told_truly(
    receiver: Receiver,
    postgres_server: PostgresServer,
    postgres_url: str,
    cluster: MakeCluster,
    session: aiohttp.ClientSession,
    notifications: list[Notifications],
) -> None:
    names = [f"t{n}" for n in range(4)]
    instances = cluster(
        {n: tenant(receiver.url(f"/{n}")) for n in names},
        2,
        env=lambda n: {
            "NOTIFY_SOCKET": str(notifications[n].path),
            "WATCHDOG_USEC": "1000000",  # a ping every half second while it is alive
        },
    )
    await start_all(instances)
    await spread(postgres_url, instances, len(names))
    acked: dict[str, list[int]] = {n: [] for n in names}

    async def send(round_: str) -> list[int]:
        """One webhook per tenant, alternating instances: the statuses answered."""
        statuses = []
        for k, name in enumerate(names):
            status, body = await ingest(session, instances[k % 2], name, items(round_, 1))
            statuses.append(status)
            if status == 202:
                acked[name].append(body["webhooks"][0]["sequence"])
            else:
                assert status == 503, body
                assert body["error"] == "unavailable"
                assert "is unreachable" in body["detail"], body
                assert body["detail"].startswith("nothing was queued: the database "), body
        return statuses

    assert await send("before") == [202] * 4
    await wait_for(lambda: all(receiver.sequences(f"/{n}") == [1] for n in names), timeout=5)

    await asyncio.to_thread(postgres_server.stop)
    down = time.monotonic()
    try:

        async def refused() -> bool:
            return await send("during") == [503] * 4

        await wait_for(refused, timeout=10, interval=0.1)
        for instance in instances:
            async with session.get(f"{instance.base}/healthz") as response:
                assert response.status == 503
                body = await response.json()
            assert body["error"] == "unhealthy"
            assert "is unreachable" in body["detail"], body
        # The watchdog goes on being fed: the process lives, and waits for the database
        # (a restart by systemd would not bring it back); STATUS= says what is wrong.
        await asyncio.sleep(2.5)
        for notify in notifications:
            during = notify.since(down + 1.0)
            assert sum("WATCHDOG" in m for m in during) >= 3, during
            assert any("is unreachable" in m.get("STATUS", "") for m in during), during
    finally:
        await asyncio.to_thread(postgres_server.start)
    up = time.monotonic()

    async def accepted() -> bool:
        return await send("after") == [202] * 4

    await wait_for(accepted, timeout=15, interval=0.2)
    for instance in instances:
        assert instance.proc is not None and instance.proc.poll() is None, instance.log()[-2000:]

        async def healthy(base: str = instance.base) -> bool:
            async with session.get(f"{base}/healthz") as response:
                return response.status == 200

        await wait_for(healthy, timeout=10, interval=0.2)

    # Delivery resumed by itself, in order, nothing lost.
    def caught_up() -> bool:
        return all(
            list(dict.fromkeys(receiver.sequences(f"/{n}"))) == list(range(1, max(acked[n]) + 1))
            for n in names
        )

    await wait_for(caught_up, timeout=4 * LEASE_S)
    await asyncio.sleep(1.0)
    for notify in notifications:
        last = [m for m in notify.since(up) if "STATUS" in m][-1]
        assert "database" not in last["STATUS"], last
    print(json.dumps({n: receiver.sequences(f"/{n}", ok_only=False) for n in names}))


# -- a frozen instance in the middle of a transaction --------------------------------------------


async def holding_locks_idle(url: str, role: str, pid: int) -> bool:
    """Whether an instance's session (`writer`, `cluster`) is idle inside a transaction
    that has written or locked rows already (it has a transaction id)."""
    conn = await asyncpg.connect(url)
    try:
        found: bool = await conn.fetchval(
            """SELECT EXISTS (SELECT FROM pg_stat_activity WHERE application_name LIKE $1
                              AND state = 'idle in transaction' AND backend_xid IS NOT NULL)""",
            f"webhookd {role} % pid {pid}",
        )
        return found
    finally:
        await conn.close()


async def test_an_instance_frozen_inside_a_transaction_holds_up_the_others_no_longer_than_a_lease(
    receiver: Receiver,
    postgres_url: str,
    cluster: MakeCluster,
    session: aiohttp.ClientSession,
) -> None:
    """SIGSTOP may catch a writer between two statements of a group commit: its locks on the
    tenants' counters (and leases) stay with the frozen session. The server ends such a
    session after lease_seconds idle in its transaction, so ingest through the others goes
    on; the frozen instance's group is rolled back, and it reconnects when it wakes."""
    a, b = cluster({"acme": tenant(receiver.url("/acme"))}, 2)
    await start_all([a, b])
    stop = asyncio.Event()

    async def produce() -> None:
        while not stop.is_set():
            try:
                await ingest(session, a, "acme", items("load", 20))
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.05)

    producing = [asyncio.create_task(produce()) for _ in range(4)]
    caught = False
    try:
        for _ in range(200):  # until a freeze lands between two statements of a commit
            await asyncio.sleep(0.05)
            a.signal(signal.SIGSTOP)
            await asyncio.sleep(0.05)
            if await holding_locks_idle(postgres_url, "writer", a.pid):
                caught = True
                break
            a.signal(signal.SIGCONT)
        assert caught, "no freeze landed inside a transaction"
        stop.set()
        frozen = time.monotonic()
        status, body = await asyncio.wait_for(ingest(session, b, "acme", items("b", 1)), 15)
        took = time.monotonic() - frozen
        print(f"ingest through the other instance waited {took:.2f} s (lease {LEASE_S} s)")
        assert status == 202, body
        assert took < 2 * LEASE_S
    finally:
        stop.set()
        a.signal(signal.SIGCONT)
        for task in producing:
            task.cancel()
        await asyncio.gather(*producing, return_exceptions=True)

    async def accepted() -> bool:
        try:
            status, _ = await ingest(session, a, "acme", items("again", 1))
        except (aiohttp.ClientError, TimeoutError):
            return False
        return status == 202

    await wait_for(accepted, timeout=10, interval=0.2)  # the woken instance reconnected
    assert a.proc is not None and a.proc.poll() is None
