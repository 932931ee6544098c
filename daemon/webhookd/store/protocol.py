"""The store's one interface: what the service, the scheduler and the metrics may ask of it.

Every engine (`sqlite/`, `postgres/`) implements `Store` with the same guarantees, and
tests/test_store_contract.py runs the same behaviour against each. What an engine does
beyond this (SQLite's pragmas, reserve file and lock file; PostgreSQL's sessions, instance
lock and reconnection) is its own and tested on its own.

The guarantees every method keeps:

- **Atomic.** A write happens entirely or not at all. A write that raises `StoreError`
  changed nothing: no sequence was taken, no id remembered, no state row moved (but see
  a connection lost during COMMIT, below).
- **Durable on return.** When a write's coroutine returns, its transaction is committed: a
  crash after that never loses it (with durability "normal", a power cut may lose the last
  commits but never corrupts the database). Writes awaited at the same time may be
  committed together (a group commit), each with its own result or error. On a database
  server, a connection lost while COMMIT is on its way leaves the outcome unknown: the write
  raises `StoreError` though it may have been committed (a producer id makes the retry
  answer `duplicate`).
- **The queue invariant.** A tenant's queued webhooks are exactly the sequences
  `acked_sequence + 1 … last_sequence` of its state row, contiguous and in order. Enqueueing
  and requeueing append at the tail; acknowledging and parking remove from the head; a
  discard empties it. So the number waiting is `last_sequence - acked_sequence`.
- **Sequences are never reused,** per tenant: not after the queue empties, not after a
  discard, not across restarts.
- **Errors.** `StoreError` means the database could not carry out the request; its message
  is one sentence for the operator (never a secret). `disk_full` on it says the refusal is
  for lack of space. Anything else raised is a bug.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from webhookd.records import (
    Delivered,
    Failure,
    FoundWebhook,
    HistoryPolicy,
    HistoryQuery,
    HistoryRecord,
    HistorySize,
    IngestResult,
    NewWebhook,
    Owner,
    ParkedWebhook,
    PruneResult,
    ReplayResult,
    ReplaySelection,
    TenantRecord,
    Webhook,
)

KEEP_ALL = HistoryPolicy()

# Called with a tenant and the webhooks a commit has just queued for it, in order.
OnEnqueued = Callable[[str, list[Webhook]], None]


class Members(Protocol):
    """What a cluster tells the service about the tenants this instance delivers."""

    async def gained(self, tenant: str) -> None:
        """This instance now holds `tenant`'s lease: read its state, start delivering."""
        ...

    def lost(self, tenant: str, reason: str) -> None:
        """The lease is gone (taken by another instance, or not renewed in time): stop
        delivering `tenant` at once. An attempt in flight may still end, but its outcome
        cannot be recorded (LeaseLost): the new owner sends it again."""
        ...

    async def release(self, tenant: str) -> None:
        """Hand `tenant` over (rebalancing, or stopping): start no new attempt, and return
        once the attempt in flight, if any, has ended and its outcome is recorded."""
        ...

    def queued(
        self, tenant: str, last_sequence: int, webhooks: list[Webhook] | None = None
    ) -> None:
        """Another instance (or a commit whose announcement was lost) queued webhooks for
        `tenant`, up to `last_sequence`: `webhooks` when the announcement carried them
        (consecutive, ending at `last_sequence`), else the worker reads them."""
        ...

    def last_known(self, tenant: str) -> int:
        """The last sequence this instance knows `tenant` has queued (0: none)."""
        ...

    def discarded(self, tenant: str) -> None:
        """Another instance discarded the queue of `tenant`, removed from the tenant API."""
        ...

    def api_tenants_changed(self, tenants: Mapping[str, str]) -> None:
        """The tenants made through the tenant API changed (on any instance): every one of
        them now, name -> its table as TOML text."""
        ...


