"""The store's write operations, each a small class applied inside a group commit.

A caller's write becomes an `Op` with a future; the writer thread applies whatever ops
have gathered in one transaction (`Tx`), batching same-shaped statements (`executemany`)
and saving each touched tenant's state row once. Ops run in the writer thread: they touch
SQLite and the thread-side state rows, never the event loop.

On a full disk (`Tx.full`), an op takes no new page: the database file cannot grow, and a
page it cannot take would leave the WAL unable to start over (see reserve.py). An
acknowledgement then only moves `acked_sequence` (one state row rewritten in place) and
leaves the rows to `Sweep`; a failure, park or requeue that would take a new page is undone
(`Tx.in_place`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from webhookd.ids import generated_id, generated_sequence, id_tag
from webhookd.records import (
    Failure,
    IngestResult,
    NewWebhook,
    StoreError,
    TenantRow,
    Webhook,
)

T = TypeVar("T")


class Tx:
    """One group commit in progress: the connection, the state rows, batched statements."""

    def __init__(
        self, conn: sqlite3.Connection, rows: dict[str, TenantRow], *, full: bool = False
    ) -> None:
        self.conn = conn
        self.rows = rows
        self.full = full  # the disk is full: take no new page (see the module's docstring)
        self.saved: dict[str, TenantRow | None] = {}
        self.inserts: list[tuple[str, int, str, str, float, str]] = []
        self.id_inserts: list[tuple[str, str, int]] = []
        self.deletes: list[tuple[str, int, int]] = []
        self.known_ids: dict[tuple[str, str], int | None] = {}

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
                "INSERT INTO webhook_ids (tenant, id, sequence) VALUES (?, ?, ?)",
                self.id_inserts,
            )
            self.id_inserts.clear()
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
                tx.id_inserts.append((self.tenant, item.id, sequence))
            tx.inserts.append(
                (self.tenant, sequence, webhook_id, item.event, self.accepted_at, item.data)
            )
            self.queued.append(
                Webhook(sequence, webhook_id, item.event, self.accepted_at, item.data)
            )
            results.append(IngestResult(webhook_id, sequence, "queued"))
        return results


class Acknowledge(Op):
    def __init__(self, tenant: str, through: int, at: float) -> None:
        super().__init__(tenant)
        self.through, self.at = through, at
        self.left_behind = False

    def apply(self, tx: Tx) -> None:
        row = tx.row(self.tenant)
        self.left_behind = False  # a transaction may be retried: start clean
        if self.through > row.acked_sequence:
            if tx.full:
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
        self, tenant: str, failure: Failure, next_attempt_at: float | None, keep: int
    ) -> None:
        super().__init__(tenant)
        self.failure, self.next_attempt_at, self.keep = failure, next_attempt_at, keep

    def apply(self, tx: Tx) -> None:
        row = tx.row(self.tenant)
        row.attempts = self.failure.attempt
        row.next_attempt_at = self.next_attempt_at
        # On a full disk with no room for the row in the pages there are, the attempt count
        # and the backoff are still stored (in the state row) and the failure still shown
        # (the worker keeps it in memory), but a restart forgets it.
        tx.in_place(self._insert(tx))

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

    def __init__(self, tenant: str, sequence: int, at: float) -> None:
        super().__init__(tenant)
        self.sequence, self.at = sequence, at

    def apply(self, tx: Tx) -> Webhook | StoreError | None:
        row = tx.row(self.tenant)
        if self.sequence != row.acked_sequence + 1 or self.sequence > row.last_sequence:
            return None
        parked = tx.in_place(lambda: self._move(tx))
        if isinstance(parked, Webhook):
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
               RETURNING id, event, accepted_at, data""",
            {"tenant": self.tenant, "id": self.webhook_id},
        ).fetchone()
        if found is None:
            return None
        tx.conn.execute(
            "INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (self.tenant, sequence, *found),
        )
        return Webhook(sequence, *found)


class Discard(_Control):
    """Drop a tenant's queue, parked webhooks and failures (an operator's explicit choice)."""

    def __init__(self, tenant: str) -> None:
        super().__init__(tenant)
        self.left_behind = False

    def apply(self, tx: Tx) -> int:
        params = {"tenant": self.tenant}
        row = tx.row(self.tenant)
        # The queue is contiguous: what waits is a subtraction. Rows acknowledged in place
        # on a full disk (at or below acked_sequence) go too, but were not waiting.
        dropped = row.last_sequence - row.acked_sequence
        # On a full disk, a long queue's delete would need more WAL than there is: the
        # queue is emptied as an acknowledgement empties it, and `Sweep` deletes the rows.
        self.left_behind = tx.full
        if not tx.full:
            tx.conn.execute("DELETE FROM webhooks WHERE tenant = :tenant", params)
        tx.conn.execute("DELETE FROM parked WHERE tenant = :tenant", params)
        tx.conn.execute("DELETE FROM failures WHERE tenant = :tenant", params)
        # The sequence counter stays: sequences are never reused, not even after a discard.
        row.acked_sequence = row.last_sequence
        row.attempts = 0
        row.next_attempt_at = None
        row.paused = False
        return dropped


class Sweep(_Control):
    """Delete a few rows acknowledged in place on a full disk (the writer's own op, run
    when it has nothing else to do). Its result: rows deleted; None when the disk is full."""

    ROWS = 200  # a step: small enough not to hold up the commits queued behind it

    def __init__(self, tenant: str) -> None:
        super().__init__(tenant)

    def apply(self, tx: Tx) -> int | None:
        row = tx.rows.get(self.tenant)
        if tx.full or row is None:
            return None if tx.full else 0
        return tx.conn.execute(
            """DELETE FROM webhooks WHERE rowid IN (
                   SELECT rowid FROM webhooks WHERE tenant = :tenant AND sequence <= :acked
                   ORDER BY sequence LIMIT :rows)""",
            {"tenant": self.tenant, "acked": row.acked_sequence, "rows": self.ROWS},
        ).rowcount


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
