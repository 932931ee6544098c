"""The history's reads on SQLite: a webhook looked up by id, and a page of a tenant's
history. What they answer is the Store's contract (store/protocol.py, records.py); the
indexes they use are described with the schema (schema.py, version 2)."""

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
from webhookd.store.sqlite.writes import selection_where

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
        "SELECT last_sequence, acked_sequence FROM tenant_state WHERE tenant = ?", (tenant,)
    ).fetchone()
    last, acked = state if state is not None else (0, 0)
    sequence = generated_sequence(id_tag(tenant), webhook_id)
    if sequence is not None:
        if not 1 <= sequence <= last:
            return FoundWebhook("unknown")
    else:
        named = conn.execute(
            "SELECT sequence FROM webhook_ids WHERE tenant = ? AND id = ?", (tenant, webhook_id)
        ).fetchone()
        if named is None or named[0] is None:
            return FoundWebhook("forgotten")
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

    The page is a range scan in sequence order from the cursor: on history_order, or on
    history_event when an event is asked (equal tenant and event, then sequence order);
    the other filters are checked on the rows the scan meets."""
    params: dict[str, Any] = {"tenant": tenant, "limit": max(0, query.limit)}
    selection = ReplaySelection(
        query.from_sequence, query.to_sequence, query.since, query.until, query.event
    )
    where = ["tenant = :tenant", *selection_where(selection, params)]
    if query.after is not None:
        where.append("sequence > :after" if query.oldest_first else "sequence < :after")
        params["after"] = query.after
    if query.outcomes is not None:
        names = sorted(query.outcomes)
        marks = []
        for n, name in enumerate(names):
            params[f"outcome{n}"] = name
            marks.append(f":outcome{n}")
        where.append(f"outcome IN ({', '.join(marks) or 'NULL'})")
    # A time range bounded at both ends: the planner chooses between the range on
    # history_accepted (then sorted: few rows when narrow) and the sequence order.
    if query.event is not None:
        index = "INDEXED BY history_event "
    elif query.since is not None and query.until is not None:
        index = ""
    else:
        index = "INDEXED BY history_order "
    order = "ASC" if query.oldest_first else "DESC"
    sql = (
        f"SELECT {RECORD_COLUMNS} FROM history {index}"
        f"WHERE {' AND '.join(where)} ORDER BY sequence {order} LIMIT :limit"
    )
    return sql, params
