"""`webhookd migrate --to postgresql://…`: an SQLite database made by a real daemon copied
into an empty PostgreSQL one, and a daemon on PostgreSQL carrying on where the SQLite one
stopped; the refusals (a target holding webhookd data, a daemon still running, no SQLite
database)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import Daemon, Receiver, tenant, wait_for, write_config
from tests.test_operator import run_cli
from webhookd import config as config_mod
from webhookd import migrate
from webhookd.config import Config, PostgresURL
from webhookd.records import (
    Delivered,
    Failure,
    FoundWebhook,
    HistoryPolicy,
    HistoryQuery,
    HistorySize,
    NewWebhook,
    ReplaySelection,
)
from webhookd.serve import Server
from webhookd.service import Service
from webhookd.store.postgres import PostgresStore
from webhookd.store.sqlite import SqliteStore

EVENT = "CHECK_COMPLETED"
AT = 1764086400.0

Start = Callable[[Config], Awaitable[Daemon]]

# What a tenant's status keeps across the move. Not the clock's `seconds_since…`, nor
# `oldest_waiting_at`: a daemon knows it once it reads the queue's head again, which a tenant
# paused or backing off does not do at start (peek shows the queue, with when each came).
KEPT = (
    "paused",
    "queue",
    "waiting",
    "last_processed_at",
    "attempts",
    "next_attempt_at",
    "parked",
    "recent_failures",
)


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start an in-process daemon from a configuration; stopped at teardown (once)."""
    started: list[Daemon] = []
    session = aiohttp.ClientSession()

    async def run(config: Config) -> Daemon:
        server = Server(Service(config))
        await server.start()
        daemon = Daemon(server, session)
        started.append(daemon)
        return daemon

    yield run
    for daemon in started:
        await daemon.server.stop()  # idempotent: a test may have stopped it already
    await session.close()


def on_postgres(path: Path, url: str) -> Config:
    loaded = config_mod.load(path)
    return dataclasses.replace(
        loaded, daemon=dataclasses.replace(loaded.daemon, database=PostgresURL(url))
    )


def kept(status: dict[str, Any]) -> dict[str, Any]:
    return {key: status[key] for key in KEPT}


def items(*ids: str) -> list[dict[str, Any]]:
    return [{"event": EVENT, "id": webhook_id, "data": {"id": webhook_id}} for webhook_id in ids]


async def test_a_migrated_database_carries_on_on_postgresql(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start: Start
) -> None:
    receiver.always("/acme", 503)
    path = write_config(
        tmp_path,
        {
            "acme": tenant(receiver.url("/acme"), retry_base=60.0),  # backing off
            "held": tenant(receiver.url("/held")),  # paused, one webhook parked
            "done": tenant(receiver.url("/done")),  # everything delivered
        },
    )
    sqlite = await start(config_mod.load(path))

    await sqlite.ingest("acme", items("a-1", "a-2", "a-3"))
    await wait_for(lambda: len(receiver.at("/acme")) == 1, timeout=5)
    assert (await sqlite.request("POST", "/v1/tenants/acme/retry"))[0] == 200
    await wait_for(lambda: len(receiver.at("/acme")) == 2, timeout=5)
    await wait_for(lambda: sqlite.service.workers["acme"].row.attempts == 2, timeout=5)

    assert (await sqlite.request("POST", "/v1/tenants/held/pause"))[0] == 200
    await sqlite.ingest("held", items("h-1", "h-2", "h-3"))
    assert (await sqlite.request("POST", "/v1/tenants/held/skip"))[0] == 200

    await sqlite.ingest("done", items("d-1", "d-2"))
    await wait_for(lambda: receiver.sequences("/done") == [1, 2], timeout=5)
    await wait_for(lambda: sqlite.service.workers["done"].waiting == 0, timeout=5)

    before = {name: kept(await sqlite.status(name)) for name in ("acme", "held", "done")}
    queues = {name: await sqlite.request("GET", f"/v1/tenants/{name}/webhooks") for name in before}
    assert before["acme"]["attempts"] == 2 and len(before["acme"]["recent_failures"]) == 2
    assert before["held"]["paused"] and before["held"]["parked"] == 1
    await sqlite.server.stop()

    # The password never shows, wherever it came from.
    with_password = postgres_url.replace("postgres@", "postgres:hunter2@", 1)
    code, out, err = await run_cli("migrate", "-c", str(path), "--to", with_password)
    assert (code, err) == (0, ""), err
    assert "hunter2" not in out
    assert f"copied {tmp_path / 'webhookd.db'} into {postgres_url}:" in out
    for line in (
        "3 tenants",
        "5 queued webhooks",  # acme's 3 and held's 2
        "1 parked webhook",
        "8 producer ids",
        "2 recent failures",
        "2 failed attempts kept",
    ):
        assert f"  {line}\n" in out
    assert re.search(r"\n  [1-9]\d* history records?\n", out), out
    assert f'next: set database = "{postgres_url}" in [daemon]' in out

    receiver.always("/acme", 200)
    postgres = await start(on_postgres(path, postgres_url))
    after = {name: kept(await postgres.status(name)) for name in ("acme", "held", "done")}
    assert after == before
    assert {
        name: await postgres.request("GET", f"/v1/tenants/{name}/webhooks") for name in before
    } == queues
    assert [w["id"] for w in queues["acme"][1]["webhooks"]] == ["a-1", "a-2", "a-3"]

    # A producer's resend is still a duplicate with its first sequence, delivered or not.
    again = await postgres.ingest("done", items("d-1", "d-3"))
    assert again["webhooks"] == [
        {"id": "d-1", "sequence": 1, "status": "duplicate"},
        {"id": "d-3", "sequence": 3, "status": "queued"},
    ]
    again = await postgres.ingest("acme", items("a-2", "a-4"))
    assert again["webhooks"] == [
        {"id": "a-2", "sequence": 2, "status": "duplicate"},
        {"id": "a-4", "sequence": 4, "status": "queued"},
    ]
    await wait_for(lambda: receiver.sequences("/done") == [1, 2, 3], timeout=5)

    # Delivery resumes in order, after the copied sequences.
    assert (await postgres.request("POST", "/v1/tenants/acme/retry"))[0] == 200
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2, 3, 4], timeout=5)
    assert [r.json["id"] for r in receiver.at("/acme", ok_only=True)] == [
        "a-1",
        "a-2",
        "a-3",
        "a-4",
    ]

    assert (await postgres.request("POST", "/v1/tenants/held/resume"))[0] == 200
    await wait_for(lambda: receiver.sequences("/held") == [2, 3], timeout=5)
    status, parked = await postgres.request("GET", "/v1/tenants/held/parked")
    assert status == 200, parked
    assert [p["id"] for p in parked["parked"]] == ["h-1"]


