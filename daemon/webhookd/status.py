"""Status as the API shows it: pure functions of the workers' in-memory state (no I/O).

One pass over the workers answers `/v1/status` for thousands of tenants; nothing here
reads the database.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from webhookd.records import Failure, Webhook
from webhookd.scheduler import TenantWorker
from webhookd.views import counted

QUEUE_STATES = ("empty", "waiting", "stalled", "paused", "disabled", "orphaned")


def iso(when: float | None) -> str | None:
    """Unix seconds as `2026-11-25T10:00:00Z` (UTC, whole seconds)."""
    if when is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def tenant(worker: TenantWorker, now: float) -> dict[str, Any]:
    """One tenant's status, every field of docs/http-api.md#get-v1tenantststatus."""
    config = worker.config
    row = worker.row
    last = row.last_processed_at
    queue = worker.queue_state
    return {
        "tenant": worker.name,
        "enabled": config.enabled if config else False,
        "paused": row.paused,
        "batching": config.batching if config else False,
        "queue": queue,
        "waiting": worker.waiting,
        "oldest_waiting_at": iso(worker.oldest_waiting_at),
        "last_processed_at": iso(last),
        "seconds_since_last_processed": None if last is None else round(now - last, 1),
        "attempts": row.attempts,
        "next_attempt_at": next_attempt_at(worker, queue, now),
        "in_flight": worker.in_flight is not None,
        "parked": worker.parked,
        "recent_failures": [failure(f) for f in worker.failures],
    }


def failure(f: Failure) -> dict[str, Any]:
    """A failed attempt, as status and a lookup show it."""
    return {
        "at": iso(f.at),
        "attempt": f.attempt,
        "first_sequence": f.first_sequence,
        "last_sequence": f.last_sequence,
        "count": f.count,
        "status": f.status,
        "error": f.error,
        "duration_ms": f.duration_ms,
    }


def next_attempt_at(worker: TenantWorker, queue: str, now: float) -> str | None:
    """When the backoff ends (null outside backoff); now, once a retry has been asked for."""
    if worker.retry_requested and queue == "waiting":
        return iso(now)
    return iso(worker.row.next_attempt_at) if worker.row.attempts else None


def daemon(workers: Sequence[TenantWorker], now: float, disk_full: bool) -> dict[str, Any]:
    """Every tenant's status, sorted by name, and the daemon's totals."""
    tenants = [tenant(w, now) for w in workers]
    # `waiting` and `parked` count webhooks; `queues` counts tenants per queue state, and
    # the states an operator looks for are repeated at the top level.
    queues = dict.fromkeys(QUEUE_STATES, 0)
    for one in tenants:
        queues[one["queue"]] += 1
    totals: dict[str, Any] = {
        "tenants": len(tenants),
        "waiting": sum(t["waiting"] for t in tenants),
        "stalled": queues["stalled"],
        "paused": queues["paused"],
        "disabled": queues["disabled"],
        "orphaned": queues["orphaned"],
        "parked": sum(t["parked"] for t in tenants),
        "in_flight": sum(1 for t in tenants if t["in_flight"]),
        "queues": queues,
        # Out of disk: ingest answers 503, deliveries go on (see store/sqlite/reserve.py).
        "disk_full": disk_full,
    }
    return {"tenants": tenants, "totals": totals}


def line(workers: Sequence[TenantWorker]) -> str:
    """The one-line summary systemd shows (STATUS=)."""
    waiting = sum(w.waiting for w in workers)
    stalled = sum(1 for w in workers if w.queue_state == "stalled")
    return f"{counted(len(workers), 'tenant')}, {waiting} waiting, {stalled} stalled"


def webhook(w: Webhook) -> dict[str, Any]:
    """A queued webhook for peek and parked lists; the secret is not part of it."""
    return {
        "id": w.id,
        "sequence": w.sequence,
        "event": w.event,
        "timestamp": w.timestamp,
        "accepted_at": iso(w.accepted_at),
        # The stored JSON text as is: never decoded and re-encoded (which could change
        # numbers, and fails for data nested deeper than orjson writes).
        "data": orjson.Fragment(w.data),
    }
