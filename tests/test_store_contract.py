"""The store's contract, run against every engine: what the service and the scheduler rely
on, whichever database holds the queue (the guarantees are written in store/protocol.py).

Each test takes its engine from the `engine` fixture. What only one engine has (SQLite's
pragmas, WAL, reserve and lock files, its disk-full mode) is tested in tests/test_store.py
and tests/test_diskfull.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from webhookd.config import PostgresURL
from webhookd.ids import generated_id, id_tag
from webhookd.records import (
    Delivered,
    Failure,
    FoundWebhook,
    HistoryOutcome,
    HistoryPolicy,
    HistoryQuery,
    HistoryRecord,
    HistorySize,
    IngestResult,
    NewWebhook,
    PruneResult,
    ReplayResult,
    ReplaySelection,
    ReplayTooLarge,
    ReplayWithoutPayloads,
    StoreError,
    TenantRecord,
    Webhook,
)
from webhookd.store import Store, make_store
from webhookd.store.history import failure_bytes, record_bytes

# Each engine, and the fixture that gives it a new, empty database for one test (the same
# database at every reopen within the test). An engine listed here runs every test below.
ENGINES = {"sqlite": "sqlite_database", "postgres": "postgres_database"}

Records = dict[str, TenantRecord]
OpenStore = Callable[[], Awaitable[tuple[Store, Records]]]

AT = 1764086400.0  # accepted_at for most webhooks below
EVENT = "CHECK_COMPLETED"


def new(webhook_id: str | None = None, data: str = "{}", event: str = "CHECK_COMPLETED"):
    return NewWebhook(webhook_id, event, data)


def sequences(results: list[IngestResult]) -> list[int]:
    numbers = [r.sequence for r in results if r.sequence is not None]
    assert len(numbers) == len(results), results
    return numbers


def failure(attempt: int, at: float = AT, status: int | None = 503) -> Failure:
    return Failure(
        at=at,
        attempt=attempt,
        first_sequence=1,
        last_sequence=1,
        count=1,
        status=status,
        error=f"HTTP {status}" if status else "connection refused",
        duration_ms=12.5,
    )


async def queued(store: Store, tenant: str) -> list[int]:
    """The sequences the store holds for the tenant, read from the start: its queue, once
    what was acknowledged is deleted (SQLite keeps those rows a while on a full disk)."""
    return [w.sequence for w in await store.read_queue(tenant, 0, 1000)]


# -- an engine, its database, a store on it ------------------------------------------------------


@pytest.fixture(params=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Path:
    return tmp_path / "state" / "webhookd.db"


@pytest.fixture
def postgres_database(postgres_url: str) -> PostgresURL:
    return PostgresURL(postgres_url)


@pytest.fixture
def database(engine: str, request: pytest.FixtureRequest) -> Any:
    """The engine's database for this test, as `database` in [daemon] would name it."""
    return request.getfixturevalue(ENGINES[engine])


@pytest.fixture
async def open_store(database: Any) -> AsyncIterator[OpenStore]:
    """Open a store on the test's database; every one opened is closed at teardown."""
    opened: list[Store] = []

    async def open_() -> tuple[Store, Records]:
        store = make_store(database)
        opened.append(store)
        records = await store.open()
        return store, {record.name: record for record in records}

    yield open_
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    store, records = await open_store()
    assert records == {}
    return store


async def reopen(store: Store, open_store: OpenStore) -> tuple[Store, Records]:
    """Close the store and open its database again, as a restart does."""
    await store.close()
    return await open_store()


# -- lifecycle -------------------------------------------------------------------------------------


async def test_writes_after_close_are_refused(store: Store) -> None:
    await store.close()
    with pytest.raises(StoreError, match="the store is closed"):
        await store.enqueue("acme", [new()], AT)


# -- sequences -------------------------------------------------------------------------------------


async def test_enqueue_numbers_each_tenant_from_one(store: Store) -> None:
    first = await store.enqueue("acme", [new(), new(), new()], AT)
    assert sequences(first) == [1, 2, 3]
    assert [r.status for r in first] == ["queued"] * 3
    assert sequences(await store.enqueue("beta", [new(), new()], AT)) == [1, 2]
    assert sequences(await store.enqueue("acme", [new()], AT)) == [4]
    assert sequences(await store.enqueue("beta", [new()], AT)) == [3]
    assert await queued(store, "acme") == [1, 2, 3, 4]
    assert await queued(store, "beta") == [1, 2, 3]


async def test_enqueue_stores_the_webhook_as_given(store: Store) -> None:
    data = '{"b": 1, "a": [1, 2.50, "é"]}'  # kept as text, never re-encoded
    [result] = await store.enqueue("acme", [new("order-7", data, "TASK_CREATED")], AT + 0.75)
    assert result == IngestResult("order-7", 1, "queued")
    [webhook] = await store.read_queue("acme", 0, 10)
    assert webhook == Webhook(1, "order-7", "TASK_CREATED", AT + 0.75, data)
    assert webhook.timestamp == int(AT)


async def test_read_queue_after_and_limit(store: Store) -> None:
    await store.enqueue("acme", [new() for _ in range(10)], AT)
    assert [w.sequence for w in await store.read_queue("acme", 3, 4)] == [4, 5, 6, 7]
    assert [w.sequence for w in await store.read_queue("acme", 8, 100)] == [9, 10]
    assert await store.read_queue("acme", 10, 100) == []
    assert await store.read_queue("nobody", 0, 100) == []


