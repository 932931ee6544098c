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
from webhookd.records import Failure, IngestResult, NewWebhook, StoreError, TenantRecord, Webhook
from webhookd.store import Store, make_store

# Each engine, and the fixture that gives it a new, empty database for one test (the same
# database at every reopen within the test). An engine listed here runs every test below.
ENGINES = {"sqlite": "sqlite_database", "postgres": "postgres_database"}

Records = dict[str, TenantRecord]
OpenStore = Callable[[], Awaitable[tuple[Store, Records]]]

AT = 1764086400.0  # accepted_at for most webhooks below


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
