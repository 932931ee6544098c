"""`webhookd migrate --to postgresql://…`: an SQLite database copied into an empty
PostgreSQL one.

The daemon must be stopped: the copy takes the SQLite store's own lock (the flock a running
daemon holds, store/sqlite/lock.py), so it refuses while a daemon has the file, and no daemon
can open it while the copy reads. The SQLite file is only read (`query_only`).

The target gets its schema from the PostgreSQL engine's own migrations, and is refused if
webhookd's tables there hold any row: the copy never merges. Tables of other applications in
the same database are left alone. The instance lock is taken on the target too, so a daemon
already running on it is refused.

Everything is copied in one PostgreSQL transaction, with COPY: every tenant's state (last
and acknowledged sequences, attempts, next attempt, last processed, paused, since when its
producer ids may have been forgotten), the live queue
(only rows after the acknowledged sequence: rows acknowledged on a full disk may wait there
for the sweep), producer ids with their acceptance time, parked webhooks, and recent
failures in their order (newest last, so their new ids keep "newest first"); then the
history: its records, the failed attempts kept (in their order too), the replays done, and
each tenant's history counters (records, failed attempts, bytes) onto its state row.

Tenants made through the API, files in `tenants_dir` beside SQLite, are copied into
`api_tenants` in the same transaction (each file's table as TOML text, inline secret
included, as the file holds it): on PostgreSQL they live in the database, shared by every
instance, and `tenants_dir` is no longer read. The files are left as they were.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from webhookd.config import PostgresURL
from webhookd.records import SchemaTooNew, StoreError
from webhookd.store.postgres import connection
from webhookd.store.postgres.connection import CONNECT_ERRORS
from webhookd.store.postgres.schema import MOVE_DELIVERED, refuse_newer, schema_version
from webhookd.store.postgres.schema import migrate as migrate_schema
from webhookd.store.sqlite.lock import DatabaseLock
from webhookd.store.sqlite.schema import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from webhookd.store.sqlite.schema import refuse_newer as sqlite_refuse_newer
from webhookd.store.sqlite.writes import DELIVERED_COLUMNS, DELIVERED_JOIN

# webhookd's tables, in the order they are copied.
TABLES = (
    "tenant_state",
    "webhooks",
    "webhook_ids",
    "parked",
    "failures",
    "history",
    "failed_attempts",
    "replays",
)


class MigrateError(Exception):
    """Why the copy was refused or failed, in one sentence for the operator."""


@dataclass
class Copied:
    tenants: int = 0
    queued: int = 0
    ids: int = 0
    parked: int = 0
    failures: int = 0
    api_tenants: int = 0
    history: int = 0
    failed_attempts: int = 0
    replays: int = 0


# What is read from SQLite, per table: the query, and the PostgreSQL columns it fills.
QUERIES: dict[str, tuple[str, list[str]]] = {
    # With the history's counters, kept on the state row on PostgreSQL.
    "tenant_state": (
        """SELECT t.tenant, t.last_sequence, t.acked_sequence, t.attempts, t.next_attempt_at,
                  t.last_processed_at, t.paused, coalesce(h.records, 0),
                  coalesce(h.failures, 0), coalesce(h.bytes, 0), t.ids_forgotten_before
           FROM tenant_state AS t LEFT JOIN history_sizes AS h USING (tenant)
           ORDER BY t.tenant""",
        [
            "tenant",
            "last_sequence",
            "acked_sequence",
            "attempts",
            "next_attempt_at",
            "last_processed_at",
            "paused",
            "history_records",
            "history_failures",
            "history_bytes",
            "ids_forgotten_before",
        ],
    ),
    # The live queue only: sequence > acked_sequence.
    "webhooks": (
        """SELECT w.tenant, w.sequence, w.id, w.event, w.accepted_at, w.data
           FROM webhooks AS w JOIN tenant_state AS t ON t.tenant = w.tenant
           WHERE w.sequence > t.acked_sequence ORDER BY w.tenant, w.sequence""",
        ["tenant", "sequence", "id", "event", "accepted_at", "data"],
    ),
    "webhook_ids": (
        """SELECT tenant, id, sequence,
                  coalesce(accepted_at, (julianday('now') - 2440587.5) * 86400.0)
           FROM webhook_ids WHERE sequence IS NOT NULL""",
        ["tenant", "id", "sequence", "accepted_at"],
    ),
    "parked": (
        """SELECT tenant, sequence, id, event, accepted_at, data, parked_at FROM parked
           ORDER BY tenant, sequence""",
        ["tenant", "sequence", "id", "event", "accepted_at", "data", "parked_at"],
    ),
    # Oldest first, so the identity column gives them ids in the same order.
    "failures": (
        """SELECT tenant, at, attempt, first_sequence, last_sequence, count, status, error,
                  duration_ms FROM failures ORDER BY id""",
        [
            "tenant",
            "at",
            "attempt",
            "first_sequence",
            "last_sequence",
            "count",
            "status",
            "error",
            "duration_ms",
        ],
    ),
    # The other outcomes' records, and the delivered ones: webhooks rows at or below
    # acked_sequence joined to the deliveries row covering each (SQLite schema version 3).
    "history": (
        f"""SELECT tenant, sequence, id, event, accepted_at, finished_at, outcome, attempts,
                   status, duration_ms, data, next_sequence FROM history
            UNION ALL
            SELECT w.tenant, {DELIVERED_COLUMNS} FROM webhooks AS w {DELIVERED_JOIN}
            ORDER BY 1, 2""",
        [
            "tenant",
            "sequence",
            "id",
            "event",
            "accepted_at",
            "finished_at",
            "outcome",
            "attempts",
            "status",
            "duration_ms",
            "data",
            "next_sequence",
        ],
    ),
    # Oldest first, as `failures`.
    "failed_attempts": (
        """SELECT tenant, at, attempt, first_sequence, last_sequence, count, status, error,
                  duration_ms FROM failed_attempts ORDER BY id""",
        [
            "tenant",
            "at",
            "attempt",
            "first_sequence",
            "last_sequence",
            "count",
            "status",
            "error",
            "duration_ms",
        ],
    ),
    "replays": (
        """SELECT tenant, replay_id, count, first_sequence, last_sequence, at FROM replays
           ORDER BY tenant, replay_id""",
        ["tenant", "replay_id", "count", "first_sequence", "last_sequence", "at"],
    ),
}


def open_sqlite(path: Path) -> tuple[sqlite3.Connection, DatabaseLock]:
    """The SQLite database, locked against a daemon and opened for reading only."""
    if not path.is_file():
        raise MigrateError(
            f"there is no SQLite database at {path} (database in [daemon] names it): "
            "nothing to migrate"
        )
    lock = DatabaseLock(path)
    try:
        lock.acquire()
    except StoreError:
        try:
            holder = lock.path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            holder = ""
        raise MigrateError(
            f"the database {path} is in use by a running webhookd (pid {holder or 'unknown'}); "
            "stop the daemon first, then migrate"
        ) from None
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA query_only = ON")
        version = sqlite_refuse_newer(conn)
        if version != SQLITE_SCHEMA_VERSION:
            raise MigrateError(
                f"{path} is not a webhookd database (schema version {version}); nothing to migrate"
            )
    except SchemaTooNew as exc:
        lock.release()
        raise MigrateError(str(exc)) from None
    except sqlite3.Error as exc:
        lock.release()
        raise MigrateError(f"cannot read the database {path}: {exc}") from None
    except BaseException:
        lock.release()
        raise
    return conn, lock


async def run(
    source: Path, target: PostgresURL, api_tenants: Mapping[str, str] | None = None
) -> Copied:
    """Copy `source` (an SQLite file) into `target` (an empty PostgreSQL database), with
    the tenants made through the API (`api_tenants`: name -> table as TOML text)."""
    conn, lock = open_sqlite(source)
    try:
        return await _copy(conn, target, api_tenants or {})
    finally:
        conn.close()
        lock.release()


async def _copy(
    sqlite: sqlite3.Connection, target: PostgresURL, api_tenants: Mapping[str, str]
) -> Copied:
    try:
        pg = await connection.connect(target, "migrate")
    except CONNECT_ERRORS as exc:
        raise MigrateError(connection.cannot_open(target, exc)) from None
    try:
        version = await schema_version(pg)
        try:
            refuse_newer(version)
        except SchemaTooNew as exc:
            raise MigrateError(f"{target}: {exc}") from None
        if version > 1:
            running = await pg.fetchval("SELECT string_agg(id, ', ') FROM instances")
            if running:
                raise MigrateError(
                    f"the database {target} is in use by webhookd ({running}); migrate "
                    "copies into an empty database only, with every webhookd stopped"
                )
        if version > 0:
            for table in (*TABLES, "api_tenants"):
                # Tables an older schema does not have yet hold nothing.
                there = await pg.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
                if there and await pg.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                    raise MigrateError(
                        f"the database {target} already holds webhookd data (rows in "
                        f"{table}); migrate copies into an empty database only"
                    )
        await migrate_schema(pg)
        copied = Copied()
        async with pg.transaction():
            for table in TABLES:
                query, columns = QUERIES[table]
                records = _records(sqlite, table, query)
                if records and table == "tenant_state":
                    # PostgreSQL keeps the sequence counter in a table of its own.
                    await pg.copy_records_to_table(
                        "counters", records=[r[:2] for r in records], columns=columns[:2]
                    )
                    await pg.copy_records_to_table(
                        table,
                        records=[(r[0], *r[2:]) for r in records],
                        columns=[columns[0], *columns[2:]],
                    )
                elif records:
                    await pg.copy_records_to_table(table, records=records, columns=columns)
                setattr(copied, FIELDS[table], len(records))
            # The delivered records, copied with the others into `history`, take their
            # shape on PostgreSQL: the webhook's row below acked_sequence and a deliveries
            # row (schema version 5).
            for statement in MOVE_DELIVERED:
                await pg.execute(statement)
            if api_tenants:
                await pg.copy_records_to_table(
                    "api_tenants",
                    records=sorted(api_tenants.items()),
                    columns=["tenant", "config"],
                )
                copied.api_tenants = len(api_tenants)
        return copied
    except (asyncpg.PostgresError, *CONNECT_ERRORS) as exc:
        raise MigrateError(
            f"copying into {target} failed, nothing was copied ({connection.reason(exc)})"
        ) from None
    finally:
        with contextlib.suppress(*CONNECT_ERRORS):
            await pg.close(timeout=connection.CONNECT_TIMEOUT_S)
        pg.terminate()  # a no-op once closed


FIELDS = {
    "tenant_state": "tenants",
    "webhooks": "queued",
    "webhook_ids": "ids",
    "parked": "parked",
    "failures": "failures",
    "history": "history",
    "failed_attempts": "failed_attempts",
    "replays": "replays",
}


def _records(sqlite: sqlite3.Connection, table: str, query: str) -> list[tuple[Any, ...]]:
    rows = sqlite.execute(query).fetchall()
    if table == "tenant_state":  # SQLite's 0/1 flag, PostgreSQL's boolean
        return [(*row[:6], bool(row[6]), *row[7:]) for row in rows]
    return rows
