"""All SQL: schema and migrations, group-committed writes, queue reads.

Writes go through one writer thread that owns a plain `sqlite3` connection: callers submit
operations (`enqueue`, `acknowledge`, `record_failure`, ...), and whatever has accumulated
while the previous transaction was committing runs as one transaction, in one thread hop,
with one fsync. aiosqlite gives a thread hop per statement, which costs ~200 µs here; a group
commit needs the whole transaction in a single hop, hence the dedicated thread.

Reads (queue heads, peeks, parked lists) use a separate aiosqlite connection that is
read-only (`query_only`); WAL lets them run beside the writer.

Queue invariant: a tenant's queued webhooks are exactly the sequences
`acked_sequence + 1 … last_sequence`, contiguous. Acknowledging and parking remove from the
head; enqueueing and requeueing append at the tail. So the number waiting is a subtraction,
never a count over the table, and startup never scans the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import aiosqlite

from webhookd import logs
from webhookd.reserve import Reserve

log = logs.get_logger("webhookd.store")

SCHEMA_VERSION = 1

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE tenant_state (
                tenant TEXT PRIMARY KEY,
                last_sequence INTEGER NOT NULL DEFAULT 0,
                acked_sequence INTEGER NOT NULL DEFAULT 0,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at REAL,
                last_processed_at REAL,
                paused INTEGER NOT NULL DEFAULT 0
            ) WITHOUT ROWID""",
            # Rows carry their payload, so a rowid table (payload out of the index) with a
            # unique index on the queue order.
            """CREATE TABLE webhooks (
                tenant TEXT NOT NULL,
                sequence INTEGER NOT NULL,
                id TEXT NOT NULL,
                event TEXT NOT NULL,
                accepted_at REAL NOT NULL,
                data TEXT NOT NULL
            )""",
            "CREATE UNIQUE INDEX webhooks_queue ON webhooks (tenant, sequence)",
            # Producer-given ids only (generated UUIDs cannot collide): what makes ingest
            # idempotent. Kept after delivery, so a late retry of a delivered webhook is
            # still answered `duplicate`.
            """CREATE TABLE webhook_ids (
                tenant TEXT NOT NULL,
                id TEXT NOT NULL,
                sequence INTEGER,
                PRIMARY KEY (tenant, id)
            ) WITHOUT ROWID""",
            """CREATE TABLE parked (
                tenant TEXT NOT NULL,
                sequence INTEGER NOT NULL,
                id TEXT NOT NULL,
                event TEXT NOT NULL,
                accepted_at REAL NOT NULL,
                data TEXT NOT NULL,
                parked_at REAL NOT NULL
            )""",
            "CREATE UNIQUE INDEX parked_order ON parked (tenant, sequence)",
            "CREATE INDEX parked_id ON parked (tenant, id)",
            # AUTOINCREMENT: "newest first" is id order, so ids must never be reused even
            # after the newest rows are pruned.
            """CREATE TABLE failures (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                tenant TEXT NOT NULL,
                at REAL NOT NULL,
                attempt INTEGER NOT NULL,
                first_sequence INTEGER NOT NULL,
                last_sequence INTEGER NOT NULL,
                count INTEGER NOT NULL,
                status INTEGER,
                error TEXT NOT NULL,
                duration_ms REAL NOT NULL
            )""",
            "CREATE INDEX failures_tenant ON failures (tenant, id)",
        ],
    ),
]


