"""Delivery core review: tests for defects found in the scheduler, store and wiring (each
failed on 5304ae8's parent and passes since the commit after it).

Each test names what an operator or producer does and which promise breaks. Checked and
found sound (no test here): ordering, at-least-once and the head buffer under random
interleavings of ingest, pause/resume, retry, skip, requeue, refresh, SIGHUP reloads that
flip batching, batch_size, enabled and presence, and PUT / DELETE?discard of an API tenant,
all against a flaky real receiver (no duplicate or out-of-order 200s, nothing lost, and
`tenant_state`, queue, parked and failures rows equal to the workers' in-memory state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, Receiver, StartDaemon, tenant, wait_for, write_config

EVENT = "CHECK_COMPLETED"


pytestmark = pytest.mark.usefixtures("restore_structlog")


def _daemon_table(daemon: Daemon) -> dict[str, Any]:
    """The [daemon] keys of a running in-process daemon, so a rewritten file keeps them."""
    d = daemon.service.config.daemon
    return {"database": str(d.database), "listen": f"{d.listen_host}:{d.listen_port}"}


async def test_lowering_recent_failures_by_reload_keeps_the_newest_failures(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """An operator lowers `recent_failures` (5 -> 2) and reloads (SIGHUP) while a tenant is
    stalled; the same happens when a PUT lowers it or an orphan comes back with a lower one.

    SPEC §6 / README status fields: `recent_failures` is newest first, at most
    `recent_failures` entries ("the 10 most recent failures"). `TenantWorker.configure`
    rebuilds the newest-first deque with `deque(old, maxlen=n)`, which keeps the LAST n
    items, i.e. the oldest failures: the status shows attempts [2, 1] instead of [5, 4],
    and disagrees with the database (which keeps the newest and is what a restart shows).
    """
    receiver.always("/acme", 503)
    backoff = {"retry_base": 0.02, "retry_doublings": 1, "retry_after_doublings": 0.02}
    acme = tenant(receiver.url("/acme"), recent_failures=5, **backoff)
    path = write_config(tmp_path, {"acme": acme})
    daemon = await start_daemon(path)
    worker = daemon.service.workers["acme"]
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: worker.row.attempts >= 5)
    status, _ = await daemon.request("POST", "/v1/tenants/acme/pause")  # no more attempts
    assert status == 200
    await wait_for(lambda: worker.in_flight is None)
    before = [f["attempt"] for f in (await daemon.status("acme"))["recent_failures"]]
    assert before == sorted(before, reverse=True) and len(before) == 5, before

    lowered = {**acme, "recent_failures": 2}
    write_config(tmp_path, {"acme": lowered}, daemon=_daemon_table(daemon))
    assert await daemon.service.reload() is True
    after = [f["attempt"] for f in (await daemon.status("acme"))["recent_failures"]]
    assert after == before[:2], f"newest two were {before[:2]}, status shows {after}"
