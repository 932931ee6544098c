"""The SQLite engine against a real file: what only it has. Its pragmas and bounded WAL,
its schema version, a failed commit that changes nothing, and its disk-full mode (ingest
refused, deliveries recorded in place, the rows swept once there is room).

The behaviour every engine shares is tests/test_store_contract.py, which runs on SQLite too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Literal

import pytest

from tests.conftest import wait_for
from tests.test_store_contract import (
    AT,
    failure,
    new,
    queued,
    reads_an_old_history_in_the_new_shape,
)
from webhookd.records import (
    Delivered,
    HistoryPolicy,
    HistoryQuery,
    HistorySize,
    IngestResult,
    SchemaTooNew,
    StoreError,
    TenantRecord,
    Webhook,
)
from webhookd.store.sqlite import SCHEMA_VERSION, SqliteStore
from webhookd.store.sqlite import engine as store_sqlite
from webhookd.store.sqlite.reserve import WAL_PAGES, size_for, wal_limit
from webhookd.store.sqlite.schema import MIGRATIONS

Records = dict[str, TenantRecord]
OpenStore = Callable[..., Awaitable[tuple[SqliteStore, Records]]]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "webhookd.db"


@pytest.fixture
async def open_store(db_path: Path) -> AsyncIterator[OpenStore]:
    """Open a SqliteStore on the test's database file; every one opened is closed at teardown."""
    opened: list[SqliteStore] = []

    async def open_(durability: Literal["full", "normal"] = "full") -> tuple[SqliteStore, Records]:
        store = SqliteStore(db_path, durability=durability)
        opened.append(store)
        records = await store.open()
        return store, {record.name: record for record in records}

    yield open_
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> SqliteStore:
    store, records = await open_store()
    assert records == {}
    return store


async def reopen(store: SqliteStore, open_store: OpenStore) -> tuple[SqliteStore, Records]:
    await store.close()
    return await open_store(durability=store.durability)


async def stored(store: SqliteStore, tenant: str) -> list[int]:
    """Every row the webhooks table holds for the tenant: the queue, the delivered records
    (history kept), and rows an acknowledgement on a full disk left to delete."""

    def read() -> list[int]:
        with contextlib.closing(sqlite3.connect(store.path)) as db:
            rows = db.execute(
                "SELECT sequence FROM webhooks WHERE tenant = ? ORDER BY sequence", (tenant,)
            )
            return [sequence for (sequence,) in rows]

    return await asyncio.to_thread(read)


async def stored_is(store: SqliteStore, tenant: str, expected: list[int]) -> bool:
    return await stored(store, tenant) == expected


# Without history, an acknowledgement deletes what it took (left behind on a full disk);
# with it, the rows stay as the delivered records.
OFF = HistoryPolicy(keep=False)


# -- opening -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("durability", "synchronous"), [("full", 2), ("normal", 1)])
async def test_pragmas_after_open(
    open_store: OpenStore, durability: Literal["full", "normal"], synchronous: int
) -> None:
    store, _ = await open_store(durability)
    assert await store.pragma("journal_mode") == "wal"
    assert await store.pragma("synchronous") == synchronous
    assert await store.pragma("user_version") == SCHEMA_VERSION
    assert await store.pragma("busy_timeout") == 5000
    # The WAL is bounded, which is what the disk-full reserve is sized for.
    page_size = await store.pragma("page_size")
    assert await store.pragma("wal_autocheckpoint") == WAL_PAGES
    assert await store.pragma("journal_size_limit") == wal_limit(page_size)
    reserve = store.path.with_name(store.path.name + "-reserve")
    assert reserve.stat().st_size == size_for(page_size)


async def test_the_wal_stays_bounded_after_a_big_ingest(store: SqliteStore) -> None:
    """A transaction bigger than the bound grows the WAL; it is copied into the database at
    once, and the WAL file is cut back to its bound at the next commit."""
    wal = store.path.with_name(store.path.name + "-wal")
    limit = wal_limit(await store.pragma("page_size"))
    await store.enqueue("acme", [new(data='{"pad": "' + "x" * 10_000 + '"}')] * 300, AT)
    assert wal.stat().st_size > limit
    # Already copied: the database file has every page.
    pages, page_size = await store.pragma("page_count"), await store.pragma("page_size")
    assert store.path.stat().st_size == pages * page_size
    await store.acknowledge("acme", 1, AT)
    assert wal.stat().st_size <= limit