async def test_refuses_a_target_that_already_holds_webhookd_data(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start: Start
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    daemon = await start(config_mod.load(path))
    await daemon.ingest("acme", items("a-1"))
    await daemon.server.stop()
    code, _, err = await run_cli("migrate", "-c", str(path), "--to", postgres_url)
    assert (code, err) == (0, "")

    code, out, err = await run_cli("migrate", "-c", str(path), "--to", postgres_url)
    assert (code, out) == (1, "")
    assert err == (
        f"error: the database {postgres_url} already holds webhookd data (rows in "
        "tenant_state); migrate copies into an empty database only\n"
    )


async def test_refuses_while_the_daemon_runs_and_leaves_the_target_untouched(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start: Start
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    await start(config_mod.load(path))  # holds the database's lock, as a daemon does

    code, out, err = await run_cli("migrate", "-c", str(path), "--to", postgres_url)
    assert (code, out) == (1, "")
    assert err.startswith(f"error: the database {tmp_path / 'webhookd.db'} is in use by a running ")
    assert err.endswith("; stop the daemon first, then migrate\n")

    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('webhookd_schema')") is None
    finally:
        await conn.close()


async def test_refuses_a_config_whose_sqlite_database_is_missing(
    tmp_path: Path, postgres_url: str
) -> None:
    path = write_config(tmp_path, {}, daemon={"database": "state/none.db"})
    code, out, err = await run_cli("migrate", "-c", str(path), "--to", postgres_url)
    assert (code, out) == (1, "")
    assert err == (
        f"error: there is no SQLite database at {tmp_path / 'state' / 'none.db'} (database in "
        "[daemon] names it): nothing to migrate\n"
    )


async def test_refuses_a_password_given_twice_without_printing_it(
    tmp_path: Path, postgres_url: str
) -> None:
    path = write_config(tmp_path, {})
    with_password = postgres_url.replace("postgres@", "postgres:hunter2@", 1)
    env = {**os.environ, "WEBHOOKD_DATABASE_PASSWORD": "swordfish"}
    code, out, err = await run_cli("migrate", "-c", str(path), "--to", with_password, env=env)
    assert (code, out) == (1, "")
    assert err == (
        "error: the password is given in 2 places (the URL, $WEBHOOKD_DATABASE_PASSWORD); "
        "keep one\n"
    )


async def test_api_tenants_are_copied_into_the_database(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start: Start
) -> None:
    path = write_config(tmp_path, {"main": tenant(receiver.url("/main"))})
    sqlite = await start(config_mod.load(path))
    made = tenant(receiver.url("/acme"), secret="hunter2-tenant", timeout=3.0)
    assert (await sqlite.request("PUT", "/v1/tenants/acme", json=made))[0] == 201
    await sqlite.ingest("acme", items("a-1"))
    await wait_for(lambda: receiver.sequences("/acme") == [1], timeout=5)
    await sqlite.server.stop()

    code, out, err = await run_cli("migrate", "-c", str(path), "--to", postgres_url)
    assert (code, err) == (0, ""), err
    assert "  1 API tenant\n" in out
    assert "hunter2-tenant" not in out
    assert (tmp_path / "tenants.d" / "acme.toml").exists()  # left as it was

    # On PostgreSQL the tenant comes from the database: tenants_dir is no longer read.
    (tmp_path / "tenants.d" / "acme.toml").unlink()
    postgres = await start(on_postgres(path, postgres_url))
    acme = postgres.service.config.tenants["acme"]
    assert acme.from_api and acme.secret.reveal() == "hunter2-tenant"
    assert acme.delivery.timeout == 3.0
    status, shown = await postgres.request("GET", "/v1/tenants/acme")
    assert (status, shown["source"], shown["secret"]) == (200, "api", "***")
    await postgres.ingest("acme", items("a-2"))
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2], timeout=5)
    assert [r.json["secret"] for r in receiver.at("/acme")] == ["hunter2-tenant"] * 2


