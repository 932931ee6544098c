"""The store's write operations, each a small class applied inside a group commit.

A caller's write becomes an `Op` with a future; the writer thread applies whatever ops
have gathered in one transaction (`Tx`), batching same-shaped statements (`executemany`)
and saving each touched tenant's state row once. Ops run in the writer thread: they touch
SQLite and the thread-side state rows, never the event loop.

On a full disk (`Tx.full`), an op takes no new page: the database file cannot grow, and a
page it cannot take would leave the WAL unable to start over (see reserve.py). An
acknowledgement then only moves `acked_sequence` (one state row rewritten in place) and
adds its small deliveries row if it fits in the pages there are (else the rows are left to
`Sweep`, their records dropped and counted); a failure, park or requeue that would take a
new page is undone (`Tx.in_place`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from webhookd.ids import generated_id, generated_sequence, id_tag
from webhookd.records import (
    Delivered,
    Failure,
    HistoryPolicy,
    IngestResult,
    NewWebhook,
    PruneResult,
    ReplayResult,
    ReplaySelection,
    ReplayTooLarge,
    ReplayWithoutPayloads,
    StoreError,
    TenantRow,
    Webhook,
)
from webhookd.store.history import (
    FAILURE_OVERHEAD,
    RECORD_OVERHEAD,
    StepClock,
    Survey,
    record_bytes,
    selection_conditions,
)


# What a history record counts for (store/history.py), over the history row's columns.
def record_bytes_sql(prefix: str = "") -> str:
    return (
        f"length(CAST({prefix}id AS BLOB)) + length(CAST({prefix}event AS BLOB))"
        f" + coalesce(length(CAST({prefix}data AS BLOB)), 0) + {RECORD_OVERHEAD}"
    )


RECORD_BYTES = record_bytes_sql()
FAILURE_BYTES = f"length(CAST(error AS BLOB)) + {FAILURE_OVERHEAD}"

# Records for the queued webhooks `after` < sequence <= `through` as they leave the queue
# (delivered, discarded), read from the rows before they are deleted: the head's attempts
# are the tenant's, the others' `others`. OR IGNORE: a record already there (none should
# be) must never fail the commit of a delivery.
RECORD_QUEUED = f"""
    INSERT OR IGNORE INTO history (tenant, sequence, id, event, accepted_at, finished_at,
        outcome, attempts, status, duration_ms, data)
    SELECT tenant, sequence, id, event, accepted_at, :at, :outcome,
           CASE WHEN sequence = :after + 1 THEN :attempts ELSE :others END,
           :status, :ms, CASE WHEN :payloads THEN data END
    FROM webhooks WHERE tenant = :tenant AND sequence > :after AND sequence <= :through
    RETURNING {RECORD_BYTES}"""

# A delivered record (issue 13, point 7): the webhook's row, left in `webhooks` at or below
# acked_sequence, joined to the `deliveries` row covering its sequence (schema.py, version
# 3): the first with last_sequence >= the row's, one probe of its key per row. CROSS JOIN:
# the webhooks row leads (SQLite keeps the written order), so a page is a range scan of
# webhooks from the cursor. The columns are a HistoryRecord's (reads.py RECORD_COLUMNS).
DELIVERED_COLUMNS = (
    "w.sequence, w.id, w.event, w.accepted_at, d.delivered_at, 'delivered', d.attempts, "
    "d.status, d.duration_ms, CASE WHEN d.payloads THEN w.data END, w.next_sequence"
)
COVERING = """(SELECT c.last_sequence FROM deliveries AS c
                WHERE c.tenant = w.tenant AND c.last_sequence >= w.sequence
                ORDER BY c.last_sequence LIMIT 1)"""
DELIVERED_JOIN = f"""CROSS JOIN deliveries AS d ON d.tenant = w.tenant
    AND d.last_sequence = {COVERING} AND d.first_sequence <= w.sequence"""
# What a delivered record counts for: RECORD_BYTES over its webhooks row (whose data is ''
# when the payload was not kept).
DELIVERED_BYTES = record_bytes_sql("w.")

T = TypeVar("T")


class Tx:
    """One group commit in progress: the connection, the state rows, batched statements."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        rows: dict[str, TenantRow],
        *,
        full: bool = False,
        sizes: dict[str, list[int]] | None = None,
    ) -> None:
        self.conn = conn
        self.rows = rows
        self.full = full  # the disk is full: take no new page (see the module's docstring)
        self.saved: dict[str, TenantRow | None] = {}
        self.inserts: list[tuple[str, int, str, str, float, str]] = []
        self.id_inserts: list[tuple[str, str, int, float]] = []
        self.records: list[dict[str, Any]] = []  # RECORD_QUEUED runs, before `deletes`
        self.deliveries: list[dict[str, Any]] = []  # `deliver` runs
        self.deletes: list[tuple[str, int, int]] = []
        self.known_ids: dict[tuple[str, str], int | None] = {}
        # The history's size per tenant before this transaction ([records, failures,
        # bytes], the store's), and what this transaction changes of it.
        self.sizes = sizes if sizes is not None else {}
        self.grown: dict[str, list[int]] = {}
        self.dropped = 0  # history records (and failed attempts) dropped for a full disk

    def grow(self, tenant: str, records: int = 0, failures: int = 0, size: int = 0) -> None:
        delta = self.grown.setdefault(tenant, [0, 0, 0])
        delta[0] += records
        delta[1] += failures
        delta[2] += size

    def size_of(self, tenant: str) -> list[int]:
        """The tenant's history size as this transaction sees it."""
        base = self.sizes.get(tenant, [0, 0, 0])
        delta = self.grown.get(tenant, [0, 0, 0])
        return [b + d for b, d in zip(base, delta, strict=True)]

    def record(self, params: dict[str, Any]) -> None:
        """Run RECORD_QUEUED now, counting what it added."""
        added = self.conn.execute(RECORD_QUEUED, params).fetchall()
        self.grow(params["tenant"], len(added), 0, sum(n for (n,) in added))

    def deliver(self, params: dict[str, Any]) -> None:
        """Record webhooks `after` < sequence <= `through` as delivered where they are: one
        deliveries row, the payloads stripped if not kept, their size counted."""
        self.conn.execute(
            """INSERT OR REPLACE INTO deliveries (tenant, last_sequence, first_sequence,
                   delivered_at, attempts, status, duration_ms, payloads)
               VALUES (:tenant, :through, :after + 1, :at, :attempts, :status, :ms,
                       :payloads)""",
            params,
        )
        if not params["payloads"]:
            self.conn.execute(
                """UPDATE webhooks SET data = '' WHERE tenant = :tenant
                   AND sequence > :after AND sequence <= :through""",
                params,
            )
        count, size = self.conn.execute(
            f"""SELECT count(*), coalesce(sum({RECORD_BYTES}), 0) FROM webhooks
                WHERE tenant = :tenant AND sequence > :after AND sequence <= :through""",
            params,
        ).fetchone()
        self.grow(params["tenant"], count, 0, size)

    def save_sizes(self) -> None:
        """The history sizes this transaction changed, added to the stored counters. On a
        full disk only if it fits (a new tenant's counter row may not): the counts in
        memory are then ahead of the stored ones until a restart reads them back."""
        rows = [(tenant, *delta) for tenant, delta in self.grown.items() if any(delta)]
        if not rows:
            return

        def save() -> None:
            self.conn.executemany(
                """INSERT INTO history_sizes (tenant, records, failures, bytes)
                   VALUES (?, ?, ?, ?)
                   ON CONFLICT (tenant) DO UPDATE SET
                       records = records + excluded.records,
                       failures = failures + excluded.failures,
                       bytes = bytes + excluded.bytes""",
                rows,
            )

        self.in_place(save)

    def row(self, tenant: str) -> TenantRow:
        """The tenant's state row, remembered as it was so a rollback can restore it."""
        if tenant not in self.saved:
            current = self.rows.get(tenant)
            self.saved[tenant] = current.copy() if current else None
        return self.rows.setdefault(tenant, TenantRow())

    def flush(self) -> None:
        """Run the batched statements, so the next statement sees their effect."""
        if self.inserts:
            self.conn.executemany(
                "INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                self.inserts,
            )
            self.inserts.clear()
        if self.id_inserts:
            self.conn.executemany(
                "INSERT INTO webhook_ids (tenant, id, sequence, accepted_at) VALUES (?, ?, ?, ?)",
                self.id_inserts,
            )
            self.id_inserts.clear()
        if self.records:
            records, self.records = self.records, []
            for params in records:
                self.record(params)
        if self.deliveries:
            deliveries, self.deliveries = self.deliveries, []
            for params in deliveries:
                self.deliver(params)
        if self.deletes:
            # Only the range acknowledged now: rows left from a full disk go by `Sweep`,
            # a few at a time, not all at once inside some delivery's commit.
            self.conn.executemany(
                "DELETE FROM webhooks WHERE tenant = ? AND sequence > ? AND sequence <= ?",
                self.deletes,
            )
            self.deletes.clear()

    def save_rows(self) -> None:
        self.conn.executemany(
            """INSERT INTO tenant_state (tenant, last_sequence, acked_sequence, attempts,
                   next_attempt_at, last_processed_at, paused)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (tenant) DO UPDATE SET
                   last_sequence = excluded.last_sequence,
                   acked_sequence = excluded.acked_sequence,
                   attempts = excluded.attempts,
                   next_attempt_at = excluded.next_attempt_at,
                   last_processed_at = excluded.last_processed_at,
                   paused = excluded.paused""",
            [
                (
                    tenant,
                    row.last_sequence,
                    row.acked_sequence,
                    row.attempts,
                    row.next_attempt_at,
                    row.last_processed_at,
                    int(row.paused),
                )
                for tenant in self.saved
                for row in (self.rows[tenant],)
            ],
        )

    def in_place(self, write: Callable[[], T]) -> T | StoreError:
        """`write()`; on a full disk, undone (a StoreError in its place) if it took a new
        page, which only a growing database file could give."""
        if not self.full:
            return write()
        self.flush()
        before = self.pages()
        self.conn.execute("SAVEPOINT in_place")
        try:
            value = write()
            grew = self.pages() > before
        except sqlite3.Error as exc:
            # A cap on the file (max_page_count) refuses the page in the statement, not at
            # commit; that may end the whole transaction, which then fails (and its ops are
            # tried one by one, see engine.py).
            full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            if not (full and self.conn.in_transaction):
                raise
            grew = True
        if grew:
            self.conn.execute("ROLLBACK TO in_place")
        self.conn.execute("RELEASE in_place")
        return StoreError(NO_ROOM, disk_full=True) if grew else value

    def pages(self) -> int:
        pages: int = self.conn.execute("PRAGMA page_count").fetchone()[0]
        return pages

    def rollback_rows(self) -> None:
        for tenant, saved in self.saved.items():
            if saved is None:
                self.rows.pop(tenant, None)
            else:
                self.rows[tenant] = saved


