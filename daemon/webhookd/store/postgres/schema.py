"""The PostgreSQL schema: versioned migrations, and what start-up reads back.

Migrations are a list of (version, statements), as for SQLite; the table `webhookd_schema`
records each version applied. A database newer than this code is refused before anything
touches it, and the pending migrations run in one transaction under an advisory lock, so
that two processes starting at once never migrate side by side (the second waits, then
finds the work done).

Types are PostgreSQL's own: `bigint` sequences, `boolean` flags. Times stay `double
precision` epoch seconds, as the records carry them: they come back exactly as stored (a
`timestamptz` keeps microseconds only, so a float would not), and `to_timestamp(at)` shows
them to a person. `data` is `text`, never `jsonb`: the producer's JSON is kept byte for
byte, never re-encoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from webhookd import logs
from webhookd.records import Failure, SchemaTooNew, TenantRecord, TenantRow

if TYPE_CHECKING:
    import asyncpg

log = logs.get_logger("webhookd.store")

SCHEMA_VERSION = 6

# The advisory lock key (b"whkd-mig") held while migrating.
MIGRATION_LOCK = int.from_bytes(b"whkd-mig", "big")

# Delivered records kept in `history` (before version 5, or copied from SQLite by
# `webhookd migrate`) moved to their shape since version 5: the webhook's row in `webhooks`
# (below acked_sequence) and a deliveries row covering it.
MOVE_DELIVERED = [
    """INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data, next_sequence)
       SELECT tenant, sequence, id, event, accepted_at, coalesce(data, ''), next_sequence
       FROM history WHERE outcome = 'delivered'
       ON CONFLICT DO NOTHING""",
    """INSERT INTO deliveries (tenant, last_sequence, first_sequence, delivered_at,
           attempts, status, duration_ms, payloads)
       SELECT tenant, sequence, sequence, finished_at, attempts, status, duration_ms,
              data IS NOT NULL
       FROM history WHERE outcome = 'delivered'""",
    "DELETE FROM history WHERE outcome = 'delivered'",
]

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE tenant_state (
                tenant text PRIMARY KEY,
                last_sequence bigint NOT NULL DEFAULT 0,
                acked_sequence bigint NOT NULL DEFAULT 0,
                attempts integer NOT NULL DEFAULT 0,
                next_attempt_at double precision,
                last_processed_at double precision,
                paused boolean NOT NULL DEFAULT false
            )""",
            # The queue: a tenant's rows in sequence order are its primary key's order.
            """CREATE TABLE webhooks (
                tenant text NOT NULL,
                sequence bigint NOT NULL,
                id text NOT NULL,
                event text NOT NULL,
                accepted_at double precision NOT NULL,
                data text NOT NULL,
                PRIMARY KEY (tenant, sequence)
            )""",
            # Producer-given ids only (generated ones carry their sequence): what makes
            # ingest idempotent. Kept after delivery, so a late retry of a delivered webhook
            # is still answered `duplicate`.
            """CREATE TABLE webhook_ids (
                tenant text NOT NULL,
                id text NOT NULL,
                sequence bigint NOT NULL,
                PRIMARY KEY (tenant, id)
            )""",
            """CREATE TABLE parked (
                tenant text NOT NULL,
                sequence bigint NOT NULL,
                id text NOT NULL,
                event text NOT NULL,
                accepted_at double precision NOT NULL,
                data text NOT NULL,
                parked_at double precision NOT NULL,
                PRIMARY KEY (tenant, sequence)
            )""",
            "CREATE INDEX parked_id ON parked (tenant, id)",
            # An identity column: "newest first" is id order, and its values are never
            # reused, even after the newest rows are pruned or a transaction rolls back.
            """CREATE TABLE failures (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                tenant text NOT NULL,
                at double precision NOT NULL,
                attempt integer NOT NULL,
                first_sequence bigint NOT NULL,
                last_sequence bigint NOT NULL,
                count integer NOT NULL,
                status integer,
                error text NOT NULL,
                duration_ms double precision NOT NULL
            )""",
            "CREATE INDEX failures_tenant ON failures (tenant, id)",
        ],
    ),
    (
        2,
        [
            # Several webhookd on one database (cluster.py). Each running process has a
            # row here, its heartbeat renewed every tick; a row not renewed for a lease's
            # length is a dead or cut-off instance.
            """CREATE TABLE instances (
                id text PRIMARY KEY,
                host text NOT NULL,
                pid integer NOT NULL,
                api_url text NOT NULL DEFAULT '',
                config_digest text NOT NULL DEFAULT '',
                started_at timestamptz NOT NULL DEFAULT now(),
                heartbeat_at timestamptz NOT NULL DEFAULT now()
            )""",
            # Who delivers each tenant: one row per tenant, claimed with a new fencing token
            # (`fence`, +1 at every claim) and kept by renewing `expires_at`. Every write
            # of a delivery's outcome carries the token it was claimed with, so a stale
            # owner's write is refused. Kept apart from tenant_state: renewing a lease must
            # not wait for the row locks of ingest.
            """CREATE TABLE leases (
                tenant text PRIMARY KEY,
                owner text,
                fence bigint NOT NULL DEFAULT 0,
                expires_at timestamptz NOT NULL DEFAULT '-infinity'
            )""",
            "CREATE INDEX leases_owner ON leases (owner)",
            "INSERT INTO leases (tenant) SELECT tenant FROM tenant_state",
            # Tenants made through the tenant API, shared by every instance: the tenant's
            # table as TOML, as a tenants_dir file holds it on SQLite.
            """CREATE TABLE api_tenants (
                tenant text PRIMARY KEY,
                config text NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now()
            )""",
        ],
    ),
    (
        3,
        [
            # Each tenant's sequence counter, apart from its delivery state: ingest moves
            # the one, the owner's outcomes the other, and with several instances these
            # are two writers' transactions. On one row, each waited for the other's
            # commit (its fsync included) at every webhook.
            """CREATE TABLE counters (
                tenant text PRIMARY KEY,
                last_sequence bigint NOT NULL DEFAULT 0
            )""",
            "INSERT INTO counters (tenant, last_sequence) SELECT tenant, last_sequence "
            "FROM tenant_state",
            "ALTER TABLE tenant_state DROP COLUMN last_sequence",
        ],
    ),
    (
        4,
        [
            # History (issue 13): one record per webhook that left the queue (delivered,
            # parked, requeued, discarded), keyed (tenant, sequence). The indexes, each for
            # a read that must stay fast at 10,000,000 records, and no more (each costs
            # every acknowledgement):
            # - the primary key (tenant, sequence): a page of a tenant's history in either
            #   direction is an index range scan from the cursor, LIMIT 100; a lookup by
            #   sequence (find_webhook, following next_sequence) is one probe.
            # - history_event (tenant, event, sequence): a page filtered by event scans that
            #   event's entries in sequence order, never the other events'.
            # - history_accepted (tenant, accepted_at): pruning by age (retention counts
            #   from acceptance, as the time filters do) deletes a tenant's oldest in index
            #   order; pruning by size finds each tenant's oldest with one probe; time
            #   ranges (listing, replay) are found through it.
            """CREATE TABLE history (
                tenant text NOT NULL,
                sequence bigint NOT NULL,
                id text NOT NULL,
                event text NOT NULL,
                accepted_at double precision NOT NULL,
                finished_at double precision NOT NULL,
                outcome text NOT NULL,
                attempts integer NOT NULL,
                status integer,
                duration_ms double precision,
                data text,
                next_sequence bigint,
                PRIMARY KEY (tenant, sequence)
            )""",
            "CREATE INDEX history_event ON history (tenant, event, sequence)",
            "CREATE INDEX history_accepted ON history (tenant, accepted_at)",
            # Failed attempts kept with the history (`failures` keeps only the newest few,
            # for status); id order is newest first. Indexes: the attempts that covered a
            # sequence (lookup) start from its last_sequence; age pruning deletes a
            # tenant's oldest by `at`.
            """CREATE TABLE failed_attempts (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                tenant text NOT NULL,
                at double precision NOT NULL,
                attempt integer NOT NULL,
                first_sequence bigint NOT NULL,
                last_sequence bigint NOT NULL,
                count integer NOT NULL,
                status integer,
                error text NOT NULL,
                duration_ms double precision NOT NULL
            )""",
            "CREATE INDEX failed_attempts_sequence ON failed_attempts (tenant, last_sequence)",
            "CREATE INDEX failed_attempts_at ON failed_attempts (tenant, at)",
            # What the history holds per tenant, on the tenant's delivery state row: the
            # statements that add records (outcomes, controls) lock that row already, so
            # counting costs no other row, and no row every instance updates.
            "ALTER TABLE tenant_state ADD COLUMN history_records bigint NOT NULL DEFAULT 0",
            "ALTER TABLE tenant_state ADD COLUMN history_failures bigint NOT NULL DEFAULT 0",
            "ALTER TABLE tenant_state ADD COLUMN history_bytes bigint NOT NULL DEFAULT 0",
            # Replays done, per tenant and replay_id: a retried request answers the first.
            """CREATE TABLE replays (
                tenant text NOT NULL,
                replay_id text NOT NULL,
                count integer NOT NULL,
                first_sequence bigint,
                last_sequence bigint,
                at double precision NOT NULL,
                PRIMARY KEY (tenant, replay_id)
            )""",
            # Producer ids are remembered with their acceptance time and forgotten after
            # the idempotency window (prune_history): (tenant, accepted_at) finds a
            # tenant's oldest. Rows from before: the webhook's time where it still exists,
            # else now (the window starts at the upgrade).
            "ALTER TABLE webhook_ids ADD COLUMN accepted_at double precision",
            """UPDATE webhook_ids AS i SET accepted_at = coalesce(
                (SELECT w.accepted_at FROM webhooks AS w
                 WHERE w.tenant = i.tenant AND w.sequence = i.sequence),
                (SELECT p.accepted_at FROM parked AS p
                 WHERE p.tenant = i.tenant AND p.sequence = i.sequence),
                extract(epoch FROM now())::double precision)""",
            "ALTER TABLE webhook_ids ALTER COLUMN accepted_at SET NOT NULL",
            "CREATE INDEX webhook_ids_accepted ON webhook_ids (tenant, accepted_at)",
        ],
    ),
    (
        5,
        [
            # A delivered webhook stays where it is (issue 13, point 7: keeping history must
            # not cost a copy and a delete per webhook). Its row in `webhooks`, at or below
            # the tenant's acked_sequence, is its record's id, sequence, event, accepted_at
            # and data; one `deliveries` row per acknowledgement (a batch shares them) holds
            # the rest: a delivered record = webhooks row JOIN LATERAL the first deliveries
            # row with last_sequence >= its sequence (one probe of this key). `history`
            # keeps the rarer outcomes (parked, requeued, discarded). `payloads` false:
            # history_payloads was false, the row's data is stripped ('').
            """CREATE TABLE deliveries (
                tenant text NOT NULL,
                last_sequence bigint NOT NULL,
                first_sequence bigint NOT NULL,
                delivered_at double precision NOT NULL,
                attempts integer NOT NULL,
                status integer,
                duration_ms double precision,
                payloads boolean NOT NULL,
                PRIMARY KEY (tenant, last_sequence)
            )""",
            # A replayed delivered webhook: the sequence of its newest copy.
            "ALTER TABLE webhooks ADD COLUMN next_sequence bigint",
            # The delivered records' reads that must stay fast at 10,000,000 records, as
            # history_event and history_accepted do on `history`: a page filtered by event
            # scans that event's entries in sequence order; a time range starts from the
            # tenant's oldest by acceptance.
            "CREATE INDEX webhooks_event ON webhooks (tenant, event, sequence)",
            "CREATE INDEX webhooks_accepted ON webhooks (tenant, accepted_at)",
            # A page of one rare outcome (parked, discarded) scans that outcome's entries.
            "CREATE INDEX history_outcome ON history (tenant, outcome, sequence)",
            # Existing delivered records move to the new shape, one deliveries row each.
            *MOVE_DELIVERED,
        ],
    ),
    (
        6,
        [
            # Producer ids accepted before this time may have been forgotten (pruned after
            # the idempotency window); NULL: the tenant never forgot one, so a producer id
            # it does not know was never seen (lookup answers unknown_webhook, not
            # forgotten). Databases from before it may have forgotten ids: the oldest
            # remaining id's time is the most that can be said.
            "ALTER TABLE tenant_state ADD COLUMN ids_forgotten_before double precision",
            """UPDATE tenant_state AS s SET ids_forgotten_before = coalesce(
                   (SELECT min(i.accepted_at) FROM webhook_ids AS i WHERE i.tenant = s.tenant),
                   extract(epoch FROM now()))
               WHERE EXISTS (SELECT FROM counters AS c
                             WHERE c.tenant = s.tenant AND c.last_sequence > 0)""",
        ],
    ),
]


