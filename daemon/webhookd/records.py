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