class StoreError(Exception):
    """The database could not carry out a write (disk full, I/O error, ...)."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


class SchemaTooNew(StoreError):
    """The database was written by a newer webhookd; refusing beats corrupting it."""


# ---------------------------------------------------------------------------------------------
# Records crossing the store boundary


class Webhook(NamedTuple):
    """One queued webhook; `data` is the producer's object as JSON text, never re-encoded.

    A NamedTuple rather than a frozen dataclass: one is built per row read, and building a
    frozen dataclass costs several times more (bench/: a fifth of the batched drain loop).
    """

    sequence: int
    id: str
    event: str
    accepted_at: float
    data: str

    @property
    def timestamp(self) -> int:
        return int(self.accepted_at)


@dataclass(frozen=True, slots=True)
class ParkedWebhook:
    webhook: Webhook
    parked_at: float


@dataclass(frozen=True, slots=True)
class Failure:
    at: float
    attempt: int
    first_sequence: int
    last_sequence: int
    count: int
    status: int | None
    error: str
    duration_ms: float


@dataclass(frozen=True, slots=True)
class NewWebhook:
    """An accepted ingest item: `id` is None when the producer gave none."""

    id: str | None
    event: str
    data: str


IngestStatus = Literal["queued", "duplicate"]


@dataclass(frozen=True, slots=True)
class IngestResult:
    id: str
    sequence: int | None
    status: IngestStatus


@dataclass(slots=True)
class TenantRow:
    """The durable per-tenant state, one row of `tenant_state`."""

    last_sequence: int = 0
    acked_sequence: int = 0
    attempts: int = 0
    next_attempt_at: float | None = None
    last_processed_at: float | None = None
    paused: bool = False

    def copy(self) -> TenantRow:
        return TenantRow(
            self.last_sequence,
            self.acked_sequence,
            self.attempts,
            self.next_attempt_at,
            self.last_processed_at,
            self.paused,
        )


@dataclass
class TenantRecord:
    """What startup learns of a tenant: its state row and its stored recent failures."""

    name: str
    row: TenantRow
    failures: list[Failure] = field(default_factory=list)
    parked: int = 0


# ---------------------------------------------------------------------------------------------
# Write operations. Each runs inside the writer thread's transaction.


class _Tx:
    """One group commit in progress: the connection, the state rows, batched statements."""

    def __init__(self, conn: sqlite3.Connection, rows: dict[str, TenantRow]) -> None:
        self.conn = conn
        self.rows = rows
        self.saved: dict[str, TenantRow | None] = {}
        self.inserts: list[tuple[str, int, str, str, float, str]] = []
        self.id_inserts: list[tuple[str, str, int]] = []
        self.deletes: list[tuple[str, int]] = []
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
            self.conn.executemany(
                "DELETE FROM webhooks WHERE tenant = ? AND sequence <= ?", self.deletes
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

    def rollback_rows(self) -> None:
        for tenant, saved in self.saved.items():
            if saved is None:
                self.rows.pop(tenant, None)
            else:
                self.rows[tenant] = saved


class _Op:
    """A write waiting for the next group commit."""

    batchable = True

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def apply(self, tx: _Tx) -> Any:
        raise NotImplementedError


class _Enqueue(_Op):
    def __init__(self, tenant: str, items: Sequence[NewWebhook], accepted_at: float) -> None:
        super().__init__(tenant)
        self.items = items
        self.accepted_at = accepted_at
        self.queued: list[Webhook] = []
        # Ids for items without one, made here (not in the writer thread, where it would
        # hold the GIL the event loop needs).
        self.fresh_ids = new_ids(sum(1 for item in items if item.id is None))

    def apply(self, tx: _Tx) -> list[IngestResult]:
        row = tx.row(self.tenant)
        results: list[IngestResult] = []
        self.queued = []  # a transaction may be retried: start clean
        fresh = iter(self.fresh_ids)
        for item in self.items:
            if item.id is not None:
                key = (self.tenant, item.id)
                if key in tx.known_ids:
                    results.append(IngestResult(item.id, tx.known_ids[key], "duplicate"))
                    continue
            row.last_sequence += 1
            sequence = row.last_sequence
            webhook_id = item.id if item.id is not None else next(fresh)
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


# Hex digit -> the RFC 4122 variant digit (10xx) that keeps its low two bits.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_ids(count: int) -> list[str]:
    """`count` random (version 4) UUIDs from one urandom call: ~3x faster than uuid.uuid4()."""
    if not count:
        return []
    raw = os.urandom(16 * count).hex()
    ids = []
    for start in range(0, 32 * count, 32):
        h = raw[start : start + 32]
        ids.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}")
    return ids


class _Acknowledge(_Op):
    def __init__(self, tenant: str, through: int, at: float) -> None:
        super().__init__(tenant)
        self.through, self.at = through, at

    def apply(self, tx: _Tx) -> None:
        row = tx.row(self.tenant)
        if self.through > row.acked_sequence:
            tx.deletes.append((self.tenant, self.through))
            row.acked_sequence = self.through
        row.attempts = 0
        row.next_attempt_at = None
        row.last_processed_at = self.at


class _Control(_Op):
    """A rare, unbatched write; the batched statements before it are flushed first."""

    batchable = False


class _RecordFailure(_Control):
    def __init__(
        self, tenant: str, failure: Failure, next_attempt_at: float | None, keep: int
    ) -> None:
        super().__init__(tenant)
        self.failure, self.next_attempt_at, self.keep = failure, next_attempt_at, keep

    def apply(self, tx: _Tx) -> None:
        row = tx.row(self.tenant)
        row.attempts = self.failure.attempt
        row.next_attempt_at = self.next_attempt_at
        f = self.failure
        tx.conn.execute(
            """INSERT INTO failures (tenant, at, attempt, first_sequence, last_sequence, count,
                   status, error, duration_ms)
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


