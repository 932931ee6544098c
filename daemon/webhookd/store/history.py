"""What both engines share about the history: how its size is counted, and the retention
each tenant has. No SQL here; each engine writes the same arithmetic in its own dialect."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from webhookd.records import ReplaySelection

# The bytes a record or a failed attempt counts for besides its text columns (its numbers,
# its outcome, its tenant's share of the key): an estimate, so that a size limit holds for
# records without payloads too. `bytes` = octets of id + event + data (+ this).
RECORD_OVERHEAD = 64
# A failed attempt: octets of its error text + this.
FAILURE_OVERHEAD = 64


def record_bytes(webhook_id: str, event: str, data: str | None) -> int:
    return (
        len(webhook_id.encode())
        + len(event.encode())
        + (len(data.encode()) if data is not None else 0)
        + RECORD_OVERHEAD
    )


def failure_bytes(error: str) -> int:
    return len(error.encode()) + FAILURE_OVERHEAD


def cutoff(
    tenant: str, now: float, retention: Mapping[str, float], default_retention: float
) -> float:
    """Records accepted (failed attempts made) before this are past the tenant's retention;
    a retention of 0 keeps nothing (every time is before the cutoff)."""
    seconds = retention.get(tenant, default_retention)
    return float("inf") if seconds <= 0 else now - seconds


# A selection's fields as conditions on history rows: (field, column, operator, PostgreSQL
# type). Each engine writes them with its own placeholders; both read the same rows.
SELECTION_CONDITIONS = (
    ("event", "event", "=", "text"),
    ("from_sequence", "sequence", ">=", "bigint"),
    ("to_sequence", "sequence", "<=", "bigint"),
    ("since", "accepted_at", ">=", "float8"),
    ("until", "accepted_at", "<", "float8"),
)


def selection_conditions(selection: ReplaySelection) -> Iterator[tuple[str, str, str, str, object]]:
    """The conditions a selection sets: (field, column, operator, PostgreSQL type, value)."""
    for field, column, operator, cast in SELECTION_CONDITIONS:
        value = getattr(selection, field)
        if value is not None:
            yield field, column, operator, cast, value
