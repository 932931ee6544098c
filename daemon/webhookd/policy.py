"""Pure delivery policy: backoff, success, batch timing, queue classification.

Functions of their inputs only (no clock, no I/O), so each has small, exact tests.
"""

from __future__ import annotations

import email.utils
from collections.abc import Collection
from datetime import UTC
from typing import Literal

QueueState = Literal["orphaned", "disabled", "paused", "stalled", "waiting", "empty"]


def backoff_delay(attempts: int, base: float, doublings: int, after_doublings: float) -> float:
    """Seconds to wait after the `attempts`-th consecutive failure of a tenant's head.

    `base × 2^(attempts−1)` while attempts ≤ doublings, then `after_doublings` (a day).
    """
    if attempts < 1:
        return 0.0
    if attempts <= doublings:
        return float(base * 2 ** (attempts - 1))
    return float(after_doublings)


def retry_after_seconds(header: str | None, now: float) -> float | None:
    """A `Retry-After` header (delta seconds or an HTTP date) as seconds from `now`."""
    if header is None:
        return None
    text = header.strip()
    # The header comes from the tenant's endpoint: anything may arrive ("²" is a digit to
    # str.isdigit, a year 99999999999 overflows), and none of it may raise.
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
        if when.tzinfo is None:  # asctime dates carry no zone; HTTP dates are always GMT
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - now)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def next_delay(
    attempts: int,
    status: int | None,
    retry_after: float | None,
    *,
    base: float,
    doublings: int,
    after_doublings: float,
) -> float:
    """The wait before the next attempt after a failure, honouring Retry-After on 429/503."""
    delay = backoff_delay(attempts, base, doublings, after_doublings)
    if status in (429, 503) and retry_after is not None:
        delay = max(delay, min(retry_after, after_doublings))
    return delay


def is_success(status: int, success_statuses: Collection[int]) -> bool:
    return status in success_statuses


def batch_due_at(waiting: int, batch_size: int, oldest_accepted_at: float, window: float) -> float:
    """When a batched tenant's next (non-retry) batch is due, as a wall-clock time.

    A full batch is due at once (returns 0.0, the distant past); a partial one when its
    oldest webhook has waited `window` seconds, time already waited included.
    """
    if waiting >= batch_size:
        return 0.0
    return oldest_accepted_at + window


def classify_queue(
    *,
    configured: bool,
    enabled: bool,
    paused: bool,
    waiting: int,
    attempts: int,
    retry_due: bool = False,
) -> QueueState:
    """The status word for a tenant's queue; the first rule that matches wins
    (docs/delivery.md#queue-states).

    `stalled` is "in backoff": a retry asked for (`retry_due`) ends the backoff, so the
    tenant is `waiting` for the attempt about to start until its outcome is known.
    """
    if not configured:
        return "orphaned"
    if not enabled:
        return "disabled"
    if paused:
        return "paused"
    if waiting and attempts and not retry_due:
        return "stalled"
    if waiting:
        return "waiting"
    return "empty"