async def test_sequences_not_reused_after_the_queue_empties(store: Store) -> None:
    await store.enqueue("acme", [new(), new()], AT)
    await store.acknowledge("acme", 2, AT + 1)
    assert await queued(store, "acme") == []
    assert sequences(await store.enqueue("acme", [new()], AT)) == [3]


async def test_sequences_not_reused_across_reopen(store: Store, open_store: OpenStore) -> None:
    await store.enqueue("acme", [new(), new(), new()], AT)
    await store.acknowledge("acme", 3, AT + 1)
    store, records = await reopen(store, open_store)
    row = records["acme"].row
    assert (row.last_sequence, row.acked_sequence) == (3, 3)
    assert sequences(await store.enqueue("acme", [new()], AT)) == [4]


async def test_queue_survives_reopen(store: Store, open_store: OpenStore) -> None:
    await store.enqueue("acme", [new("a"), new("b")], AT)
    await store.enqueue("beta", [new()], AT)
    store, records = await reopen(store, open_store)
    assert sorted(records) == ["acme", "beta"]
    assert [w.id for w in await store.read_queue("acme", 0, 10)] == ["a", "b"]
    assert (records["acme"].row.last_sequence, records["acme"].row.acked_sequence) == (2, 0)
    assert sequences(await store.enqueue("acme", [new()], AT)) == [3]


async def test_sequences_not_reused_after_discard(store: Store, open_store: OpenStore) -> None:
    await store.enqueue("acme", [new(), new(), new()], AT)
    await store.record_failure("acme", failure(1), AT + 30, keep=10)
    await store.set_paused("acme", True)
    assert await store.park("acme", 1, AT) is not None
    assert await store.discard("acme") == 2
    assert await queued(store, "acme") == []
    assert await store.list_parked("acme") == []
    assert sequences(await store.enqueue("acme", [new()], AT)) == [4]
    store, records = await reopen(store, open_store)
    record = records["acme"]
    assert (record.row.last_sequence, record.row.acked_sequence) == (4, 3)
    assert (record.row.attempts, record.row.next_attempt_at, record.row.paused) == (0, None, False)
    assert (record.failures, record.parked) == ([], 0)
    assert sequences(await store.enqueue("acme", [new()], AT)) == [5]


# -- producer ids ----------------------------------------------------------------------------------


async def test_duplicate_ids_in_one_request(store: Store) -> None:
    results = await store.enqueue("acme", [new("a"), new("a", '{"again": 1}'), new("b")], AT)
    assert results == [
        IngestResult("a", 1, "queued"),
        IngestResult("a", 1, "duplicate"),
        IngestResult("b", 2, "queued"),
    ]
    queue = await store.read_queue("acme", 0, 10)
    assert [(w.sequence, w.id, w.data) for w in queue] == [(1, "a", "{}"), (2, "b", "{}")]


async def test_duplicate_ids_in_a_later_request(store: Store) -> None:
    await store.enqueue("acme", [new("a"), new("b")], AT)
    results = await store.enqueue("acme", [new("b"), new("c"), new("a")], AT)
    assert results == [
        IngestResult("b", 2, "duplicate"),
        IngestResult("c", 3, "queued"),
        IngestResult("a", 1, "duplicate"),
    ]
    assert await queued(store, "acme") == [1, 2, 3]


async def test_duplicate_ids_after_delivery_and_reopen(store: Store, open_store: OpenStore) -> None:
    await store.enqueue("acme", [new("a"), new("b")], AT)
    await store.acknowledge("acme", 2, AT + 1)
    assert await store.enqueue("acme", [new("a")], AT) == [IngestResult("a", 1, "duplicate")]
    store, _ = await reopen(store, open_store)
    assert await store.enqueue("acme", [new("b")], AT) == [IngestResult("b", 2, "duplicate")]
    assert await queued(store, "acme") == []
    # Nothing was queued for the duplicates: the next webhook follows on without a gap.
    assert sequences(await store.enqueue("acme", [new("c")], AT)) == [3]


async def test_ids_are_per_tenant(store: Store) -> None:
    await store.enqueue("acme", [new("a")], AT)
    await store.enqueue("acme", [new()], AT)
    assert await store.enqueue("beta", [new("a")], AT) == [IngestResult("a", 1, "queued")]


async def test_duplicate_ids_in_requests_committed_together(store: Store) -> None:
    first, second = await asyncio.gather(
        store.enqueue("acme", [new("a"), new("b")], AT),
        store.enqueue("acme", [new("b"), new("a"), new("c")], AT),
    )
    assert first == [IngestResult("a", 1, "queued"), IngestResult("b", 2, "queued")]
    assert second == [
        IngestResult("b", 2, "duplicate"),
        IngestResult("a", 1, "duplicate"),
        IngestResult("c", 3, "queued"),
    ]
    assert await queued(store, "acme") == [1, 2, 3]


async def test_generated_ids_are_uuids(store: Store) -> None:
    results = await store.enqueue("acme", [new(), new(), new()], AT)
    ids = [r.id for r in results]
    assert len(set(ids)) == 3
    for webhook_id in ids:
        assert str(uuid.UUID(webhook_id)) == webhook_id
        assert uuid.UUID(webhook_id).version == 8
    assert [w.id for w in await store.read_queue("acme", 0, 10)] == ids


# -- acknowledge and failures ----------------------------------------------------------------------


