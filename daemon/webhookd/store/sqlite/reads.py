"""The history's reads on SQLite: a webhook looked up by id, and a page of a tenant's
history. What they answer is the Store's contract (store/protocol.py, records.py); the
indexes they use are described with the schema (schema.py, versions 2 and 3)."""

from __future__ import annotations

import sqlite3
from typing import Any

from webhookd.ids import generated_sequence, id_tag
from webhookd.records import (
    Failure,
    FoundWebhook,
    HistoryQuery,
    HistoryRecord,
    ReplaySelection,
    Webhook,
)
from webhookd.store.sqlite.writes import DELIVERED_COLUMNS, DELIVERED_JOIN, selection_where

RECORD_COLUMNS = (
    "sequence, id, event, accepted_at, finished_at, outcome, attempts, status, duration_ms, "
    "data, next_sequence"
)
FAILURES_SHOWN = 50  # failed attempts a lookup returns at most, newest first


def find_webhook(conn: sqlite3.Connection, tenant: str, webhook_id: str) -> FoundWebhook:
    """Where `webhook_id` is now (`FoundWebhook`), read in one transaction."""
    conn.execute("BEGIN")
    try:
        return _find(conn, tenant, webhook_id)
    finally:
        conn.execute("COMMIT")


def _find(conn: sqlite3.Connection, tenant: str, webhook_id: str) -> FoundWebhook:
    state = conn.execute(
        """SELECT last_sequence, acked_sequence, ids_forgotten_before FROM tenant_state
           WHERE tenant = ?""",
        (tenant,),
    ).fetchone()
    last, acked, forgotten_before = state if state is not None else (0, 0, None)
    sequence = generated_sequence(id_tag(tenant), webhook_id)
    if sequence is not None:
        if not 1 <= sequence <= last:
            return FoundWebhook("unknown")
    else:
        named = conn.execute(
            "SELECT sequence FROM webhook_ids WHERE tenant = ? AND id = ?", (tenant, webhook_id)
        ).fetchone()
        if named is None and forgotten_before is None:
            return FoundWebhook("unknown")  # the tenant never forgot a producer id
        if named is None or named[0] is None:
            return FoundWebhook("forgotten", forgotten_before=forgotten_before)
        sequence = named[0]
    seen: list[int] = []
    while True:
        seen.append(sequence)
        if acked < sequence <= last:
            row = conn.execute(
                """SELECT sequence, id, event, accepted_at, data FROM webhooks
                   WHERE tenant = ? AND sequence = ?""",
                (tenant, sequence),
            ).fetchone()
            if row is not None:
                return FoundWebhook(
                    "queued",
                    sequence,
                    webhook=Webhook(*row),
                    failures=_failures(conn, tenant, seen),
                )
        row = conn.execute(
            """SELECT sequence, id, event, accepted_at, data, parked_at FROM parked
               WHERE tenant = ? AND sequence = ?""",
            (tenant, sequence),
        ).fetchone()
        if row is not None:
            return FoundWebhook(
                "parked",
                sequence,
                webhook=Webhook(*row[:5]),
                parked_at=row[5],
                failures=_failures(conn, tenant, seen),
            )
        row = conn.execute(
            f"SELECT {RECORD_COLUMNS} FROM history WHERE tenant = ? AND sequence = ?",
            (tenant, sequence),
        ).fetchone()
        if row is None and sequence <= acked:
            row = conn.execute(
                f"""SELECT {DELIVERED_COLUMNS} FROM webhooks AS w {DELIVERED_JOIN}
                    WHERE w.tenant = ? AND w.sequence = ?""",
                (tenant, sequence),
            ).fetchone()
        if row is None:
            return FoundWebhook("expired", sequence, failures=_failures(conn, tenant, seen))
        record = HistoryRecord(*row)
        following = record.next_sequence
        if following is not None and following not in seen and following <= last:
            sequence = following
            continue
        return FoundWebhook(
            "history", sequence, record=record, failures=_failures(conn, tenant, seen)
        )


def _failures(conn: sqlite3.Connection, tenant: str, sequences: list[int]) -> tuple[Failure, ...]:
    """The failed attempts kept that included any of `sequences`, newest first."""
    found: list[tuple[int, Failure]] = []
    for sequence in sequences:
        for rowid, *values in conn.execute(
            """SELECT id, at, attempt, first_sequence, last_sequence, count, status, error,
                      duration_ms FROM failed_attempts
               WHERE tenant = ? AND last_sequence >= ? AND first_sequence <= ?
               ORDER BY id DESC LIMIT ?""",
            (tenant, sequence, sequence, FAILURES_SHOWN),
        ):
            found.append((rowid, Failure(*values)))
    found.sort(key=lambda pair: pair[0], reverse=True)
    return tuple(f for _, f in found[:FAILURES_SHOWN])


