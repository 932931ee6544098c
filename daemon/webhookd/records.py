"""What crosses the store boundary: rows as immutable records, and the store's errors.

Outside `store/` so that the layers the rows reach (the scheduler, the sender, status and
the views) import nothing of the store: the store fills these, whichever engine it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple


class StoreError(Exception):
    """The database could not carry out a write (disk full, I/O error, ...)."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


class LeaseLost(StoreError):
    """A delivery's outcome was refused: this instance no longer holds the tenant's lease
    (another instance claimed it, with a newer fencing token). The tenant's worker stops;
    the new owner delivers from the last outcome recorded."""


class SchemaTooNew(StoreError):
    """The database was written by a newer webhookd; refusing beats corrupting it."""


class Webhook(NamedTuple):
    """One queued webhook; `data` is the producer's object as JSON text, never re-encoded.

    A NamedTuple rather than a frozen dataclass: one is built per row read, and building a
    frozen dataclass costs several times more (bench/: a fifth of the batched drain loop).
    """

    sequence: int
    id: str
    event: str
    accepted_at: float
    data: str

    @property
    def timestamp(self) -> int:
        return int(self.accepted_at)


class Owner(NamedTuple):
    """The instance that holds a tenant's lease (several instances on one database), and
    where its API is reached (`[daemon] advertise_url`; empty if it published none)."""

    instance: str
    api_url: str


@dataclass(frozen=True, slots=True)
class ParkedWebhook:
    webhook: Webhook
    parked_at: float


@dataclass(frozen=True, slots=True)
class Failure:
    at: float
    attempt: int
    first_sequence: int
    last_sequence: int
    count: int
    status: int | None
    error: str
    duration_ms: float


@dataclass(frozen=True, slots=True)
class NewWebhook:
    """An accepted ingest item: `id` is None when the producer gave none."""

    id: str | None
    event: str
    data: str


IngestStatus = Literal["queued", "duplicate"]


@dataclass(frozen=True, slots=True)
class IngestResult:
    id: str
    sequence: int | None
    status: IngestStatus


@dataclass(slots=True)
class TenantRow:
    """The durable per-tenant state, one row of `tenant_state`."""

    last_sequence: int = 0
    acked_sequence: int = 0
    attempts: int = 0
    next_attempt_at: float | None = None
    last_processed_at: float | None = None
    paused: bool = False

    def copy(self) -> TenantRow:
        return TenantRow(
            self.last_sequence,
            self.acked_sequence,
            self.attempts,
            self.next_attempt_at,
            self.last_processed_at,
            self.paused,
        )


@dataclass
class TenantRecord:
    """What startup learns of a tenant: its state row and its stored recent failures."""

    name: str
    row: TenantRow
    failures: list[Failure] = field(default_factory=list)
    parked: int = 0


# -- history: what became of webhooks that left the queue ---------------------------------------

HistoryOutcome = Literal["delivered", "parked", "requeued", "discarded"]
"""How a webhook left the queue. `parked`: skipped (a skip parks the head), and still
parked; `requeued`: parked, then put back at the tail under `next_sequence`; `discarded`:
dropped with its tenant's queue by an operator."""

HISTORY_OUTCOMES: tuple[HistoryOutcome, ...] = ("delivered", "parked", "requeued", "discarded")


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """What a tenant keeps of the webhooks that leave its queue (its config):
    `keep` False when `history_retention` is 0 (no record at all), `payloads` False when
    `history_payloads = false` (the record without its data)."""

    keep: bool = True
    payloads: bool = True