async def test_acknowledge_removes_through_and_resets_backoff(
    store: Store, open_store: OpenStore
) -> None:
    await store.enqueue("acme", [new() for _ in range(5)], AT)
    await store.record_failure("acme", failure(1), AT + 30, keep=10)
    await store.record_failure("acme", failure(2), AT + 90, keep=10)
    await store.acknowledge("acme", 3, AT + 100)
    assert await queued(store, "acme") == [4, 5]

    store, records = await reopen(store, open_store)
    row = records["acme"].row
    assert row.last_sequence == 5
    assert row.acked_sequence == 3
    assert row.attempts == 0
    assert row.next_attempt_at is None
    assert row.last_processed_at == AT + 100
    # The failures list is history, not backoff state: an acknowledge keeps it.
    assert [f.attempt for f in records["acme"].failures] == [2, 1]

    # An older acknowledgement never moves the head back.
    await store.acknowledge("acme", 2, AT + 200)
    assert await queued(store, "acme") == [4, 5]
    await store.acknowledge("acme", 5, AT + 300)
    assert await queued(store, "acme") == []
    store, records = await reopen(store, open_store)
    row = records["acme"].row
    assert (row.acked_sequence, row.last_processed_at) == (5, AT + 300)


async def test_record_failure_persists_backoff_and_keeps_the_newest(
    store: Store, open_store: OpenStore
) -> None:
    await store.enqueue("acme", [new()], AT)
    await store.enqueue("beta", [new()], AT)
    await store.record_failure("beta", failure(1, status=None), AT + 1, keep=10)
    for attempt in range(1, 6):
        await store.record_failure(
            "acme", failure(attempt, AT + attempt), AT + 60 * attempt, keep=3
        )

    store, records = await reopen(store, open_store)
    acme = records["acme"]
    assert acme.row.attempts == 5
    assert acme.row.next_attempt_at == AT + 300
    assert acme.failures == [failure(5, AT + 5), failure(4, AT + 4), failure(3, AT + 3)]
    # Pruning is per tenant.
    assert records["beta"].failures == [failure(1, status=None)]
    assert records["beta"].row.attempts == 1

    await store.record_failure("acme", failure(6, AT + 6), None, keep=1)
    store, records = await reopen(store, open_store)
    assert records["acme"].failures == [failure(6, AT + 6)]
    assert records["acme"].row.next_attempt_at is None


async def test_record_failure_keep_zero_keeps_none(store: Store, open_store: OpenStore) -> None:
    await store.record_failure("acme", failure(1), AT + 30, keep=0)
    store, records = await reopen(store, open_store)
    assert records["acme"].failures == []
    assert records["acme"].row.attempts == 1


async def test_clear_failures(store: Store, open_store: OpenStore) -> None:
    for attempt in (1, 2, 3):
        await store.record_failure("acme", failure(attempt), AT + 30, keep=10)
    assert await store.clear_failures("acme") == 3
    assert await store.clear_failures("acme") == 0
    store, records = await reopen(store, open_store)
    assert records["acme"].failures == []
    assert records["acme"].row.attempts == 3  # clearing the list is not a retry or a reset


# -- park and requeue ------------------------------------------------------------------------------


async def test_park_moves_only_the_head(store: Store, open_store: OpenStore) -> None:
    await store.enqueue("acme", [new("a", '{"n": 1}'), new("b"), new("c")], AT)
    await store.record_failure("acme", failure(3), AT + 120, keep=10)
    assert await store.park("acme", 2, AT + 5) is None
    assert await store.park("acme", 4, AT + 5) is None
    assert await store.park("nobody", 1, AT + 5) is None

    parked = await store.park("acme", 1, AT + 5)
    assert parked == Webhook(1, "a", "CHECK_COMPLETED", AT, '{"n": 1}')
    assert await store.park("acme", 1, AT + 6) is None  # no longer the head
    assert await queued(store, "acme") == [2, 3]
    [listed] = await store.list_parked("acme")
    assert (listed.webhook, listed.parked_at) == (parked, AT + 5)

    store, records = await reopen(store, open_store)
    record = records["acme"]
    assert record.parked == 1  # start-up counts parked webhooks per tenant
    assert (record.row.acked_sequence, record.row.last_sequence) == (1, 3)
    assert (record.row.attempts, record.row.next_attempt_at) == (0, None)
    assert record.parked == 1


async def test_requeue_goes_to_the_tail_with_a_new_sequence(
    store: Store, open_store: OpenStore
) -> None:
    calls: list[tuple[str, list[Webhook]]] = []
    store.on_enqueued = lambda tenant, webhooks: calls.append((tenant, list(webhooks)))
    await store.enqueue("acme", [new("a", '{"n": 1}', "TASK_CREATED"), new("b")], AT)
    await store.park("acme", 1, AT + 5)
    calls.clear()

    assert await store.requeue("acme", "nope", AT + 10) is None
    requeued = await store.requeue("acme", "a", AT + 10)
    assert requeued == Webhook(3, "a", "TASK_CREATED", AT, '{"n": 1}')
    assert calls == [("acme", [requeued])]
    assert await store.list_parked("acme") == []
    assert await store.requeue("acme", "a", AT + 11) is None
    assert [(w.sequence, w.id) for w in await store.read_queue("acme", 0, 10)] == [
        (2, "b"),
        (3, "a"),
    ]
    assert sequences(await store.enqueue("acme", [new()], AT)) == [4]

    store, records = await reopen(store, open_store)
    assert (records["acme"].row.last_sequence, records["acme"].parked) == (4, 0)
    assert await queued(store, "acme") == [2, 3, 4]