def _prune_failures(conn: sqlite3.Connection, tenant: str, keep: int) -> None:
    conn.execute(
        """DELETE FROM failures WHERE tenant = :tenant AND id <= (
               SELECT id FROM failures WHERE tenant = :tenant
               ORDER BY id DESC LIMIT 1 OFFSET :keep)""",
        {"tenant": tenant, "keep": keep},
    )


class _ClearFailures(_Control):
    def __init__(self, tenant: str) -> None:
        super().__init__(tenant)

    def apply(self, tx: _Tx) -> int:
        return tx.conn.execute(
            "DELETE FROM failures WHERE tenant = :tenant", {"tenant": self.tenant}
        ).rowcount


class _SetPaused(_Control):
    def __init__(self, tenant: str, paused: bool) -> None:
        super().__init__(tenant)
        self.paused = paused

    def apply(self, tx: _Tx) -> None:
        tx.row(self.tenant).paused = self.paused


class _SetAttempts(_Control):
    def __init__(self, tenant: str, attempts: int, next_attempt_at: float | None) -> None:
        super().__init__(tenant)
        self.attempts, self.next_attempt_at = attempts, next_attempt_at

    def apply(self, tx: _Tx) -> None:
        row = tx.row(self.tenant)
        row.attempts, row.next_attempt_at = self.attempts, self.next_attempt_at


class _Park(_Control):
    """Move the head webhook to `parked`; its sequence becomes a visible gap."""

    def __init__(self, tenant: str, sequence: int, at: float) -> None:
        super().__init__(tenant)
        self.sequence, self.at = sequence, at

    def apply(self, tx: _Tx) -> Webhook | None:
        row = tx.row(self.tenant)
        if self.sequence != row.acked_sequence + 1 or self.sequence > row.last_sequence:
            return None
        params = {"tenant": self.tenant, "sequence": self.sequence, "at": self.at}
        found = tx.conn.execute(
            """INSERT INTO parked (tenant, sequence, id, event, accepted_at, data, parked_at)
               SELECT tenant, sequence, id, event, accepted_at, data, :at FROM webhooks
               WHERE tenant = :tenant AND sequence = :sequence
               RETURNING sequence, id, event, accepted_at, data""",
            params,
        ).fetchone()
        if found is None:
            return None
        tx.conn.execute(
            "DELETE FROM webhooks WHERE tenant = :tenant AND sequence = :sequence", params
        )
        row.acked_sequence = self.sequence
        row.attempts = 0
        row.next_attempt_at = None
        return Webhook(*found)


class _Requeue(_Control):
    """Put a parked webhook back at the tail: a new sequence, the same id and data."""

    def __init__(self, tenant: str, webhook_id: str, at: float) -> None:
        super().__init__(tenant)
        self.webhook_id, self.at = webhook_id, at
        self.queued: list[Webhook] = []

    def apply(self, tx: _Tx) -> Webhook | None:
        self.queued = []  # a transaction may be retried: start clean
        params = {"tenant": self.tenant, "id": self.webhook_id}
        found = tx.conn.execute(
            """DELETE FROM parked WHERE rowid = (
                   SELECT rowid FROM parked WHERE tenant = :tenant AND id = :id
                   ORDER BY sequence LIMIT 1)
               RETURNING id, event, accepted_at, data""",
            params,
        ).fetchone()
        if found is None:
            return None
        row = tx.row(self.tenant)
        row.last_sequence += 1
        webhook = Webhook(row.last_sequence, found[0], found[1], found[2], found[3])
        tx.conn.execute(
            "INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (self.tenant, webhook.sequence, *found),
        )
        self.queued.append(webhook)
        return webhook


