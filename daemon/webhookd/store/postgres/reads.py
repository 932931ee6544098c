"""The history's reads on PostgreSQL: a webhook looked up by id, and a page of a tenant's
history. What they answer is the Store's contract (store/protocol.py, records.py); the
indexes they use are described with the schema (schema.py, versions 4 and 5). Both answer
from the database on any instance."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from webhookd.ids import generated_sequence, id_tag
from webhookd.records import (
    Failure,
    FoundWebhook,
    HistoryQuery,
    HistoryRecord,
    ReplaySelection,
    Webhook,
)
from webhookd.store.postgres.writes import (
    COVERED,
    DELIVERED_COLUMNS,
    DELIVERED_JOIN,
    selection_where,
)

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    # A session of the read pool (or any session).
    Connection = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

RECORD_COLUMNS = (
    "sequence, id, event, accepted_at, finished_at, outcome, attempts, status, duration_ms, "
    "data, next_sequence"
)
FAILURES_SHOWN = 50  # failed attempts a lookup returns at most, newest first


async def find_webhook(conn: Connection, tenant: str, webhook_id: str) -> FoundWebhook:
    """Where `webhook_id` is now (`FoundWebhook`), read in one snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _find(conn, tenant, webhook_id)


async def _find(conn: Connection, tenant: str, webhook_id: str) -> FoundWebhook:
    state = await conn.fetchrow(
        """SELECT c.last_sequence, coalesce(s.acked_sequence, 0), s.ids_forgotten_before
           FROM counters AS c LEFT JOIN tenant_state AS s USING (tenant)
           WHERE tenant = $1""",
        tenant,
    )
    last, acked, forgotten_before = tuple(state) if state is not None else (0, 0, None)
    sequence = generated_sequence(id_tag(tenant), webhook_id)
    if sequence is not None:
        if not 1 <= sequence <= last:
            return FoundWebhook("unknown")
    else:
        named = await conn.fetchval(
            "SELECT sequence FROM webhook_ids WHERE tenant = $1 AND id = $2", tenant, webhook_id
        )
        if named is None:
            if forgotten_before is None:
                return FoundWebhook("unknown")  # the tenant never forgot a producer id
            return FoundWebhook("forgotten", forgotten_before=forgotten_before)
        sequence = int(named)
    seen: list[int] = []
    while True:
        seen.append(sequence)
        if acked < sequence <= last:
            row = await conn.fetchrow(
                """SELECT sequence, id, event, accepted_at, data FROM webhooks
                   WHERE tenant = $1 AND sequence = $2""",
                tenant,
                sequence,
            )
            if row is not None:
                return FoundWebhook(
                    "queued",
                    sequence,
                    webhook=Webhook(*row),
                    failures=await _failures(conn, tenant, seen),
                )
        row = await conn.fetchrow(
            """SELECT sequence, id, event, accepted_at, data, parked_at FROM parked
               WHERE tenant = $1 AND sequence = $2""",
            tenant,
            sequence,
        )
        if row is not None:
            return FoundWebhook(
                "parked",
                sequence,
                webhook=Webhook(*row[:5]),
                parked_at=row[5],
                failures=await _failures(conn, tenant, seen),
            )
        row = await conn.fetchrow(
            f"SELECT {RECORD_COLUMNS} FROM history WHERE tenant = $1 AND sequence = $2",
            tenant,
            sequence,
        )
        if row is None and sequence <= acked:
            row = await conn.fetchrow(
                f"""SELECT {DELIVERED_COLUMNS} FROM webhooks AS w {DELIVERED_JOIN}
                    WHERE w.tenant = $1 AND w.sequence = $2 AND {COVERED}""",
                tenant,
                sequence,
            )
        if row is None:
            return FoundWebhook("expired", sequence, failures=await _failures(conn, tenant, seen))
        record = HistoryRecord(*row)
        following = record.next_sequence
        if following is not None and following not in seen and following <= last:
            sequence = following
            continue
        return FoundWebhook(
            "history", sequence, record=record, failures=await _failures(conn, tenant, seen)
        )