# -- paused ----------------------------------------------------------------------------------------


async def test_set_paused_survives_reopen(store: Store, open_store: OpenStore) -> None:
    await store.set_paused("acme", True)
    store, records = await reopen(store, open_store)
    assert records["acme"].row.paused is True
    await store.enqueue("acme", [new()], AT)  # a paused tenant still queues
    assert await queued(store, "acme") == [1]
    await store.set_paused("acme", False)
    store, records = await reopen(store, open_store)
    assert records["acme"].row.paused is False


# -- group commit ----------------------------------------------------------------------------------


async def test_concurrent_enqueues_are_group_committed(store: Store) -> None:
    calls: list[tuple[str, list[Webhook]]] = []
    store.on_enqueued = lambda tenant, webhooks: calls.append((tenant, list(webhooks)))
    before = store.commits
    tenants = ["acme" if n % 2 else "beta" for n in range(50)]
    results = await asyncio.gather(
        *(store.enqueue(tenant, [new(), new(), new()], AT) for tenant in tenants)
    )
    assert store.commits - before <= 5

    for tenant in ("acme", "beta"):
        mine = [sequences(r) for t, r in zip(tenants, results, strict=True) if t == tenant]
        for numbers in mine:
            assert numbers == list(range(numbers[0], numbers[0] + 3))
        assert sorted(n for numbers in mine for n in numbers) == list(range(1, 76))
        assert await queued(store, tenant) == list(range(1, 76))

    # on_enqueued saw every queued row exactly once, tagged with its tenant.
    seen = {
        tenant: [w.sequence for t, ws in calls if t == tenant for w in ws] for tenant in tenants
    }
    assert seen == {"acme": list(range(1, 76)), "beta": list(range(1, 76))}
    for tenant, webhooks in calls:
        after = webhooks[0].sequence - 1
        assert webhooks == await store.read_queue(tenant, after, len(webhooks))


async def test_on_enqueued_runs_with_the_commit(store: Store) -> None:
    calls: list[tuple[str, list[Webhook]]] = []
    store.on_enqueued = lambda tenant, webhooks: calls.append((tenant, list(webhooks)))
    results = await store.enqueue("acme", [new("a", '{"x": 1}'), new()], AT)
    # Called before enqueue returns (so a worker wakes before ingest answers), once.
    assert len(calls) == 1
    tenant, webhooks = calls[0]
    assert tenant == "acme"
    assert webhooks == await store.read_queue("acme", 0, 10)
    assert [w.id for w in webhooks] == [r.id for r in results]

    # Nothing new queued (all duplicates): not called.
    await store.enqueue("acme", [new("a")], AT)
    assert len(calls) == 1
    # Other writes never call it.
    await store.acknowledge("acme", 1, AT)
    await store.record_failure("acme", failure(1), AT, keep=10)
    await store.set_paused("acme", True)
    assert len(calls) == 1


# -- history: records of the webhooks that leave the queue ---------------------------------------

OK = Delivered(status=200, duration_ms=12.5, attempts=2)
NO_HISTORY = HistoryPolicy(keep=False)
NO_PAYLOADS = HistoryPolicy(payloads=False)
DAY = 86400.0


async def page(store: Store, tenant: str = "acme", **query: Any) -> list[HistoryRecord]:
    return await store.history(tenant, HistoryQuery(**query))


def record(
    sequence: int,
    webhook_id: str,
    outcome: HistoryOutcome = "delivered",
    finished_at: float = AT + 5,
    data: str | None = "{}",
    **fields: Any,
) -> HistoryRecord:
    values: dict[str, Any] = {
        "event": "CHECK_COMPLETED",
        "accepted_at": AT,
        "attempts": 2,
        "status": 200,
        "duration_ms": 12.5,
        "next_sequence": None,
    }
    if outcome != "delivered":
        values.update(attempts=0, status=None, duration_ms=None)
    values.update(fields)
    return HistoryRecord(
        sequence=sequence,
        id=webhook_id,
        finished_at=finished_at,
        outcome=outcome,
        data=data,
        **values,
    )


async def test_acknowledge_keeps_a_delivered_record_for_each_webhook(
    store: Store, open_store: OpenStore
) -> None:
    results = await store.enqueue("acme", [new("a", '{"n": 1}'), new(), new("c")], AT)
    generated = results[1].id
    await store.acknowledge("acme", 2, AT + 5, OK)
    expected = [record(2, generated), record(1, "a", data='{"n": 1}')]
    assert await page(store) == expected
    assert await store.history_size() == HistorySize(
        2, 0, record_bytes("a", EVENT, '{"n": 1}') + record_bytes(generated, EVENT, "{}")
    )
    store, _ = await reopen(store, open_store)
    assert await page(store) == expected
    assert (await store.history_size()).records == 2
    # Unknown outcome (a test): no status nor duration; the tenant's attempts plus this one.
    await store.acknowledge("acme", 3, AT + 6)
    [newest] = await page(store, limit=1)
    assert newest == record(3, "c", finished_at=AT + 6, attempts=1, status=None, duration_ms=None)