class Op:
    """A write waiting for the next group commit."""

    batchable = True
    appends = False  # adds rows to the queue: its commit is checked for room first
    # Set when the op failed for lack of room with its history record: it runs again
    # without it (the record dropped and counted), never held back for it.
    skip_history = False

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def apply(self, tx: Tx) -> Any:
        raise NotImplementedError


class Enqueue(Op):
    appends = True

    def __init__(self, tenant: str, items: Sequence[NewWebhook], accepted_at: float) -> None:
        super().__init__(tenant)
        self.items = items
        self.accepted_at = accepted_at
        self.queued: list[Webhook] = []

    def apply(self, tx: Tx) -> list[IngestResult]:
        row = tx.row(self.tenant)
        results: list[IngestResult] = []
        self.queued = []  # a transaction may be retried: start clean
        tag = id_tag(self.tenant)
        for item in self.items:
            if item.id is not None:
                key = (self.tenant, item.id)
                if key in tx.known_ids:
                    results.append(IngestResult(item.id, tx.known_ids[key], "duplicate"))
                    continue
                first = generated_sequence(tag, item.id)
                if first is not None and first <= row.last_sequence:
                    # An id this tenant was given (the service refuses one not yet given).
                    results.append(IngestResult(item.id, first, "duplicate"))
                    continue
            row.last_sequence += 1
            sequence = row.last_sequence
            webhook_id = item.id if item.id is not None else generated_id(tag, sequence)
            if item.id is not None:
                tx.known_ids[(self.tenant, item.id)] = sequence
                tx.id_inserts.append((self.tenant, item.id, sequence, self.accepted_at))
            tx.inserts.append(
                (self.tenant, sequence, webhook_id, item.event, self.accepted_at, item.data)
            )
            self.queued.append(
                Webhook(sequence, webhook_id, item.event, self.accepted_at, item.data)
            )
            results.append(IngestResult(webhook_id, sequence, "queued"))
        return results


