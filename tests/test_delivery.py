"""Delivery semantics against a real receiver: order, batching, backoff, timeouts."""

from __future__ import annotations

import asyncio
import itertools

from aiohttp import web

from tests.conftest import Receiver, StartDaemon, tenant, wait_for


async def test_unbatched_delivers_one_at_a_time_in_order(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    for n in range(20):
        await daemon.ingest("acme", {"event": "CHECK_COMPLETED", "data": {"n": n}})
    await wait_for(lambda: len(receiver.at("/acme")) == 20)
    bodies = [r.json for r in receiver.at("/acme")]
    assert all(isinstance(b, dict) for b in bodies)
    assert [b["sequence"] for b in bodies] == list(range(1, 21))
    assert [b["data"]["n"] for b in bodies] == list(range(20))
    first = receiver.at("/acme")[0]
    assert first.headers["Authorization"] == "Bearer s3cr3t"
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"].startswith("webhookd/")
    assert set(bodies[0]) == {"id", "sequence", "event", "secret", "timestamp", "data"}
    assert bodies[0]["secret"] == "s3cr3t"


async def test_batched_full_batches_go_at_once_rest_after_window(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        tenants={
            "acme": tenant(receiver.url("/acme"), batching=True, batch_size=10, batch_window=0.5)
        }
    )
    items = [{"event": "CHECK_COMPLETED", "data": {"n": n}} for n in range(25)]
    await daemon.ingest("acme", items)
    await wait_for(lambda: len(receiver.at("/acme")) == 2, timeout=0.4)
    sizes = [len(r.webhooks) for r in receiver.at("/acme")]
    assert sizes == [10, 10]
    await wait_for(lambda: len(receiver.at("/acme")) == 3, timeout=3)
    assert [len(r.webhooks) for r in receiver.at("/acme")] == [10, 10, 5]
    assert receiver.sequences("/acme") == list(range(1, 26))


async def test_failure_keeps_head_and_backs_off(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.script("/acme", 500, 500, 500)
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), retry_base=0.1)})
    await daemon.ingest("acme", [{"event": "CHECK_COMPLETED"}, {"event": "CHECK_COMPLETED"}])
    await wait_for(lambda: len(receiver.sequences("/acme")) == 2, timeout=5)
    times = [r.at for r in receiver.at("/acme")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.1, 0.2, 0.4 after failures 1..3, then the success of 1 is followed at once by 2
    for gap, expected in zip(gaps[:3], [0.1, 0.2, 0.4], strict=True):
        assert expected * 0.9 <= gap < expected + 0.25, gaps
    assert [w["sequence"] for r in receiver.at("/acme") for w in r.webhooks] == [1, 1, 1, 1, 2]
    status = await daemon.status("acme")
    assert status["queue"] == "empty"
    assert status["attempts"] == 0
    assert [f["attempt"] for f in status["recent_failures"]] == [3, 2, 1]


async def test_hanging_endpoint_times_out_and_does_not_delay_others(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    receiver.always("/slow", hang)
    daemon = await start_daemon(
        tenants={
            "slow": tenant(receiver.url("/slow"), timeout=0.3, retry_base=5),
            "live": tenant(receiver.url("/live")),
        }
    )
    await daemon.ingest("slow", {"event": "CHECK_COMPLETED"})
    for _ in range(5):
        await daemon.ingest("live", {"event": "CHECK_COMPLETED"})
    await wait_for(lambda: len(receiver.at("/live")) == 5, timeout=1)
    await wait_for(lambda: daemon.service.workers["slow"].row.attempts == 1, timeout=2)
    status = await daemon.status("slow")
    assert status["queue"] == "stalled"
    assert status["recent_failures"][0]["error"] == "timeout after 0.3 s"