async def test_the_history_policy_keeps_no_record_or_no_payload(store: Store) -> None:
    await store.enqueue("acme", [new("a", '{"n": 1}'), new("b", '{"n": 2}')], AT)
    await store.acknowledge("acme", 1, AT + 5, OK, NO_HISTORY)
    await store.acknowledge("acme", 2, AT + 5, OK, NO_PAYLOADS)
    assert await page(store) == [record(2, "b", data=None)]
    assert await store.history_size() == HistorySize(1, 0, record_bytes("b", EVENT, None))
    await store.record_failure("acme", failure(1), AT + 30, keep=10, history=NO_HISTORY)
    assert (await store.history_size()).failures == 0


async def test_park_requeue_and_discard_leave_records(store: Store, open_store: OpenStore) -> None:
    await store.enqueue("acme", [new("a"), new("b"), new("c")], AT)
    await store.record_failure("acme", failure(1), AT + 1, keep=10)
    await store.record_failure("acme", failure(2), AT + 2, keep=10)
    await store.park("acme", 1, AT + 3)
    assert await page(store) == [record(1, "a", "parked", AT + 3, attempts=2)]
    requeued = await store.requeue("acme", "a", AT + 4)
    assert requeued is not None and requeued.sequence == 4
    assert await page(store) == [record(1, "a", "requeued", AT + 3, attempts=2, next_sequence=4)]
    await store.park("acme", 2, AT + 5, NO_PAYLOADS)
    # Discard: the queued ones get records (the head with the tenant's attempts), the
    # parked ones' records say discarded.
    await store.record_failure("acme", failure(1), AT + 6, keep=10)
    assert await store.discard("acme", AT + 7) == 2
    expected = [
        record(4, "a", "discarded", AT + 7),
        record(3, "c", "discarded", AT + 7, attempts=1),
        record(2, "b", "discarded", AT + 7, data=None),
        record(1, "a", "requeued", AT + 3, attempts=2, next_sequence=4),
    ]
    assert await page(store) == expected
    store, _ = await reopen(store, open_store)
    assert await page(store) == expected
    assert (await store.history_size()).records == 4


async def test_discard_without_history_keeps_the_records_there_are(store: Store) -> None:
    await store.enqueue("acme", [new("a"), new("b")], AT)
    await store.park("acme", 1, AT + 3)
    await store.discard("acme", AT + 7, NO_HISTORY)
    assert await page(store) == [record(1, "a", "discarded", AT + 7)]


async def test_failed_attempts_are_kept_apart_from_the_recent_failures(
    store: Store, open_store: OpenStore
) -> None:
    await store.enqueue("acme", [new("a"), new("b")], AT)
    await store.record_failure("acme", failure(1, AT + 1), AT + 30, keep=1)
    await store.record_failure("acme", failure(2, AT + 2), AT + 30, keep=1)
    store, records = await reopen(store, open_store)
    assert records["acme"].failures == [failure(2, AT + 2)]  # `keep` bounds those only
    found = await store.find_webhook("acme", "a")
    assert found.place == "queued"
    assert found.failures == (failure(2, AT + 2), failure(1, AT + 1))
    assert (await store.find_webhook("acme", "b")).failures == ()  # not in their range
    size = await store.history_size()
    assert (size.records, size.failures) == (0, 2)
    assert size.bytes == 2 * failure_bytes("HTTP 503")


# -- lookup ----------------------------------------------------------------------------------------


async def test_find_webhook_wherever_it_is(store: Store) -> None:
    results = await store.enqueue("acme", [new("a"), new(), new("c"), new("d")], AT)
    generated = results[1].id
    assert (await store.find_webhook("acme", "d")) == FoundWebhook(
        "queued", 4, webhook=Webhook(4, "d", EVENT, AT, "{}")
    )
    await store.acknowledge("acme", 2, AT + 5, OK)
    found = await store.find_webhook("acme", generated)
    assert (found.place, found.sequence, found.record) == ("history", 2, record(2, generated))
    await store.park("acme", 3, AT + 6)
    found = await store.find_webhook("acme", "c")
    assert (found.place, found.sequence, found.parked_at) == ("parked", 3, AT + 6)
    assert found.webhook == Webhook(3, "c", EVENT, AT, "{}")
    # Requeued: followed to its new copy, queued under the new sequence.
    await store.requeue("acme", "c", AT + 7)
    found = await store.find_webhook("acme", "c")
    assert (found.place, found.sequence) == ("queued", 5)
    await store.acknowledge("acme", 5, AT + 8, OK)
    found = await store.find_webhook("acme", "c")
    assert (found.place, found.sequence) == ("history", 5)
    assert found.record is not None and found.record.outcome == "delivered"
    # Never given out: a producer id never seen (the tenant has forgotten none), a
    # generated id past the counter, another tenant's generated id.
    assert await store.find_webhook("acme", "zzz") == FoundWebhook("unknown")
    past = generated_id(id_tag("acme"), 99)
    assert await store.find_webhook("acme", past) == FoundWebhook("unknown")
    assert await store.find_webhook("nobody", generated) == FoundWebhook("unknown")


async def test_find_webhook_says_expired_once_pruned(store: Store) -> None:
    results = await store.enqueue("acme", [new("a"), new()], AT)
    await store.acknowledge("acme", 2, AT + 5, OK)
    await prune(store, AT + 8 * DAY, window=30 * DAY)
    assert await page(store) == []
    # The producer id is still remembered (the window), the generated one carries it.
    assert await store.find_webhook("acme", "a") == FoundWebhook("expired", 1)
    assert await store.find_webhook("acme", results[1].id) == FoundWebhook("expired", 2)


# -- listing ---------------------------------------------------------------------------------------


