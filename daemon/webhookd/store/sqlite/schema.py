"""The database schema: versioned migrations, and what start-up reads back.

Migrations are a list of (version, statements); `PRAGMA user_version` records the version
applied, and a database newer than this code is refused before anything touches it.
"""

from __future__ import annotations

import sqlite3

from webhookd import logs
from webhookd.records import Failure, SchemaTooNew, TenantRecord, TenantRow

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


def refuse_newer(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database schema is version {version}, newer than this webhookd "
            f"understands ({SCHEMA_VERSION}); run a newer webhookd"
        )
    return version


def migrate(conn: sqlite3.Connection) -> None:
    version = refuse_newer(conn)
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


def load_records(conn: sqlite3.Connection) -> list[TenantRecord]:
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