class Acknowledge(Op):
    def __init__(
        self,
        tenant: str,
        through: int,
        at: float,
        delivered: Delivered | None = None,
        history: HistoryPolicy | None = None,
    ) -> None:
        super().__init__(tenant)
        self.through, self.at = through, at
        self.delivered = delivered
        self.history = history or HistoryPolicy()
        self.left_behind = False

    def apply(self, tx: Tx) -> None:
        row = tx.row(self.tenant)
        self.left_behind = False  # a transaction may be retried: start clean
        if self.through > row.acked_sequence:
            # With history kept, the rows stay where they are as the delivered records
            # (below acked_sequence, out of the queue) and one deliveries row says how they
            # went: no copy, no delete (schema.py, version 3). Without, they are deleted.
            kept = False
            if self.history.keep and self.skip_history:
                tx.dropped += self.through - row.acked_sequence
            elif self.history.keep:
                d = self.delivered
                params = {
                    "tenant": self.tenant,
                    "after": row.acked_sequence,
                    "through": self.through,
                    "at": self.at,
                    "attempts": d.attempts if d is not None else row.attempts + 1,
                    "status": d.status if d is not None else None,
                    "ms": d.duration_ms if d is not None else None,
                    "payloads": self.history.payloads,
                }
                if tx.full:
                    # Only if it fits in the pages there are: the acknowledgement is
                    # recorded either way, its records dropped (and counted) if not.
                    kept = not isinstance(tx.in_place(lambda: tx.deliver(params)), StoreError)
                    if not kept:
                        tx.dropped += self.through - row.acked_sequence
                else:
                    tx.deliveries.append(params)
                    kept = True
            if kept:
                pass  # the rows are the records now
            elif tx.full:
                # Deleting rows rewrites their pages and the free list: WAL space we may
                # not have. Moving `acked_sequence` is one state row, rewritten in place,
                # and takes the rows out of the queue as surely (reads ask for sequences
                # above it); they are deleted once there is room.
                self.left_behind = True
            else:
                tx.deletes.append((self.tenant, row.acked_sequence, self.through))
            row.acked_sequence = self.through
        row.attempts = 0
        row.next_attempt_at = None
        row.last_processed_at = self.at


class _Control(Op):
    """A rare, unbatched write; the batched statements before it are flushed first."""

    batchable = False


