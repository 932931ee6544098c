"""One task per tenant: wait for work or a timer, pick the batch, send, record, back off.

A worker owns its tenant's timing and its in-memory view of the queue. It sleeps on an
event (set by a commit that queued webhooks for it, a control call or a reload) with at most
one timer, so an idle tenant costs no CPU. The head of the queue is kept in a small buffer;
fresh ingest for a caught-up tenant is appended straight from the commit, so steady-state
delivery reads nothing back from SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Protocol

from webhookd import logs, policy
from webhookd.config import TenantConfig
from webhookd.records import (
    Delivered,
    Failure,
    HistoryPolicy,
    LeaseLost,
    StoreError,
    TenantRecord,
    TenantRow,
    Webhook,
)
from webhookd.sender import Outcome
from webhookd.store import Store

log = logs.get_logger("webhookd.delivery")

# How long to hold off when the database refused to record an outcome (disk full, ...).
STORE_RETRY_S = 1.0
STORE_RETRY_MAX_S = 30.0
# Head rows kept in memory for an unbatched tenant (a batched one keeps two batches).
UNBATCHED_BUFFER = 32
# How often a worker whose lease is not known to be valid looks again (cluster.py renews).
LEASE_WAIT_S = 0.25


class Clock:
    """Wall-clock time and timed waits, in one object so tests can replace it."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def wait(self, event: asyncio.Event, delay: float) -> None:
        """Return when `event` is set or `delay` seconds have passed, whichever is first."""
        loop = asyncio.get_running_loop()
        handle = loop.call_later(delay, event.set)
        try:
            await event.wait()
        finally:
            handle.cancel()


def history_policy(config: TenantConfig) -> HistoryPolicy:
    """What the tenant keeps of the webhooks leaving its queue (`history_retention`,
    `history_payloads`)."""
    options = config.delivery
    return HistoryPolicy(keep=options.history_retention > 0, payloads=options.history_payloads)


class DeliverySender(Protocol):
    async def send(self, tenant: TenantConfig, webhooks: list[Webhook]) -> Outcome: ...


class InFlight(Exception):
    """A control call that must not race the attempt in flight (skip)."""


# Called after each attempt: (tenant, batch, outcome) -> None; metrics hang off it.
AttemptHook = Callable[[str, list[Webhook], Outcome], None]