async def _failures(conn: Connection, tenant: str, sequences: list[int]) -> tuple[Failure, ...]:
    """The failed attempts kept that included any of `sequences`, newest first."""
    rows = await conn.fetch(
        """SELECT DISTINCT f.id, f.at, f.attempt, f.first_sequence, f.last_sequence, f.count,
                  f.status, f.error, f.duration_ms
           FROM unnest($2::bigint[]) AS s (sequence) CROSS JOIN LATERAL (
               SELECT * FROM failed_attempts
               WHERE tenant = $1 AND last_sequence >= s.sequence
                 AND first_sequence <= s.sequence
               ORDER BY id DESC LIMIT $3) AS f
           ORDER BY f.id DESC LIMIT $3""",
        tenant,
        sequences,
        FAILURES_SHOWN,
    )
    return tuple(Failure(*row[1:]) for row in rows)


def history_query(tenant: str, query: HistoryQuery) -> tuple[str, list[Any]]:
    """The statement for one page of a tenant's history, and its parameters.

    Two sources, each read as an index range scan in sequence order from the cursor,
    LIMIT the page, then merged (UNION ALL, ORDER BY sequence, LIMIT the page):
    - the delivered records: webhooks rows at or below acked_sequence (on its primary key,
      or webhooks_event when an event is asked), each joined to its deliveries row by one
      probe (writes.DELIVERED_JOIN);
    - the other outcomes in `history` (on its primary key, history_event when an event is
      asked, history_outcome when outcomes are).
    An outcome filter reads only the source that holds it. The other filters are checked
    on the rows the scans meet, or (a time range) the planner starts from
    webhooks_accepted / history_accepted when that is narrower."""
    args: list[Any] = [tenant]
    if query.after is not None:
        args.append(query.after)
    args.append(max(0, query.limit))
    limit = f"${len(args)}"
    order = "ASC" if query.oldest_first else "DESC"
    outcomes = sorted(query.outcomes) if query.outcomes is not None else None
    selection = ReplaySelection(
        query.from_sequence, query.to_sequence, query.since, query.until, query.event
    )
    parts: list[str] = []
    if outcomes is None or "delivered" in outcomes:
        where = [
            "w.tenant = $1::text",
            "w.sequence <= coalesce("
            "(SELECT acked_sequence FROM tenant_state WHERE tenant = $1::text), 0)",
            COVERED,
            *selection_where(selection, args, "w."),
        ]
        if query.after is not None:
            where.append(f"w.sequence {'>' if query.oldest_first else '<'} $2::bigint")
        parts.append(
            f"SELECT {DELIVERED_COLUMNS} FROM webhooks AS w {DELIVERED_JOIN} "
            f"WHERE {' AND '.join(where)} ORDER BY w.sequence {order} LIMIT {limit}"
        )
    others: list[str] | None = None
    if outcomes is not None:
        others = [o for o in outcomes if o != "delivered"]
    if others is None or others:
        where = ["tenant = $1::text", *selection_where(selection, args)]
        if query.after is not None:
            where.append(f"sequence {'>' if query.oldest_first else '<'} $2::bigint")
        if others is not None and len(others) == 1:
            # One outcome: an equality, so that any plan is a range scan of history_outcome.
            args.append(others[0])
            where.append(f"outcome = ${len(args)}::text")
        elif others is not None:
            args.append(others)
            where.append(f"outcome = ANY(${len(args)}::text[])")
        parts.append(
            f"SELECT {RECORD_COLUMNS} FROM history WHERE {' AND '.join(where)} "
            f"ORDER BY sequence {order} LIMIT {limit}"
        )
    if not parts:  # only outcomes no record has
        return f"SELECT {RECORD_COLUMNS} FROM history WHERE false", []
    if len(parts) == 1:
        return parts[0], args
    merged = " UNION ALL ".join(f"({part})" for part in parts)
    return f"{merged} ORDER BY 1 {order} LIMIT {limit}", args
