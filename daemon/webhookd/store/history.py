"""What both engines share about the history: how its size is counted, the retention each
tenant has, and what pruning knows of every tenant (`Survey`). No SQL here; each engine
writes the same arithmetic in its own dialect."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

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


# -- what pruning knows of every tenant --------------------------------------------------------

# Where a tenant's oldest rows are: the other outcomes' records, the delivered ones (the
# queue's rows at or below acked_sequence), the failed attempts.
PRUNED = ("history", "webhooks", "failed_attempts")
# How long a survey serves the pruner (in the store's `now`): pruning by age starts at most
# this late, and a size bound counts what went in since from the state rows.
SURVEY_S = 10.0
# A step stops once it has taken this long (what it did is kept; `more` says to call
# again): the writes queued behind it wait about this much, however many tenants it has
# to go through (pruning by size goes tenant by tenant when their records interleave).
STEP_S = 0.005
# ... once it has done this many pieces (a tenant's rows of one table): a step of a few
# tenants always goes through, however slow the machine.
STEP_PIECES_MIN = 8
# At most this many (tenant, table) a step is given to prune by age (a step prunes PRUNE_STEP
# rows at most, each of them at least one).
DUE_PER_STEP = 500
# At most this many tenants looked at per step for their producer ids (a tenant whose
# oldest id must stay, its record still kept, is tried again at the next survey only).
IDS_TENANTS_PER_STEP = 500

SurveyRow = tuple[str, int, float | None, float | None, float | None, float | None]
# What a survey was made for: (retention per tenant, default retention, max bytes, window).
# The service hands the same retention mapping each step until its configuration changes:
# compared by identity first, then by value (in C: a few hundred µs for 10,000 tenants).
Settings = tuple[Mapping[str, float], float, int | None, float]


@dataclass
class Survey:
    """Each tenant's oldest record, delivered record, failed attempt and producer id, read
    in one statement on the engine's read path (not the writer): which tenants have
    anything to prune, for SURVEY_S, without a probe of every tenant in every step. With
    10,000 tenants the probes took 30-200 ms per step, and pruning by size, which looked
    for the oldest again for every tenant it pruned, seconds; the writer waited meanwhile.

    Each oldest row waits in a heap by the time it falls due (past its tenant's retention,
    or for a producer id past the window too); each step takes what has fallen due by
    then, and a tenant pruned of all it could is not looked at again before the next
    survey. A row the survey does not know of (one that fell due behind the oldest, a
    tenant that came since, a replay's copy keeping its old acceptance time) waits for
    the next survey. For pruning by size the times are lower bounds: a tenant's oldest rows
    only get newer (pruned, or new rows after them)."""

    now: float
    settings: Settings
    acked: dict[str, int]
    # (tenant, table in PRUNED): its oldest row's time; raised by `pruned`, read once, to
    # make the heap by size.
    oldest: dict[tuple[str, str], float]
    heap: list[tuple[float, str, str]] | None = None  # by size: (time, tenant, table)
    lifetime: float = SURVEY_S  # how long it serves, in the store's `now`
    # By age: (falls due at, tenant, index in PRUNED) not yet due, and those due, in turn.
    _waiting: list[tuple[float, str, int]] = dataclasses.field(default_factory=list)
    _due: deque[tuple[str, str]] = dataclasses.field(default_factory=deque)
    # Producer ids: (falls due at, tenant) not yet due, and the tenants due, in turn.
    _ids_waiting: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    _ids_due: deque[str] = dataclasses.field(default_factory=deque)

    @classmethod
    def of(cls, rows: Iterable[SurveyRow], now: float, settings: Settings) -> Survey:
        survey = cls(now, settings, {}, {})
        kept, default, _, window = settings
        # SURVEY_S, or a tenth of the shortest retention or window: a retention of seconds
        # is pruned within a fraction of it.
        spans = [s for s in (default, window, *kept.values()) if s > 0]
        survey.lifetime = min(SURVEY_S, min(spans, default=SURVEY_S) / 10)
        for tenant, acked, *times, id_at in rows:
            survey.acked[tenant] = acked
            seconds = kept.get(tenant, default)
            for index, (table, at) in enumerate(zip(PRUNED, times, strict=True)):
                if at is not None:
                    survey.oldest[(tenant, table)] = at
                    due = at + seconds if seconds > 0 else -math.inf
                    survey._waiting.append((due, tenant, index))
            if id_at is not None:
                survey._ids_waiting.append((id_at + max(window, seconds), tenant))
        heapq.heapify(survey._waiting)
        heapq.heapify(survey._ids_waiting)
        return survey

    def serves(self, now: float, settings: Settings) -> bool:
        """Whether this survey may still guide a step at `now`: the same settings, and
        not older than its lifetime."""
        return self.now <= now <= self.now + self.lifetime and (
            settings is self.settings or settings == self.settings
        )

    def due(self, now: float) -> list[tuple[str, str, float]]:
        """(tenant, table, cutoff) with rows past the tenant's retention at `now`, in the
        order they fell due; those a step has pruned (`pruned`) are no longer in it."""
        while self._waiting and self._waiting[0][0] < now:
            _, tenant, index = heapq.heappop(self._waiting)
            self._due.append((tenant, PRUNED[index]))
        kept, default, _, _ = self.settings
        return [
            (tenant, table, cutoff(tenant, now, kept, default))
            for tenant, table in itertools.islice(self._due, DUE_PER_STEP)
        ]

    def pruned(self, tenant: str, table: str, before: float) -> None:
        """A step removed every row of `table` older than `before` it could (for the
        delivered ones: up to the first within retention): not looked at again before the
        next survey."""
        if self.oldest.get((tenant, table), before) < before:
            self.oldest[(tenant, table)] = before
        if self._due and self._due[0] == (tenant, table):
            self._due.popleft()

    def ids_due(self, now: float) -> list[tuple[str, float]]:
        """(tenant, before): tenants with producer ids older than both the window and the
        tenant's retention, at most IDS_TENANTS_PER_STEP; those a step has tried
        (`ids_tried`) are no longer in it."""
        while self._ids_waiting and self._ids_waiting[0][0] < now:
            self._ids_due.append(heapq.heappop(self._ids_waiting)[1])
        kept, default, _, window = self.settings
        return [
            (tenant, now - max(window, kept.get(tenant, default)))
            for tenant in itertools.islice(self._ids_due, IDS_TENANTS_PER_STEP)
        ]

    def ids_tried(self, tenant: str) -> None:
        """A step forgot what it could of the tenant's ids: not looked at again before the
        next survey."""
        if self._ids_due and self._ids_due[0] == tenant:
            self._ids_due.popleft()

    # By size: the oldest row of every tenant together, in a heap of lower bounds.

    def pop_oldest(self) -> tuple[float, str, str] | None:
        if self.heap is None:
            self.heap = [(at, tenant, table) for (tenant, table), at in self.oldest.items()]
            heapq.heapify(self.heap)
        return heapq.heappop(self.heap) if self.heap else None

    def next_oldest(self) -> float:
        """The time of the oldest row left in the heap: how far the tenant popped may go."""
        return self.heap[0][0] if self.heap else float("inf")

    def push(self, at: float, tenant: str, table: str) -> None:
        assert self.heap is not None
        heapq.heappush(self.heap, (at, tenant, table))


def settings_of(
    retention: Mapping[str, float], default: float, max_bytes: int | None, window: float
) -> Settings:
    return (retention, default, max_bytes, window)


class StepClock:
    """Whether a pruning step should stop now (STEP_S, STEP_PIECES_MIN): asked before
    each piece of work."""

    def __init__(self) -> None:
        self.ends = time.monotonic() + STEP_S
        self.pieces = 0

    def over(self) -> bool:
        self.pieces += 1
        return self.pieces > STEP_PIECES_MIN and time.monotonic() > self.ends