async def test_reopen_keeps_the_schema(store: SqliteStore, open_store: OpenStore) -> None:
    await store.enqueue("acme", [new()], AT)
    store, _ = await reopen(store, open_store)
    assert await store.pragma("user_version") == SCHEMA_VERSION
    assert await store.pragma("journal_mode") == "wal"
    assert await queued(store, "acme") == [1]


async def test_a_newer_schema_is_refused(db_path: Path, open_store: OpenStore) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE from_the_future (x)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew) as caught:
        await open_store()
    assert str(caught.value) == (
        f"the database schema is version {SCHEMA_VERSION + 1}, newer than this webhookd "
        f"understands ({SCHEMA_VERSION}); run a newer webhookd"
    )
    assert isinstance(caught.value, StoreError)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert tables == {"from_the_future"}


# -- a failed commit -----------------------------------------------------------------------------


async def test_a_failed_commit_changes_nothing(store: SqliteStore, open_store: OpenStore) -> None:
    calls: list[tuple[str, list[Webhook]]] = []
    store.on_enqueued = lambda tenant, webhooks: calls.append((tenant, list(webhooks)))
    await store.enqueue("acme", [new("first")], AT)
    calls.clear()
    commits = store.commits

    # Disk full, simulated: the file may not grow by more than a page.
    pages = await store.pragma("page_count")
    assert await store.pragma(f"max_page_count = {pages + 1}") == pages + 1
    big = '{"blob": "' + "x" * 500_000 + '"}'
    outcomes = await asyncio.gather(
        store.enqueue("acme", [new("big", big), new()], AT),
        store.enqueue("beta", [new("small")], AT),  # committed with it, so fails with it
        return_exceptions=True,
    )
    for outcome in outcomes:
        assert isinstance(outcome, StoreError)
        assert str(outcome).startswith("the database is full (")
    assert store.commits == commits
    assert calls == []
    assert await queued(store, "acme") == [1]
    assert await queued(store, "beta") == []

    await store.pragma("max_page_count = 1073741823")
    # The counters rolled back with the transaction, and the ids were not remembered.
    assert await store.enqueue("acme", [new("big", big)], AT) == [IngestResult("big", 2, "queued")]
    assert await store.enqueue("beta", [new("small")], AT) == [IngestResult("small", 1, "queued")]
    assert await store.pragma("integrity_check") == "ok"

    store, records = await reopen(store, open_store)
    assert await store.pragma("integrity_check") == "ok"
    assert (records["acme"].row.last_sequence, records["beta"].row.last_sequence) == (2, 1)
    assert [w.id for w in await store.read_queue("acme", 0, 10)] == ["first", "big"]


def disk_full(store: SqliteStore) -> bool:
    """Read through a call: the flag changes behind the type checker's narrowing."""
    return store.disk_full


async def test_on_a_full_database_ingest_is_refused_but_deliveries_are_recorded(
    store: SqliteStore, open_store: OpenStore
) -> None:
    await store.enqueue("acme", [new() for _ in range(3)], AT)
    reserve = store.path.with_name(store.path.name + "-reserve")
    assert reserve.exists() and not disk_full(store)
    pages = await store.pragma("page_count")
    await store.pragma(f"max_page_count = {pages}")
    big = '{"blob": "' + "x" * 500_000 + '"}'
    # An acknowledgement and a too-big enqueue in one group: the commit runs out of space,
    # the reserve is released, and it runs again without the ingest, which is refused.
    outcomes = await asyncio.gather(
        store.acknowledge("acme", 2, AT + 1, history=OFF),
        store.enqueue("acme", [new(data=big)], AT),
        return_exceptions=True,
    )
    assert outcomes[0] is None
    assert isinstance(outcomes[1], StoreError) and outcomes[1].disk_full
    assert disk_full(store) and not reserve.exists()
    # Recorded in place: the rows stay until there is room, out of the queue all the same.
    assert [w.sequence for w in await store.read_queue("acme", 2, 10)] == [3]
    assert await queued(store, "acme") == [3]
    assert await stored(store, "acme") == [1, 2, 3]
    # The filesystem itself has room (only the page count was capped), so the reserve is
    # made again at the next ingest and ingest is accepted (tests/test_diskfull.py fills a
    # real volume, where it stays refused until space is freed).
    await store.pragma("max_page_count = 1073741823")
    assert await store.enqueue("acme", [new("later")], AT) == [IngestResult("later", 4, "queued")]
    assert reserve.exists() and not disk_full(store)
    # With room again, the writer deletes what was acknowledged in place.
    await wait_for(lambda: stored_is(store, "acme", [3, 4]))
    store, records = await reopen(store, open_store)
    row = records["acme"].row
    assert (row.acked_sequence, row.last_sequence, row.last_processed_at) == (2, 4, AT + 1)
    assert await store.pragma("integrity_check") == "ok"