async def listing_store(store: Store) -> None:
    """Ten webhooks: sequences 1..10, events alternating, accepted a minute apart;
    1..8 delivered, 9 parked, 10 queued."""
    for n in range(1, 11):
        event = "A" if n % 2 else "B"
        await store.enqueue("acme", [new(f"w{n}", f'{{"n": {n}}}', event)], AT + 60 * n)
    await store.acknowledge("acme", 8, AT + 1000, OK)
    await store.park("acme", 9, AT + 1001)
    await store.enqueue("beta", [new("w1")], AT)
    await store.acknowledge("beta", 1, AT + 1000, OK)


async def test_history_pages_with_a_cursor_both_ways(store: Store) -> None:
    await listing_store(store)
    first = await page(store, limit=4)
    assert [r.sequence for r in first] == [9, 8, 7, 6]
    second = await page(store, limit=4, after=first[-1].sequence)
    assert [r.sequence for r in second] == [5, 4, 3, 2]
    third = await page(store, limit=4, after=second[-1].sequence)
    assert [r.sequence for r in third] == [1]
    assert await page(store, limit=4, after=1) == []
    up = await page(store, limit=5, oldest_first=True)
    assert [r.sequence for r in up] == [1, 2, 3, 4, 5]
    up = await page(store, limit=5, oldest_first=True, after=5)
    assert [r.sequence for r in up] == [6, 7, 8, 9]
    assert [r.id for r in await page(store, "beta")] == ["w1"]
    assert await page(store, "nobody") == []


async def test_history_filters_combine(store: Store) -> None:
    await listing_store(store)

    async def listed(**query: Any) -> list[int]:
        return [r.sequence for r in await page(store, **query)]

    assert await listed(event="B") == [8, 6, 4, 2]
    assert await listed(event="B", limit=2, after=6) == [4, 2]
    assert await listed(event="B", oldest_first=True, after=2) == [4, 6, 8]
    assert await listed(from_sequence=3, to_sequence=6) == [6, 5, 4, 3]
    assert await listed(since=AT + 120, until=AT + 300) == [4, 3, 2]
    assert await listed(since=AT + 120, until=AT + 300, event="A") == [3]
    assert await listed(outcomes=frozenset({"parked"})) == [9]
    assert await listed(outcomes=frozenset({"parked", "delivered"}), limit=2) == [9, 8]
    assert await listed(outcomes=frozenset({"discarded"})) == []
    assert await listed(event="C") == []


# -- replay ----------------------------------------------------------------------------------------


async def test_replay_puts_delivered_webhooks_back_in_order(
    store: Store, open_store: OpenStore
) -> None:
    calls: list[tuple[str, list[Webhook]]] = []
    await listing_store(store)
    store.on_enqueued = lambda tenant, webhooks: calls.append((tenant, list(webhooks)))
    selection = ReplaySelection(from_sequence=2, to_sequence=9)
    dry = await store.replay("acme", selection, AT + 2000, limit=100, dry_run=True)
    assert dry == ReplayResult(7, None, None, dry_run=True)  # delivered only: 9 is parked
    assert calls == []
    result = await store.replay("acme", selection, AT + 2000, limit=100)
    assert result == ReplayResult(7, 11, 17)
    queue = await store.read_queue("acme", 9, 100)
    assert [(w.sequence, w.id, w.data) for w in queue] == [(10, "w10", '{"n": 10}')] + [
        (9 + n, f"w{n}", f'{{"n": {n}}}') for n in range(2, 9)
    ]
    assert [w.accepted_at for w in queue[1:]] == [AT + 60 * n for n in range(2, 9)]
    assert calls == [("acme", queue[1:])]
    # The records say where they went; a lookup follows them to the new copies.
    assert [r.next_sequence for r in await page(store, from_sequence=1, to_sequence=8)] == [
        17,
        16,
        15,
        14,
        13,
        12,
        11,
        None,
    ]
    assert (await store.find_webhook("acme", "w3")).sequence == 12
    assert sequences(await store.enqueue("acme", [new()], AT)) == [18]
    store, records = await reopen(store, open_store)
    assert records["acme"].row.last_sequence == 18
    assert len(await store.read_queue("acme", 10, 100)) == 8


async def test_replay_by_time_and_event(store: Store) -> None:
    await listing_store(store)
    selection = ReplaySelection(since=AT + 120, until=AT + 480, event="A")
    assert await store.replay("acme", selection, AT, limit=100) == ReplayResult(3, 11, 13)
    assert [w.id for w in await store.read_queue("acme", 10, 100)] == ["w3", "w5", "w7"]
    assert await store.replay("acme", ReplaySelection(event="C"), AT, limit=100) == (
        ReplayResult(0, None, None)
    )


async def test_replay_is_all_or_nothing(store: Store) -> None:
    await listing_store(store)
    with pytest.raises(ReplayTooLarge) as refused:
        await store.replay("acme", ReplaySelection(from_sequence=2), AT, limit=5)
    assert (refused.value.count, refused.value.limit) == (7, 5)
    assert (refused.value.first_sequence, refused.value.last_sequence) == (2, 8)
    with pytest.raises(ReplayTooLarge):
        await store.replay("acme", ReplaySelection(), AT, limit=5, dry_run=True)
    await store.enqueue("acme", [new("x")], AT)
    await store.acknowledge("acme", 11, AT, OK, NO_PAYLOADS)  # 10 and x, without data
    with pytest.raises(ReplayWithoutPayloads):
        await store.replay("acme", ReplaySelection(from_sequence=8), AT, limit=100)
    assert await queued(store, "acme") == []
    assert [r.next_sequence for r in await page(store)] == [None] * 11


