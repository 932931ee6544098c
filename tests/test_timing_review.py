"""Timing review: where the next attempt's time departed from SPEC §4 (each test failed on
fb19f3f's code and passes since the commit after it)."""

from __future__ import annotations

import time

from tests.conftest import Receiver, StartDaemon, tenant, wait_for
from webhookd.scheduler import Clock


class SteppedClock(Clock):
    """The wall clock as the host sees it, which an NTP step or a VM resume can move."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


STEP_BACK_S = 3600.0


async def test_a_backward_wall_clock_step_does_not_stretch_a_backoff(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """SPEC §4 Backoff: "After a failure the next attempt is at `retry_base × 2^(attempts−1)`
    while `attempts ≤ retry_doublings`, else `retry_after_doublings` seconds later."

    The worker sleeps on the event loop's monotonic timer, but measures what is left of
    the backoff against the wall clock (`next_attempt_at − clock.now()`). When the host's
    clock steps back an hour during a 0.3 s backoff (NTP correction, VM resumed from a
    snapshot), the worker wakes after 0.3 s, finds the stored wall-clock time an hour
    ahead and sleeps again: the retry comes an hour late instead of 0.3 s later.
    """
    clock = SteppedClock()
    receiver.script("/acme", 500)
    daemon = await start_daemon(
        clock=clock, tenants={"acme": tenant(receiver.url("/acme"), retry_base=0.3)}
    )
    worker = daemon.service.workers["acme"]
    await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
    await wait_for(lambda: worker.row.attempts == 1, timeout=3)
    failed_at = receiver.at("/acme")[0].at

    clock.offset -= STEP_BACK_S
    await wait_for(lambda: len(receiver.at("/acme")) == 2, timeout=3)
    gap = receiver.at("/acme")[1].at - failed_at
    assert 0.28 <= gap < 1.5, gap
    assert receiver.at("/acme")[1].status == 200


async def test_a_backward_wall_clock_step_does_not_stretch_a_batch_window(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """SPEC §4 Batching on: a batch "is sent as soon as `batch_size` webhooks are waiting,
    or once the oldest waiting webhook has waited `batch_window` seconds".

    The window is measured as `accepted_at + batch_window − clock.now()` on the wall
    clock. A step back of an hour while a partial batch waits out a 0.5 s window holds
    the batch for an hour and a half second: the oldest webhook has long waited its
    window, yet nothing is sent.
    """
    clock = SteppedClock()
    daemon = await start_daemon(
        clock=clock,
        tenants={
            "acme": tenant(receiver.url("/acme"), batching=True, batch_size=10, batch_window=0.5)
        },
    )
    ingested = time.monotonic()
    await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
    clock.offset -= STEP_BACK_S
    await wait_for(lambda: len(receiver.at("/acme")) == 1, timeout=3)
    waited = receiver.at("/acme")[0].at - ingested
    assert 0.45 <= waited < 1.5, waited