async def fill_the_database(store: SqliteStore) -> None:
    """Cap the file at its size, then fail an ingest: the store is in its disk-full mode."""
    pages = await store.pragma("page_count")
    await store.pragma(f"max_page_count = {pages}")
    with pytest.raises(StoreError) as caught:
        await store.enqueue("acme", [new(data='{"blob": "' + "x" * 100_000 + '"}')], AT)
    assert caught.value.disk_full and disk_full(store)


async def test_on_a_full_disk_writes_take_no_new_page_and_the_queue_stays_right(
    store: SqliteStore, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cap is SQLite's, which statvfs cannot see: the store must not look for room and
    # find it while this part runs.
    monkeypatch.setattr(store_sqlite, "SPACE_CHECK_S", 3600.0)
    await store.enqueue("acme", [new(f"a{n}") for n in range(6)], AT)
    await store.enqueue("beta", [new(f"b{n}") for n in range(2)], AT)
    many = [f"t{n:02}" for n in range(60)]
    for name in many:
        await store.enqueue(name, [new()], AT)
    await fill_the_database(store)

    # Acknowledged in place: the rows stay in the table, the queue starts after them.
    await store.acknowledge("acme", 3, AT + 1, history=OFF)
    await store.acknowledge("beta", 1, AT + 1, history=OFF)
    assert await stored(store, "acme") == [1, 2, 3, 4, 5, 6]
    assert [w.id for w in await store.read_queue("acme", 3, 10)] == ["a3", "a4", "a5"]
    # The head can still be parked and requeued (each takes the pages the other gives back).
    parked = await store.park("acme", 4, AT + 2, OFF)
    assert parked is not None and parked.id == "a3"
    assert await store.park("acme", 2, AT + 2) is None  # not the head: already acknowledged
    requeued = await store.requeue("acme", "a3", AT + 3)
    assert requeued is not None and (requeued.sequence, requeued.id) == (7, "a3")
    for attempt in range(1, 31):  # pruned as they come: the same pages, over and over
        await store.record_failure("acme", failure(attempt), AT + attempt, keep=10)
    # Failures that need new pages, with an acknowledgement in the same group commit: SQLite's
    # cap refuses a page inside the statement, which may end the transaction; then each op
    # is tried alone, and only those that need a page fail. (On a real disk, where the page
    # is refused only at commit, the failure is simply not stored: tests/test_diskfull.py.)
    long = dataclasses.replace(failure(1), error="connection reset " * 12)
    outcomes = await asyncio.gather(
        store.acknowledge("acme", 5, AT + 4, history=OFF),
        *(store.record_failure(name, long, AT + 1, keep=10) for name in many),
        return_exceptions=True,
    )
    assert outcomes[0] is None
    assert all(o is None or (isinstance(o, StoreError) and o.disk_full) for o in outcomes), outcomes
    assert None in outcomes[1:] and any(isinstance(o, StoreError) for o in outcomes), outcomes
    # Discarding counts what was waiting, not the rows acknowledged in place; on a full
    # disk it leaves the rows to be deleted once there is room, as an acknowledgement does.
    assert await store.discard("beta", history=OFF) == 1
    assert await store.read_queue("beta", 2, 10) == []
    assert disk_full(store)

    # A restart before there is room: the same queue, and then the rows left go.
    store, records = await reopen(store, open_store)
    acme = records["acme"].row
    assert (acme.acked_sequence, acme.last_sequence, acme.attempts) == (5, 7, 0)
    assert [w.id for w in await store.read_queue("acme", 5, 10)] == ["a5", "a3"]
    assert len(records["acme"].failures) == 10
    assert records["acme"].parked == 0
    assert not disk_full(store)
    await wait_for(lambda: stored_is(store, "acme", [6, 7]))
    await wait_for(lambda: stored_is(store, "beta", []))
    assert await store.pragma("integrity_check") == "ok"


async def test_on_a_full_database_history_records_give_way(
    store: SqliteStore, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under SQLite's page cap (which refuses a page inside the statement, and may end the
    transaction): an acknowledgement whose record cannot be stored is recorded without it."""
    monkeypatch.setattr(store_sqlite, "SPACE_CHECK_S", 3600.0)
    # Each record is a small deliveries row (the webhook's row stays): enough tenants that
    # theirs need new pages.
    tenants = [f"t{n:03}" for n in range(300)]
    for name in tenants:
        await store.enqueue(name, [new(f"{name}-1", '{"pad": "' + "x" * 2000 + '"}')], AT)
    await fill_the_database(store)
    outcomes = await asyncio.gather(
        *(store.acknowledge(name, 1, AT + 1, Delivered(200, 5.0, 1)) for name in tenants),
        return_exceptions=True,
    )
    assert outcomes == [None] * len(tenants)
    kept = [name for name in tenants if await store.history(name, HistoryQuery())]
    assert store.history_dropped == len(tenants) - len(kept) > 0
    store, records = await reopen(store, open_store)
    assert all(records[name].row.acked_sequence == 1 for name in tenants)
    assert await store.pragma("integrity_check") == "ok"


async def test_a_version_1_database_remembers_its_ids_acceptance_time(db_path: Path) -> None:
    """Upgraded in place: an id whose webhook is still queued or parked takes its time; one
    whose webhook is gone takes the upgrade's (its window starts then)."""
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    for statement in MIGRATIONS[0][1]:
        conn.execute(statement)
    conn.executescript(
        """PRAGMA user_version = 1;
           INSERT INTO tenant_state (tenant, last_sequence, acked_sequence)
               VALUES ('acme', 3, 1);
           INSERT INTO webhooks VALUES ('acme', 3, 'c', 'E', 100.0, '{}');
           INSERT INTO parked VALUES ('acme', 2, 'b', 'E', 50.0, '{}', 60.0);
           INSERT INTO webhook_ids VALUES ('acme', 'a', 1), ('acme', 'b', 2), ('acme', 'c', 3);"""
    )
    conn.close()
    before = time.time()
    store = SqliteStore(db_path)
    records = {r.name: r for r in await store.open()}
    try:
        assert records["acme"].row.last_sequence == 3
        assert await store.pragma("user_version") == SCHEMA_VERSION == 4
        assert await store.enqueue("acme", [new("a"), new("b")], AT) == [
            IngestResult("a", 1, "duplicate"),
            IngestResult("b", 2, "duplicate"),
        ]
        assert await store.history_size() == HistorySize(0, 0, 0)
    finally:
        await store.close()
    conn = sqlite3.connect(db_path)
    times = dict(conn.execute("SELECT id, accepted_at FROM webhook_ids").fetchall())
    conn.close()
    assert (times["b"], times["c"]) == (50.0, 100.0)
    assert before - 1 <= times["a"] <= time.time() + 1


async def test_a_version_2_database_keeps_its_history_in_the_new_shape(db_path: Path) -> None:
    """Version 3 keeps a delivered webhook's row where it is (one deliveries row says how it
    went) instead of a copy in `history`: the delivered records of a version 2 database
    move there, payload, missing payload and replay link included; the other outcomes'
    records stay; listing, lookup, replay and the size read the same as before."""
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    for _, statements in MIGRATIONS[:2]:
        for statement in statements:
            conn.execute(statement)
    conn.executescript(
        """PRAGMA user_version = 2;
           INSERT INTO tenant_state (tenant, last_sequence, acked_sequence)
               VALUES ('acme', 5, 3);
           INSERT INTO webhooks VALUES ('acme', 4, 'd', 'E', 40.0, '{}'),
                                       ('acme', 5, 'a', 'E', 10.0, '{"n": 1}');
           INSERT INTO history VALUES
               ('acme', 1, 'a', 'E', 10.0, 11.0, 'delivered', 1, 200, 5.0, '{"n": 1}', 5),
               ('acme', 2, 'b', 'F', 20.0, 21.0, 'delivered', 2, 204, 6.0, NULL, NULL),
               ('acme', 3, 'c', 'E', 30.0, 31.0, 'discarded', 0, NULL, NULL, '{}', NULL);
           INSERT INTO history_sizes VALUES ('acme', 3, 0, 300);
           INSERT INTO webhook_ids VALUES ('acme', 'a', 1, 10.0), ('acme', 'b', 2, 20.0);"""
    )
    conn.close()
    store = SqliteStore(db_path)
    await store.open()
    try:
        assert await store.pragma("user_version") == SCHEMA_VERSION == 4
        await reads_an_old_history_in_the_new_shape(store)
    finally:
        await store.close()