class _Discard(_Control):
    """Drop a tenant's queue, parked webhooks and failures (an operator's explicit choice)."""

    def __init__(self, tenant: str) -> None:
        super().__init__(tenant)

    def apply(self, tx: _Tx) -> int:
        params = {"tenant": self.tenant}
        dropped = tx.conn.execute("DELETE FROM webhooks WHERE tenant = :tenant", params).rowcount
        tx.conn.execute("DELETE FROM parked WHERE tenant = :tenant", params)
        tx.conn.execute("DELETE FROM failures WHERE tenant = :tenant", params)
        row = tx.row(self.tenant)
        # The sequence counter stays: sequences are never reused, not even after a discard.
        row.acked_sequence = row.last_sequence
        row.attempts = 0
        row.next_attempt_at = None
        row.paused = False
        return dropped


# ---------------------------------------------------------------------------------------------
# The store


PRAGMAS_COMMON = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA temp_store = MEMORY",
    # The per-tenant queue index is the hot spot under mixed insert/delete; keep it cached.
    "PRAGMA cache_size = -65536",
)


class Store:
    """SQLite-backed queue store. One instance per daemon; not shared between processes."""

    def __init__(self, path: Path, *, durability: Literal["full", "normal"] = "full") -> None:
        self.path = path
        self.durability = durability
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="webhookd-writer"
        )
        self._conn: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._rows: dict[str, TenantRow] = {}
        self._pending: list[_Op] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.on_enqueued: Any = None  # set by the service: (tenant, [Webhook]) -> None
        self.commits = 0
        self._reserve = Reserve(path.with_name(path.name + "-reserve"))
        # Set when a commit ran out of space: ingest is refused, deliveries still recorded.
        self.disk_full = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> list[TenantRecord]:
        """Open (creating or migrating) the database; returns every known tenant's state."""
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(self._executor, self._open_writer)
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in ("PRAGMA query_only = ON", "PRAGMA busy_timeout = 5000"):
            await self._reader.execute(pragma)
        self._writer = asyncio.create_task(self._write_loop(), name="webhookd-store-writer")
        return records

    def _open_writer(self) -> list[TenantRecord]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            _refuse_newer(conn)  # before any pragma changes a database we must not touch
            for pragma in PRAGMAS_COMMON:
                conn.execute(pragma)
            synchronous = "FULL" if self.durability == "full" else "NORMAL"
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            _migrate(conn)
            records = _load_records(conn)
            if not self._reserve.make():
                self.disk_full = True
                log.warning("disk_full", detail="no room for the reserve; ingest is refused")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._rows = {r.name: r.row.copy() for r in records}
        return records

    async def close(self) -> None:
        """Commit what is pending, then close both connections. Idempotent."""
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._conn is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._close_writer)
        self._executor.shutdown(wait=True)

    def _close_writer(self) -> None:
        assert self._conn is not None
        try:
            # Fold the WAL back into the main file so a clean stop leaves one file.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("checkpoint_failed", error=str(exc))
        self._conn.close()
        self._conn = None

    # -- the group-commit writer -------------------------------------------------------------

    async def _submit(self, op: _Op) -> Any:
        if self._closing and self._writer is None:
            raise StoreError("the store is closed")
        self._pending.append(op)
        self._wakeup.set()
        return await op.future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            ops, self._pending = self._pending, []
            if not ops:
                if self._closing:
                    return
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._commit, ops)
            except Exception as exc:
                if not isinstance(exc, StoreError):
                    # A bug, not the disk: fail these writes but keep the writer alive.
                    log.exception("commit_crashed", ops=len(ops))
                    exc = StoreError(f"internal error: {exc!r}")
                results = [exc] * len(ops)
            for op, result in zip(ops, results, strict=True):
                self._settle(op, result)
            if self._closing and not self._pending:
                return

    def _settle(self, op: _Op, result: Any) -> None:
        """Tell the op's caller how it went; announce what a committed op queued."""
        if isinstance(result, StoreError):
            if not op.future.done():
                op.future.set_exception(result)
            return
        queued = getattr(op, "queued", None)
        if queued and self.on_enqueued is not None:
            try:
                self.on_enqueued(op.tenant, queued)
            except Exception:
                # The rows are committed; the tenant's worker reads them from the database
                # instead. The writer itself must keep running.
                log.exception("enqueue_notify_failed", tenant=op.tenant)
        if not op.future.done():  # the caller may have been cancelled meanwhile
            op.future.set_result(result)

    def _commit(self, ops: list[_Op]) -> list[Any]:
        """Run `ops` as one transaction (in the writer thread); see `reserve` for a full disk.

        Out of space, the reserve is released and the transaction runs again without its
        ingest, which is refused (a StoreError in its place): deliveries, failures and
        controls are still recorded. The result list holds each op's result or error.
        """
        try:
            results = self._transaction(ops)
        except Exception as exc:
            if not (isinstance(exc, StoreError) and exc.disk_full):
                if len(ops) == 1:
                    raise
                # One bad write must not fail the others committed with it (other
                # producers' ingest, deliveries being recorded): each on its own, then.
                log.warning("commit_isolating", ops=len(ops), error=str(exc))
                results = [self._alone(op) for op in ops]
                if self.disk_full:
                    self._checkpoint()
                return results
            released = self._reserve.release()
            self.disk_full = True
            log.warning("disk_full", released_reserve=released, error=str(exc))
            refused = StoreError(DISK_FULL, disk_full=True)
            rest = [op for op in ops if not isinstance(op, _Enqueue)]
            done = iter(self._transaction(rest) if rest else [])
            results = [refused if isinstance(op, _Enqueue) else next(done) for op in ops]
        if self.disk_full:
            self._checkpoint()
        return results

    def _alone(self, op: _Op) -> Any:
        """Run one op in its own transaction; its error becomes its result."""
        try:
            return self._transaction([op])[0]
        except StoreError as exc:
            return exc
        except Exception as exc:
            log.exception("commit_crashed", tenant=op.tenant)
            return StoreError(f"internal error: {type(exc).__name__}")

    def _checkpoint(self) -> None:
        """While the disk is full, restart the WAL after each commit so that it reuses its
        own space instead of growing (it can only grow into space we do not have)."""
        assert self._conn is not None
        try:
            self._conn.execute("PRAGMA wal_checkpoint(RESTART)")
        except sqlite3.Error as exc:
            log.warning("checkpoint_failed", error=str(exc))

    def _transaction(self, ops: list[_Op]) -> list[Any]:
        """Run `ops` as one transaction. All or nothing."""
        conn = self._conn
        if conn is None:
            raise StoreError("the store is closed")
        tx = _Tx(conn, self._rows)
        try:
            conn.execute("BEGIN IMMEDIATE")
            _lookup_ids(tx, [op for op in ops if isinstance(op, _Enqueue)])
            results = []
            for op in ops:
                if not op.batchable:
                    tx.flush()
                results.append(op.apply(tx))
            tx.flush()
            if tx.saved:
                tx.save_rows()
            conn.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:
            tx.rollback_rows()
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rollback_failed")
            if isinstance(exc, sqlite3.Error):
                full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                log.error("commit_failed", error=str(exc), ops=len(ops), disk_full=full)
                raise StoreError(_describe(exc), disk_full=full) from exc
            raise
        return results

    # -- writes ------------------------------------------------------------------------------

    async def enqueue(
        self, tenant: str, items: Sequence[NewWebhook], accepted_at: float
    ) -> list[IngestResult]:
        """Queue `items` for `tenant` (all or nothing); returns once durably committed."""
        if self.disk_full and not await self._recover_space():
            raise StoreError(DISK_FULL, disk_full=True)
        result: list[IngestResult] = await self._submit(_Enqueue(tenant, items, accepted_at))
        return result

    async def _recover_space(self) -> bool:
        """Make the reserve again if the disk has room for it; True when space is back."""
        if not self._reserve.room():  # one statvfs call: cheap enough for every request
            return False
        loop = asyncio.get_running_loop()
        try:
            made = await loop.run_in_executor(self._executor, self._reserve.make)
        except OSError as exc:
            log.warning("reserve_failed", error=str(exc))
            return False
        if made:
            self.disk_full = False
            log.warning("disk_space_recovered", detail="ingest accepted again")
        return made

    async def acknowledge(self, tenant: str, through_sequence: int, at: float) -> None:
        """The endpoint took everything up to `through_sequence`: remove it, reset backoff."""
        await self._submit(_Acknowledge(tenant, through_sequence, at))

    async def record_failure(
        self, tenant: str, failure: Failure, next_attempt_at: float | None, keep: int
    ) -> None:
        """Store a failed attempt, the new attempt count and when to try next."""
        await self._submit(_RecordFailure(tenant, failure, next_attempt_at, keep))

    async def clear_failures(self, tenant: str) -> int:
        cleared: int = await self._submit(_ClearFailures(tenant))
        return cleared

    async def set_paused(self, tenant: str, paused: bool) -> None:
        await self._submit(_SetPaused(tenant, paused))

    async def set_attempts(self, tenant: str, attempts: int, next_attempt_at: float | None) -> None:
        await self._submit(_SetAttempts(tenant, attempts, next_attempt_at))

    async def park(self, tenant: str, sequence: int, at: float) -> Webhook | None:
        """Park the head webhook `sequence`; None when it is no longer the head."""
        parked: Webhook | None = await self._submit(_Park(tenant, sequence, at))
        return parked

    async def requeue(self, tenant: str, webhook_id: str, at: float) -> Webhook | None:
        """Move a parked webhook to the tail of the queue; None when no such parked id."""
        queued: Webhook | None = await self._submit(_Requeue(tenant, webhook_id, at))
        return queued

    async def discard(self, tenant: str) -> int:
        dropped: int = await self._submit(_Discard(tenant))
        return dropped

    # -- reads -------------------------------------------------------------------------------

    @property
    def _db(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("the store is not open")
        return self._reader

    async def read_queue(self, tenant: str, after: int, limit: int) -> list[Webhook]:
        """Up to `limit` queued webhooks of `tenant` with sequence > `after`, in order."""
        rows = await self._db.execute_fetchall(
            """SELECT sequence, id, event, accepted_at, data FROM webhooks
               WHERE tenant = :tenant AND sequence > :after
               ORDER BY sequence LIMIT :limit""",
            {"tenant": tenant, "after": after, "limit": limit},
        )
        return [Webhook(*row) for row in rows]

    async def list_parked(self, tenant: str, limit: int = 1000) -> list[ParkedWebhook]:
        rows = await self._db.execute_fetchall(
            """SELECT sequence, id, event, accepted_at, data, parked_at FROM parked
               WHERE tenant = :tenant ORDER BY sequence LIMIT :limit""",
            {"tenant": tenant, "limit": limit},
        )
        return [ParkedWebhook(Webhook(*row[:5]), row[5]) for row in rows]

    async def count_parked(self) -> dict[str, int]:
        rows = await self._db.execute_fetchall(
            "SELECT tenant, count(*) FROM parked GROUP BY tenant"
        )
        return {tenant: count for tenant, count in rows}

    async def ping(self) -> None:
        """Raise unless the database answers a query."""
        await self._db.execute_fetchall("SELECT 1")

    async def pragma(self, name: str) -> Any:
        """One pragma's value as the writer connection sees it (for tests and `check`)."""
        loop = asyncio.get_running_loop()

        def read() -> Any:
            assert self._conn is not None
            return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

        return await loop.run_in_executor(self._executor, read)


def _lookup_ids(tx: _Tx, ops: Iterable[_Enqueue]) -> None:
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


def _refuse_newer(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database schema is version {version}, newer than this webhookd "
            f"understands ({SCHEMA_VERSION}); run a newer webhookd"
        )
    return version


def _migrate(conn: sqlite3.Connection) -> None:
    version = _refuse_newer(conn)
    for target, statements in MIGRATIONS:
        if target <= version:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("schema_migrated", version=target)


def _load_records(conn: sqlite3.Connection) -> list[TenantRecord]:
    records: dict[str, TenantRecord] = {}
    for name, *values in conn.execute(
        """SELECT tenant, last_sequence, acked_sequence, attempts, next_attempt_at,
                  last_processed_at, paused FROM tenant_state ORDER BY tenant"""
    ):
        row = TenantRow(*values)
        row.paused = bool(row.paused)
        records[name] = TenantRecord(name, row)
    for name, *values in conn.execute(
        """SELECT tenant, at, attempt, first_sequence, last_sequence, count, status, error,
                  duration_ms FROM failures ORDER BY tenant, id DESC"""
    ):
        if name in records:
            records[name].failures.append(Failure(*values))
    for name, count in conn.execute("SELECT tenant, count(*) FROM parked GROUP BY tenant"):
        if name in records:
            records[name].parked = count
    return list(records.values())


DISK_FULL = (
    "the database is full (no disk space left): ingest is refused until space is freed "
    "next to the database; deliveries go on"
)


def _describe(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "full" in text:
        return f"the database is full ({text}); free disk space"
    return f"database error: {text}"