class TenantWorker:
    def __init__(
        self,
        record: TenantRecord,
        config: TenantConfig | None,
        *,
        store: Store,
        sender: DeliverySender,
        clock: Clock,
        on_attempt: AttemptHook | None = None,
        may_send: Callable[[str], bool] | None = None,
    ) -> None:
        self.name = record.name
        self.config = config
        self.row: TenantRow = record.row
        keep = config.delivery.recent_failures if config else 10
        self.failures: deque[Failure] = deque(record.failures[:keep], maxlen=keep)
        self.parked = record.parked
        # Kept when the tenant is removed: a discard of an orphaned queue still follows it.
        self.history = history_policy(config) if config is not None else HistoryPolicy()
        self._store = store
        self._sender = sender
        self._clock = clock
        self._on_attempt = on_attempt
        # Several instances on one database: an attempt starts only under a valid lease.
        self._may_send = may_send
        self.buffer: deque[Webhook] = deque()
        self.buffer_end = self.row.acked_sequence  # highest sequence read into the buffer
        self.retry_requested = False
        # The deadline last timed: (wall-clock time, its steady-clock twin).
        self._timed: tuple[float, float] | None = None
        self.in_flight: tuple[int, int] | None = None
        self.wake = asyncio.Event()
        self.stopping = False
        self._held_until = 0.0  # after a failed write, no attempt before this
        # Held for an attempt (pick, send, record) and by control calls that move the head.
        self._head_lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None

    # -- state seen by status ----------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return self.row.last_sequence - self.row.acked_sequence

    @property
    def oldest_waiting_at(self) -> float | None:
        if self.waiting and self.buffer:
            return self.buffer[0].accepted_at
        return None

    @property
    def queue_state(self) -> policy.QueueState:
        config = self.config
        return policy.classify_queue(
            configured=config is not None,
            enabled=config is not None and config.enabled,
            paused=self.row.paused,
            waiting=self.waiting,
            attempts=self.row.attempts,
            retry_due=self.retry_requested,
        )

    @property
    def _capacity(self) -> int:
        config = self.config
        if config is not None and config.batching:
            return 2 * config.delivery.batch_size
        return UNBATCHED_BUFFER

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"webhookd-tenant-{self.name}")

    def stop(self) -> None:
        """Start no new attempt; the one in flight, if any, runs on."""
        self.stopping = True
        self.wake.set()

    def configure(self, config: TenantConfig | None) -> None:
        """Apply a new configuration (None: removed); it takes effect from the next attempt."""
        self.config = config
        if config is not None:
            self.history = history_policy(config)
        if config is None or not config.enabled:
            self.retry_requested = False  # as for a pause: a retry must not outlive it
        if config is not None and config.delivery.recent_failures != self.failures.maxlen:
            # Newest first: a shorter deque keeps the head, not the (oldest) tail.
            keep = config.delivery.recent_failures
            self.failures = deque(islice(self.failures, keep), maxlen=keep)
        self.wake.set()

    # -- events from outside -----------------------------------------------------------------

    def enqueued(self, webhooks: list[Webhook]) -> None:
        """A commit queued `webhooks` (consecutive) for this tenant. Told twice (an
        instance hears its own commits' announcements too), the second changes nothing."""
        if webhooks[-1].sequence <= self.buffer_end:
            return
        before = self.waiting
        self.row.last_sequence = max(self.row.last_sequence, webhooks[-1].sequence)
        room = self._capacity - len(self.buffer)
        if webhooks[0].sequence == self.buffer_end + 1 and room > 0:
            taken = webhooks[:room]
            self.buffer.extend(taken)
            self.buffer_end = taken[-1].sequence
        if self._changes_due(before):
            self.wake.set()

    def announced(self, last_sequence: int) -> None:
        """Webhooks up to `last_sequence` were queued elsewhere (another instance): the
        worker reads them from the database."""
        if last_sequence <= self.row.last_sequence:
            return
        before = self.waiting
        self.row.last_sequence = last_sequence
        if self._changes_due(before):
            self.wake.set()

    def _changes_due(self, waiting_before: int) -> bool:
        """Whether webhooks arriving can move the next attempt earlier (else: no wake-up).

        With webhooks already waiting, the next attempt is already timed (in flight, in
        backoff, or a partial batch waiting for its oldest webhook's window); only a batch
        becoming full moves it. A paused, disabled or removed tenant sends nothing anyway.
        """
        config = self.config
        if config is None or not config.enabled or self.row.paused:
            return False
        if not waiting_before:
            return True
        size = config.delivery.batch_size
        return config.batching and waiting_before < size <= self.waiting

    def request_retry(self) -> bool:
        """Make the next attempt start now, whatever the backoff. True if there is one to make.

        Paused, disabled or orphaned tenants ignore it: a retry must not linger and cut a
        backoff short long after, when the tenant is resumed.
        """
        if self.queue_state not in ("waiting", "stalled"):
            return False
        self.retry_requested = True
        self.wake.set()
        return True

    async def set_paused(self, paused: bool) -> None:
        await self._store.set_paused(self.name, paused)
        self.row.paused = paused
        if paused:
            self.retry_requested = False  # asked before the pause; see request_retry
        self.wake.set()

    async def clear_failures(self) -> int:
        cleared = await self._store.clear_failures(self.name)
        self.failures.clear()
        return cleared

    async def skip(self) -> Webhook | None:
        """Park the head webhook so the rest can flow. Raises InFlight during an attempt."""
        if self._head_lock.locked():
            raise InFlight(self.name)
        async with self._head_lock:
            if not self.waiting:
                return None
            parked = await self._store.park(
                self.name, self.row.acked_sequence + 1, self._now(), self.history
            )
            if parked is None:
                return None
            self._advance(parked.sequence)
            self.row.attempts = 0
            self.row.next_attempt_at = None
            self.parked += 1
            self.wake.set()
            return parked

    async def requeue(self, webhook_id: str) -> Webhook | None:
        requeued = await self._store.requeue(self.name, webhook_id, self._now())
        if requeued is not None:
            self.parked = max(0, self.parked - 1)
            # `enqueued` ran from the commit (store.on_enqueued), waking this worker.
        return requeued

    async def discard(self) -> int:
        async with self._head_lock:
            dropped = await self._store.discard(self.name, self._now(), self.history)
            self.row.acked_sequence = self.row.last_sequence
            self.row.attempts = 0
            self.row.next_attempt_at = None
            self.row.paused = False
            self.buffer.clear()
            self.buffer_end = self.row.acked_sequence
            self.failures.clear()
            self.parked = 0
            return dropped

    # -- the loop ----------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock.now()

    def _due(self) -> float | None:
        """When the next attempt should start (wall clock); None when nothing is to be sent."""
        config = self.config
        if config is None or not config.enabled or self.row.paused or not self.waiting:
            return None
        if self.retry_requested:
            return max(0.0, self._held_until)
        if self.row.attempts:
            when = self.row.next_attempt_at or 0.0
        elif config.batching and self.buffer:
            when = policy.batch_due_at(
                self.waiting,
                config.delivery.batch_size,
                self.buffer[0].accepted_at,
                config.delivery.batch_window,
            )
        else:
            when = 0.0
        return max(when, self._held_until)

    async def _run(self) -> None:
        while not self.stopping:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug must not silence a tenant for good: log it, hold off, go on.
                log.exception("worker_error", tenant=self.name)
                self._held_until = self._now() + STORE_RETRY_S

    async def _step(self) -> None:
        self.wake.clear()
        if self.waiting and not self.buffer:
            await self._fill(self._capacity)
        when = self._due()
        if self.stopping:
            return
        if when is None:
            await self.wake.wait()
            return
        delay = self._remaining(when)
        if delay > 0:
            await self._clock.wait(self.wake, delay)
            return
        if self._may_send is not None and not self._may_send(self.name):
            # The lease is being renewed, or handed over: no attempt without it.
            await self._clock.wait(self.wake, LEASE_WAIT_S)
            return
        async with self._head_lock:
            if not self.stopping:
                await self._attempt()

    def _remaining(self, when: float) -> float:
        """Seconds until `when` (wall clock, as stored). A deadline is converted to the
        steady clock once, when first timed: a wall-clock step while it is awaited (NTP,
        a resumed VM) neither stretches a backoff or batch window nor cuts it short."""
        steady = self._clock.monotonic()
        if self._timed is None or self._timed[0] != when:
            self._timed = (when, steady + (when - self._now()))
        return self._timed[1] - steady

    async def _fill(self, want: int) -> None:
        """Read more of the queue head into the buffer, until it holds `want` (or all)."""
        if len(self.buffer) >= want or self.buffer_end >= self.row.last_sequence:
            return
        limit = max(want, self._capacity) - len(self.buffer)
        try:
            rows = await self._store.read_queue(self.name, self.buffer_end, limit)
        except Exception:
            log.exception("queue_read_failed", tenant=self.name)
            self._held_until = self._now() + STORE_RETRY_S
            return
        for webhook in rows:
            # An ingest commit may have appended meanwhile: keep the buffer contiguous.
            if webhook.sequence == self.buffer_end + 1:
                self.buffer.append(webhook)
                self.buffer_end = webhook.sequence

    def _advance(self, through: int) -> None:
        """Everything up to `through` has left the queue."""
        self.row.acked_sequence = max(self.row.acked_sequence, through)
        while self.buffer and self.buffer[0].sequence <= through:
            self.buffer.popleft()
        self.buffer_end = max(self.buffer_end, through)

    async def _attempt(self) -> None:
        config = self.config
        if config is None:
            return
        size = config.delivery.batch_size if config.batching else 1
        await self._fill(size)
        # Waiting for the lock (a skip or discard held it) or for the read may have changed
        # what is due: paused, disabled, removed, reconfigured, or a younger head.
        when = self._due()
        if self.config is not config or when is None or self._remaining(when) > 0:
            return
        if self._may_send is not None and not self._may_send(self.name):
            return  # the lease lapsed meanwhile (a freeze, a renewal not answered)
        batch = list(islice(self.buffer, size))
        if not batch:
            # The count says webhooks wait but none could be read: hold off, don't spin.
            log.error("queue_head_unreadable", tenant=self.name, waiting=self.waiting)
            self._held_until = self._now() + STORE_RETRY_S
            return
        self.retry_requested = False
        self.in_flight = (batch[0].sequence, batch[-1].sequence)
        try:
            outcome = await self._sender.send(config, batch)
            if self._on_attempt is not None:
                self._on_attempt(self.name, batch, outcome)
            if outcome.ok:
                await self._succeeded(batch, outcome)
            else:
                await self._failed(config, batch, outcome)
        finally:
            self.in_flight = None

    async def _succeeded(self, batch: list[Webhook], outcome: Outcome) -> None:
        now = self._now()
        first, last = batch[0].sequence, batch[-1].sequence
        attempt = self.row.attempts + 1
        delivered = Delivered(outcome.status or 0, outcome.duration_ms, attempt)
        pause = STORE_RETRY_S
        while True:
            try:
                # The rows stay until this commit: a crash before it re-sends, never loses.
                await self._store.acknowledge(self.name, last, now, delivered, self.history)
                break
            except LeaseLost as exc:
                self._lost(exc, first, last)
                return
            except StoreError as exc:
                # Retry the record, not the delivery: the endpoint already has these. Also
                # while stopping: a hand-over frees the lease only after this record (else
                # the next owner sends these again), and a stop waits for it up to
                # shutdown_grace, then cancels this task (they stay queued, sent again).
                log.error(
                    "delivery_not_recorded",
                    tenant=self.name,
                    first_sequence=first,
                    last_sequence=last,
                    error=str(exc),
                    retry_s=pause,
                )
                self.wake.clear()
                await self._clock.wait(self.wake, pause)
                pause = min(pause * 2, STORE_RETRY_MAX_S)
        self._advance(last)
        self.row.attempts = 0
        self.row.next_attempt_at = None
        self.row.last_processed_at = now
        self.retry_requested = False
        log.info(
            "delivered",
            tenant=self.name,
            count=len(batch),
            first_sequence=first,
            last_sequence=last,
            status=outcome.status,
            duration_ms=outcome.duration_ms,
            attempt=attempt,
        )

    async def _failed(self, config: TenantConfig, batch: list[Webhook], outcome: Outcome) -> None:
        now = self._now()
        attempts = self.row.attempts + 1
        options = config.delivery
        delay = policy.next_delay(
            attempts,
            outcome.status,
            outcome.retry_after,
            base=options.retry_base,
            doublings=options.retry_doublings,
            after_doublings=options.retry_after_doublings,
        )
        if self.retry_requested:  # a retry arrived while this attempt was in flight
            delay = 0.0
        failure = Failure(
            at=now,
            attempt=attempts,
            first_sequence=batch[0].sequence,
            last_sequence=batch[-1].sequence,
            count=len(batch),
            status=outcome.status,
            error=outcome.error or f"HTTP {outcome.status}",
            duration_ms=outcome.duration_ms,
        )
        try:
            await self._store.record_failure(
                self.name, failure, now + delay, keep=options.recent_failures, history=self.history
            )
        except LeaseLost as exc:
            self._lost(exc, failure.first_sequence, failure.last_sequence)
            return
        except StoreError as exc:
            log.error("failure_not_recorded", tenant=self.name, error=str(exc))
            delay = max(delay, STORE_RETRY_S)
        self.row.attempts = attempts
        self.row.next_attempt_at = now + delay
        self.failures.appendleft(failure)
        log.warning(
            "delivery_failed",
            tenant=self.name,
            count=len(batch),
            first_sequence=failure.first_sequence,
            last_sequence=failure.last_sequence,
            status=outcome.status,
            error=failure.error,
            duration_ms=outcome.duration_ms,
            attempt=attempts,
            delay_s=round(delay, 3),
        )

    def _lost(self, exc: LeaseLost, first: int, last: int) -> None:
        """Another instance delivers this tenant now: its outcome goes unrecorded (the new
        owner sends these again), and this worker stops."""
        self.stopping = True
        log.warning(
            "lease_lost",
            tenant=self.name,
            first_sequence=first,
            last_sequence=last,
            detail=str(exc),
        )

    # -- waiting for the task ----------------------------------------------------------------

    async def join(self) -> None:
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
