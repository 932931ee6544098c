"""The store's write operations on PostgreSQL, each a small class applied in a group commit.

A caller's write becomes an `Op` with a future; the writer applies whatever ops have
gathered in one transaction (`Tx`). The transaction first locks the rows of every tenant
the group touches (its sequence counter, its delivery state, or both), in tenant order
(`Tx.lock`): two transactions that touch the same tenants then take them in the same
order, and do not deadlock (but for a tenant's first webhook, below). Ingest and
acknowledgements are batched (`Tx.flush`), a statement each for the whole run of them, with
arrays passed through `unnest` (bench/README-pg-drivers.md: as fast as COPY for these group
sizes, in one round trip); the rarer controls run one by one, each after a flush, so each
sees the writes before it.

The database is the state's only copy: sequences are allocated by `UPDATE counters SET
last_sequence = last_sequence + n … RETURNING` inside the transaction, so a rolled-back
group takes none. Parameters are positional (`$1`), as asyncpg has them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from webhookd.ids import generated_id, generated_sequence, id_tag
from webhookd.records import (
    Delivered,
    Failure,
    HistoryPolicy,
    IngestResult,
    LeaseLost,
    NewWebhook,
    PruneResult,
    ReplayResult,
    ReplaySelection,
    ReplayTooLarge,
    ReplayWithoutPayloads,
    Webhook,
)
from webhookd.store.history import (
    FAILURE_OVERHEAD,
    RECORD_OVERHEAD,
    StepClock,
    Survey,
    selection_conditions,
)
from webhookd.store.postgres.announce import announcement

if TYPE_CHECKING:
    import asyncpg

    Connection = asyncpg.Connection[asyncpg.Record]

# What a group reads before it writes, in one statement (one round trip): the rows of every
# tenant it touches, locked in tenant order, its sequence counter (ingest, requeue) first,
# then its delivery state (outcomes, controls), each only where the group's ops need it, so
# that ingest through one instance and the owner's outcomes through another do not wait for
# each other's commits; then the leases of the tenants whose delivery outcomes it records,
# held FOR SHARE to the commit (a claim by another instance waits for it, and sees what it
# recorded); then the producer ids its ingest names that were given before. UNION ALL runs
# its branches in order (an Append), and each branch locks its rows as its sort yields them.
# The id lookup is LATERAL: one primary-key lookup per id, never a join the planner could
# turn into a scan of the table.
READ = """
    SELECT 'c' AS kind, tenant, last_sequence AS n, NULL::text AS s FROM (
        SELECT tenant, last_sequence FROM counters
        WHERE tenant = ANY($1::text[]) ORDER BY tenant FOR NO KEY UPDATE) AS c
    UNION ALL
    SELECT 's', tenant, NULL, NULL FROM (
        SELECT tenant FROM tenant_state
        WHERE tenant = ANY($2::text[]) ORDER BY tenant FOR NO KEY UPDATE) AS s
    UNION ALL
    SELECT 'l', tenant, fence, owner FROM (
        SELECT tenant, owner, fence FROM leases
        WHERE tenant = ANY($3::text[]) ORDER BY tenant FOR SHARE) AS l
    UNION ALL
    SELECT 'i', u.tenant, w.sequence, u.id
    FROM unnest($4::text[], $5::text[]) AS u (tenant, id)
    CROSS JOIN LATERAL (
        SELECT sequence FROM webhook_ids WHERE tenant = u.tenant AND id = u.id
    ) AS w"""

# The rows a group needs and did not find. A concurrent transaction may be creating the
# same ones: ON CONFLICT waits for it to end, so once this statement returns every row
# exists, and the next statement's snapshot sees the ones others made (a statement cannot
# see rows committed after it began, which is why creating and locking are two).
CREATE = """
    WITH counter AS (
        INSERT INTO counters (tenant) SELECT unnest($1::text[])
        ON CONFLICT (tenant) DO NOTHING
    )
    INSERT INTO tenant_state (tenant) SELECT unnest($1::text[])
    ON CONFLICT (tenant) DO NOTHING"""

# A group's ingest in one statement: the counters move, the webhooks and their producer ids
# go in. `= ANY($1)` as well as the join: an index condition of its own, so the planner finds
# the counters by key rather than joining with a scan of every tenant's row. Each tenant's
# new webhooks are also announced to every instance ($13, announce.py), delivered with the
# commit: the tenant's owner may be another process.
ENQUEUE = """
    WITH allocated AS (
        UPDATE counters AS s SET last_sequence = s.last_sequence + u.n
        FROM unnest($1::text[], $2::bigint[]) AS u (tenant, n)
        WHERE s.tenant = ANY($1::text[]) AND s.tenant = u.tenant
        RETURNING s.tenant, s.last_sequence
    ),
    queued AS (
        INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data)
        SELECT * FROM unnest($3::text[], $4::bigint[], $5::text[], $6::text[],
                             $7::float8[], $8::text[])
    ),
    named AS (
        INSERT INTO webhook_ids (tenant, id, sequence, accepted_at)
        SELECT * FROM unnest($9::text[], $10::text[], $11::bigint[], $12::float8[])
    )
    SELECT a.tenant, a.last_sequence, pg_notify('webhookd_queued', m.told)::text AS told
    FROM allocated AS a JOIN unnest($1::text[], $13::text[]) AS m (tenant, told)
      ON m.tenant = a.tenant"""

# Per tenant, sent together (executemany: one round trip). Scalar parameters keep the plan
# an index range scan from the queue's head (acked_sequence before the update: the
# subquery reads the statement's snapshot) to `through`, whatever the table's size; an
# `unnest` join here let the planner choose a scan of the whole table, or of each tenant's
# whole queue.
# What a history record counts for (store/history.py), over the history row's columns.
RECORD_BYTES = (
    f"octet_length(id) + octet_length(event) + coalesce(octet_length(data), 0) + {RECORD_OVERHEAD}"
)
FAILURE_BYTES = f"octet_length(error) + {FAILURE_OVERHEAD}"

# A delivered record (issue 13, point 7): the webhook's row, left in `webhooks` at or below
# acked_sequence, joined to the `deliveries` row covering its sequence (schema.py, version
# 5): the first with last_sequence >= the row's, one probe of its key per row (LATERAL,
# so the webhooks row leads and a page is a range scan of webhooks from the cursor). The
# columns are a HistoryRecord's (reads.py RECORD_COLUMNS).
DELIVERED_COLUMNS = (
    "w.sequence, w.id, w.event, w.accepted_at, d.delivered_at, 'delivered'::text, "
    "d.attempts, d.status, d.duration_ms, CASE WHEN d.payloads THEN w.data END, "
    "w.next_sequence"
)
DELIVERED_JOIN = """CROSS JOIN LATERAL (
        SELECT * FROM deliveries AS c
        WHERE c.tenant = w.tenant AND c.last_sequence >= w.sequence
        ORDER BY c.last_sequence LIMIT 1) AS d"""
COVERED = "d.first_sequence <= w.sequence"

# Per acknowledgement, sent together (executemany: one round trip), in the one statement
# that moves the head. With history kept ($7), the webhooks stay where they are as the
# delivered records and one deliveries row says how they went (no copy, no delete), their
# size counted on the tenant's state row (locked by `READ`), their payloads stripped if not
# kept ($8: for those tenants only). Without, they leave the queue. Scalar parameters keep
# the plan an index range scan: $1 tenant, $2 through, $3 at, $4 attempts (NULL: the
# tenant's plus this one), $5 status, $6 duration, $7 keep records, $8 keep payloads.
ACKNOWLEDGE = f"""
    WITH state AS (
        SELECT acked_sequence, attempts FROM tenant_state WHERE tenant = $1::text
    ),
    gone AS (
        DELETE FROM webhooks
        WHERE tenant = $1::text AND sequence <= $2::bigint
          AND sequence > (SELECT acked_sequence FROM state) AND NOT $7::boolean
    ),
    kept AS (
        INSERT INTO deliveries (tenant, last_sequence, first_sequence, delivered_at,
            attempts, status, duration_ms, payloads)
        SELECT $1::text, $2::bigint, s.acked_sequence + 1, $3::float8,
               coalesce($4::integer, s.attempts + 1), $5::integer, $6::float8, $8::boolean
        FROM state AS s WHERE $7::boolean AND $2::bigint > s.acked_sequence
        ON CONFLICT DO NOTHING
        RETURNING first_sequence
    ),
    stripped AS (
        UPDATE webhooks SET data = ''
        WHERE tenant = $1::text AND sequence <= $2::bigint
          AND sequence > (SELECT first_sequence - 1 FROM kept) AND NOT $8::boolean
    ),
    sized AS (
        SELECT count(*) AS n, coalesce(sum(
            octet_length(id) + octet_length(event)
            + CASE WHEN $8::boolean THEN octet_length(data) ELSE 0 END
            + {RECORD_OVERHEAD}), 0) AS size
        FROM webhooks
        WHERE tenant = $1::text AND sequence <= $2::bigint
          AND sequence > (SELECT first_sequence - 1 FROM kept)
    )
    UPDATE tenant_state SET acked_sequence = greatest(acked_sequence, $2::bigint),
        attempts = 0, next_attempt_at = NULL, last_processed_at = $3::float8,
        history_records = history_records + (SELECT n FROM sized),
        history_bytes = history_bytes + (SELECT size FROM sized)
    WHERE tenant = $1::text"""


class Tx:
    """One group commit in progress: the connection, what the group read under its locks
    (the tenants' sequence counters, the leases, the producer ids given before), and the
    batched writes not yet sent."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.last: dict[str, int] = {}
        self.leases: dict[str, tuple[str, int]] = {}  # tenant: (owner, fence)
        self.known: dict[tuple[str, str], int] = {}  # (tenant, producer id): sequence
        self.enqueues: list[Enqueue] = []
        # ACKNOWLEDGE's parameters, in submission order (several for one tenant run in
        # turn, each seeing the one before).
        self.acks: list[tuple[Any, ...]] = []

    async def lock(self, ops: Sequence[Op], fenced: bool = False) -> None:
        """Read and lock what this group needs, creating the tenant rows that are missing.

        Rows that exist are locked in tenant order, counters first (`READ`), and with them
        the leases of the tenants whose outcomes it records (when `fenced`: several
        instances) and the producer ids its ingest names. The missing rows are then made and
        locked (a tenant's first webhook): out of order with the others, once per tenant, so
        a deadlock is possible then; the server detects it, and the writer retries the group
        op by op."""
        counted = sorted({op.tenant for op in ops if op.tenant is not None and op.counts})
        stated = sorted({op.tenant for op in ops if op.tenant is not None and op.states})
        leased = (
            sorted({op.tenant for op in ops if op.fenced and op.tenant is not None})
            if fenced
            else []
        )
        named = {
            (op.tenant, item.id)
            for op in ops
            if isinstance(op, Enqueue)
            for item in op.items
            if item.id is not None
        }
        found = await self._read(counted, stated, leased, named)
        create = sorted(
            {
                op.tenant
                for op in ops
                if op.creates_row
                and op.tenant is not None
                and (
                    (op.counts and op.tenant not in self.last)
                    or (op.states and op.tenant not in found)
                )
            }
        )
        if create:
            await self.conn.execute(CREATE, create)
            await self._read(
                [t for t in create if t in counted and t not in self.last],
                [t for t in create if t in stated and t not in found],
                [],
                set(),
            )

    async def _read(
        self,
        counted: list[str],
        stated: list[str],
        leased: list[str],
        named: set[tuple[str, str]],
    ) -> set[str]:
        """`READ`: fills `last`, `leases` and `known`; answers the tenants whose delivery
        state it locked."""
        if not (counted or stated or leased or named):
            return set()
        tenants, ids = (list(c) for c in zip(*named, strict=True)) if named else ([], [])
        stated_found: set[str] = set()
        for kind, tenant, number, text in await self.conn.fetch(
            READ, counted, stated, leased, tenants, ids
        ):
            if kind == "c":
                self.last[tenant] = number
            elif kind == "s":
                stated_found.add(tenant)
            elif kind == "l":
                self.leases[tenant] = (text, number)
            else:
                self.known[(tenant, text)] = number
        return stated_found

    def check_fences(self, ops: Sequence[Op], instance: str) -> list[Op]:
        """The ops this instance may still run: an op that records a delivery's outcome
        runs only if `instance` holds the tenant's lease with the token the op carries (as
        `lock` read it). The others are refused with LeaseLost, and the rest of the group
        goes on."""
        kept: list[Op] = []
        for op in ops:
            held = self.leases.get(op.tenant) if op.tenant is not None else None
            if op.fenced and (op.fence is None or held != (instance, op.fence)):
                op.result = LeaseLost(
                    f"the lease of {op.tenant} was claimed by another instance; this one "
                    "stopped delivering it"
                )
            else:
                kept.append(op)
        return kept

    async def flush(self) -> None:
        """Send the batched writes, so that the next statement sees their effect."""
        if self.enqueues:
            ops, self.enqueues = self.enqueues, []
            await self._enqueue(ops)
        if self.acks:
            acks, self.acks = self.acks, []
            await self.conn.executemany(ACKNOWLEDGE, acks)

    async def _enqueue(self, ops: list[Enqueue]) -> None:
        counts: dict[str, int] = {}
        rows: list[tuple[str, int, str, str, float, str]] = []
        ids: list[tuple[str, str, int, float]] = []
        for op in ops:
            op.plan(self.last, counts, self.known, rows, ids)
        if not counts:
            return  # duplicates only
        queued: dict[str, list[Webhook]] = {}
        for op in ops:
            queued.setdefault(op.tenant, []).extend(op.queued)
        told = [
            announcement(tenant, self.last[tenant] + n, queued[tenant])
            for tenant, n in counts.items()
        ]
        allocated = await self.conn.fetch(
            ENQUEUE,
            list(counts),
            list(counts.values()),
            *_columns(rows, 6),
            *_columns(ids, 4),
            told,
        )
        for row in allocated:
            tenant, last = row["tenant"], row["last_sequence"]
            # The rows are locked (`lock`): nothing else moved the counter since.
            if last != self.last[tenant] + counts[tenant]:
                raise RuntimeError(f"the sequence counter of {tenant!r} moved under its lock")
            self.last[tenant] = last


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as one list per column: what `unnest` takes."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


class Op:
    """A write waiting for the next group commit; `result` is set inside the transaction."""

    batchable = False  # run by `Tx.flush` with others of its kind, rather than on its own
    creates_row = True  # the tenant gets its rows if it has none
    counts = False  # reads or moves the tenant's sequence counter (locked: `Tx.lock`)
    states = True  # reads or writes the tenant's delivery state (locked: `Tx.lock`)
    fenced = False  # records a delivery's outcome: only with the tenant's lease (cluster.py)
    alone = False  # committed in a transaction of its own, never in a group

    def __init__(self, tenant: str | None) -> None:
        self.tenant = tenant
        self.fence: int | None = None  # the lease's token when submitted (fenced ops)
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.result: Any = None
        self.queued: list[Webhook] = []  # what a committed op queued (announced after)

    def defer(self, tx: Tx) -> None:
        """A batchable op: hand it to the transaction's next flush."""
        raise NotImplementedError

    async def apply(self, tx: Tx) -> None:
        """An unbatched op: run it now (the writes before it were flushed)."""
        raise NotImplementedError


class Enqueue(Op):
    batchable = True
    counts = True
    states = False

    def __init__(self, tenant: str, items: Sequence[NewWebhook], accepted_at: float) -> None:
        super().__init__(tenant)
        self.tenant: str = tenant
        self.items = items
        self.accepted_at = accepted_at

    def defer(self, tx: Tx) -> None:
        tx.enqueues.append(self)

    def plan(
        self,
        last: dict[str, int],
        counts: dict[str, int],
        known: dict[tuple[str, str], int],
        rows: list[tuple[str, int, str, str, float, str]],
        ids: list[tuple[str, str, int, float]],
    ) -> None:
        """Give each new item the tenant's next sequence (`last` plus what this flush has
        given before, `counts`); an id seen before (`known`, which grows) is a duplicate."""
        tenant = self.tenant
        tag = id_tag(tenant)
        results: list[IngestResult] = []
        self.queued = []  # a transaction may be retried: start clean
        for item in self.items:
            given = last[tenant] + counts.get(tenant, 0)
            if item.id is not None:
                first = known.get((tenant, item.id))
                if first is None:
                    first = generated_sequence(tag, item.id)
                    if first is not None and first > given:
                        first = None  # never given out (the service refuses these)
                if first is not None:
                    results.append(IngestResult(item.id, first, "duplicate"))
                    continue
            sequence = given + 1
            counts[tenant] = counts.get(tenant, 0) + 1
            webhook_id = item.id if item.id is not None else generated_id(tag, sequence)
            if item.id is not None:
                known[(tenant, item.id)] = sequence
                ids.append((tenant, item.id, sequence, self.accepted_at))
            rows.append((tenant, sequence, webhook_id, item.event, self.accepted_at, item.data))
            self.queued.append(
                Webhook(sequence, webhook_id, item.event, self.accepted_at, item.data)
            )
            results.append(IngestResult(webhook_id, sequence, "queued"))
        self.result = results


class Acknowledge(Op):
    batchable = True
    fenced = True

    def __init__(
        self,
        tenant: str,
        through: int,
        at: float,
        delivered: Delivered | None = None,
        history: HistoryPolicy | None = None,
    ) -> None:
        super().__init__(tenant)
        self.tenant: str = tenant
        self.through, self.at = through, at
        self.delivered = delivered
        self.history = history or HistoryPolicy()

    def defer(self, tx: Tx) -> None:
        d = self.delivered
        tx.acks.append(
            (
                self.tenant,
                self.through,
                self.at,
                d.attempts if d is not None else None,
                d.status if d is not None else None,
                d.duration_ms if d is not None else None,
                self.history.keep,
                self.history.payloads,
            )
        )


class RecordFailure(Op):
    fenced = True

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

    async def apply(self, tx: Tx) -> None:
        f = self.failure
        # With the history's: kept apart (pruned with the records), and counted.
        await tx.conn.execute(
            f"""WITH state AS (
                   UPDATE tenant_state SET attempts = $2, next_attempt_at = $10,
                       history_failures = history_failures + $11::boolean::integer,
                       history_bytes = history_bytes + CASE WHEN $11::boolean
                           THEN octet_length($8::text) + {FAILURE_OVERHEAD} ELSE 0 END
                   WHERE tenant = $1
               ),
               kept AS (
                   INSERT INTO failed_attempts (tenant, at, attempt, first_sequence,
                       last_sequence, count, status, error, duration_ms)
                   SELECT $1, $3, $2, $4, $5, $6, $7, $8, $9 WHERE $11::boolean
               )
               INSERT INTO failures (tenant, at, attempt, first_sequence, last_sequence,
                   count, status, error, duration_ms)
               VALUES ($1, $3, $2, $4, $5, $6, $7, $8, $9)""",
            self.tenant,
            f.attempt,
            f.at,
            f.first_sequence,
            f.last_sequence,
            f.count,
            f.status,
            f.error,
            f.duration_ms,
            self.next_attempt_at,
            self.history.keep,
        )
        # Only the newest `keep` stay (none for 0, the new one included).
        await tx.conn.execute(
            """DELETE FROM failures WHERE tenant = $1 AND id <= (
                   SELECT id FROM failures WHERE tenant = $1
                   ORDER BY id DESC LIMIT 1 OFFSET $2)""",
            self.tenant,
            self.keep,
        )


class ClearFailures(Op):
    creates_row = False

    async def apply(self, tx: Tx) -> None:
        status = await tx.conn.execute("DELETE FROM failures WHERE tenant = $1", self.tenant)
        self.result = int(status.split()[-1])  # "DELETE 3"


class SetPaused(Op):
    def __init__(self, tenant: str, paused: bool) -> None:
        super().__init__(tenant)
        self.paused = paused

    async def apply(self, tx: Tx) -> None:
        await tx.conn.execute(
            "UPDATE tenant_state SET paused = $2 WHERE tenant = $1", self.tenant, self.paused
        )


class Park(Op):
    """Move the head webhook to `parked`; its sequence becomes a visible gap."""

    fenced = True  # the head is the owner's: an attempt of it may be in flight there

    def __init__(
        self, tenant: str, sequence: int, at: float, history: HistoryPolicy | None = None
    ) -> None:
        super().__init__(tenant)
        self.sequence, self.at = sequence, at
        self.history = history or HistoryPolicy()

    async def apply(self, tx: Tx) -> None:
        # Only the head: the row right after acked_sequence (rows exist up to last_sequence).
        found = await tx.conn.fetchrow(
            f"""WITH head AS (
                   DELETE FROM webhooks AS w USING tenant_state AS s
                   WHERE s.tenant = $1::text AND s.acked_sequence + 1 = $2::bigint
                     AND w.tenant = s.tenant AND w.sequence = $2::bigint
                   RETURNING w.sequence, w.id, w.event, w.accepted_at, w.data
               ),
               kept AS (
                   INSERT INTO parked (tenant, sequence, id, event, accepted_at, data, parked_at)
                   SELECT $1::text, sequence, id, event, accepted_at, data, $3::float8 FROM head
               ),
               recorded AS (
                   INSERT INTO history (tenant, sequence, id, event, accepted_at,
                       finished_at, outcome, attempts, data)
                   SELECT $1::text, h.sequence, h.id, h.event, h.accepted_at, $3::float8,
                          'parked', s.attempts, CASE WHEN $5::boolean THEN h.data END
                   FROM head AS h, tenant_state AS s
                   WHERE s.tenant = $1::text AND $4::boolean
                   ON CONFLICT DO NOTHING
                   RETURNING {RECORD_BYTES} AS size
               ),
               moved AS (
                   UPDATE tenant_state SET acked_sequence = $2::bigint, attempts = 0,
                       next_attempt_at = NULL,
                       history_records = history_records + (SELECT count(*) FROM recorded),
                       history_bytes = history_bytes
                           + (SELECT coalesce(sum(size), 0) FROM recorded)
                   WHERE tenant = $1::text AND EXISTS (SELECT FROM head)
               )
               SELECT sequence, id, event, accepted_at, data FROM head""",
            self.tenant,
            self.sequence,
            self.at,
            self.history.keep,
            self.history.payloads,
        )
        self.result = Webhook(*found) if found is not None else None


class Requeue(Op):
    """Put a parked webhook back at the tail: a new sequence, the same id and data."""

    creates_row = False  # a tenant with parked webhooks has its rows
    counts = True
    states = False

    def __init__(self, tenant: str, webhook_id: str, at: float) -> None:
        super().__init__(tenant)
        self.tenant: str = tenant
        self.webhook_id, self.at = webhook_id, at

    async def apply(self, tx: Tx) -> None:
        self.queued = []  # a transaction may be retried: start clean
        found = await tx.conn.fetchrow(
            """WITH taken AS (
                   DELETE FROM parked WHERE (tenant, sequence) = (
                       SELECT tenant, sequence FROM parked WHERE tenant = $1::text AND id = $2
                       ORDER BY sequence LIMIT 1)
                   RETURNING sequence, id, event, accepted_at, data
               ),
               allocated AS (
                   UPDATE counters SET last_sequence = last_sequence + 1
                   WHERE tenant = $1::text AND EXISTS (SELECT FROM taken)
                   RETURNING last_sequence
               ),
               recorded AS (
                   UPDATE history AS h SET outcome = 'requeued',
                       next_sequence = a.last_sequence
                   FROM taken AS t, allocated AS a
                   WHERE h.tenant = $1::text AND h.sequence = t.sequence
                     AND h.outcome = 'parked'
               ),
               queued AS (
                   INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data)
                   SELECT $1::text, a.last_sequence, t.id, t.event, t.accepted_at, t.data
                   FROM taken AS t, allocated AS a
               )
               SELECT a.last_sequence, t.id, t.event, t.accepted_at, t.data,
                      pg_notify('webhookd_queued', $1::text || ' ' || a.last_sequence)::text
               FROM taken AS t, allocated AS a""",
            self.tenant,
            self.webhook_id,
        )
        if found is None:
            self.result = None
            return
        webhook = Webhook(*found[:5])
        tx.last[self.tenant] = webhook.sequence
        self.queued = [webhook]
        self.result = webhook


class Discard(Op):
    """Drop a tenant's queue, parked webhooks and failures (an operator's explicit choice)."""

    counts = True  # reads the counter: the head moves to it

    def __init__(self, tenant: str, at: float, history: HistoryPolicy | None = None) -> None:
        super().__init__(tenant)
        self.at = at
        self.history = history or HistoryPolicy()

    async def apply(self, tx: Tx) -> None:
        # The queue is contiguous: what waits is a subtraction. The sequence counter stays:
        # sequences are never reused, not even after a discard.
        # Each queued webhook gets a `discarded` record (the head with the tenant's
        # attempts), and each parked one: its `parked` record rewritten, or a new one.
        self.result = await tx.conn.fetchval(
            f"""WITH before AS (
                        SELECT c.last_sequence, s.acked_sequence, s.attempts,
                               c.last_sequence - s.acked_sequence AS waiting
                        FROM tenant_state AS s JOIN counters AS c USING (tenant)
                        WHERE tenant = $1::text
                    ),
                    queue AS (
                        DELETE FROM webhooks WHERE tenant = $1::text
                          AND sequence > (SELECT acked_sequence FROM before)
                        RETURNING sequence, id, event, accepted_at, data
                    ),
                    kept AS (
                        DELETE FROM parked WHERE tenant = $1::text
                        RETURNING sequence, id, event, accepted_at, data
                    ),
                    failed AS (DELETE FROM failures WHERE tenant = $1::text),
                    marked AS (
                        UPDATE history SET outcome = 'discarded', finished_at = $2::float8
                        WHERE tenant = $1::text AND sequence IN (SELECT sequence FROM kept)
                        RETURNING sequence
                    ),
                    recorded AS (
                        INSERT INTO history (tenant, sequence, id, event, accepted_at,
                            finished_at, outcome, attempts, data)
                        SELECT $1::text, q.sequence, q.id, q.event, q.accepted_at, $2::float8,
                               'discarded',
                               CASE WHEN q.sequence = b.acked_sequence + 1
                                    THEN b.attempts ELSE 0 END,
                               CASE WHEN $4::boolean THEN q.data END
                        FROM queue AS q, before AS b
                        WHERE $3::boolean AND q.sequence > b.acked_sequence
                        UNION ALL
                        SELECT $1::text, k.sequence, k.id, k.event, k.accepted_at, $2::float8,
                               'discarded', 0, CASE WHEN $4::boolean THEN k.data END
                        FROM kept AS k
                        WHERE $3::boolean AND k.sequence NOT IN (SELECT sequence FROM marked)
                        ON CONFLICT DO NOTHING
                        RETURNING {RECORD_BYTES} AS size
                    )
               UPDATE tenant_state SET acked_sequence = before.last_sequence, attempts = 0,
                   next_attempt_at = NULL, paused = false,
                   history_records = history_records + (SELECT count(*) FROM recorded),
                   history_bytes = history_bytes
                       + (SELECT coalesce(sum(size), 0) FROM recorded)
               FROM before WHERE tenant = $1::text
               RETURNING before.waiting""",
            self.tenant,
            self.at,
            self.history.keep,
            self.history.payloads,
        )


class Show(Op):
    """One setting as the writer's session has it (for tests and `check`)."""

    def __init__(self, name: str) -> None:
        super().__init__(None)
        self.name = name

    async def apply(self, tx: Tx) -> None:
        self.result = await tx.conn.fetchval("SELECT current_setting($1)", self.name)


def selection_where(selection: ReplaySelection, args: list[Any], prefix: str = "") -> list[str]:
    """The conditions (AND) on history rows for a selection, its parameters appended to
    `args` (numbered after those already there)."""
    where: list[str] = []
    for _, column, operator, cast, value in selection_conditions(selection):
        args.append(value)
        where.append(f"{prefix}{column} {operator} ${len(args)}::{cast}")
    return where


class Replay(Op):
    """Put delivered webhooks back at the tail, in their order, all or nothing: a write
    like ingest (the counter moves, the owner is told by NOTIFY)."""

    creates_row = False  # a tenant with history has its rows
    counts = True
    states = False

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
        self.tenant: str = tenant
        self.selection, self.at, self.limit = selection, at, limit
        self.dry_run, self.replay_id = dry_run, replay_id

    async def apply(self, tx: Tx) -> None:
        self.queued = []  # a transaction may be retried: start clean
        conn = tx.conn
        if self.replay_id is not None:
            done = await conn.fetchrow(
                """SELECT count, first_sequence, last_sequence FROM replays
                   WHERE tenant = $1 AND replay_id = $2""",
                self.tenant,
                self.replay_id,
            )
            if done is not None:
                count, first, last = done
                self.result = ReplayResult(count, first, last, repeated=True)
                return
        # The delivered records: webhooks rows at or below acked_sequence that a
        # deliveries row covers (DELIVERED_JOIN).
        args: list[Any] = [self.tenant]
        where = " AND ".join(
            [
                "w.tenant = $1::text",
                "w.sequence <= (SELECT acked_sequence FROM tenant_state WHERE tenant = $1)",
                COVERED,
                *selection_where(self.selection, args, "w."),
            ]
        )
        counted = await conn.fetchrow(
            f"""SELECT count(*), min(w.sequence), max(w.sequence),
                       count(*) FILTER (WHERE NOT d.payloads)
                FROM webhooks AS w {DELIVERED_JOIN} WHERE {where}""",
            *args,
        )
        assert counted is not None
        count, first, last, bare = counted
        if count > self.limit:
            self.result = ReplayTooLarge(count, self.limit, first, last)
            return
        if bare:
            self.result = ReplayWithoutPayloads(
                f"{bare} of the {count} webhooks matched were delivered without their data "
                "kept (history_payloads = false): they cannot be sent again"
            )
            return
        if self.dry_run:
            self.result = ReplayResult(count, None, None, dry_run=True)
            return
        found = (
            await conn.fetch(
                f"""SELECT w.sequence, w.id, w.event, w.accepted_at, w.data
                    FROM webhooks AS w {DELIVERED_JOIN}
                    WHERE {where} ORDER BY w.sequence""",
                *args,
            )
            if count
            else []
        )
        start = tx.last.get(self.tenant, 0)
        self.queued = [
            Webhook(start + n, row["id"], row["event"], row["accepted_at"], row["data"])
            for n, row in enumerate(found, 1)
        ]
        end = start + len(found)
        result = ReplayResult(len(found), start + 1 if found else None, end if found else None)
        await conn.execute(
            """WITH allocated AS (
                   UPDATE counters SET last_sequence = $2::bigint
                   WHERE tenant = $1::text AND $2::bigint > $9::bigint
               ),
               queued AS (
                   INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data)
                   SELECT $1::text, * FROM unnest($3::bigint[], $4::text[], $5::text[],
                                                  $6::float8[], $7::text[])
               ),
               moved AS (
                   UPDATE webhooks AS h SET next_sequence = u.new
                   FROM unnest($8::bigint[], $3::bigint[]) AS u (old, new)
                   WHERE h.tenant = $1::text AND h.sequence = u.old
               ),
               done AS (
                   INSERT INTO replays (tenant, replay_id, count, first_sequence,
                       last_sequence, at)
                   SELECT $1::text, $10::text, $11::integer, $12::bigint, $13::bigint,
                          $14::float8
                   WHERE $10::text IS NOT NULL
               )
               SELECT CASE WHEN $2::bigint > $9::bigint
                      THEN pg_notify('webhookd_queued', $1::text || ' ' || $2::bigint) END""",
            self.tenant,
            end,
            [w.sequence for w in self.queued],
            [w.id for w in self.queued],
            [w.event for w in self.queued],
            [w.accepted_at for w in self.queued],
            [w.data for w in self.queued],
            [row["sequence"] for row in found],
            start,
            self.replay_id,
            result.count,
            result.first_sequence,
            result.last_sequence,
            self.at,
        )
        if found:
            tx.last[self.tenant] = end
        self.result = result


# The advisory lock key (b"whkd-prn") a pruning step holds for its transaction.
PRUNE_LOCK = int.from_bytes(b"whkd-prn", "big")


class PruneHistory(Op):
    """One step of pruning (Store.prune_history), in a transaction of its own (`alone`):
    it locks the state rows of the tenants it prunes, in tenant order, to count what goes."""

    creates_row = False
    states = False
    alone = True

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
        super().__init__(None)
        self.now, self.retention, self.default = now, retention, default_retention
        self.max_bytes, self.window, self.step = max_bytes, idempotency_window, step
        self.survey = survey
        self.clock = StepClock()  # when the step stops (started again by apply)

    async def apply(self, tx: Tx) -> None:
        conn = tx.conn
        # One instance prunes at a time: the others' steps would pick the same oldest rows
        # and wait on each other's locks for nothing. An instance that finds the lock taken
        # does nothing this round; the pruner holding it goes on.
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", PRUNE_LOCK):
            self.result = PruneResult()
            return
        self.result = await self._prune(conn)

    async def _prune(self, conn: Connection) -> PruneResult:
        self.clock = StepClock()
        by_age, failures, budget = await self._by_age(conn, self.step)
        by_size = ids = 0
        if self.max_bytes is not None and budget > 0:
            by_size, failed, budget = await self._by_size(conn, budget, self.max_bytes)
            failures += failed
        if budget > 0:
            ids = await self._forget_ids(conn, budget)
            budget -= ids
        return PruneResult(by_age, by_size, failures, ids, more=budget <= 0)

    async def _by_age(self, conn: Connection, budget: int) -> tuple[int, int, int]:
        """The rows past their tenant's retention, of the tenants the survey found with
        any; returns (records, failed attempts, budget left)."""
        survey = self.survey
        by_age = failures = 0
        for tenant, table, before in survey.due(self.now):
            if budget <= 0:
                break
            if self.clock.over():
                return by_age, failures, 0  # 0: more to do, in the next step
            if table == "webhooks":
                removed, _, records = await _delete_delivered(
                    conn, tenant, survey.acked.get(tenant, 0), budget, before=before
                )
            else:
                removed, _ = await self._delete(
                    conn,
                    tenant,
                    table,
                    condition=f"{TIME[table]} < $2",
                    args=[before],
                    budget=budget,
                )
                records = removed if table == "history" else 0
            if removed < budget:
                survey.pruned(tenant, table, before)
            by_age += records
            if table == "failed_attempts":
                failures += removed
            budget -= removed
        return by_age, failures, budget

    async def _by_size(self, conn: Connection, budget: int, max_bytes: int) -> tuple[int, int, int]:
        """The oldest rows of every tenant together while the history is over
        `max_bytes`; returns (records, failed attempts, budget left)."""
        total = await conn.fetchval(TOTAL_BYTES)
        by_size = failures = 0
        # Each look at a tenant's oldest either prunes or corrects what the survey knew of
        # it (a lower bound); the step's clock bounds how many.
        while budget > 0 and total > max_bytes:
            if self.clock.over():
                return by_size, failures, 0  # 0: more to look at, in the next step
            removed, freed, table, records = await self._oldest(conn, budget, total - max_bytes)
            if table == "failed_attempts":
                failures += removed
            else:
                by_size += records
            total -= freed
            budget -= removed
            if not removed and self.survey.heap == []:
                break
        return by_size, failures, budget

    async def _forget_ids(self, conn: Connection, budget: int) -> int:
        """Producer ids past the window and the retention, of the tenants the survey found
        with any; returns how many were forgotten."""
        survey = self.survey
        due = survey.ids_due(self.now)
        if not due:
            return 0
        tenants = [t for t, _ in due]
        ids: int = await conn.fetchval(
            FORGET_IDS,
            tenants,
            [before for _, before in due],
            [survey.acked.get(t, 0) for t in tenants],
            budget,
        )
        if ids < budget:
            for tenant, _ in due:
                survey.ids_tried(tenant)
        return ids

    async def _delete(
        self,
        conn: Connection,
        tenant: str,
        table: str,
        *,
        condition: str,
        args: list[Any],
        budget: int,
    ) -> tuple[int, int]:
        """Delete the tenant's oldest rows of `table` meeting `condition` (at most
        `budget`), counted off its state row; return (rows, bytes)."""
        key, size = ("sequence", RECORD_BYTES) if table == "history" else ("id", FAILURE_BYTES)
        column = "history_records" if table == "history" else "history_failures"
        limit = f"${len(args) + 2}"
        found = await conn.fetchrow(
            f"""WITH gone AS (
                    DELETE FROM {table} WHERE tenant = $1 AND {key} IN (
                        SELECT {key} FROM {table} WHERE tenant = $1 AND {condition}
                        ORDER BY {TIME[table]} LIMIT {limit})
                    RETURNING {size} AS size
                ),
                counted AS (
                    UPDATE tenant_state SET {column} = {column} - (SELECT count(*) FROM gone),
                        history_bytes = history_bytes
                            - (SELECT coalesce(sum(size), 0) FROM gone)
                    WHERE tenant = $1
                )
                SELECT count(*), coalesce(sum(size), 0) FROM gone""",
            tenant,
            *args,
            budget,
        )
        assert found is not None
        return int(found[0]), int(found[1])

    async def _oldest(
        self, conn: Connection, budget: int, excess: int
    ) -> tuple[int, int, str, int]:
        """Remove the oldest records (or failed attempts) of the tenant that holds the
        oldest, up to `budget` rows, until `excess` bytes are gone or another tenant's
        oldest is older; return (rows, bytes, table, records). The survey's heap says which
        tenant: a time found newer than it knew goes back into the heap, and nothing is
        removed this time."""
        survey = self.survey
        popped = survey.pop_oldest()
        if popped is None:
            return 0, 0, "history", 0
        known, tenant, table = popped
        acked = survey.acked.get(tenant, 0)
        at = await conn.fetchval(ONE_OLDEST[table], tenant, acked)
        if at is None:
            return 0, 0, table, 0
        if at > known:
            survey.push(at, tenant, table)
            return 0, 0, table, 0
        until = survey.next_oldest()
        survey.push(at, tenant, table)  # a lower bound of what it keeps
        if table == "webhooks":
            removed, freed, records = await _delete_delivered(
                conn, tenant, acked, budget, excess=excess, until=until
            )
            return removed, freed, table, records
        size = RECORD_BYTES if table == "history" else FAILURE_BYTES
        rows = await conn.fetch(
            f"""SELECT {TIME[table]}, {size} FROM {table} WHERE tenant = $1
                ORDER BY {TIME[table]} LIMIT $2""",
            tenant,
            budget,
        )
        # The rows to take: the oldest, while bytes remain to free and they are older than
        # any other tenant's oldest; then deleted as "at or before the last one taken".
        taken = freed = 0
        last = rows[0][0] if rows else 0.0
        for at, n in rows:
            if taken and (freed >= excess or at > until):
                break
            taken += 1
            freed += n
            last = at
        removed, freed = await self._delete(
            conn, tenant, table, condition=f"{TIME[table]} <= $2", args=[last], budget=taken
        )
        return removed, freed, table, removed if table == "history" else 0


TIME = {"history": "accepted_at", "failed_attempts": "at"}
# What pruning knows of every tenant (store/history.py Survey), read off the writer: each
# tenant's oldest record of the other outcomes, delivered record (the lowest sequence at or
# below acked_sequence), failed attempt and producer id, in the order of history.PRUNED.
SURVEY = """
    SELECT s.tenant, s.acked_sequence,
           (SELECT min(accepted_at) FROM history AS h WHERE h.tenant = s.tenant),
           (SELECT w.accepted_at FROM webhooks AS w
            WHERE w.tenant = s.tenant AND w.sequence <= s.acked_sequence
            ORDER BY w.sequence LIMIT 1),
           (SELECT min(at) FROM failed_attempts AS f WHERE f.tenant = s.tenant),
           (SELECT min(accepted_at) FROM webhook_ids AS i WHERE i.tenant = s.tenant)
    FROM tenant_state AS s"""
# One tenant's oldest, as the survey reads it ($2: its acked_sequence as the survey knew it).
ONE_OLDEST = {
    "history": "SELECT min(accepted_at) FROM history WHERE tenant = $1 AND $2::bigint >= 0",
    "webhooks": """SELECT accepted_at FROM webhooks WHERE tenant = $1 AND sequence <= $2
                   ORDER BY sequence LIMIT 1""",
    "failed_attempts": "SELECT min(at) FROM failed_attempts WHERE tenant = $1 AND $2::bigint >= 0",
}
TOTAL_BYTES = "SELECT coalesce(sum(history_bytes), 0)::bigint FROM tenant_state"


async def _delete_delivered(
    conn: Connection,
    tenant: str,
    acked: int,
    budget: int,
    *,
    before: float | None = None,
    excess: int | None = None,
    until: float = float("inf"),
) -> tuple[int, int, int]:
    """Delete a tenant's oldest rows at or below acked_sequence (its delivered records), in
    sequence order, up to `budget`: those accepted `before` (pruning by age: up to the
    first that is not), or until `excess` bytes of records are gone or a row is accepted
    after `until` (by size); with them the deliveries rows no longer covering any, all
    counted off the state row. Returns (rows, bytes, records)."""
    rows = await conn.fetch(
        f"""SELECT w.sequence, w.accepted_at,
                   octet_length(w.id) + octet_length(w.event) + octet_length(w.data)
                       + {RECORD_OVERHEAD},
                   coalesce(d.first_sequence <= w.sequence, false)
            FROM webhooks AS w LEFT JOIN LATERAL (
                SELECT c.first_sequence FROM deliveries AS c
                WHERE c.tenant = w.tenant AND c.last_sequence >= w.sequence
                ORDER BY c.last_sequence LIMIT 1) AS d ON true
            WHERE w.tenant = $1 AND w.sequence <= $2 ORDER BY w.sequence LIMIT $3""",
        tenant,
        acked,
        budget,
    )
    taken = records = freed = 0
    last = 0
    for sequence, at, size, covered in rows:
        if before is not None and at >= before:
            break
        if excess is not None and taken and (freed >= excess or at > until):
            break
        taken += 1
        last = sequence
        if covered:
            records += 1
            freed += size
    if taken:
        await conn.execute(
            """WITH gone AS (
                   DELETE FROM webhooks WHERE tenant = $1 AND sequence <= $2
               ),
               covering AS (
                   DELETE FROM deliveries WHERE tenant = $1 AND last_sequence <= $2
               )
               UPDATE tenant_state SET history_records = history_records - $3,
                   history_bytes = history_bytes - $4
               WHERE tenant = $1""",
            tenant,
            last,
            records,
            freed,
        )
    return taken, freed, records


# Producer ids past the window (per tenant: `before`) whose webhook is neither queued
# (its sequence after the tenant's head), parked nor in the history: the oldest of each
# tenant through (tenant, accepted_at), `$4` at most in all. A tenant that forgot any
# notes that ids accepted before its `before` may be forgotten; the count is the answer.
FORGET_IDS = """
    WITH gone AS (
    DELETE FROM webhook_ids AS d USING (
        SELECT c.tenant, c.id
        FROM unnest($1::text[], $2::float8[], $3::bigint[]) AS t (tenant, before, acked)
        CROSS JOIN LATERAL (
            SELECT i.tenant, i.id FROM webhook_ids AS i
            WHERE i.tenant = t.tenant AND i.accepted_at < t.before
              AND i.sequence <= t.acked
              AND NOT EXISTS (SELECT FROM parked AS p WHERE p.tenant = i.tenant AND p.id = i.id)
              AND NOT EXISTS (
                  SELECT FROM history AS h
                  WHERE h.tenant = i.tenant AND h.sequence = i.sequence)
              AND NOT EXISTS (
                  SELECT FROM webhooks AS w
                  WHERE w.tenant = i.tenant AND w.sequence = i.sequence)
            ORDER BY i.accepted_at LIMIT $4
        ) AS c
        LIMIT $4
    ) AS chosen
    WHERE d.tenant = chosen.tenant AND d.id = chosen.id
    RETURNING d.tenant
    ), noted AS (
        UPDATE tenant_state AS s
        SET ids_forgotten_before = greatest(coalesce(s.ids_forgotten_before, 0), t.before)
        FROM unnest($1::text[], $2::float8[]) AS t (tenant, before)
        WHERE s.tenant = t.tenant AND t.tenant IN (SELECT tenant FROM gone)
    )
    SELECT count(*) FROM gone"""