async def test_the_history_is_copied_with_its_sizes_ids_and_replays(
    tmp_path: Path, postgres_url: str
) -> None:
    """Store to store: what the history holds on SQLite reads the same on PostgreSQL."""
    path = tmp_path / "webhookd.db"
    sqlite = SqliteStore(path)
    await sqlite.open()
    await sqlite.enqueue(
        "acme", [NewWebhook(f"a{n}", EVENT, f'{{"n": {n}}}') for n in range(5)], AT
    )
    await sqlite.record_failure("acme", Failure(AT + 1, 1, 1, 1, 1, 503, "HTTP 503", 2.0), None, 10)
    await sqlite.acknowledge("acme", 2, AT + 2, Delivered(200, 3.5, 2))
    await sqlite.park("acme", 3, AT + 3)
    await sqlite.acknowledge(
        "acme", 4, AT + 4, Delivered(200, 1.0, 1), HistoryPolicy(payloads=False)
    )
    replayed = await sqlite.replay(
        "acme", ReplaySelection(to_sequence=2), AT + 5, limit=10, replay_id="r"
    )
    # beta keeps no history: its producer id is forgotten after the window, and since when
    # ids may be forgotten is copied too.
    await sqlite.enqueue("beta", [NewWebhook("b0", EVENT, "{}")], AT)
    await sqlite.acknowledge("beta", 1, AT + 1, Delivered(200, 1.0, 1), HistoryPolicy(keep=False))
    forgot = await sqlite.prune_history(
        AT + 2 * 86400.0,
        retention={"acme": 30 * 86400.0, "beta": 0.0},
        default_retention=30 * 86400.0,
        max_bytes=None,
        idempotency_window=86400.0,
        step=100,
    )
    assert forgot.ids == 1
    pages = await sqlite.history("acme", HistoryQuery())
    size = await sqlite.history_size()
    found = {i: await sqlite.find_webhook("acme", i) for i in ("a0", "a2", "a3", "zz")}
    beta = await sqlite.find_webhook("beta", "b0")
    assert beta == FoundWebhook("forgotten", forgotten_before=AT + 86400.0)
    await sqlite.close()

    copied = await migrate.run(path, PostgresURL(postgres_url))
    assert (copied.history, copied.failed_attempts, copied.replays, copied.ids) == (4, 1, 1, 5)
    postgres = PostgresStore(PostgresURL(postgres_url))
    await postgres.open()
    try:
        assert await postgres.history("acme", HistoryQuery()) == pages
        assert [r.next_sequence for r in pages] == [None, None, 7, 6]
        assert await postgres.history_size() == size
        assert {i: await postgres.find_webhook("acme", i) for i in found} == found
        assert await postgres.find_webhook("beta", "b0") == beta
        # The delivered records take PostgreSQL's shape (the webhook's row and a deliveries
        # row): listed by outcome, and replayed, from there.
        delivered = HistoryQuery(outcomes=frozenset({"delivered"}))
        assert await postgres.history("acme", delivered) == [
            r for r in pages if r.outcome == "delivered"
        ]
        again = await postgres.replay(
            "acme", ReplaySelection(to_sequence=2), AT, limit=10, dry_run=True
        )
        assert again.count == 2
        assert await postgres.replay("acme", ReplaySelection(), AT, limit=10, replay_id="r") == (
            dataclasses.replace(replayed, repeated=True)
        )
        ids = await asyncpg.connect(postgres_url)
        try:
            assert {r[0] for r in await ids.fetch("SELECT accepted_at FROM webhook_ids")} == {AT}
        finally:
            await ids.close()
        # Pruning on PostgreSQL counts off what SQLite counted.
        step = await postgres.prune_history(
            AT + 30 * 86400.0,
            retention={},
            default_retention=7 * 86400.0,
            max_bytes=None,
            idempotency_window=86400.0,
            step=100,
        )
        assert (step.by_age, step.failures) == (4, 1)
        assert await postgres.history_size() == HistorySize(0, 0, 0)
    finally:
        await postgres.close()