async def test_replay_id_makes_a_retry_safe(store: Store, open_store: OpenStore) -> None:
    await listing_store(store)
    selection = ReplaySelection(from_sequence=1, to_sequence=2)
    first = await store.replay("acme", selection, AT, limit=10, replay_id="r-1")
    assert first == ReplayResult(2, 11, 12)
    again = await store.replay("acme", selection, AT, limit=10, replay_id="r-1")
    assert again == ReplayResult(2, 11, 12, repeated=True)
    store, _ = await reopen(store, open_store)
    again = await store.replay("acme", ReplaySelection(), AT, limit=10, replay_id="r-1")
    assert again == ReplayResult(2, 11, 12, repeated=True)
    assert [w.id for w in await store.read_queue("acme", 10, 100)] == ["w1", "w2"]
    # Per tenant.
    assert await store.replay("beta", selection, AT, limit=10, replay_id="r-1") == (
        ReplayResult(1, 2, 2)
    )


# -- retention -------------------------------------------------------------------------------------


async def prune(
    store: Store,
    now: float,
    *,
    retention: dict[str, float] | None = None,
    default: float = 7 * DAY,
    max_bytes: int | None = None,
    window: float = DAY,
    step: int = 1000,
) -> PruneResult:
    return await store.prune_history(
        now,
        retention=retention or {},
        default_retention=default,
        max_bytes=max_bytes,
        idempotency_window=window,
        step=step,
    )


async def test_prune_by_age_per_tenant_in_steps(store: Store, open_store: OpenStore) -> None:
    for n in range(5):
        await store.enqueue("acme", [new(f"a{n}")], AT + n * DAY)
        await store.enqueue("beta", [new(f"b{n}")], AT + n * DAY)
    await store.record_failure("acme", failure(1, AT), None, keep=10)
    await store.record_failure("acme", failure(1, AT + 3 * DAY), None, keep=10)
    await store.acknowledge("acme", 5, AT + 5 * DAY, OK)
    await store.acknowledge("beta", 5, AT + 5 * DAY, OK)
    now = AT + 5 * DAY
    # acme keeps 2.5 days: a0, a1, a2 and one failed attempt go; beta keeps the default.
    step = await prune(store, now, retention={"acme": 2.5 * DAY}, step=2, window=30 * DAY)
    assert step == PruneResult(by_age=2, more=True)
    step = await prune(store, now, retention={"acme": 2.5 * DAY}, step=2, window=30 * DAY)
    assert step == PruneResult(by_age=1, failures=1, more=True)
    step = await prune(store, now, retention={"acme": 2.5 * DAY}, step=2, window=30 * DAY)
    assert step == PruneResult()
    assert [r.id for r in await page(store)] == ["a4", "a3"]
    assert len(await page(store, "beta")) == 5
    size = await store.history_size()
    assert (size.records, size.failures) == (7, 1)
    assert size.bytes == sum(record_bytes(f"a{n}", EVENT, "{}") for n in (3, 4)) + sum(
        record_bytes(f"b{n}", EVENT, "{}") for n in range(5)
    ) + failure_bytes("HTTP 503")
    store, _ = await reopen(store, open_store)
    assert await store.history_size() == size
    # Retention 0: nothing kept.
    step = await prune(store, now, retention={"beta": 0}, window=30 * DAY)
    assert step.by_age == 5
    assert await page(store, "beta") == []


async def test_prune_by_size_takes_the_oldest_first(store: Store) -> None:
    for n in range(6):
        tenant = "acme" if n % 2 else "beta"
        await store.enqueue(tenant, [new(f"w{n}", "x" * 100)], AT + n)
    await store.acknowledge("acme", 3, AT + 10, OK)
    await store.acknowledge("beta", 3, AT + 10, OK)
    one = record_bytes("w0", EVENT, "x" * 100)
    assert (await store.history_size()).bytes == 6 * one
    step = await prune(store, AT + 20, max_bytes=3 * one + 1, window=30 * DAY)
    assert (step.by_age, step.by_size) == (0, 3)
    remaining = [r.id for t in ("acme", "beta") for r in await page(store, t)]
    assert sorted(remaining) == ["w3", "w4", "w5"]
    assert await store.history_size() == HistorySize(3, 0, 3 * one)
    assert await prune(store, AT + 20, max_bytes=3 * one, window=30 * DAY) == PruneResult()


async def test_prune_by_size_over_many_tenants_keeps_exactly_the_newest(store: Store) -> None:
    # Thirty tenants whose records interleave in time, pruned in small steps: each step
    # goes tenant by tenant from what the pruner last surveyed, and what is left must be
    # the newest records of all of them together, whatever order the steps took them in.
    tenants = [f"t{n:02d}" for n in range(30)]
    for k in range(4):
        for n, tenant in enumerate(tenants):
            await store.enqueue(tenant, [new(f"{tenant}-{k}")], AT + 30 * k + n)
    for tenant in tenants:
        await store.acknowledge(tenant, 4, AT + 200, OK)
    one = record_bytes("t00-0", EVENT, "{}")
    steps = 0
    while (step := await prune(store, AT + 300, max_bytes=45 * one, step=7, window=DAY)).more:
        assert step.by_size <= 7
        steps += 1
    assert steps >= 10  # 75 records go, 7 at most per step
    kept = sorted([r.accepted_at for t in tenants for r in await page(store, t)])
    assert kept == [AT + 30 * k + n for k in range(4) for n in range(30)][-45:]
    assert await store.history_size() == HistorySize(45, 0, 45 * one)