class RecordFailure(_Control):
    def __init__(
        self,
        tenant: str,
        failure: Failure,
        next_attempt_at: float | None,
        keep: int,
        history: HistoryPolicy | None = None,
    ) -> None:
        super().__init__(tenant)
        self.failure, self.next_attempt_at, self.keep = failure, next_attempt_at, keep
        self.history = history or HistoryPolicy()

    def apply(self, tx: Tx) -> None:
        row = tx.row(self.tenant)
        row.attempts = self.failure.attempt
        row.next_attempt_at = self.next_attempt_at
        # On a full disk with no room for the row in the pages there are, the attempt count
        # and the backoff are still stored (in the state row) and the failure still shown
        # (the worker keeps it in memory), but a restart forgets it.
        tx.in_place(self._insert(tx))
        if self.history.keep and (
            self.skip_history or isinstance(tx.in_place(lambda: self._keep(tx)), StoreError)
        ):
            tx.dropped += 1

    def _keep(self, tx: Tx) -> None:
        f = self.failure
        tx.conn.execute(
            """INSERT INTO failed_attempts (tenant, at, attempt, first_sequence,
                   last_sequence, count, status, error, duration_ms)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                self.tenant,
                f.at,
                f.attempt,
                f.first_sequence,
                f.last_sequence,
                f.count,
                f.status,
                f.error,
                f.duration_ms,
            ),
        )
        tx.grow(self.tenant, 0, 1, len(f.error.encode()) + FAILURE_OVERHEAD)

    def _insert(self, tx: Tx) -> Callable[[], None]:
        def insert() -> None:
            f = self.failure
            tx.conn.execute(
                """INSERT INTO failures (tenant, at, attempt, first_sequence, last_sequence,
                       count, status, error, duration_ms)
               VALUES (:tenant, :at, :attempt, :first, :last, :count, :status, :error, :ms)""",
                {
                    "tenant": self.tenant,
                    "at": f.at,
                    "attempt": f.attempt,
                    "first": f.first_sequence,
                    "last": f.last_sequence,
                    "count": f.count,
                    "status": f.status,
                    "error": f.error,
                    "ms": f.duration_ms,
                },
            )
            _prune_failures(tx.conn, self.tenant, self.keep)

        return insert


def _prune_failures(conn: sqlite3.Connection, tenant: str, keep: int) -> None:
    conn.execute(
        """DELETE FROM failures WHERE tenant = :tenant AND id <= (
               SELECT id FROM failures WHERE tenant = :tenant
               ORDER BY id DESC LIMIT 1 OFFSET :keep)""",
        {"tenant": tenant, "keep": keep},
    )


class ClearFailures(_Control):
    def __init__(self, tenant: str) -> None:
        super().__init__(tenant)

    def apply(self, tx: Tx) -> int:
        return tx.conn.execute(
            "DELETE FROM failures WHERE tenant = :tenant", {"tenant": self.tenant}
        ).rowcount


class SetPaused(_Control):
    def __init__(self, tenant: str, paused: bool) -> None:
        super().__init__(tenant)
        self.paused = paused

    def apply(self, tx: Tx) -> None:
        tx.row(self.tenant).paused = self.paused


class Park(_Control):
    """Move the head webhook to `parked`; its sequence becomes a visible gap."""

    def __init__(
        self, tenant: str, sequence: int, at: float, history: HistoryPolicy | None = None
    ) -> None:
        super().__init__(tenant)
        self.sequence, self.at = sequence, at
        self.history = history or HistoryPolicy()

    def apply(self, tx: Tx) -> Webhook | StoreError | None:
        row = tx.row(self.tenant)
        if self.sequence != row.acked_sequence + 1 or self.sequence > row.last_sequence:
            return None
        parked = tx.in_place(lambda: self._move(tx))
        if isinstance(parked, Webhook):
            if self.history.keep:
                attempts = row.attempts
                if isinstance(tx.in_place(lambda: self._record(tx, parked, attempts)), StoreError):
                    tx.dropped += 1
            row.acked_sequence = self.sequence
            row.attempts = 0
            row.next_attempt_at = None
        return parked

    def _move(self, tx: Tx) -> Webhook | None:
        # Deleted first, so that the parked copy can take the pages the row gives back.
        found = tx.conn.execute(
            """DELETE FROM webhooks WHERE tenant = :tenant AND sequence = :sequence
               RETURNING sequence, id, event, accepted_at, data""",
            {"tenant": self.tenant, "sequence": self.sequence},
        ).fetchone()
        if found is None:
            return None
        tx.conn.execute(
            """INSERT INTO parked (tenant, sequence, id, event, accepted_at, data, parked_at)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (self.tenant, *found, self.at),
        )
        return Webhook(*found)

    def _record(self, tx: Tx, webhook: Webhook, attempts: int) -> None:
        data = webhook.data if self.history.payloads else None
        tx.conn.execute(
            """INSERT OR IGNORE INTO history (tenant, sequence, id, event, accepted_at,
                   finished_at, outcome, attempts, data)
               VALUES (?, ?, ?, ?, ?, ?, 'parked', ?, ?)""",
            (self.tenant, *webhook[:4], self.at, attempts, data),
        )
        tx.grow(self.tenant, 1, 0, record_bytes(webhook.id, webhook.event, data))


class Requeue(_Control):
    """Put a parked webhook back at the tail: a new sequence, the same id and data."""

    appends = True

    def __init__(self, tenant: str, webhook_id: str, at: float) -> None:
        super().__init__(tenant)
        self.webhook_id, self.at = webhook_id, at
        self.queued: list[Webhook] = []

    def apply(self, tx: Tx) -> Webhook | StoreError | None:
        self.queued = []  # a transaction may be retried: start clean
        current = tx.rows.get(self.tenant)
        sequence = (current.last_sequence if current else 0) + 1
        webhook = tx.in_place(lambda: self._move(tx, sequence))
        if isinstance(webhook, Webhook):
            tx.row(self.tenant).last_sequence = webhook.sequence
            self.queued.append(webhook)
        return webhook

    def _move(self, tx: Tx, sequence: int) -> Webhook | None:
        # Deleted first, so that the queued copy can take the pages the parked one gives back.
        found = tx.conn.execute(
            """DELETE FROM parked WHERE rowid = (
                   SELECT rowid FROM parked WHERE tenant = :tenant AND id = :id
                   ORDER BY sequence LIMIT 1)
               RETURNING sequence, id, event, accepted_at, data""",
            {"tenant": self.tenant, "id": self.webhook_id},
        ).fetchone()
        if found is None:
            return None
        before, *kept = found
        tx.conn.execute(
            "INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (self.tenant, sequence, *kept),
        )
        # Its parked record (if kept) says where it went; rewritten in place.
        tx.conn.execute(
            """UPDATE history SET outcome = 'requeued', next_sequence = ?
               WHERE tenant = ? AND sequence = ? AND outcome = 'parked'""",
            (sequence, self.tenant, before),
        )
        return Webhook(sequence, *kept)


