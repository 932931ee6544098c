"""The PostgreSQL engine against a real server: what only it has. Its session settings, its
schema version and the migration lock, two stores sharing one database, a failed statement
that fails alone, and the server going away and coming back.

The behaviour every engine shares is tests/test_store_contract.py, which runs on PostgreSQL
too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import asyncpg
import pytest
from structlog.testing import capture_logs

from tests.conftest import wait_for
from tests.postgres import PostgresServer
from tests.test_store_contract import (
    AT,
    DAY,
    OK,
    new,
    prune,
    queued,
    reads_an_old_history_in_the_new_shape,
    sequences,
)
from webhookd.config import PostgresURL
from webhookd.records import (
    Delivered,
    HistoryQuery,
    HistorySize,
    IngestResult,
    PruneResult,
    SchemaTooNew,
    StoreError,
    TenantRecord,
    Webhook,
)
from webhookd.store import make_store
from webhookd.store.postgres import SCHEMA_VERSION, PostgresStore
from webhookd.store.postgres.schema import MIGRATIONS, migrate
from webhookd.store.postgres.writes import PRUNE_LOCK
from webhookd.store.sqlite import SqliteStore

Records = dict[str, TenantRecord]
OpenStore = Callable[..., Awaitable[tuple[PostgresStore, Records]]]


@pytest.fixture
def database(postgres_url: str) -> PostgresURL:
    return PostgresURL(postgres_url)


@pytest.fixture
async def open_store(database: PostgresURL) -> AsyncIterator[OpenStore]:
    """Open a PostgresStore on the test's database; every one opened is closed at teardown."""
    opened: list[PostgresStore] = []

    async def open_(
        durability: Literal["full", "normal"] = "full",
    ) -> tuple[PostgresStore, Records]:
        store = PostgresStore(database, durability=durability)
        opened.append(store)
        records = await store.open()
        return store, {record.name: record for record in records}

    yield open_
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> PostgresStore:
    store, records = await open_store()
    assert records == {}
    return store


