"""The daemon on PostgreSQL, in-process with a real receiver: delivery in order, batched and
unbatched; a restart that keeps every tenant's state; the server going away and coming back
with nothing lost."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Daemon, Receiver, tenant, wait_for, write_config
from tests.postgres import PostgresServer
from webhookd import config as config_mod
from webhookd.config import Config, PostgresURL
from webhookd.serve import Server
from webhookd.service import Service

EVENT = "CHECK_COMPLETED"

StartDaemon = Callable[[Config], Awaitable[Daemon]]


def on_postgres(path: Path, url: str) -> Config:
    """The configuration at `path`, with `database` pointing at PostgreSQL."""
    loaded = config_mod.load(path)
    daemon = dataclasses.replace(loaded.daemon, database=PostgresURL(url))
    return dataclasses.replace(loaded, daemon=daemon)


@pytest.fixture
async def start_daemon() -> AsyncIterator[StartDaemon]:
    """Start an in-process daemon from a configuration; stopped at teardown (once)."""
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


def items(prefix: str, count: int) -> list[dict[str, Any]]:
    return [{"event": EVENT, "id": f"{prefix}-{n}", "data": {"n": n}} for n in range(count)]


async def test_delivers_in_order_and_a_restart_keeps_every_tenants_state(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_daemon: StartDaemon
) -> None:
    receiver.always("/down", 503)
    path = write_config(
        tmp_path,
        {
            "one": tenant(receiver.url("/one")),
            "many": tenant(receiver.url("/many"), batching=True, batch_size=4, batch_window=0.2),
            "down": tenant(receiver.url("/down"), retry_base=60.0),
            "held": tenant(receiver.url("/held")),
        },
    )
    config = on_postgres(path, postgres_url)
    daemon = await start_daemon(config)

    for chunk in range(3):
        await daemon.ingest("one", items(f"one{chunk}", 3))
        await daemon.ingest("many", items(f"many{chunk}", 5))
    await wait_for(lambda: len(receiver.sequences("/one")) == 9, timeout=10)
    await wait_for(lambda: len(receiver.sequences("/many")) == 15, timeout=10)
    assert receiver.sequences("/one") == list(range(1, 10))
    assert all(len(r.webhooks) == 1 for r in receiver.at("/one"))
    assert receiver.sequences("/many") == list(range(1, 16))
    batches = [[w["sequence"] for w in r.webhooks] for r in receiver.at("/many")]
    assert max(len(b) for b in batches) == 4
    assert all(b == list(range(b[0], b[0] + len(b))) for b in batches)

    # Backoff: one failure recorded, the next attempt a minute away.
    await daemon.ingest("down", items("down", 1))

    async def failed_once() -> dict[str, Any] | None:
        status = await daemon.status("down")
        return status if status["attempts"] == 1 else None

    down = await wait_for(failed_once, timeout=10)
    # Paused, with a parked webhook and one waiting behind it.
    status, _ = await daemon.request("POST", "/v1/tenants/held/pause")
    assert status == 200
    await daemon.ingest("held", items("held", 2))
    status, body = await daemon.request("POST", "/v1/tenants/held/skip")
    assert (status, body["parked"]) == (200, {"id": "held-0", "sequence": 1})
    held = await daemon.status("held")

    await daemon.server.stop()
    daemon = await start_daemon(config)

    after = await daemon.status("down")
    assert (after["attempts"], after["queue"]) == (1, "stalled")
    assert after["next_attempt_at"] == down["next_attempt_at"]
    assert after["recent_failures"] == down["recent_failures"]
    after = await daemon.status("held")
    assert (after["paused"], after["waiting"], after["parked"]) == (True, 1, 1)
    kept = ("queue", "paused", "waiting", "parked", "attempts", "next_attempt_at")
    assert {key: after[key] for key in kept} == {key: held[key] for key in kept}
    status, body = await daemon.request("GET", "/v1/tenants/held/parked")
    assert [(p["id"], p["sequence"]) for p in body["parked"]] == [("held-0", 1)]

    # Sequences go on from where they were, and delivery with them.
    [answer] = (await daemon.ingest("one", items("again", 1)))["webhooks"]
    assert answer["sequence"] == 10
    answers = (await daemon.ingest("many", items("again", 4)))["webhooks"]
    assert [a["sequence"] for a in answers] == [16, 17, 18, 19]
    # A duplicate from before the restart is still one.
    [duplicate] = (await daemon.ingest("one", items("one0", 1)))["webhooks"]
    assert (duplicate["status"], duplicate["sequence"]) == ("duplicate", 1)
    await wait_for(lambda: len(receiver.sequences("/one")) == 10, timeout=10)
    await wait_for(lambda: len(receiver.sequences("/many")) == 19, timeout=10)
    assert receiver.sequences("/one") == list(range(1, 11))
    assert receiver.sequences("/many") == list(range(1, 20))
    assert receiver.at("/held") == []


async def test_a_database_outage_refuses_ingest_and_loses_nothing(
    tmp_path: Path,
    receiver: Receiver,
    postgres_server: PostgresServer,
    postgres_url: str,
    start_daemon: StartDaemon,
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    daemon = await start_daemon(on_postgres(path, postgres_url))
    await daemon.ingest("acme", items("before", 3))
    await wait_for(lambda: len(receiver.sequences("/acme")) == 3, timeout=10)

    # Queued while the endpoint fails: these wait in the database when it goes away.
    receiver.always("/acme", 503)
    await daemon.ingest("acme", items("queued", 3))
    await wait_for(lambda: len(receiver.at("/acme")) > 3, timeout=10)

    await asyncio.to_thread(postgres_server.stop)
    status, body = await daemon.request(
        "POST", "/v1/tenants/acme/webhooks", json=items("during", 1)
    )
    assert status == 503, body
    assert body["error"] == "unavailable"
    assert body["detail"].startswith(
        f"nothing was queued: the database {postgres_url} is unreachable ("
    )
    assert body["detail"].endswith("; webhookd reconnects by itself once it answers")
    status, body = await daemon.request("GET", "/healthz")
    assert (status, body["error"]) == (503, "unhealthy")
    # Reads of the database answer the same: 503 to send again, not a 500.
    for route in ("/v1/tenants/acme/parked", "/v1/tenants/acme/webhooks"):
        async with daemon.session.get(daemon.base + route, headers=daemon.headers) as answer:
            body = await answer.json()
            assert (answer.status, body["error"]) == (503, "unavailable"), (route, body)
            assert answer.headers["Retry-After"] == "1"
            assert postgres_url in body["detail"]
    # The metrics say so too: what the database-unreachable and 5xx alerts watch.
    status, text = await daemon.request("GET", "/metrics")
    assert status == 200
    assert "\nwebhookd_healthy 0.0\n" in text
    assert 'webhookd_ingest_responses_total{code="503"} 1.0\n' in text
    # The endpoint comes back while the database is still away: deliveries go on, and
    # their outcomes wait to be recorded.
    receiver.always("/acme", 200)
    await asyncio.sleep(0.5)

    await asyncio.to_thread(postgres_server.start)

    async def accepted() -> bool:
        status, _ = await daemon.request(
            "POST", "/v1/tenants/acme/webhooks", json=items("after", 2)
        )
        return status == 202

    await wait_for(accepted, timeout=10, interval=0.2)
    status, _ = await daemon.request("GET", "/healthz")
    assert status == 200
    assert "\nwebhookd_healthy 1.0\n" in (await daemon.request("GET", "/metrics"))[1]

    async def drained() -> bool:
        return bool((await daemon.status("acme"))["waiting"] == 0)

    await wait_for(drained, timeout=60, interval=0.2)
    delivered = receiver.sequences("/acme")
    assert delivered == list(range(1, 9)), delivered
    ids = [w["id"] for r in receiver.at("/acme", ok_only=True) for w in r.webhooks]
    expected = [f"before-{n}" for n in range(3)] + [f"queued-{n}" for n in range(3)]
    assert ids == [*expected, "after-0", "after-1"]