class Cluster(Protocol):
    """This instance among others sharing one database (PostgreSQL). Each tenant is
    delivered by one instance at a time, which holds its lease: an owner, a fencing token
    and an expiry renewed in the background. SQLite has no cluster (`Store.cluster` None):
    its one process delivers every tenant."""

    instance: str
    """This instance's name, as status shows owners: host, process id and a random tag."""

    api_url: str
    """Where the other instances reach this instance's API (`[daemon] advertise_url`, or
    derived from `listen`); published with each heartbeat. Set before `start`."""

    live_instances: int
    """Live instances (this one included) as the last tick counted them (the metrics)."""

    tenants: int
    """The tenants the instances share (a lease row each), as the last tick counted them
    (the metrics: with `live_instances`, whether an instance without leases is idle by the
    fair share or missing its part)."""

    lease_changes: dict[str, int]
    """Leases `gained`, `lost` (claimed by another, or not renewed in time) and `released`
    (handed over, or back at stop) since start (the metrics)."""

    config_digest: str
    """A digest of this instance's main-file tenants, published for the others to compare
    (`webhookd.config.tenants_digest`)."""

    mismatch: list[str]
    """The live instances whose published digest differs from this one's (last tick)."""

    def publish_digest(self, digest: str) -> None:
        """Publish a new digest now (after a reload), and have the others compare again."""
        ...

    async def api_tenants(self) -> dict[str, str]:
        """The tenants made through the API, read now: name -> table as TOML text."""
        ...

    async def save_api_tenant(self, tenant: str, text: str) -> bool:
        """Store an API tenant (created, True, or replaced), give it a lease row and tell
        every instance. Raises on a database error (nothing stored then)."""
        ...

    async def delete_api_tenant(self, tenant: str) -> bool:
        """Remove an API tenant and tell every instance; False if there was none."""
        ...

    async def announce_discarded(self, tenant: str) -> None:
        """Tell the others that a removed tenant's queue was discarded (`Members.discarded`)."""
        ...

    unreachable: str | None
    """Why the leases cannot be renewed now (the database is away), in a sentence; None
    while they can. The leases held lapse meanwhile, and come back once it answers."""

    def holds(self, tenant: str) -> bool:
        """Whether this instance may start an attempt for `tenant` now: it holds the lease,
        renewed recently enough that no other instance can have claimed it meanwhile, and
        is not handing it over."""
        ...

    async def owner(self, tenant: str) -> Owner | None:
        """The instance holding `tenant`'s lease now, as the database has it (None: no live
        instance holds it). Raises `StoreError` when the database cannot be asked."""
        ...

    async def claim(self, tenant: str) -> bool:
        """Take `tenant`'s lease now, when no live instance holds it (a control call for a
        tenant between owners); its worker starts as for a lease claimed by a tick. False
        when another instance holds it or this one is stopping."""
        ...

    async def survey(self) -> dict[str, Any]:
        """The live instances (`id`, `host`, `pid`, `api_url`, `heartbeat_age_s`, `tenants`
        held) and each tenant's owner, read now: `{"instances": [...], "owners": {...}}`.
        Raises `StoreError` when the database cannot be asked."""
        ...

    async def heads(self, tenants: Sequence[str]) -> dict[str, float]:
        """When the head webhook of each of `tenants` that has one waiting was accepted,
        read now (status of tenants held elsewhere). Raises `StoreError`."""
        ...

    async def start(self, members: Members, tenants: Sequence[str]) -> None:
        """Join: announce this instance, make sure `tenants` (the configured ones) have a
        lease row, claim a fair share, and keep renewing and rebalancing in the background."""
        ...

    async def add_tenants(self, tenants: Sequence[str]) -> None:
        """Tenants newly configured (reload, tenant API): give them lease rows, claim."""
        ...

    def drain(self) -> None:
        """The service is stopping: claim nothing more, but keep renewing the leases held
        while the attempts in flight end and are recorded."""
        ...

    async def leave(self) -> None:
        """Hand every lease back at once (the service has drained) and say this instance
        is gone, so that the others take its tenants over without waiting for expiry."""
        ...