async def schema_version(conn: asyncpg.Connection[asyncpg.Record]) -> int:
    """The version the database has: 0 for a database webhookd never used."""
    if not await conn.fetchval("SELECT to_regclass('webhookd_schema') IS NOT NULL"):
        return 0
    version: int = await conn.fetchval("SELECT coalesce(max(version), 0) FROM webhookd_schema")
    return version


def refuse_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database schema is version {version}, newer than this webhookd "
            f"understands ({SCHEMA_VERSION}); run a newer webhookd"
        )


async def migrate(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Bring the schema to SCHEMA_VERSION, or raise SchemaTooNew having changed nothing."""
    refuse_newer(await schema_version(conn))  # before the lock: nothing is written yet
    # A session lock taken before the transaction, not a transaction lock inside it: a
    # transaction that began before another process committed its migration would still
    # find no webhookd_schema table in its catalog cache after waiting for the lock.
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        version = await schema_version(conn)  # again: another process may have migrated
        refuse_newer(version)
        if version == SCHEMA_VERSION:
            return
        async with conn.transaction():
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS webhookd_schema (
                    version integer PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )"""
            )
            for target, statements in MIGRATIONS:
                if target <= version:
                    continue
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO webhookd_schema (version) VALUES ($1)", target)
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    log.info("schema_migrated", version=SCHEMA_VERSION, previous=version)