async def sql(database: PostgresURL, query: str, *args: Any) -> list[asyncpg.Record]:
    """A query on a session of its own, as an operator's psql would run it."""
    conn = await asyncpg.connect(database.url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def sessions(database: PostgresURL) -> list[str]:
    """The roles of webhookd's sessions on the database: writer, reader, cluster."""
    rows = await sql(
        database,
        """SELECT application_name FROM pg_stat_activity
           WHERE datname = current_database() AND application_name LIKE 'webhookd %'""",
    )
    return sorted(row["application_name"].split()[1] for row in rows)


# -- opening -------------------------------------------------------------------------------------


def test_make_store_picks_the_engine_for_the_database(
    database: PostgresURL, tmp_path: Path
) -> None:
    assert isinstance(make_store(database, "normal"), PostgresStore)
    assert isinstance(make_store(tmp_path / "webhookd.db"), SqliteStore)


@pytest.mark.parametrize(("durability", "synchronous"), [("full", "on"), ("normal", "off")])
async def test_durability_is_the_writers_synchronous_commit(
    open_store: OpenStore,
    database: PostgresURL,
    durability: Literal["full", "normal"],
    synchronous: str,
) -> None:
    store, _ = await open_store(durability)
    assert await store.setting("synchronous_commit") == synchronous
    await store.ping()  # the readers connect on demand
    # One session writes, the readers beside it (a daemon's cluster session joins later).
    assert await sessions(database) == ["reader", "writer"]


async def test_the_schema_is_created_once_and_versioned(
    store: PostgresStore, open_store: OpenStore, database: PostgresURL
) -> None:
    await store.enqueue("acme", [new()], AT)
    await store.close()
    store, records = await open_store()
    rows = await sql(database, "SELECT version FROM webhookd_schema")
    assert [row["version"] for row in rows] == list(range(1, SCHEMA_VERSION + 1))
    tables = await sql(
        database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
    )
    assert [row["tablename"] for row in tables] == [
        "api_tenants",
        "counters",
        "deliveries",
        "failed_attempts",
        "failures",
        "history",
        "instances",
        "leases",
        "parked",
        "replays",
        "tenant_state",
        "webhook_ids",
        "webhookd_schema",
        "webhooks",
    ]
    assert records["acme"].row.last_sequence == 1
    assert await queued(store, "acme") == [1]


async def test_a_newer_schema_is_refused_and_left_untouched(
    database: PostgresURL, open_store: OpenStore
) -> None:
    await sql(database, "CREATE TABLE from_the_future (x integer)")
    await sql(database, "CREATE TABLE webhookd_schema (version integer PRIMARY KEY)")
    await sql(database, f"INSERT INTO webhookd_schema VALUES ({SCHEMA_VERSION + 1})")
    with pytest.raises(SchemaTooNew) as caught:
        await open_store()
    assert str(caught.value) == (
        f"the database schema is version {SCHEMA_VERSION + 1}, newer than this webhookd "
        f"understands ({SCHEMA_VERSION}); run a newer webhookd"
    )
    tables = await sql(database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert sorted(row["tablename"] for row in tables) == ["from_the_future", "webhookd_schema"]
    assert await sessions(database) == []  # and it let go of the database


async def test_a_version_2_database_keeps_its_counters_when_they_move_to_their_own_table(
    database: PostgresURL, open_store: OpenStore
) -> None:
    conn = await asyncpg.connect(database.url)
    try:
        await conn.execute(
            "CREATE TABLE webhookd_schema (version integer PRIMARY KEY, applied_at timestamptz)"
        )
        for version, statements in MIGRATIONS:
            if version <= 2:
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO webhookd_schema (version) VALUES ($1)", version)
        await conn.execute(
            "INSERT INTO tenant_state (tenant, last_sequence, acked_sequence) VALUES ('acme', 5, 3)"
        )
        await conn.execute(
            """INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data)
               VALUES ('acme', 4, 'a4', 'E', 0, '{}'), ('acme', 5, 'a5', 'E', 0, '{}')"""
        )
    finally:
        await conn.close()
    store, records = await open_store()
    assert (records["acme"].row.last_sequence, records["acme"].row.acked_sequence) == (5, 3)
    assert sequences(await store.enqueue("acme", [new()], AT)) == [6]
    assert await queued(store, "acme") == [4, 5, 6]


async def test_a_version_3_database_upgrades_in_place_and_keeps_its_data(
    database: PostgresURL, open_store: OpenStore
) -> None:
    conn = await asyncpg.connect(database.url)
    try:
        await conn.execute(
            "CREATE TABLE webhookd_schema (version integer PRIMARY KEY, applied_at timestamptz)"
        )
        for version, statements in MIGRATIONS:
            if version <= 3:
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO webhookd_schema (version) VALUES ($1)", version)
        await conn.execute(
            """INSERT INTO counters (tenant, last_sequence) VALUES ('acme', 4);
               INSERT INTO tenant_state (tenant, acked_sequence, attempts) VALUES ('acme', 2, 3);
               INSERT INTO leases (tenant) VALUES ('acme');
               INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data)
                   VALUES ('acme', 3, 'c', 'E', 30, '{"n": 3}'),
                          ('acme', 4, 'd', 'E', 40, '{}');
               INSERT INTO parked (tenant, sequence, id, event, accepted_at, data, parked_at)
                   VALUES ('acme', 2, 'b', 'E', 20, '{}', 25);
               INSERT INTO webhook_ids (tenant, id, sequence)
                   VALUES ('acme', 'a', 1), ('acme', 'b', 2), ('acme', 'c', 3);
               INSERT INTO failures (tenant, at, attempt, first_sequence, last_sequence,
                   count, status, error, duration_ms)
                   VALUES ('acme', 31, 3, 3, 3, 1, 503, 'HTTP 503', 1.5)"""
        )
    finally:
        await conn.close()
    before = time.time()
    store, records = await open_store()
    acme = records["acme"]
    assert (acme.row.last_sequence, acme.row.acked_sequence, acme.row.attempts) == (4, 2, 3)
    assert (acme.parked, [f.error for f in acme.failures]) == (1, ["HTTP 503"])
    assert await queued(store, "acme") == [3, 4]
    rows = await sql(database, "SELECT version FROM webhookd_schema ORDER BY version")
    assert [row["version"] for row in rows] == [1, 2, 3, 4, 5, 6] and SCHEMA_VERSION == 6
    times = {
        row["id"]: row["accepted_at"]
        for row in await sql(database, "SELECT id, accepted_at FROM webhook_ids")
    }
    assert (times["b"], times["c"]) == (20.0, 30.0)  # from the webhook where it still is
    assert before - 1 <= times["a"] <= time.time() + 1  # gone: the upgrade's time
    results = await store.enqueue("acme", [new("a"), new("c"), new("e")], AT)
    assert [(r.status, r.sequence) for r in results] == [
        ("duplicate", 1),
        ("duplicate", 3),
        ("queued", 5),
    ]
    # The history starts empty, and works.
    assert await store.history_size() == HistorySize(0, 0, 0)
    await store.acknowledge("acme", 3, AT, Delivered(200, 1.0, 4))
    [record] = await store.history("acme", HistoryQuery())
    assert (record.sequence, record.id, record.data, record.attempts) == (3, "c", '{"n": 3}', 4)
    assert (await store.find_webhook("acme", "b")).place == "parked"


async def test_a_version_4_database_keeps_its_history_in_the_new_shape(
    database: PostgresURL, open_store: OpenStore
) -> None:
    """Version 5 keeps a delivered webhook's row where it is (one deliveries row says how it
    went) instead of a copy in `history`: the delivered records of a version 4 database
    move there, payload, missing payload and replay link included; the other outcomes'
    records stay; listing, lookup, replay and the size read the same as before."""
    conn = await asyncpg.connect(database.url)
    try:
        await conn.execute(
            "CREATE TABLE webhookd_schema (version integer PRIMARY KEY, applied_at timestamptz)"
        )
        for version, statements in MIGRATIONS:
            if version <= 4:
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO webhookd_schema (version) VALUES ($1)", version)
        await conn.execute(
            """INSERT INTO counters (tenant, last_sequence) VALUES ('acme', 5);
               INSERT INTO tenant_state (tenant, acked_sequence, history_records,
                   history_bytes) VALUES ('acme', 3, 3, 300);
               INSERT INTO leases (tenant) VALUES ('acme');
               INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data)
                   VALUES ('acme', 4, 'd', 'E', 40, '{}'), ('acme', 5, 'a', 'E', 10, '{"n": 1}');
               INSERT INTO history VALUES
                   ('acme', 1, 'a', 'E', 10, 11, 'delivered', 1, 200, 5, '{"n": 1}', 5),
                   ('acme', 2, 'b', 'F', 20, 21, 'delivered', 2, 204, 6, NULL, NULL),
                   ('acme', 3, 'c', 'E', 30, 31, 'discarded', 0, NULL, NULL, '{}', NULL);
               INSERT INTO webhook_ids (tenant, id, sequence, accepted_at)
                   VALUES ('acme', 'a', 1, 10), ('acme', 'b', 2, 20)"""
        )
    finally:
        await conn.close()
    store, _ = await open_store()
    rows = await sql(database, "SELECT version FROM webhookd_schema ORDER BY version")
    assert [row["version"] for row in rows] == [1, 2, 3, 4, 5, 6] and SCHEMA_VERSION == 6
    await reads_an_old_history_in_the_new_shape(store)


async def test_two_processes_migrating_at_once_migrate_once(database: PostgresURL) -> None:
    """The migration lock: the second waits for the first, then finds the work done."""
    conns = [await asyncpg.connect(database.url) for _ in range(3)]
    try:
        await asyncio.gather(*(migrate(conn) for conn in conns))
    finally:
        for conn in conns:
            await conn.close()
    rows = await sql(database, "SELECT version FROM webhookd_schema")
    assert [row["version"] for row in rows] == list(range(1, SCHEMA_VERSION + 1))


async def test_an_unreachable_server_is_a_one_sentence_error(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.database_url("postgres").replace(
        f":{postgres_server.port}/", ":1/"
    )  # nothing listens on port 1
    store = make_store(PostgresURL(url))
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert str(caught.value) == (
        f"cannot open the database {url} (connection refused); check that PostgreSQL runs "
        "there and that database in [daemon] names it"
    )
    await store.close()


async def test_a_missing_database_is_named(postgres_server: PostgresServer) -> None:
    url = postgres_server.database_url("no_such_db")
    store = make_store(PostgresURL(url))
    with pytest.raises(StoreError, match=r'\(database "no_such_db" does not exist\); create'):
        await store.open()
    await store.close()


# -- several stores on one database -------------------------------------------------------------


async def test_two_stores_on_one_database_share_the_sequence_counters(
    store: PostgresStore, open_store: OpenStore
) -> None:
    other, _ = await open_store()
    firsts = await asyncio.gather(
        *(s.enqueue("acme", [new(), new()], AT) for s in [store, other] * 10)
    )
    sequences = sorted(r.sequence for results in firsts for r in results if r.sequence)
    assert sequences == list(range(1, 41))  # no gaps, no repeats, whoever ingests
    assert await queued(other, "acme") == list(range(1, 41))


async def test_one_instance_prunes_at_a_time_the_others_steps_do_nothing(
    store: PostgresStore, open_store: OpenStore, database: PostgresURL
) -> None:
    """Every instance runs the pruner; a step finding another instance's step under way
    (its transaction's advisory lock) returns at once with nothing done, rather than
    picking the same oldest rows and waiting on their locks."""
    other, _ = await open_store()
    for n in range(5):
        await store.enqueue("acme", [new(f"a{n}")], AT + n * DAY)
    await store.acknowledge("acme", 5, AT + 5 * DAY, OK)
    conn = await asyncpg.connect(database.url)
    try:
        async with conn.transaction():  # a step under way elsewhere
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PRUNE_LOCK)
            skipped = await asyncio.wait_for(prune(other, AT + 9 * DAY, default=5 * DAY), 5)
            assert skipped == PruneResult()
            assert (await other.history_size()).records == 5
    finally:
        await conn.close()
    done = await prune(other, AT + 9 * DAY, default=5 * DAY)
    assert done.by_age == 4  # accepted before AT + 4 days
    assert (await store.history_size()).records == 1


async def test_two_stores_creating_the_same_new_tenants_at_once_both_succeed(
    store: PostgresStore, open_store: OpenStore
) -> None:
    # Each store's group commit creates state rows the other creates at the same moment:
    # a row the other committed after this statement's snapshot must still be locked and
    # read (it was taken as new, then its counter "moved under its lock", and deadlocks
    # followed from the rows locked out of order).
    others = [(await open_store())[0] for _ in range(3)]
    stores = [store, *others]
    names = [f"t{n}" for n in range(12)]
    for round_ in range(4):
        tenants = [f"{name}-{round_}" for name in names]
        with capture_logs() as logs:
            results = await asyncio.gather(
                *(s.enqueue(t, [new(), new()], AT) for t in tenants for s in stores)
            )
        assert all(r.sequence for result in results for r in result)
        # Not even retried one op at a time, as a group that failed would be.
        assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
        for t in tenants:
            assert await queued(store, t) == list(range(1, 9))


async def test_a_tenants_first_ingest_on_two_instances_at_once_is_queued_by_both(
    store: PostgresStore, database: PostgresURL
) -> None:
    """Another instance creates the tenant's row while this one waits to create it too: this
    one's insert then finds the row, which its statement's snapshot predates. It must still
    lock and read it (the counter is 1 by then), not take the counter for 0 and refuse."""
    other = await asyncpg.connect(database.url)
    try:
        # The other instance's first ingest for acme, open until this one waits behind it.
        transaction = other.transaction()
        await transaction.start()
        await other.execute("INSERT INTO counters (tenant, last_sequence) VALUES ('acme', 1)")
        await other.execute("INSERT INTO tenant_state (tenant) VALUES ('acme')")
        await other.execute(
            """INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data)
               VALUES ('acme', 1, 'theirs', 'CHECK_COMPLETED', 0, '{}')"""
        )
        ours = asyncio.create_task(store.enqueue("acme", [new("ours")], AT))

        async def waiting() -> bool:
            rows = await sql(
                database,
                """SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'
                   AND application_name LIKE 'webhookd writer %'""",
            )
            return bool(rows)

        await wait_for(waiting, timeout=10, interval=0.02)
        await transaction.commit()
        assert await asyncio.wait_for(ours, 10) == [IngestResult("ours", 2, "queued")]
    finally:
        await other.close()
    assert [(w.sequence, w.id) for w in await store.read_queue("acme", 0, 10)] == [
        (1, "theirs"),
        (2, "ours"),
    ]


# -- a failed statement --------------------------------------------------------------------------


async def test_a_write_the_server_refuses_fails_alone_and_takes_nothing(
    store: PostgresStore, open_store: OpenStore
) -> None:
    calls: list[tuple[str, list[Webhook]]] = []
    store.on_enqueued = lambda tenant, webhooks: calls.append((tenant, list(webhooks)))
    await store.enqueue("acme", [new("first")], AT)
    calls.clear()
    commits = store.commits

    # PostgreSQL text cannot hold a NUL character: the server refuses that statement.
    outcomes = await asyncio.gather(
        store.enqueue("acme", [new("bad", '{"x": "\x00"}'), new()], AT),
        store.enqueue("beta", [new("small")], AT),  # committed with it at first
        store.acknowledge("acme", 1, AT + 1),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], StoreError)
    assert str(outcomes[0]).startswith("database error: invalid byte sequence")
    assert outcomes[1] == [IngestResult("small", 1, "queued")]
    assert outcomes[2] is None
    # The group failed, then each write ran on its own: two of them committed.
    assert store.commits == commits + 2
    assert calls == [("beta", [Webhook(1, "small", "CHECK_COMPLETED", AT, "{}")])]
    assert await queued(store, "acme") == []

    # Nothing of the refused write remains: no sequence taken, no id remembered.
    assert await store.enqueue("acme", [new("bad")], AT) == [IngestResult("bad", 2, "queued")]
    store, records = await reopen(store, open_store)
    assert (records["acme"].row.last_sequence, records["acme"].row.acked_sequence) == (2, 1)


async def reopen(store: PostgresStore, open_store: OpenStore) -> tuple[PostgresStore, Records]:
    await store.close()
    return await open_store(durability=store.durability)


# -- the server going away -----------------------------------------------------------------------


async def test_while_the_server_is_down_writes_fail_and_it_is_used_again_once_back(
    store: PostgresStore, postgres_server: PostgresServer, database: PostgresURL
) -> None:
    assert sequences(await store.enqueue("acme", [new("a")], AT)) == [1]
    with capture_logs() as logs:
        await asyncio.to_thread(postgres_server.stop)
        with pytest.raises(StoreError) as caught:
            await store.enqueue("acme", [new("b")], AT)
        assert str(caught.value).startswith(f"the database {database} is unreachable (")
        assert str(caught.value).endswith("; webhookd reconnects by itself once it answers")
        with pytest.raises(StoreError, match="is unreachable"):
            await store.acknowledge("acme", 1, AT)
        with pytest.raises(StoreError, match="is unreachable"):
            await store.ping()
        with pytest.raises(StoreError, match="is unreachable"):
            await store.read_queue("acme", 0, 10)

        await asyncio.to_thread(postgres_server.start)

        async def written() -> bool:
            try:
                await store.enqueue("acme", [new("b")], AT)
            except StoreError:
                return False
            return True

        await wait_for(written, timeout=10, interval=0.1)
    events = [entry["event"] for entry in logs if entry["event"].startswith("database_")]
    assert events == ["database_unreachable", "database_reconnected"]
    await store.ping()
    # Nothing was lost, and the refused write took no sequence.
    assert [(w.sequence, w.id) for w in await store.read_queue("acme", 0, 10)] == [
        (1, "a"),
        (2, "b"),
    ]
    assert await sessions(database) == ["reader", "writer"]


async def test_a_session_ended_by_an_operator_is_replaced(
    store: PostgresStore, database: PostgresURL
) -> None:
    await store.enqueue("acme", [new()], AT)
    await sql(
        database,
        """SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
           WHERE application_name LIKE 'webhookd writer %'""",
    )

    async def written() -> bool:
        try:
            await store.enqueue("acme", [new()], AT)
        except StoreError:
            return False
        return True

    await wait_for(written, timeout=10, interval=0.05)
    assert await queued(store, "acme") == [1, 2]  # and a reader connects
    assert await sessions(database) == ["reader", "writer"]