async def test_prune_finds_records_older_than_what_it_surveyed(store: Store) -> None:
    # Pruning looks at which tenants have anything to prune now and then, not at every
    # step: a record that comes with an old time after that look (a replay's copy keeps
    # its acceptance time) is pruned once the look is renewed, within seconds.
    await store.enqueue("acme", [new("a")], AT + DAY)
    await store.acknowledge("acme", 1, AT + DAY, OK)
    now = AT + 3 * DAY
    assert await prune(store, now, default=2.5 * DAY, window=DAY) == PruneResult()
    await store.enqueue("beta", [new("b")], AT)  # past its retention already
    await store.acknowledge("beta", 1, now, OK)
    assert (await prune(store, now + 60, default=2.5 * DAY, window=DAY)).by_age == 1
    assert await page(store, "beta") == []
    assert [r.id for r in await page(store)] == ["a"]


async def test_producer_ids_are_remembered_for_the_window(store: Store) -> None:
    # acme keeps no history: its ids are remembered for the window, or while queued.
    await store.enqueue("acme", [new("a"), new("c")], AT)
    await store.acknowledge("acme", 1, AT + 5, OK, NO_HISTORY)
    # beta keeps 7 days: an id is remembered while its record is.
    await store.enqueue("beta", [new("b")], AT)
    await store.acknowledge("beta", 1, AT + 5, OK)
    off = {"acme": 0.0}
    assert (await prune(store, AT + DAY - 1, retention=off)).ids == 0
    assert [r.status for r in await store.enqueue("acme", [new("a")], AT)] == ["duplicate"]
    assert await store.find_webhook("acme", "zzz") == FoundWebhook("unknown")
    assert (await prune(store, AT + DAY + 1, retention=off)).ids == 1
    # Once it forgot one, an id it does not know may be one it forgot: it says since when.
    assert await store.find_webhook("acme", "a") == FoundWebhook(
        "forgotten", forgotten_before=AT + 1
    )
    assert await store.find_webhook("acme", "zzz") == FoundWebhook(
        "forgotten", forgotten_before=AT + 1
    )
    assert await store.find_webhook("beta", "zzz") == FoundWebhook("unknown")
    again = await store.enqueue("acme", [new("a"), new("c")], AT + DAY + 1)
    assert [(r.status, r.sequence) for r in again] == [("queued", 3), ("duplicate", 2)]
    assert [r.status for r in await store.enqueue("beta", [new("b")], AT)] == ["duplicate"]
    # b goes with its record, once the retention is over.
    step = await prune(store, AT + 8 * DAY, retention=off)
    assert (step.by_age, step.ids) == (1, 1)
    assert await store.find_webhook("beta", "b") == FoundWebhook(
        "forgotten", forgotten_before=AT + DAY
    )
    assert [r.status for r in await store.enqueue("beta", [new("b")], AT)] == ["queued"]


async def test_prune_with_nothing_to_do(store: Store) -> None:
    assert await prune(store, AT) == PruneResult()
    assert await store.history_size() == HistorySize(0, 0, 0)


async def reads_an_old_history_in_the_new_shape(store: Store) -> None:
    """What each engine's upgrade test checks once a database from before the delivered
    records moved (SQLite 2, PostgreSQL 4) is opened: acme had sequences 1-2 delivered (1
    replayed as 5, 2 kept without its data), 3 discarded, 4-5 queued, and ids a and b."""
    records = [
        HistoryRecord(3, "c", "E", 30.0, 31.0, "discarded", 0, None, None, "{}", None),
        HistoryRecord(2, "b", "F", 20.0, 21.0, "delivered", 2, 204, 6.0, None, None),
        HistoryRecord(1, "a", "E", 10.0, 11.0, "delivered", 1, 200, 5.0, '{"n": 1}', 5),
    ]
    assert await store.history("acme", HistoryQuery()) == records
    assert await store.history("acme", HistoryQuery(oldest_first=True)) == records[::-1]
    delivered = HistoryQuery(outcomes=frozenset({"delivered"}))
    assert await store.history("acme", delivered) == records[1:]
    assert await store.history("acme", HistoryQuery(event="E", after=3)) == records[2:]
    assert await queued(store, "acme") == [4, 5]
    found = await store.find_webhook("acme", "b")
    assert (found.place, found.record) == ("history", records[1])
    found = await store.find_webhook("acme", "a")  # replayed: its newest copy
    assert (found.place, found.sequence) == ("queued", 5)
    # Ids it once had may have been forgotten before the version that notes it: an id
    # it does not know may be one accepted before its oldest remembered.
    forgotten = FoundWebhook("forgotten", forgotten_before=10.0)
    assert await store.find_webhook("acme", "zzz") == forgotten
    assert await store.history_size() == HistorySize(3, 0, 300)
    with pytest.raises(ReplayWithoutPayloads):  # 2 was kept without its data
        await store.replay("acme", ReplaySelection(from_sequence=1), AT, limit=10)
    again = await store.replay("acme", ReplaySelection(to_sequence=1), AT, limit=10)
    assert (again.count, again.first_sequence) == (1, 6)