async def load_records(
    conn: asyncpg.Connection[asyncpg.Record] | asyncpg.Pool[asyncpg.Record],
    tenants: list[str] | None = None,
) -> list[TenantRecord]:
    """Every tenant's record (`tenants` None), or these tenants' (those with a state row)."""
    # Two forms rather than `$1 OR tenant = ANY($2)`: a prepared statement's generic plan
    # would scan every tenant's rows for one tenant's record.
    where, args = ("", []) if tenants is None else ("WHERE tenant = ANY($1::text[])", [tenants])
    records: dict[str, TenantRecord] = {}
    for name, *values in await conn.fetch(
        f"""SELECT tenant, c.last_sequence, s.acked_sequence, s.attempts, s.next_attempt_at,
                   s.last_processed_at, s.paused
            FROM tenant_state AS s JOIN counters AS c USING (tenant) {where}
            ORDER BY tenant""",
        *args,
    ):
        records[name] = TenantRecord(name, TenantRow(*values))
    for name, *values in await conn.fetch(
        f"""SELECT tenant, at, attempt, first_sequence, last_sequence, count, status, error,
                   duration_ms FROM failures {where} ORDER BY tenant, id DESC""",
        *args,
    ):
        if name in records:
            records[name].failures.append(Failure(*values))
    for name, count in await conn.fetch(
        f"SELECT tenant, count(*) FROM parked {where} GROUP BY tenant", *args
    ):
        if name in records:
            records[name].parked = count
    return list(records.values())