class Discard(_Control):
    """Drop a tenant's queue, parked webhooks and failures (an operator's explicit choice)."""

    def __init__(self, tenant: str, at: float, history: HistoryPolicy | None = None) -> None:
        super().__init__(tenant)
        self.at = at
        self.history = history or HistoryPolicy()
        self.left_behind = False

    def apply(self, tx: Tx) -> int:
        row = tx.row(self.tenant)
        params = {"tenant": self.tenant, "acked": row.acked_sequence}
        # The queue is contiguous: what waits is a subtraction. Rows at or below
        # acked_sequence are delivered records (or rows left on a full disk, for `Sweep`).
        dropped = row.last_sequence - row.acked_sequence
        if self.history.keep and dropped and self.skip_history:
            tx.dropped += dropped
        elif self.history.keep and dropped:
            record = {
                "tenant": self.tenant,
                "after": row.acked_sequence,
                "through": row.last_sequence,
                "at": self.at,
                "outcome": "discarded",
                "attempts": row.attempts,
                "others": 0,
                "status": None,
                "ms": None,
                "payloads": self.history.payloads,
            }
            if isinstance(tx.in_place(lambda: tx.record(record)), StoreError):
                tx.dropped += dropped
        # The parked ones' records say discarded now; those without one get one.
        tx.conn.execute(
            """UPDATE history SET outcome = 'discarded', finished_at = :at
               WHERE tenant = :tenant AND sequence IN (
                   SELECT sequence FROM parked WHERE tenant = :tenant)""",
            {"tenant": self.tenant, "at": self.at},
        )
        if self.history.keep and (
            self.skip_history
            or isinstance(tx.in_place(lambda: self._record_parked(tx)), StoreError)
        ):
            tx.dropped += 1
        # On a full disk, a long queue's delete would need more WAL than there is: the
        # queue is emptied as an acknowledgement empties it, and `Sweep` deletes the rows.
        self.left_behind = tx.full
        if not tx.full:
            tx.conn.execute(
                "DELETE FROM webhooks WHERE tenant = :tenant AND sequence > :acked", params
            )
        tx.conn.execute("DELETE FROM parked WHERE tenant = :tenant", params)
        tx.conn.execute("DELETE FROM failures WHERE tenant = :tenant", params)
        # The sequence counter stays: sequences are never reused, not even after a discard.
        row.acked_sequence = row.last_sequence
        row.attempts = 0
        row.next_attempt_at = None
        row.paused = False
        return dropped

    def _record_parked(self, tx: Tx) -> None:
        added = tx.conn.execute(
            f"""INSERT OR IGNORE INTO history (tenant, sequence, id, event, accepted_at,
                    finished_at, outcome, attempts, data)
                SELECT tenant, sequence, id, event, accepted_at, :at, 'discarded', 0,
                       CASE WHEN :payloads THEN data END
                FROM parked WHERE tenant = :tenant
                RETURNING {RECORD_BYTES}""",
            {"tenant": self.tenant, "at": self.at, "payloads": self.history.payloads},
        ).fetchall()
        tx.grow(self.tenant, len(added), 0, sum(n for (n,) in added))


class Sweep(_Control):
    """Delete a few rows acknowledged in place on a full disk (the writer's own op, run
    when it has nothing else to do): rows at or below acked_sequence that no deliveries row
    covers (those it covers are delivered records). It looks at up to ROWS rows above
    `after` and moves `after` past them. Its result: rows looked at (fewer than ROWS: done);
    None when the disk is full."""

    ROWS = 200  # a step: small enough not to hold up the commits queued behind it

    def __init__(self, tenant: str, after: int = 0) -> None:
        super().__init__(tenant)
        self.after = after

    def apply(self, tx: Tx) -> int | None:
        row = tx.rows.get(self.tenant)
        if tx.full or row is None:
            return None if tx.full else 0
        seen = tx.conn.execute(
            f"""SELECT w.rowid, w.sequence, coalesce(
                       (SELECT d.first_sequence FROM deliveries AS d
                        WHERE d.tenant = w.tenant AND d.last_sequence = {COVERING})
                       <= w.sequence, 0)
                FROM webhooks AS w INDEXED BY webhooks_queue
                WHERE w.tenant = :tenant AND w.sequence > :after AND w.sequence <= :acked
                ORDER BY w.sequence LIMIT :rows""",
            {
                "tenant": self.tenant,
                "after": self.after,
                "acked": row.acked_sequence,
                "rows": self.ROWS,
            },
        ).fetchall()
        loose = [rowid for rowid, _, covered in seen if not covered]
        if loose:
            tx.conn.execute(
                f"DELETE FROM webhooks WHERE rowid IN ({','.join('?' * len(loose))})", loose
            )
        if seen:
            self.after = seen[-1][1]
        return len(seen)


NO_ROOM = (
    "the database is full (no disk space left) and this change needs more of it; "
    "free space next to the database"
)