@dataclass(frozen=True, slots=True)
class Delivered:
    """A successful attempt's outcome, recorded with the webhooks it delivered."""

    status: int
    duration_ms: float
    attempts: int  # attempts the batch took, this one included


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One webhook that left the queue: delivered, parked, requeued or discarded.

    `finished_at` is when it left (delivered at, parked at, discarded at; a requeued one
    keeps its parked time). `status`, `duration_ms` are the delivering attempt's (None
    otherwise); `attempts` is how many attempts were made for it. `data` is None when the
    tenant keeps no payloads. `next_sequence`: the sequence it was queued again under
    (requeued, or the newest replay), None if never."""

    sequence: int
    id: str
    event: str
    accepted_at: float
    finished_at: float
    outcome: HistoryOutcome
    attempts: int
    status: int | None
    duration_ms: float | None
    data: str | None
    next_sequence: int | None = None


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """A page of a tenant's history. Newest first (by sequence, descending) unless
    `oldest_first`; `after` is the cursor: the sequence the previous page ended with
    (exclusive, in the page's order). Every filter is optional and they combine (AND):
    `event`, a sequence range (inclusive), a time range on `accepted_at` (`since`
    inclusive, `until` exclusive), and the outcomes wanted."""

    limit: int = 100
    oldest_first: bool = False
    after: int | None = None
    event: str | None = None
    from_sequence: int | None = None
    to_sequence: int | None = None
    since: float | None = None
    until: float | None = None
    outcomes: frozenset[HistoryOutcome] | None = None


@dataclass(frozen=True, slots=True)
class ReplaySelection:
    """Which delivered webhooks a replay puts back: a sequence range or a time range on
    `accepted_at` (as in HistoryQuery), optionally one event type."""

    from_sequence: int | None = None
    to_sequence: int | None = None
    since: float | None = None
    until: float | None = None
    event: str | None = None


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay queued (or, dry, would queue): `count` webhooks under the new
    sequences `first_sequence`..`last_sequence` (None when count is 0 or dry).
    `repeated` True when `replay_id` named a replay already done: this is its result."""

    count: int
    first_sequence: int | None
    last_sequence: int | None
    dry_run: bool = False
    repeated: bool = False


class ReplayTooLarge(StoreError):
    """A replay matched more than its limit: nothing was queued. `count` is how many it
    matched, `first_sequence`/`last_sequence` the range they span (to say how to split)."""

    def __init__(self, count: int, limit: int, first_sequence: int, last_sequence: int) -> None:
        super().__init__(f"the replay matches {count} webhooks, more than replay_max ({limit})")
        self.count, self.limit = count, limit
        self.first_sequence, self.last_sequence = first_sequence, last_sequence


class ReplayWithoutPayloads(StoreError):
    """A replay matched delivered webhooks whose data was not kept (`history_payloads =
    false` when they were delivered): nothing was queued."""


WebhookPlace = Literal["queued", "parked", "history", "expired", "unknown", "forgotten"]


@dataclass(frozen=True, slots=True)
class FoundWebhook:
    """Where the store finds a webhook id of a tenant (`Store.find_webhook`), following a
    requeued or replayed webhook to its newest copy.

    - `queued`: `webhook` is in the queue (the service knows whether it is in flight).
    - `parked`: `webhook` is parked since `parked_at`.
    - `history`: `record` is its newest history record (delivered, discarded; a requeued
      record is followed to its next copy, so it is never the answer).
    - `expired`: given out and gone from the queue, but its record is older than the
      retention (pruned): known from a generated id's sequence or a producer id still
      remembered; `sequence` is the one it had.
    - `unknown`: never given out (a generated id whose sequence was never reached; a
      producer id not remembered by a tenant that never forgot one).
    - `forgotten`: a producer id not remembered by a tenant that has forgotten ids
      accepted before `forgotten_before` (after the idempotency window): it was never
      seen, or accepted before then (the two cannot be told apart).

    `failures` are the failed attempts kept in history that included its sequence, newest
    first."""

    place: WebhookPlace
    sequence: int | None = None
    webhook: Webhook | None = None
    parked_at: float | None = None
    record: HistoryRecord | None = None
    failures: tuple[Failure, ...] = ()
    forgotten_before: float | None = None


@dataclass(frozen=True, slots=True)
class PruneResult:
    """One pruning step (`Store.prune_history`): records removed for their age and to stay
    under the size limit, failed attempts removed, producer ids forgotten, and whether more
    remain to prune now (call again)."""

    by_age: int = 0
    by_size: int = 0
    failures: int = 0
    ids: int = 0
    more: bool = False


class HistorySize(NamedTuple):
    """What the history holds now, every tenant together: records (delivered and other
    webhooks) and failed attempts, and their bytes as the store counts them (the columns'
    lengths; the engine's pages and indexes add to it)."""

    records: int
    failures: int
    bytes: int