class Store(Protocol):
    """A durable, per-tenant ordered queue with its delivery state. One per daemon."""

    on_enqueued: OnEnqueued | None
    """Set by the service before `open`. Called once per commit that queued webhooks for a
    tenant (by `enqueue` or `requeue`), with exactly those webhooks in sequence order, after
    the commit and before the write returns: a worker wakes before ingest answers. Never
    called for duplicates or other writes. An exception it raises is logged and swallowed:
    the rows are committed, and the tenant's worker reads them from the database."""

    @property
    def cluster(self) -> Cluster | None:
        """This instance's membership on an engine that several instances can share
        (PostgreSQL); None on SQLite, where the one process delivers every tenant."""
        ...

    @property
    def disk_full(self) -> bool:
        """True while ingest is refused for lack of space: `enqueue` raises `StoreError`
        with `disk_full` set and queues nothing. Acknowledgements, failures and controls
        are still recorded wherever they fit, so deliveries go on. The store looks for room
        by itself and turns this off once there is enough again. Always False on PostgreSQL:
        the server's disk is its own, and a write it refuses for lack of space raises
        `StoreError` as any other refusal does."""
        ...

    @property
    def history_dropped(self) -> int:
        """History records and failed attempts dropped since `open` because they did not
        fit on a full disk (SQLite); the outcomes they belonged to were recorded. Always 0
        on PostgreSQL."""
        ...

    @property
    def commits(self) -> int:
        """Transactions committed since `open`: concurrent writes share commits (group
        commit), so this grows more slowly than the number of writes under load."""
        ...

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> list[TenantRecord]:
        """Open the database (creating or migrating its schema) and take it for this
        daemon alone; return every tenant that has a state row, with its row, its stored
        failures newest first, and its number of parked webhooks.

        Raises `StoreError` with a one-sentence reason and what to do when the database
        cannot be opened or another daemon has it; `SchemaTooNew` (a `StoreError`) when a
        newer webhookd wrote it, leaving it untouched.
        """
        ...

    async def close(self) -> None:
        """Commit every write already submitted, then release the database. Idempotent;
        a write after it raises `StoreError("the store is closed")`."""
        ...

    # -- writes ------------------------------------------------------------------------------

    async def enqueue(
        self, tenant: str, items: Sequence[NewWebhook], accepted_at: float
    ) -> list[IngestResult]:
        """Queue `items` for `tenant` at the tail, all or nothing; one result per item, in
        order, once durably committed.

        Each queued item takes the next sequence (`last_sequence + 1`, …) and keeps its
        `data` text exactly. An item without an id gets a generated one (`webhookd.ids`).
        Ids are per tenant: an item whose id the tenant remembers is `duplicate` with the
        first item's sequence and queues nothing; so is a generated id of this tenant sent
        back. A producer id is remembered while its webhook is queued, parked or in the
        history, and at least until `prune_history` forgets it after the idempotency
        window (before a restart too, earlier in the same call, or in a call committed
        together with this one). Its acceptance time is remembered with it. Raises
        `StoreError` (with `disk_full`) while the disk is full.
        """
        ...

    async def acknowledge(
        self,
        tenant: str,
        through_sequence: int,
        at: float,
        delivered: Delivered | None = None,
        history: HistoryPolicy = KEEP_ALL,
    ) -> None:
        """The endpoint took everything up to `through_sequence`: those leave the queue
        (`acked_sequence` moves up to it, never back), attempts and `next_attempt_at` reset,
        `last_processed_at` becomes `at`. The stored failures stay.

        Each webhook leaving gets a `delivered` history record (finished at `at`, with
        `delivered`'s status, duration and attempts; None: unknown, as for a test), in the
        same transaction, per `history`. A record that does not fit (a full disk) is
        dropped and counted (`history_dropped`): the acknowledgement is never held back
        for want of room for its record."""
        ...

    async def record_failure(
        self,
        tenant: str,
        failure: Failure,
        next_attempt_at: float | None,
        keep: int,
        history: HistoryPolicy = KEEP_ALL,
    ) -> None:
        """A failed attempt: the tenant's `attempts` becomes `failure.attempt` and its next
        attempt `next_attempt_at`; `failure` is stored and only the newest `keep` of the
        tenant's failures are kept. With `history.keep`, the failure is also kept in the
        history of failed attempts (pruned with the records, never by `keep`). On a full
        disk the backoff is still stored, the failure rows only if they fit."""
        ...

    async def clear_failures(self, tenant: str) -> int:
        """Forget the tenant's stored failures; return how many there were. The attempt
        count and backoff are untouched: clearing the list is not a retry."""
        ...

    async def set_paused(self, tenant: str, paused: bool) -> None:
        """Store whether the tenant is paused. A paused tenant still queues."""
        ...

    async def park(
        self, tenant: str, sequence: int, at: float, history: HistoryPolicy = KEEP_ALL
    ) -> Webhook | None:
        """Move the head webhook `sequence` out of the queue into the tenant's parked
        webhooks (parked at `at`): `acked_sequence` becomes `sequence`, attempts and backoff
        reset; a `parked` history record says so (per `history`). None, and nothing
        changes, when `sequence` is not the head."""
        ...

    async def requeue(self, tenant: str, webhook_id: str, at: float) -> Webhook | None:
        """Move the parked webhook `webhook_id` back to the tail with a new sequence
        (`last_sequence + 1`), its id, event, `accepted_at` and data unchanged; return it as
        queued (and announce it through `on_enqueued`). Its `parked` history record, if
        kept, becomes `requeued` with `next_sequence` the new one. None when no parked
        webhook of the tenant has that id."""
        ...

    async def discard(
        self, tenant: str, at: float | None = None, history: HistoryPolicy = KEEP_ALL
    ) -> int:
        """Drop the tenant's queue, parked webhooks and failures (an operator's explicit
        choice); return how many were waiting. `acked_sequence` becomes `last_sequence` (the
        counter stays: sequences are never reused), attempts and backoff reset, unpaused.
        Each queued webhook dropped gets a `discarded` history record (finished at `at`),
        and so does each parked one (its `parked` record becomes `discarded`), per
        `history`; the history and the failed attempts kept stay."""
        ...

    async def replay(
        self,
        tenant: str,
        selection: ReplaySelection,
        at: float,
        *,
        limit: int,
        dry_run: bool = False,
        replay_id: str | None = None,
    ) -> ReplayResult:
        """Put the tenant's delivered webhooks that `selection` matches back at the tail,
        in their original sequence order, all or nothing: each takes a new sequence and
        keeps its id, event, `accepted_at` and data (as `requeue`), and its history record's
        `next_sequence` becomes the new one. Announced through `on_enqueued`; durable on
        return as `enqueue`.

        Raises `ReplayTooLarge` when more than `limit` match, `ReplayWithoutPayloads` when
        one of them has no data kept; nothing is queued then. `dry_run` only counts (still
        refusing over `limit`). A `replay_id` the tenant used before answers that replay's
        result (`repeated`) and queues nothing: a retried request is safe. Raises
        `StoreError` (with `disk_full`) while the disk is full."""
        ...

    async def prune_history(
        self,
        now: float,
        *,
        retention: Mapping[str, float],
        default_retention: float,
        max_bytes: int | None,
        idempotency_window: float,
        step: int,
    ) -> PruneResult:
        """One small step of pruning, at most `step` rows removed in one short transaction
        (so that it never holds ingest or deliveries long): history records and failed
        attempts older than their tenant's retention in seconds (`retention[tenant]`, else
        `default_retention`; 0 removes them all), then the oldest records, every tenant
        together, while the history counts more than `max_bytes` (None: no size limit),
        then producer ids accepted more than `idempotency_window` seconds before `now`
        whose webhook is neither queued, parked nor in the history (for a tenant whose
        retention is longer than the window, ids accepted more than the retention before
        `now`: those of records pruned early for size or never kept wait until then, so
        that a step never scans the ids still in the history). `more` says whether
        a step now would remove more."""
        ...

    # -- reads -------------------------------------------------------------------------------

    async def load(self, tenants: Sequence[str] | None = None) -> list[TenantRecord]:
        """The stored records (state row, failures newest first, parked count) of
        `tenants`, or of every tenant (None), as `open` returns them. Tenants without a
        state row are left out."""
        ...

    async def read_queue(self, tenant: str, after: int, limit: int) -> list[Webhook]:
        """Up to `limit` queued webhooks of `tenant` with sequence > `after`, in sequence
        order. Callers read from `acked_sequence`: below it an engine may still return
        webhooks acknowledged but not yet deleted (as SQLite does on a full disk)."""
        ...

    async def list_parked(self, tenant: str, limit: int = 1000) -> list[ParkedWebhook]:
        """The tenant's parked webhooks in sequence order, up to `limit`."""
        ...

    async def find_webhook(self, tenant: str, webhook_id: str) -> FoundWebhook:
        """Where webhook `webhook_id` of `tenant` is now (`FoundWebhook`): a producer id
        through the ids remembered, a generated id through the sequence it carries, then
        through the queue, the parked webhooks and the history, following `next_sequence`
        to its newest copy."""
        ...

    async def history(self, tenant: str, query: HistoryQuery) -> list[HistoryRecord]:
        """One page of the tenant's history records (`HistoryQuery`), at most
        `query.limit`, in the order asked. Answers from indexes whatever the history's size
        (docs: a page of 100 in well under 50 ms with 10,000,000 records)."""
        ...

    async def history_size(self) -> HistorySize:
        """What the history holds now, every tenant together (status and metrics): cheap
        to ask (a sum of counters kept with the writes, not a count of rows)."""
        ...

    async def ping(self) -> None:
        """Return once the database answers a query; raise otherwise (the health check)."""
        ...