def lookup_ids(tx: Tx, ops: Iterable[Enqueue]) -> None:
    """Find which producer ids of this group were accepted before (one query per tenant)."""
    wanted: dict[str, set[str]] = {}
    for op in ops:
        ids = {item.id for item in op.items if item.id is not None}
        if ids:
            wanted.setdefault(op.tenant, set()).update(ids)
    for tenant, ids in wanted.items():
        id_list = list(ids)
        # Chunked to stay well inside SQLite's bound-parameter limit.
        for start in range(0, len(id_list), 900):
            chunk = id_list[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for found_id, sequence in tx.conn.execute(
                f"SELECT id, sequence FROM webhook_ids WHERE tenant = ? AND id IN ({marks})",
                (tenant, *chunk),
            ):
                tx.known_ids[(tenant, found_id)] = sequence


def selection_where(
    selection: ReplaySelection, params: dict[str, Any], prefix: str = ""
) -> list[str]:
    """The conditions (AND) on history rows for a replay's selection (or a query's), with
    their parameters added to `params`."""
    where: list[str] = []
    for field, column, operator, _, value in selection_conditions(selection):
        where.append(f"{prefix}{column} {operator} :{field}")
        params[field] = value
    return where


class Replay(_Control):
    """Put delivered webhooks back at the tail, in their order, all or nothing."""

    appends = True

    def __init__(
        self,
        tenant: str,
        selection: ReplaySelection,
        at: float,
        *,
        limit: int,
        dry_run: bool,
        replay_id: str | None,
    ) -> None:
        super().__init__(tenant)
        self.selection, self.at, self.limit = selection, at, limit
        self.dry_run, self.replay_id = dry_run, replay_id
        self.queued: list[Webhook] = []

    def apply(self, tx: Tx) -> ReplayResult | StoreError:
        self.queued = []  # a transaction may be retried: start clean
        conn = tx.conn
        if self.replay_id is not None:
            done = conn.execute(
                """SELECT count, first_sequence, last_sequence FROM replays
                   WHERE tenant = ? AND replay_id = ?""",
                (self.tenant, self.replay_id),
            ).fetchone()
            if done is not None:
                count, first, last = done
                return ReplayResult(count, first, last, repeated=True)
        current = tx.rows.get(self.tenant)
        acked = current.acked_sequence if current else 0
        # The delivered records: webhooks rows at or below acked_sequence that a deliveries
        # row covers (DELIVERED_JOIN). One upper bound (see reads._bounds).
        to = self.selection.to_sequence
        params: dict[str, Any] = {
            "tenant": self.tenant,
            "acked": acked if to is None else min(acked, to),
        }
        selection = dataclasses.replace(self.selection, to_sequence=None)
        where = " AND ".join(
            [
                "w.tenant = :tenant",
                "w.sequence <= :acked",
                *selection_where(selection, params, "w."),
            ]
        )
        count, first, last, bare = conn.execute(
            f"""SELECT count(*), min(w.sequence), max(w.sequence), sum(NOT d.payloads)
                FROM webhooks AS w {DELIVERED_JOIN} WHERE {where}""",
            params,
        ).fetchone()
        if count > self.limit:
            return ReplayTooLarge(count, self.limit, first, last)
        if bare:
            return ReplayWithoutPayloads(
                f"{bare} of the {count} webhooks matched were delivered without their data "
                "kept (history_payloads = false): they cannot be sent again"
            )
        if self.dry_run:
            return ReplayResult(count, None, None, dry_run=True)
        row = tx.row(self.tenant)
        found = conn.execute(
            f"""SELECT w.sequence, w.id, w.event, w.accepted_at, w.data
                FROM webhooks AS w {DELIVERED_JOIN} WHERE {where}
                ORDER BY w.sequence""",
            params,
        ).fetchall()
        start = row.last_sequence
        self.queued = [
            Webhook(start + n, webhook_id, event, accepted_at, data)
            for n, (_, webhook_id, event, accepted_at, data) in enumerate(found, 1)
        ]
        if found:
            conn.executemany(
                "INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(self.tenant, *w) for w in self.queued],
            )
            conn.executemany(
                "UPDATE webhooks SET next_sequence = ? WHERE tenant = ? AND sequence = ?",
                [
                    (w.sequence, self.tenant, old[0])
                    for w, old in zip(self.queued, found, strict=True)
                ],
            )
            row.last_sequence = start + len(found)
        result = ReplayResult(
            len(found),
            self.queued[0].sequence if found else None,
            self.queued[-1].sequence if found else None,
        )
        if self.replay_id is not None:
            conn.execute(
                """INSERT INTO replays (tenant, replay_id, count, first_sequence,
                       last_sequence, at) VALUES (?, ?, ?, ?, ?, ?)""",
                (
                    self.tenant,
                    self.replay_id,
                    result.count,
                    result.first_sequence,
                    result.last_sequence,
                    self.at,
                ),
            )
        return result


def prune_delivered(
    tx: Tx,
    tenant: str,
    budget: int,
    *,
    before: float | None = None,
    excess: int | None = None,
    until: float = float("inf"),
) -> tuple[int, int]:
    """Delete a tenant's oldest rows at or below acked_sequence (its delivered records, and
    any row a full disk left), in sequence order, up to `budget`: those accepted `before`
    (pruning by age: up to the first that is not), or until `excess` bytes of records are
    gone or a row is accepted after `until` (by size). With them go the deliveries rows no
    longer covering any. Returns (rows deleted, of which records)."""
    current = tx.rows.get(tenant)
    acked = current.acked_sequence if current else 0
    if before is not None:
        # One probe first: most steps find nothing old enough, and must cost next to
        # nothing (the pruner runs every few seconds, in the writer).
        oldest = tx.conn.execute(
            """SELECT accepted_at FROM webhooks INDEXED BY webhooks_queue
               WHERE tenant = ? AND sequence <= ? ORDER BY sequence LIMIT 1""",
            (tenant, acked),
        ).fetchone()
        if oldest is None or oldest[0] >= before:
            return 0, 0
    rows = tx.conn.execute(
        f"""SELECT w.rowid, w.sequence, w.accepted_at, {DELIVERED_BYTES}, coalesce(
                   (SELECT d.first_sequence FROM deliveries AS d
                    WHERE d.tenant = w.tenant AND d.last_sequence = {COVERING})
                   <= w.sequence, 0)
            FROM webhooks AS w INDEXED BY webhooks_queue
            WHERE w.tenant = ? AND w.sequence <= ? ORDER BY w.sequence LIMIT ?""",
        (tenant, acked, budget),
    ).fetchall()
    chosen: list[int] = []
    last = records = freed = 0
    for rowid, sequence, at, size, covered in rows:
        if before is not None and at >= before:
            break
        if excess is not None and chosen and (freed >= excess or at > until):
            break
        chosen.append(rowid)
        last = sequence
        if covered:
            records += 1
            freed += size
    for start in range(0, len(chosen), 900):
        chunk = chosen[start : start + 900]
        tx.conn.execute(
            f"DELETE FROM webhooks WHERE rowid IN ({','.join('?' * len(chunk))})", chunk
        )
    if chosen:
        tx.conn.execute(
            "DELETE FROM deliveries WHERE tenant = ? AND last_sequence <= ?", (tenant, last)
        )
        tx.grow(tenant, -records, 0, -freed)
    return len(chosen), records


# What pruning knows of every tenant (store/history.py Survey), read on the reader
# connection, not the writer: each tenant's oldest record of the other outcomes, delivered
# record (the lowest sequence at or below acked_sequence), failed attempt and producer id,
# in the order of history.PRUNED.
SURVEY = """
    SELECT s.tenant, s.acked_sequence,
           (SELECT min(accepted_at) FROM history AS h WHERE h.tenant = s.tenant),
           (SELECT w.accepted_at FROM webhooks AS w INDEXED BY webhooks_queue
            WHERE w.tenant = s.tenant AND w.sequence <= s.acked_sequence
            ORDER BY w.sequence LIMIT 1),
           (SELECT min(at) FROM failed_attempts AS f WHERE f.tenant = s.tenant),
           (SELECT min(accepted_at) FROM webhook_ids AS i WHERE i.tenant = s.tenant)
    FROM tenant_state AS s"""
# One tenant's oldest, as the survey reads it.
ONE_OLDEST = {
    "history": "SELECT min(accepted_at) FROM history WHERE tenant = ? AND ? >= 0",
    "webhooks": """SELECT accepted_at FROM webhooks INDEXED BY webhooks_queue
                   WHERE tenant = ? AND sequence <= ? ORDER BY sequence LIMIT 1""",
    "failed_attempts": "SELECT min(at) FROM failed_attempts WHERE tenant = ? AND ? >= 0",
}


class PruneHistory(_Control):
    """One step of pruning the history (Store.prune_history): by age per tenant, then by
    size (oldest first, every tenant together), then producer ids; at most `step` rows.
    Which tenants have anything to prune, the survey says (read off the writer)."""

    def __init__(
        self,
        now: float,
        *,
        retention: dict[str, float],
        default_retention: float,
        max_bytes: int | None,
        idempotency_window: float,
        step: int,
        survey: Survey,
    ) -> None:
        super().__init__("")
        self.now, self.retention, self.default = now, retention, default_retention
        self.max_bytes, self.window, self.step = max_bytes, idempotency_window, step
        self.survey = survey
        self.clock = StepClock()  # when the step stops (started again by apply)

    def apply(self, tx: Tx) -> PruneResult:
        self.clock = StepClock()
        budget = self.step
        by_age, failures, budget = self._by_age(tx, budget)
        by_size = ids = 0
        if self.max_bytes is not None and budget > 0:
            by_size, failed, budget = self._by_size(tx, budget, self.max_bytes)
            failures += failed
        if budget > 0:
            ids = self._forget_ids(tx, budget)
            budget -= ids
        return PruneResult(by_age, by_size, failures, ids, more=budget <= 0)

    def _by_age(self, tx: Tx, budget: int) -> tuple[int, int, int]:
        """The rows past their tenant's retention, of the tenants the survey found with
        any; returns (records, failed attempts, budget left)."""
        conn, survey = tx.conn, self.survey
        by_age = failures = 0
        for tenant, table, before in survey.due(self.now):
            if budget <= 0:
                break
            if self.clock.over():
                return by_age, failures, 0  # 0: more to do, in the next step
            if table == "webhooks":
                removed, records = prune_delivered(tx, tenant, budget, before=before)
            else:
                sql = (
                    f"""DELETE FROM history WHERE rowid IN (
                            SELECT rowid FROM history WHERE tenant = ? AND accepted_at < ?
                            ORDER BY accepted_at LIMIT ?)
                        RETURNING {RECORD_BYTES}"""
                    if table == "history"
                    else f"""DELETE FROM failed_attempts WHERE id IN (
                            SELECT id FROM failed_attempts WHERE tenant = ? AND at < ?
                            ORDER BY at LIMIT ?)
                        RETURNING {FAILURE_BYTES}"""
                )
                gone = conn.execute(sql, (tenant, before, budget)).fetchall()
                freed = sum(n for (n,) in gone)
                removed = len(gone)
                if table == "history":
                    tx.grow(tenant, -removed, 0, -freed)
                    records = removed
                else:
                    tx.grow(tenant, 0, -removed, -freed)
                    records = 0
                    failures += removed
            if removed < budget:
                survey.pruned(tenant, table, before)
            by_age += records
            budget -= removed
        return by_age, failures, budget

    def _by_size(self, tx: Tx, budget: int, max_bytes: int) -> tuple[int, int, int]:
        """The oldest rows of every tenant together while the history is over
        `max_bytes`; returns (records, failed attempts, budget left)."""
        total = sum(size[2] for size in tx.sizes.values())
        total += sum(delta[2] for delta in tx.grown.values())
        by_size = failures = 0
        # Each look at a tenant's oldest either prunes or corrects what the survey knew of
        # it (a lower bound); the step's clock bounds how many.
        while budget > 0 and total > max_bytes:
            if self.clock.over():
                return by_size, failures, 0  # 0: more to look at, in the next step
            taken = self._oldest(tx, budget, total - max_bytes)
            if taken is None:
                break
            removed, records, freed = taken
            by_size += records
            failures += removed - records
            budget -= removed
            total -= freed
        return by_size, failures, budget

    def _forget_ids(self, tx: Tx, budget: int) -> int:
        """Producer ids past the window and the retention, of the tenants the survey found
        with any; returns how many were forgotten."""
        conn, survey = tx.conn, self.survey
        ids = 0
        for tenant, before in survey.ids_due(self.now):
            if ids >= budget or self.clock.over():
                break
            row = tx.rows.get(tenant)
            if row is None:  # removed since the survey
                survey.ids_tried(tenant)
                continue
            forgotten: int = conn.execute(
                """DELETE FROM webhook_ids WHERE tenant = :tenant AND id IN (
                       SELECT i.id FROM webhook_ids AS i
                       WHERE i.tenant = :tenant AND i.accepted_at < :before
                         AND NOT coalesce(i.sequence > :acked, 0)
                         AND NOT EXISTS (SELECT 1 FROM parked AS p
                                         WHERE p.tenant = :tenant AND p.id = i.id)
                         AND NOT EXISTS (SELECT 1 FROM history AS h
                                         WHERE h.tenant = :tenant
                                           AND h.sequence = i.sequence)
                         AND NOT EXISTS (SELECT 1 FROM webhooks AS w
                                         WHERE w.tenant = :tenant
                                           AND w.sequence = i.sequence)
                       ORDER BY i.accepted_at LIMIT :budget)""",
                {
                    "tenant": tenant,
                    "before": before,
                    "acked": row.acked_sequence,
                    "budget": budget - ids,
                },
            ).rowcount
            if forgotten:
                conn.execute(
                    """UPDATE tenant_state SET ids_forgotten_before =
                           max(coalesce(ids_forgotten_before, 0), ?) WHERE tenant = ?""",
                    (before, tenant),
                )
            if forgotten < budget - ids:
                survey.ids_tried(tenant)
            ids += forgotten
        return ids

    def _oldest(self, tx: Tx, budget: int, excess: int) -> tuple[int, int, int] | None:
        """Remove the oldest records (or failed attempts) of the tenant that holds the
        oldest, up to `budget` rows, until `excess` bytes are gone or another tenant's
        oldest is older; return (rows removed, of which records, bytes freed), or None when
        nothing is left. The survey's heap says which tenant: a time found newer than it
        knew goes back into the heap, and nothing is removed this time."""
        conn = tx.conn
        survey = self.survey
        popped = survey.pop_oldest()
        if popped is None:
            return None
        known, tenant, table = popped
        current = tx.rows.get(tenant)
        acked = current.acked_sequence if current else 0
        found = conn.execute(ONE_OLDEST[table], (tenant, acked)).fetchone()
        at = found[0] if found else None
        if at is None:
            return 0, 0, 0
        if at > known:
            survey.push(at, tenant, table)
            return 0, 0, 0
        until = survey.next_oldest()
        survey.push(at, tenant, table)  # a lower bound of what it keeps
        size_before = tx.size_of(tenant)[2]
        if table == "webhooks":
            removed, records = prune_delivered(tx, tenant, budget, excess=excess, until=until)
            return removed, records, size_before - tx.size_of(tenant)[2]
        if table == "history":
            rows = conn.execute(
                f"""SELECT rowid, accepted_at, {RECORD_BYTES} FROM history
                    WHERE tenant = ? ORDER BY accepted_at LIMIT ?""",
                (tenant, budget),
            ).fetchall()
        else:
            rows = conn.execute(
                f"""SELECT id, at, {FAILURE_BYTES} FROM failed_attempts
                    WHERE tenant = ? ORDER BY at LIMIT ?""",
                (tenant, budget),
            ).fetchall()
        chosen: list[int] = []
        freed = 0
        for rowid, at, size in rows:
            if chosen and (freed >= excess or at > until):
                break
            chosen.append(rowid)
            freed += size
        key = "rowid" if table == "history" else "id"
        for start in range(0, len(chosen), 900):
            chunk = chosen[start : start + 900]
            conn.execute(
                f"DELETE FROM {table} WHERE {key} IN ({','.join('?' * len(chunk))})", chunk
            )
        if table == "history":
            tx.grow(tenant, -len(chosen), 0, -freed)
            return len(chosen), len(chosen), freed
        tx.grow(tenant, 0, -len(chosen), -freed)
        return len(chosen), 0, freed
