"""The SQLite store: group-committed writes in one writer thread, reads beside it.

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
never a count over the table, and startup never scans the queue. Rows at or below
`acked_sequence` are out of the queue: every queue read asks for `sequence >
acked_sequence`. With history kept they are the delivered records (a `deliveries` row
covers each, see schema.py version 3), pruned by age and size; without (history off, or
a record dropped on a full disk, where an acknowledgement only moves the number, see
writes.py) the acknowledgement deletes them, or the writer does a few at a time once
there is room (`Sweep`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from webhookd import logs
from webhookd.records import (
    Delivered,
    Failure,
    FoundWebhook,
    HistoryPolicy,
    HistoryQuery,
    HistoryRecord,
    HistorySize,
    IngestResult,
    NewWebhook,
    ParkedWebhook,
    PruneResult,
    ReplayResult,
    ReplaySelection,
    StoreError,
    TenantRecord,
    TenantRow,
    Webhook,
)
from webhookd.store.history import Survey, settings_of
from webhookd.store.protocol import KEEP_ALL, Cluster, OnEnqueued
from webhookd.store.sqlite import reads
from webhookd.store.sqlite.lock import DatabaseLock
from webhookd.store.sqlite.reserve import (
    WAL_FRAME_HEADER,
    WAL_PAGES,
    Reserve,
    free_bytes,
    size_for,
    wal_limit,
)
from webhookd.store.sqlite.schema import load_records, migrate, refuse_newer
from webhookd.store.sqlite.writes import (
    COVERING,
    SURVEY,
    Acknowledge,
    ClearFailures,
    Discard,
    Enqueue,
    Op,
    Park,
    PruneHistory,
    RecordFailure,
    Replay,
    Requeue,
    SetPaused,
    Sweep,
    Tx,
    lookup_ids,
)

log = logs.get_logger("webhookd.store")


# How often a full disk is looked at for room again (one statvfs call).
SPACE_CHECK_S = 2.0

PRAGMAS_COMMON = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA temp_store = MEMORY",
    # The per-tenant queue index is the hot spot under mixed insert/delete; keep it cached.
    # 16 MiB: a bound, not a target (64 MiB bought no speed in bench/ and kept RSS high).
    "PRAGMA cache_size = -16384",
    # A bounded WAL is what the reserve is sized for (see reserve.py); journal_size_limit,
    # which depends on the page size, is set beside it at open.
    f"PRAGMA wal_autocheckpoint = {WAL_PAGES}",
)


class SqliteStore:
    """The `Store` on SQLite. One instance per daemon; not shared between processes."""

    def __init__(self, path: Path, *, durability: Literal["full", "normal"] = "full") -> None:
        self.path = path
        self.durability = durability
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="webhookd-writer"
        )
        self._conn: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._rows: dict[str, TenantRow] = {}
        self._survey: Survey | None = None  # what pruning knows of every tenant
        self._pending: list[Op] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.on_enqueued: OnEnqueued | None = None  # set by the service (see Store)
        self.cluster: Cluster | None = None  # one process delivers every tenant
        self.commits = 0
        self._lock = DatabaseLock(path)
        self._reserve: Reserve  # made at open, sized by the database's page size
        self._page_size = 4096
        # Tenants with rows acknowledged on a full disk still in the table (see `Sweep`).
        # Tenants with rows acknowledged in place on a full disk, and where their sweep is.
        self._behind: dict[str, int] = {}
        # Set when a commit ran out of space: ingest is refused, deliveries still recorded.
        self.disk_full = False
        self._space_watch: asyncio.Task[None] | None = None
        # The history's size per tenant ([records, failed attempts, bytes]), as stored in
        # history_sizes and kept up to date by each commit; and the records dropped for a
        # full disk since open.
        self._sizes: dict[str, list[int]] = {}
        self.history_dropped = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> list[TenantRecord]:
        """Open (creating or migrating) the database; returns every known tenant's state."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._take_lock)
            records = await loop.run_in_executor(self._executor, self._open_writer)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(_cannot_open(self.path, exc)) from None
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        # The reader streams each row once: a small cache is enough.
        for pragma in (
            "PRAGMA query_only = ON",
            "PRAGMA busy_timeout = 5000",
            "PRAGMA cache_size = -2048",
        ):
            await self._reader.execute(pragma)
        self._writer = asyncio.create_task(self._write_loop(), name="webhookd-store-writer")
        if self.disk_full:
            self._watch_space()
        return records

    def _take_lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()

    def _open_writer(self) -> list[TenantRecord]:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            refuse_newer(conn)  # before any pragma changes a database we must not touch
            for pragma in PRAGMAS_COMMON:
                conn.execute(pragma)
            synchronous = "FULL" if self.durability == "full" else "NORMAL"
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            self._page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA journal_size_limit = {wal_limit(self._page_size)}")
            migrate(conn)
            records = load_records(conn)
            self._behind = {r.name: 0 for r in records if _left_behind(conn, r)}
            self._reserve = Reserve(
                self.path.with_name(self.path.name + "-reserve"), size_for(self._page_size)
            )
            if not self._reserve.make():
                self.disk_full = True
                log.warning("disk_full", detail="no room for the reserve; ingest is refused")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._rows = {r.name: r.row.copy() for r in records}
        self._sizes = {
            tenant: [records_, failures, size]
            for tenant, records_, failures, size in conn.execute(
                "SELECT tenant, records, failures, bytes FROM history_sizes"
            )
        }
        return records

    async def close(self) -> None:
        """Commit what is pending, then close both connections. Idempotent."""
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        if self._space_watch is not None:
            self._space_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._space_watch
            self._space_watch = None
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._conn is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._close_writer)
        self._executor.shutdown(wait=True)
        self._lock.release()  # last: the files are closed

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

    async def _submit(self, op: Op) -> Any:
        if self._closing and self._writer is None:
            raise StoreError("the store is closed")
        self._pending.append(op)
        self._wakeup.set()
        return await op.future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending and not self._sweep_next():
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
            if self.disk_full:
                self._watch_space()
            if self._closing and not self._pending:
                return

    def _sweep_next(self) -> bool:
        """With nothing else to write and room on the disk, queue one step of deleting
        rows acknowledged in place; True if one was queued."""
        if not self._behind or self.disk_full or self._closing:
            return False
        tenant, after = next(iter(self._behind.items()))
        self._pending.append(Sweep(tenant, after))
        return True

    def _settle(self, op: Op, result: Any) -> None:
        """Tell the op's caller how it went; announce what a committed op queued."""
        if isinstance(op, Sweep):  # the writer's own op: nobody awaits it
            if isinstance(result, StoreError) and not result.disk_full:
                # Not for lack of room (that is waited out): left until the next start.
                self._behind.pop(op.tenant, None)
            elif result is not None and result < Sweep.ROWS:
                self._behind.pop(op.tenant, None)
            elif op.tenant in self._behind and isinstance(op, Sweep):
                self._behind[op.tenant] = op.after
            op.future.cancel()
            return
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
        if getattr(op, "left_behind", False):
            self._behind.setdefault(op.tenant, 0)
        if not op.future.done():  # the caller may have been cancelled meanwhile
            op.future.set_result(result)

    def _commit(self, ops: list[Op]) -> list[Any]:
        """Run `ops` as one transaction (in the writer thread); see `reserve` for a full disk.

        Out of space, the reserve is released and the transaction runs again without its
        ingest, which is refused (a StoreError in its place): deliveries, failures and
        controls are still recorded, in place (see writes.py). The result list holds each
        op's result or error.
        """
        if not self.disk_full:
            try:
                return self._transaction(ops)
            except Exception as exc:
                if isinstance(exc, StoreError) and exc.disk_full:
                    self._full(exc)
                elif len(ops) == 1:
                    raise
                else:
                    # One bad write must not fail the others committed with it (other
                    # producers' ingest, deliveries being recorded): each on its own, then.
                    log.warning("commit_isolating", ops=len(ops), error=str(exc))
                    return [self._alone(op) for op in ops]
        # Full: no ingest (nor replay), which could only grow the database; the rest in
        # place.
        refused = StoreError(DISK_FULL, disk_full=True)
        rest = [op for op in ops if not _grows(op)]
        done = iter(self._together(rest))
        results = [refused if _grows(op) else next(done) for op in ops]
        self._checkpoint()
        return results

    def _full(self, exc: StoreError) -> None:
        """The disk has just filled: give back the reserve, and restart the WAL in it."""
        released = self._reserve.release()
        self.disk_full = True
        log.warning("disk_full", released_reserve=released, error=str(exc))
        # Before anything else is written: copying the WAL into the database file may need
        # the file to grow, and the space the reserve gave back is for that first.
        self._checkpoint()

    def _together(self, ops: list[Op]) -> list[Any]:
        """`ops` in one transaction; if that fails, each on its own, so that the one write
        that cannot be recorded (a requeue too big for the room left) fails alone."""
        if not ops:
            return []
        try:
            return self._transaction(ops)
        except StoreError as exc:
            if len(ops) == 1:
                return [exc]
            log.warning("commit_isolating", ops=len(ops), error=str(exc))
            return [self._alone(op) for op in ops]

    def _alone(self, op: Op) -> Any:
        """Run one op in its own transaction; its error becomes its result."""
        try:
            return self._transaction([op])[0]
        except StoreError as exc:
            keeps = getattr(op, "history", None)
            if exc.disk_full and keeps is not None and keeps.keep and not op.skip_history:
                # An outcome never waits for room for its history record: again without.
                op.skip_history = True
                return self._alone(op)
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

    def _check_room(self, conn: sqlite3.Connection, pages_before: int) -> None:
        """Refuse (as a full disk) an ingest whose commit and checkpoint would not fit.

        A commit that fits in the WAL but whose checkpoint cannot extend the database file
        is the trap: the WAL could never start over, and every later write, deliveries
        included, would need it to grow. So before COMMIT: the WAL frames of the pages this
        transaction adds, plus every page the database file still lacks (this
        transaction's and any not yet checkpointed), must fit in the free space. Pages it
        only changes are not counted: a few, which the reserve's margin covers.
        """
        pages: int = conn.execute("PRAGMA page_count").fetchone()[0]
        added = pages - pages_before
        if added <= 0:
            return
        missing = pages - os.stat(self.path).st_size // self._page_size
        need = added * (self._page_size + WAL_FRAME_HEADER) + missing * self._page_size
        free = free_bytes(self.path.parent)
        if free < need:
            log.warning("commit_refused", need_bytes=need, free_bytes=free)
            raise StoreError(DISK_FULL, disk_full=True)

    def _transaction(self, ops: list[Op]) -> list[Any]:
        """Run `ops` as one transaction. All or nothing."""
        conn = self._conn
        if conn is None:
            raise StoreError("the store is closed")
        tx = Tx(conn, self._rows, full=self.disk_full, sizes=self._sizes)
        try:
            conn.execute("BEGIN IMMEDIATE")
            appends = not tx.full and any(op.appends for op in ops)
            pages_before = conn.execute("PRAGMA page_count").fetchone()[0] if appends else 0
            lookup_ids(tx, [op for op in ops if isinstance(op, Enqueue)])
            results = []
            for op in ops:
                if not op.batchable:
                    tx.flush()
                results.append(op.apply(tx))
            tx.flush()
            if tx.saved:
                tx.save_rows()
            tx.save_sizes()
            if appends:
                self._check_room(conn, pages_before)
            conn.execute("COMMIT")
            self.commits += 1
            for tenant, delta in tx.grown.items():
                size = self._sizes.setdefault(tenant, [0, 0, 0])
                for n, d in enumerate(delta):
                    size[n] += d
            self.history_dropped += tx.dropped
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
        result: list[IngestResult] = await self._submit(Enqueue(tenant, items, accepted_at))
        return result

    def _watch_space(self) -> None:
        if self._space_watch is None or self._space_watch.done():
            self._space_watch = asyncio.create_task(
                self._wait_for_space(), name="webhookd-store-space"
            )

    async def _wait_for_space(self) -> None:
        """While the disk is full, look for room every SPACE_CHECK_S: status and metrics show
        the recovery without waiting for an ingest to try."""
        while self.disk_full and not self._closing:
            await asyncio.sleep(SPACE_CHECK_S)
            if self.disk_full and not self._closing:
                await self._recover_space()

    async def _recover_space(self) -> bool:
        """Make the reserve again if the disk has room for it; True when space is back."""
        if not self._reserve.room():  # one statvfs call: cheap enough for every request
            return False
        loop = asyncio.get_running_loop()
        try:
            made = await loop.run_in_executor(self._executor, self._remake_reserve)
        except OSError as exc:
            log.warning("reserve_failed", error=str(exc))
            return False
        if made:
            log.warning("disk_space_recovered", detail="ingest accepted again")
            self._wakeup.set()  # the writer may have rows to sweep
        return made

    def _remake_reserve(self) -> bool:
        """In the writer thread, so no commit runs between making the reserve and clearing
        the flag (one that found the disk full again would see its flag overwritten)."""
        made = self._reserve.make()
        if made:
            self.disk_full = False
        return made

    async def acknowledge(
        self,
        tenant: str,
        through_sequence: int,
        at: float,
        delivered: Delivered | None = None,
        history: HistoryPolicy = KEEP_ALL,
    ) -> None:
        """The endpoint took everything up to `through_sequence`: remove it, reset backoff,
        and record the delivered webhooks in the history (see Store)."""
        await self._submit(Acknowledge(tenant, through_sequence, at, delivered, history))

    async def record_failure(
        self,
        tenant: str,
        failure: Failure,
        next_attempt_at: float | None,
        keep: int,
        history: HistoryPolicy = KEEP_ALL,
    ) -> None:
        """Store a failed attempt, the new attempt count and when to try next."""
        await self._submit(RecordFailure(tenant, failure, next_attempt_at, keep, history))

    async def clear_failures(self, tenant: str) -> int:
        cleared: int = await self._submit(ClearFailures(tenant))
        return cleared

    async def set_paused(self, tenant: str, paused: bool) -> None:
        await self._submit(SetPaused(tenant, paused))

    async def park(
        self, tenant: str, sequence: int, at: float, history: HistoryPolicy = KEEP_ALL
    ) -> Webhook | None:
        """Park the head webhook `sequence`; None when it is no longer the head."""
        parked: Webhook | None = await self._submit(Park(tenant, sequence, at, history))
        return parked

    async def requeue(self, tenant: str, webhook_id: str, at: float) -> Webhook | None:
        """Move a parked webhook to the tail of the queue; None when no such parked id."""
        queued: Webhook | None = await self._submit(Requeue(tenant, webhook_id, at))
        return queued

    async def discard(
        self, tenant: str, at: float | None = None, history: HistoryPolicy = KEEP_ALL
    ) -> int:
        when = time.time() if at is None else at
        dropped: int = await self._submit(Discard(tenant, when, history))
        return dropped

    async def replay(
        self,
        tenant: str,
        selection: ReplaySelection,
        at: float,
        *,
        limit: int,
        dry_run: bool = False,
        replay_id: str | None = None,
    ) -> ReplayResult:
        if not dry_run and self.disk_full and not await self._recover_space():
            raise StoreError(DISK_FULL, disk_full=True)
        op = Replay(tenant, selection, at, limit=limit, dry_run=dry_run, replay_id=replay_id)
        result: ReplayResult = await self._submit(op)
        return result

    async def prune_history(
        self,
        now: float,
        *,
        retention: Mapping[str, float],
        default_retention: float,
        max_bytes: int | None,
        idempotency_window: float,
        step: int,
    ) -> PruneResult:
        settings = settings_of(retention, default_retention, max_bytes, idempotency_window)
        survey = self._survey
        if survey is None or not survey.serves(now, settings):
            rows = await self._db.execute_fetchall(SURVEY)
            # Off the event loop: 10,000 tenants' rows take tens of milliseconds to sort out.
            survey = self._survey = await asyncio.to_thread(
                Survey.of, [tuple(r) for r in rows], now, settings
            )
        op = PruneHistory(
            now,
            retention=dict(retention),
            default_retention=default_retention,
            max_bytes=max_bytes,
            idempotency_window=idempotency_window,
            step=step,
            survey=survey,
        )
        result: PruneResult = await self._submit(op)
        return result

    # -- reads -------------------------------------------------------------------------------

    @property
    def _db(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("the store is not open")
        return self._reader

    async def load(self, tenants: Sequence[str] | None = None) -> list[TenantRecord]:
        """Stored records, read on the writer's thread: after every commit before it."""
        loop = asyncio.get_running_loop()

        def read() -> list[TenantRecord]:
            if self._conn is None:
                raise StoreError("the store is not open")
            return load_records(self._conn)

        records = await loop.run_in_executor(self._executor, read)
        if tenants is None:
            return records
        wanted = set(tenants)
        return [r for r in records if r.name in wanted]

    async def read_queue(self, tenant: str, after: int, limit: int) -> list[Webhook]:
        """Up to `limit` queued webhooks of `tenant` with sequence > `after`, in order.
        Rows at or below acked_sequence are delivered records, not the queue."""
        rows = await self._db.execute_fetchall(
            """SELECT sequence, id, event, accepted_at, data FROM webhooks
               WHERE tenant = :tenant AND sequence > max(:after, coalesce(
                   (SELECT acked_sequence FROM tenant_state WHERE tenant = :tenant), 0))
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

    async def find_webhook(self, tenant: str, webhook_id: str) -> FoundWebhook:
        """Read on the writer's thread: between commits, so the webhook is found in one
        place (not between the queue and the history, moving)."""
        loop = asyncio.get_running_loop()

        def read() -> FoundWebhook:
            if self._conn is None:
                raise StoreError("the store is not open")
            return reads.find_webhook(self._conn, tenant, webhook_id)

        return await loop.run_in_executor(self._executor, read)

    async def history(self, tenant: str, query: HistoryQuery) -> list[HistoryRecord]:
        sql, params = reads.history_query(tenant, query)
        rows = await self._db.execute_fetchall(sql, params)
        return [HistoryRecord(*row) for row in rows]

    async def history_size(self) -> HistorySize:
        records = failures = size = 0
        for r, f, b in list(self._sizes.values()):
            records, failures, size = records + r, failures + f, size + b
        return HistorySize(records, failures, size)

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


def _grows(op: Op) -> bool:
    """Ingest and replay: refused while the disk is full (they only grow the database)."""
    return isinstance(op, Enqueue) or (isinstance(op, Replay) and not op.dry_run)


def _left_behind(conn: sqlite3.Connection, record: TenantRecord) -> bool:
    """Whether rows acknowledged on a full disk before the last stop are still there: the
    tenant's oldest row at or below acked_sequence is not a delivered record. (Any further
    up are left to pruning, which deletes every row below acked_sequence by age.)"""
    found = conn.execute(
        f"""SELECT coalesce((SELECT d.first_sequence FROM deliveries AS d
                             WHERE d.tenant = w.tenant AND d.last_sequence = {COVERING})
                            <= w.sequence, 0)
            FROM webhooks AS w INDEXED BY webhooks_queue
            WHERE w.tenant = :tenant AND w.sequence <= :acked ORDER BY w.sequence LIMIT 1""",
        {"tenant": record.name, "acked": record.row.acked_sequence},
    ).fetchone()
    return found is not None and not found[0]


DISK_FULL = (
    "the database is full (no disk space left): ingest is refused until space is freed "
    "next to the database; deliveries go on"
)


def _cannot_open(path: Path, exc: sqlite3.Error | OSError) -> str:
    """Why the database could not be opened, and what to do, in one sentence."""
    if isinstance(exc, OSError):
        where = exc.filename or path.parent
        return (
            f"cannot write beside the database: {where}: {exc.strerror or exc}; the daemon "
            f"must be able to create and write files in {path.parent}"
        )
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return (
            f"{path} is not a webhookd database, or it is damaged ({text}); restore it from "
            "a backup, or set database in [daemon] to another file"
        )
    if "readonly" in text or "read-only" in text:
        return (
            f"{path} is read-only for this user ({text}); the daemon must be able to write "
            f"the database and create files beside it in {path.parent}"
        )
    if "locked" in text:
        return f"{path} is locked by another program ({text}); stop it and start again"
    if "unable to open" in text:
        return (
            f"cannot open {path} ({text}); check that its folder exists and that the daemon's "
            "user may write there"
        )
    return f"cannot open {path}: {text}"


def _describe(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "full" in text:
        return f"the database is full ({text}); free disk space"
    return f"database error: {text}"