def history_query(tenant: str, query: HistoryQuery) -> tuple[str, dict[str, Any]]:
    """The statement for one page of a tenant's history, and its parameters.

    Two sources, each read as a range scan in sequence order from the cursor, LIMIT the
    page, then merged (UNION ALL, ORDER BY sequence, LIMIT the page):
    - the delivered records: webhooks rows at or below acked_sequence (on webhooks_queue,
      or webhooks_event when an event is asked), each joined to its deliveries row by one
      probe (writes.DELIVERED_JOIN);
    - the other outcomes in `history` (on history_order, history_event when an event is
      asked, history_outcome when one outcome is).
    An outcome filter reads only the source that holds it. A time range bounded at both
    ends leaves the choice to the planner: the range on webhooks_accepted /
    history_accepted (then sorted: few rows when narrow) or the sequence order. The other
    filters are checked on the rows the scans meet."""
    params: dict[str, Any] = {"tenant": tenant, "limit": max(0, query.limit)}
    if query.after is not None:
        params["after"] = query.after
    order = "ASC" if query.oldest_first else "DESC"
    outcomes = sorted(query.outcomes) if query.outcomes is not None else None
    parts: list[str] = []
    if outcomes is None or "delivered" in outcomes:
        parts.append(_delivered_page(query, params))
    others: list[str] | None = None
    if outcomes is not None:
        others = [o for o in outcomes if o != "delivered"]
    if others is None or others:
        parts.append(_others_page(query, others, params))
    if not parts:  # only outcomes no record has
        return f"SELECT {RECORD_COLUMNS} FROM history WHERE 0", {}
    if len(parts) == 1:
        return parts[0], params
    merged = " UNION ALL ".join(f"SELECT * FROM ({part})" for part in parts)
    return f"{merged} ORDER BY 1 {order} LIMIT :limit", params


def _selection(query: HistoryQuery) -> ReplaySelection:
    """The query's filters but the sequence range (`_bounds` has it)."""
    return ReplaySelection(None, None, query.since, query.until, query.event)


def _bounds(query: HistoryQuery, params: dict[str, Any], column: str, top: str = "") -> list[str]:
    """The sequence range a page scans, as one lower and one upper bound on `column`: the
    sequence range asked, the cursor, and `top` (the delivered records: acked_sequence).
    One each: with two upper bounds SQLite's range scan uses one and checks the other on
    each row it meets, which from the top of a long history is a scan of all between."""
    lower = [":from_sequence - 1"] if query.from_sequence is not None else []
    upper = [":to_sequence"] if query.to_sequence is not None else []
    if query.from_sequence is not None:
        params["from_sequence"] = query.from_sequence
    if query.to_sequence is not None:
        params["to_sequence"] = query.to_sequence
    if query.after is not None:
        (lower if query.oldest_first else upper).append(
            ":after" if query.oldest_first else ":after - 1"
        )
    if top:
        upper.append(top)
    where = []
    if lower:
        where.append(f"{column} > {_one('max', lower)}")
    if upper:
        where.append(f"{column} <= {_one('min', upper)}")
    return where


def _one(function: str, bounds: list[str]) -> str:
    return bounds[0] if len(bounds) == 1 else f"{function}({', '.join(bounds)})"


def _delivered_page(query: HistoryQuery, params: dict[str, Any]) -> str:
    acked = "coalesce((SELECT acked_sequence FROM tenant_state WHERE tenant = :tenant), 0)"
    where = [
        "w.tenant = :tenant",
        *_bounds(query, params, "w.sequence", acked),
        *selection_where(_selection(query), params, "w."),
    ]
    if query.event is not None:
        index = "INDEXED BY webhooks_event "
    elif query.since is not None and query.until is not None:
        index = ""
    else:
        index = "INDEXED BY webhooks_queue "
    order = "ASC" if query.oldest_first else "DESC"
    return (
        f"SELECT {DELIVERED_COLUMNS} FROM webhooks AS w {index}{DELIVERED_JOIN} "
        f"WHERE {' AND '.join(where)} ORDER BY w.sequence {order} LIMIT :limit"
    )


def _others_page(query: HistoryQuery, others: list[str] | None, params: dict[str, Any]) -> str:
    where = [
        "tenant = :tenant",
        *_bounds(query, params, "sequence"),
        *selection_where(_selection(query), params),
    ]
    if others is not None:
        marks = []
        for n, name in enumerate(others):
            params[f"outcome{n}"] = name
            marks.append(f":outcome{n}")
        where.append(f"outcome IN ({', '.join(marks)})")
    if query.event is not None:
        index = "INDEXED BY history_event "
    elif others is not None and len(others) == 1:
        index = "INDEXED BY history_outcome "
    elif query.since is not None and query.until is not None:
        index = ""
    else:
        index = "INDEXED BY history_order "
    order = "ASC" if query.oldest_first else "DESC"
    return (
        f"SELECT {RECORD_COLUMNS} FROM history {index}"
        f"WHERE {' AND '.join(where)} ORDER BY sequence {order} LIMIT :limit"
    )
