"""The PostgreSQL store: group-committed writes on one connection, reads on a small pool.

Writes go through one event-loop task that owns the writer connection: callers submit
operations (`enqueue`, `acknowledge`, ...), and whatever has accumulated while the previous
transaction was committing runs as one transaction (writes.py), with one WAL flush. If the
transaction fails on a statement, its ops are run again one by one, so the one bad write
fails alone. `durability` sets the writer session's `synchronous_commit`: "full" waits for
each commit's WAL flush (on), "normal" does not (off: a server crash may lose the last
moments of commits, never consistency).

Reads (queue heads, parked lists, the health check) use a pool of a few read-only sessions
beside the writer.

Several webhookd may share the database (cluster.py): any of them queues webhooks for any
tenant, and the one holding a tenant's lease delivers it. The writes that record a
delivery's outcome carry the lease's fencing token and are refused (`LeaseLost`) when
another instance has claimed the tenant since. A commit that queues webhooks notifies the
others (`NOTIFY webhookd_queued`), so the owner's worker wakes wherever ingest landed.

The server may go away (restarted, stopped, unreachable). Writes then raise `StoreError`
at once (ingest answers 503) and `ping` fails, while a task reconnects the writer in the
background.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import asyncpg

from webhookd import logs
from webhookd.config import PostgresURL
from webhookd.records import (
    Delivered,
    Failure,
    FoundWebhook,
    HistoryPolicy,
    HistoryQuery,
    HistoryRecord,
    HistorySize,
    IngestResult,
    LeaseLost,
    NewWebhook,
    ParkedWebhook,
    PruneResult,
    ReplayResult,
    ReplaySelection,
    StoreError,
    TenantRecord,
    Webhook,
)
from webhookd.store.history import Survey, settings_of
from webhookd.store.postgres import connection, reads
from webhookd.store.postgres.cluster import PgCluster
from webhookd.store.postgres.connection import CONNECT_ERRORS
from webhookd.store.postgres.schema import load_records, migrate
from webhookd.store.postgres.writes import (
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
    Show,
    Tx,
)
from webhookd.store.protocol import KEEP_ALL, OnEnqueued

if TYPE_CHECKING:
    from webhookd.store.postgres.connection import Connection

log = logs.get_logger("webhookd.store")

READERS = 3  # sessions in the read pool: reads are short, and the writer has its own
CLOSE_TIMEOUT_S = 5.0  # a graceful close that takes longer (a server gone quiet) is cut
RECONNECT_FIRST_S = 0.25  # the first wait before connecting again, doubled up to …
RECONNECT_MAX_S = 2.0  # … this: a server back is in use again within about this long


class PostgresStore:
    """The `Store` on PostgreSQL. One per daemon; several daemons may share the database."""

    disk_full = False  # the server's disk is its own: a full one is a StoreError, not a mode
    history_dropped = 0  # the same: a history record is never dropped, it fails its commit

    def __init__(
        self,
        database: PostgresURL,
        *,
        durability: Literal["full", "normal"] = "full",
        lease_seconds: float = 10.0,
    ) -> None:
        self.database = database
        self.durability = durability
        self.on_enqueued: OnEnqueued | None = None  # set by the service (see Store)
        self.lease_seconds = lease_seconds
        self.cluster: PgCluster | None = PgCluster(database, lease_seconds)
        self.commits = 0
        self._conn: Connection | None = None  # the writer's session
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._survey: Survey | None = None  # what pruning knows of every tenant
        self._pending: list[Op] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False
        self._down: StoreError | None = None  # set while the server is unreachable

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> list[TenantRecord]:
        """Connect, create or migrate the schema; return every known tenant's state."""
        try:
            await self._connect()
            assert self._conn is not None
            await migrate(self._conn)
            records = await load_records(self._conn)
            self._pool = await asyncpg.create_pool(
                self.database.url,
                password=self.database.password.reveal() or None,
                # Connected on demand: a pool that keeps a floor reconnects by itself while
                # the server is away, warning at each attempt; the writer already says so.
                min_size=0,
                max_size=READERS,
                reset=_keep_session,
                timeout=connection.CONNECT_TIMEOUT_S,
                server_settings={
                    "application_name": connection.application_name("reader"),
                    "default_transaction_read_only": "on",
                },
            )
        except BaseException as exc:
            await self._disconnect()
            if isinstance(exc, StoreError) or not isinstance(exc, CONNECT_ERRORS):
                raise
            raise StoreError(connection.cannot_open(self.database, exc)) from None
        self._writer = asyncio.create_task(self._write_loop(), name="webhookd-store-writer")
        return records

    async def _connect(self) -> None:
        """The writer's session, with the durability asked for.

        A process frozen between two statements of a commit (SIGSTOP, a suspended VM, a cut
        network) would keep its locks on the tenants' counters and leases, and hold up
        ingest and claims on every other instance for as long: the server ends a session
        idle in its transaction for lease_seconds (its leases are lost by then anyway), and
        the transaction is rolled back."""
        synchronous = "on" if self.durability == "full" else "off"
        writer = await connection.connect(
            self.database,
            "writer",
            {
                "synchronous_commit": synchronous,
                "idle_in_transaction_session_timeout": str(int(self.lease_seconds * 1000)),
            },
        )
        writer.add_termination_listener(self._terminated)
        self._conn = writer

    async def close(self) -> None:
        """Commit what is pending, then close the sessions. Idempotent."""
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
            self._reconnecting = None
        await self._disconnect()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
            except (TimeoutError, *CONNECT_ERRORS):
                pool.terminate()
        if conn is not None:
            with contextlib.suppress(*CONNECT_ERRORS):
                await conn.close(timeout=CLOSE_TIMEOUT_S)
            conn.terminate()  # a no-op once closed

    # -- losing the server, and finding it again ---------------------------------------------

    def _terminated(self, conn: object) -> None:
        """A session ended without our closing it (the server stopped or restarted, the
        network broke, an operator terminated it)."""
        if conn is self._conn:
            self._lose(None)

    def _lose(self, exc: BaseException | None) -> None:
        """The writer's session is gone: stop writing, and reconnect in the background."""
        if self._down is not None:
            return
        self._down = StoreError(connection.unreachable(self.database, exc))
        log.error(
            "database_unreachable",
            database=str(self.database),
            error=connection.reason(exc) if exc else connection.CLOSED,
        )
        if self._conn is not None:
            self._conn.terminate()
        self._conn = None
        if not self._closing:
            self._reconnecting = asyncio.create_task(
                self._reconnect(), name="webhookd-store-connect"
            )

    async def _reconnect(self) -> None:
        delay = RECONNECT_FIRST_S
        while not self._closing:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
            try:
                await self._connect()
            except CONNECT_ERRORS as exc:
                self._down = StoreError(connection.unreachable(self.database, exc))
                continue
            except Exception:
                # A bug, not the server: say so, and keep trying rather than stay down.
                log.exception("reconnect_crashed", database=str(self.database))
                continue
            self._down = None
            log.warning("database_reconnected", database=str(self.database))
            self._wakeup.set()
            return

    # -- the group-commit writer -------------------------------------------------------------

    async def _submit(self, op: Op) -> Any:
        if self._closing and self._writer is None:
            raise StoreError("the store is closed")
        if op.fenced and self.cluster is not None and self.cluster.joined:
            assert op.tenant is not None
            op.fence = self.cluster.fence(op.tenant)
            if op.fence is None:
                raise LeaseLost(f"this instance does not hold the lease of {op.tenant}")
        self._pending.append(op)
        self._wakeup.set()
        return await op.future

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                await self._wakeup.wait()
            self._wakeup.clear()
            ops, self._pending = self._pending, []
            if not ops:
                if self._closing:
                    return
                continue
            # An op that must not share its transaction (pruning: it locks tenants the
            # group does not know of) commits on its own, after the group.
            grouped = [op for op in ops if not op.alone]
            for group in ([grouped] if grouped else []) + [[op] for op in ops if op.alone]:
                try:
                    results = await self._commit(group)
                except Exception as exc:
                    # A bug, not the database: fail these writes but keep the writer alive.
                    log.exception("commit_crashed", ops=len(group))
                    results = [StoreError(f"internal error: {type(exc).__name__}")] * len(group)
                for op, result in zip(group, results, strict=True):
                    self._settle(op, result)
            if self._closing and not self._pending:
                return

    async def _commit(self, ops: list[Op]) -> list[Any]:
        """Run `ops` as one transaction; the result list holds each op's result or error."""
        conn = self._conn
        if conn is None:
            return [self._unavailable()] * len(ops)
        try:
            return await self._transaction(conn, ops)
        except Exception as exc:
            if _session_ended(conn, exc):  # not a statement: none of them can commit now
                self._lose(exc)
                return [self._unavailable()] * len(ops)
            if len(ops) == 1:
                return [self._refused(exc, ops)]
            # One bad write must not fail the others committed with it (other producers'
            # ingest, deliveries being recorded): each on its own, then.
            log.warning("commit_isolating", ops=len(ops), error=connection.reason(exc))
            return [await self._alone(op) for op in ops]

    async def _alone(self, op: Op) -> Any:
        conn = self._conn
        if conn is None:
            return self._unavailable()
        try:
            return (await self._transaction(conn, [op]))[0]
        except Exception as exc:
            if _session_ended(conn, exc):
                self._lose(exc)
                return self._unavailable()
            return self._refused(exc, [op])

    def _unavailable(self) -> StoreError:
        """Why nothing can be written now: the server is unreachable, or the store is not
        open."""
        if self._down is not None:
            return self._down
        if self._closing:
            return StoreError("the store is closed")
        return StoreError("the store is not open")

    def _refused(self, exc: Exception, ops: list[Op]) -> StoreError:
        if isinstance(exc, asyncpg.PostgresError):
            log.error("commit_failed", error=connection.reason(exc), ops=len(ops))
            return StoreError(f"database error: {connection.reason(exc)}")
        # A bug, not the database: fail these writes but keep the writer alive.
        log.exception("commit_crashed", ops=len(ops))
        return StoreError(f"internal error: {type(exc).__name__}")

    async def _transaction(self, conn: Connection, ops: list[Op]) -> list[Any]:
        """Run `ops` as one transaction. All or nothing (an op refused for its lease is
        not run, and its result is the refusal)."""
        every = ops
        async with conn.transaction():
            tx = Tx(conn)
            clustered = self.cluster is not None and self.cluster.joined
            await tx.lock(ops, fenced=clustered)
            if self.cluster is not None and clustered:
                ops = tx.check_fences(ops, self.cluster.instance)
            for op in ops:
                if op.batchable:
                    op.defer(tx)
                else:
                    await tx.flush()
                    await op.apply(tx)
            await tx.flush()
        self.commits += 1
        return [op.result for op in every]

    def _settle(self, op: Op, result: Any) -> None:
        """Tell the op's caller how it went; announce what a committed op queued."""
        if isinstance(result, LeaseLost) and self.cluster is not None and op.tenant:
            self.cluster.refused(op.tenant, op.fence)
        if isinstance(result, StoreError):
            if not op.future.done():
                op.future.set_exception(result)
            return
        if op.queued and op.tenant is not None and self.on_enqueued is not None:
            try:
                self.on_enqueued(op.tenant, op.queued)
            except Exception:
                # The rows are committed; the tenant's worker reads them from the database
                # instead. The writer itself must keep running.
                log.exception("enqueue_notify_failed", tenant=op.tenant)
        if not op.future.done():  # the caller may have been cancelled meanwhile
            op.future.set_result(result)

    # -- writes ------------------------------------------------------------------------------

    async def enqueue(
        self, tenant: str, items: Sequence[NewWebhook], accepted_at: float
    ) -> list[IngestResult]:
        result: list[IngestResult] = await self._submit(Enqueue(tenant, items, accepted_at))
        return result

    async def acknowledge(
        self,
        tenant: str,
        through_sequence: int,
        at: float,
        delivered: Delivered | None = None,
        history: HistoryPolicy = KEEP_ALL,
    ) -> None:
        await self._submit(Acknowledge(tenant, through_sequence, at, delivered, history))

    async def record_failure(
        self,
        tenant: str,
        failure: Failure,
        next_attempt_at: float | None,
        keep: int,
        history: HistoryPolicy = KEEP_ALL,
    ) -> None:
        await self._submit(RecordFailure(tenant, failure, next_attempt_at, keep, history))

    async def clear_failures(self, tenant: str) -> int:
        cleared: int = await self._submit(ClearFailures(tenant))
        return cleared

    async def set_paused(self, tenant: str, paused: bool) -> None:
        await self._submit(SetPaused(tenant, paused))

    async def park(
        self, tenant: str, sequence: int, at: float, history: HistoryPolicy = KEEP_ALL
    ) -> Webhook | None:
        parked: Webhook | None = await self._submit(Park(tenant, sequence, at, history))
        return parked

    async def requeue(self, tenant: str, webhook_id: str, at: float) -> Webhook | None:
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
            rows = await self._fetch(SURVEY)
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

    async def setting(self, name: str) -> str:
        """One setting as the writer's session has it (for tests and `check`)."""
        value: str = await self._submit(Show(name))
        return value

    # -- reads -------------------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        if self._pool is None:
            raise StoreError("the store is not open")
        try:
            return await self._pool.fetch(sql, *args)
        except CONNECT_ERRORS as exc:
            raise StoreError(connection.unreachable(self.database, exc)) from None

    async def load(self, tenants: Sequence[str] | None = None) -> list[TenantRecord]:
        if self._pool is None:
            raise StoreError("the store is not open")
        try:
            return await load_records(self._pool, None if tenants is None else list(tenants))
        except CONNECT_ERRORS as exc:
            raise StoreError(connection.unreachable(self.database, exc)) from None

    async def read_queue(self, tenant: str, after: int, limit: int) -> list[Webhook]:
        rows = await self._fetch(
            # Rows at or below acked_sequence are delivered records, not the queue.
            """SELECT sequence, id, event, accepted_at, data FROM webhooks
               WHERE tenant = $1 AND sequence > greatest($2::bigint, coalesce(
                   (SELECT acked_sequence FROM tenant_state WHERE tenant = $1), 0))
               ORDER BY sequence LIMIT $3""",
            tenant,
            after,
            limit,
        )
        return [Webhook(*row) for row in rows]

    async def list_parked(self, tenant: str, limit: int = 1000) -> list[ParkedWebhook]:
        rows = await self._fetch(
            """SELECT sequence, id, event, accepted_at, data, parked_at FROM parked
               WHERE tenant = $1 ORDER BY sequence LIMIT $2""",
            tenant,
            limit,
        )
        return [ParkedWebhook(Webhook(*row[:5]), row[5]) for row in rows]

    async def find_webhook(self, tenant: str, webhook_id: str) -> FoundWebhook:
        if self._pool is None:
            raise StoreError("the store is not open")
        try:
            async with self._pool.acquire() as conn:
                return await reads.find_webhook(conn, tenant, webhook_id)
        except CONNECT_ERRORS as exc:
            raise StoreError(connection.unreachable(self.database, exc)) from None

    async def history(self, tenant: str, query: HistoryQuery) -> list[HistoryRecord]:
        sql, args = reads.history_query(tenant, query)
        return [HistoryRecord(*row) for row in await self._fetch(sql, *args)]

    async def history_size(self) -> HistorySize:
        [row] = await self._fetch(
            """SELECT coalesce(sum(history_records), 0), coalesce(sum(history_failures), 0),
                      coalesce(sum(history_bytes), 0) FROM tenant_state"""
        )
        return HistorySize(int(row[0]), int(row[1]), int(row[2]))

    async def ping(self) -> None:
        """Raise unless the database answers and this store can write to it."""
        if self._conn is None:
            raise self._unavailable()
        await self._fetch("SELECT 1")


async def _keep_session(_conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """What a reader's session needs when it goes back to the pool: nothing. Reads set
    nothing, listen to nothing and keep no lock or cursor (asyncpg still rolls back a
    transaction left open). asyncpg's default reset sends `SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL` after every read, a second round trip that doubled
    a queue-head read's cost: 161 against 88 µs of client CPU, 113 against 47 µs of the
    server's, measured with the reads a worker makes."""


def _session_ended(conn: Connection, exc: Exception) -> bool:
    """Whether `exc` ended the session (the server went away) rather than refused a
    statement; asyncpg may raise the server's last message before it marks the session
    closed."""
    return conn.is_closed() or isinstance(exc, connection.SESSION_ENDED)
