"""The database schema: versioned migrations, and what start-up reads back.

Migrations are a list of (version, statements); `PRAGMA user_version` records the version
applied, and a database newer than this code is refused before anything touches it.
"""

from __future__ import annotations

import sqlite3

from webhookd import logs
from webhookd.records import Failure, SchemaTooNew, TenantRecord, TenantRow

log = logs.get_logger("webhookd.store")

SCHEMA_VERSION = 4

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
    (
        2,
        [
            # History (issue 13): one record per webhook that left the queue (delivered,
            # parked, requeued, discarded), keyed (tenant, sequence). A rowid table: the
            # payload stays out of the indexes. The indexes, each for a read that must stay
            # fast at 10,000,000 records, and no more (each costs every acknowledgement):
            # - history_order (tenant, sequence): a page of a tenant's history in either
            #   direction is a range scan from the cursor, LIMIT 100 rows; a lookup by
            #   sequence (find_webhook, following next_sequence) is one probe.
            # - history_event (tenant, event, sequence): a page filtered by event is the
            #   same range scan within that event, never a scan of the other events.
            # - history_accepted (tenant, accepted_at): pruning by age (retention counts
            #   from acceptance, as the time filters do) deletes a tenant's oldest in index
            #   order; pruning by size finds each tenant's oldest with one probe; time
            #   ranges (listing, replay) are found through it.
            """CREATE TABLE history (
                tenant TEXT NOT NULL,
                sequence INTEGER NOT NULL,
                id TEXT NOT NULL,
                event TEXT NOT NULL,
                accepted_at REAL NOT NULL,
                finished_at REAL NOT NULL,
                outcome TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                status INTEGER,
                duration_ms REAL,
                data TEXT,
                next_sequence INTEGER
            )""",
            "CREATE UNIQUE INDEX history_order ON history (tenant, sequence)",
            "CREATE INDEX history_event ON history (tenant, event, sequence)",
            "CREATE INDEX history_accepted ON history (tenant, accepted_at)",
            # Failed attempts kept with the history (the `failures` table above keeps only
            # the newest few, for status). Rowid order is newest first. Indexes: the
            # attempts that covered a sequence (lookup) start from its last_sequence; age
            # pruning deletes a tenant's oldest by `at`.
            """CREATE TABLE failed_attempts (
                id INTEGER PRIMARY KEY,
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
            "CREATE INDEX failed_attempts_sequence ON failed_attempts (tenant, last_sequence)",
            "CREATE INDEX failed_attempts_at ON failed_attempts (tenant, at)",
            # What the history holds per tenant, kept by the writes that change it: status
            # and metrics read sums of these, never counts of rows.
            """CREATE TABLE history_sizes (
                tenant TEXT PRIMARY KEY,
                records INTEGER NOT NULL DEFAULT 0,
                failures INTEGER NOT NULL DEFAULT 0,
                bytes INTEGER NOT NULL DEFAULT 0
            ) WITHOUT ROWID""",
            # Replays done, per tenant and replay_id: a retried request answers the first.
            """CREATE TABLE replays (
                tenant TEXT NOT NULL,
                replay_id TEXT NOT NULL,
                count INTEGER NOT NULL,
                first_sequence INTEGER,
                last_sequence INTEGER,
                at REAL NOT NULL,
                PRIMARY KEY (tenant, replay_id)
            ) WITHOUT ROWID""",
            # Producer ids are remembered with their acceptance time, and forgotten after
            # the idempotency window (prune_history): (tenant, accepted_at) finds a
            # tenant's oldest. Rows from before: the webhook's time where it still exists,
            # else now (the window starts at the upgrade).
            "ALTER TABLE webhook_ids ADD COLUMN accepted_at REAL",
            """UPDATE webhook_ids SET accepted_at = coalesce(
                (SELECT w.accepted_at FROM webhooks AS w
                 WHERE w.tenant = webhook_ids.tenant AND w.sequence = webhook_ids.sequence),
                (SELECT p.accepted_at FROM parked AS p
                 WHERE p.tenant = webhook_ids.tenant AND p.sequence = webhook_ids.sequence),
                (julianday('now') - 2440587.5) * 86400.0)""",
            "CREATE INDEX webhook_ids_accepted ON webhook_ids (tenant, accepted_at)",
        ],
    ),
    (
        3,
        [
            # A delivered webhook stays where it is (issue 13, point 7: keeping history must
            # not cost a copy and a delete per webhook). Its row in `webhooks`, at or below
            # the tenant's acked_sequence, is its record's id, sequence, event, accepted_at
            # and data; one `deliveries` row per acknowledgement (a batch shares them) holds
            # the rest: a delivered record = webhooks row JOIN the deliveries row covering
            # its sequence (the first with last_sequence >= it: one probe of this key). The
            # `history` table keeps the rarer outcomes (parked, requeued, discarded).
            # `payloads` = 0: history_payloads was false, the row's data is stripped ('').
            """CREATE TABLE deliveries (
                tenant TEXT NOT NULL,
                last_sequence INTEGER NOT NULL,
                first_sequence INTEGER NOT NULL,
                delivered_at REAL NOT NULL,
                attempts INTEGER NOT NULL,
                status INTEGER,
                duration_ms REAL,
                payloads INTEGER NOT NULL,
                PRIMARY KEY (tenant, last_sequence)
            ) WITHOUT ROWID""",
            # A replayed delivered webhook: the sequence of its newest copy.
            "ALTER TABLE webhooks ADD COLUMN next_sequence INTEGER",
            # The delivered records' reads that must stay fast at 10,000,000 records, as
            # history_event and history_accepted do on `history`: a page filtered by event
            # is a range scan within the event; a time range and pruning by age start from
            # the tenant's oldest by acceptance.
            "CREATE INDEX webhooks_event ON webhooks (tenant, event, sequence)",
            "CREATE INDEX webhooks_accepted ON webhooks (tenant, accepted_at)",
            # A page of one rare outcome (parked, discarded) is a range scan within it.
            "CREATE INDEX history_outcome ON history (tenant, outcome, sequence)",
            # Existing delivered records move to the new shape, one deliveries row each.
            # OR REPLACE: a row acknowledged in place on a full disk may still be there.
            """INSERT OR REPLACE INTO webhooks (tenant, sequence, id, event, accepted_at, data,
                   next_sequence)
               SELECT tenant, sequence, id, event, accepted_at, coalesce(data, ''),
                      next_sequence
               FROM history WHERE outcome = 'delivered'""",
            """INSERT INTO deliveries (tenant, last_sequence, first_sequence, delivered_at,
                   attempts, status, duration_ms, payloads)
               SELECT tenant, sequence, sequence, finished_at, attempts, status, duration_ms,
                      data IS NOT NULL
               FROM history WHERE outcome = 'delivered'""",
            "DELETE FROM history WHERE outcome = 'delivered'",
        ],
    ),
    (
        4,
        [
            # Producer ids accepted before this time may have been forgotten (pruned after
            # the idempotency window); NULL: the tenant never forgot one, so a producer id
            # it does not know was never seen (lookup answers unknown_webhook, not
            # forgotten). Databases from before it may have forgotten ids: the oldest
            # remaining id's time is the most that can be said.
            "ALTER TABLE tenant_state ADD COLUMN ids_forgotten_before REAL",
            """UPDATE tenant_state SET ids_forgotten_before = (
                   SELECT coalesce(min(i.accepted_at), strftime('%s', 'now'))
                   FROM webhook_ids AS i WHERE i.tenant = tenant_state.tenant)
               WHERE last_sequence > 0""",
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
