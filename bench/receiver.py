"""The benchmark's webhook endpoint, run as its own process: `python -m bench.receiver PORT`.

It answers POSTs with 200 and counts webhooks per path. It parses each body (orjson, as
a real receiver would) to check that every path's sequences only go up (a resend or a
reorder shows as `disorder`) and, for webhooks whose `data` carries `t` (the producer's
`time.time()` at send), records the ingest-to-arrival latency on the same clock, overall
and per group: a path without its last segment (`/ok/batched/t0001` is in `/ok/batched`),
followed by `@<p>` when `data` carries a phase tag `p` (`/ok/batched@main`). For webhooks
whose `data` carries `k` (the paced producer's request number), the first arrival of each
`k` is kept, so the producer can match it with its own stamps (acknowledged at, sent at).

Two path prefixes misbehave on purpose: under `/fail/` every POST answers `fail_status`
(503 unless changed) and is not counted as received; under `/slow/` the answer comes
`slow_s` seconds (2.0) late, and the webhooks count when the 200 goes out. POST /behaviour
with `{"fail_status": 200, "slow_s": 0}` changes both, so a run can heal its endpoints.

GET /stats reports (`?paths=1` adds per-path counts and last sequences, `?groups=1` the
per-group latencies, `?arrivals=1` the arrival stamps by `k`, `?latency=0` skips the
sort); POST /reset clears everything and restores the default behaviour. All are cheap
next to the traffic being counted.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
import uvloop
from aiohttp import web

FAIL_PREFIX = "/fail/"
SLOW_PREFIX = "/slow/"
DEFAULT_FAIL_STATUS = 503
DEFAULT_SLOW_S = 2.0


class Tally:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self.requests = 0
        self.disorder = 0
        self.rejected_requests = 0  # answered fail_status under /fail/
        self.slow_requests = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.per_path: dict[str, int] = {}
        self.last_sequence: dict[str, int] = {}
        self.latencies: dict[str, list[float]] = {}  # per group
        self.arrivals: dict[int, float] = {}  # first arrival of each paced request `k`
        self.fail_status = DEFAULT_FAIL_STATUS
        self.slow_s = DEFAULT_SLOW_S

    def record(self, path: str, body: bytes) -> None:
        now = time.time()
        document = orjson.loads(body)
        items = document if isinstance(document, list) else (document,)
        last = self.last_sequence.get(path, 0)
        group = path.rpartition("/")[0]
        for item in items:
            sequence = item.get("sequence", 0)
            if sequence <= last:
                self.disorder += 1
            last = sequence
            data = item.get("data", {})
            sent = data.get("t")
            if sent is not None:
                phase = data.get("p")
                key = group if phase is None else f"{group}@{phase}"
                self.latencies.setdefault(key, []).append(now - sent)
                k = data.get("k")
                if k is not None:
                    self.arrivals.setdefault(k, now)
        self.last_sequence[path] = last
        self.per_path[path] = self.per_path.get(path, 0) + len(items)
        self.total += len(items)
        self.requests += 1
        if self.first_at is None:
            self.first_at = now
        self.last_at = now

    def stats(
        self, *, with_paths: bool, with_groups: bool, with_latency: bool, with_arrivals: bool
    ) -> dict[str, Any]:
        result: dict[str, Any] = {
            "total": self.total,
            "requests": self.requests,
            "paths": len(self.per_path),
            "disorder": self.disorder,
            "rejected_requests": self.rejected_requests,
            "slow_requests": self.slow_requests,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "latency": None,
        }
        if with_latency:
            every = [sample for samples in self.latencies.values() for sample in samples]
            result["latency"] = percentiles(every)
        if with_groups:
            result["latency_groups"] = {
                group: percentiles(samples) for group, samples in self.latencies.items()
            }
        if with_arrivals:
            result["arrivals"] = list(self.arrivals.items())
        if with_paths:
            result["per_path"] = self.per_path
            result["last_sequence"] = self.last_sequence
        return result


def percentiles(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": ordered[-1],
    }


TALLY = web.AppKey("tally", Tally)


async def webhook(request: web.Request) -> web.Response:
    tally = request.app[TALLY]
    body = await request.read()
    path = request.path
    if path.startswith(FAIL_PREFIX) and tally.fail_status != 200:
        tally.rejected_requests += 1
        return web.Response(status=tally.fail_status)
    if path.startswith(SLOW_PREFIX) and tally.slow_s > 0:
        tally.slow_requests += 1
        await asyncio.sleep(tally.slow_s)
    tally.record(path, body)
    return web.Response(status=200)


async def stats(request: web.Request) -> web.Response:
    query = request.query
    body = request.app[TALLY].stats(
        with_paths=query.get("paths") == "1",
        with_groups=query.get("groups") == "1",
        with_latency=query.get("latency") != "0",
        with_arrivals=query.get("arrivals") == "1",
    )
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def reset(request: web.Request) -> web.Response:
    request.app[TALLY].reset()
    return web.Response(status=200)


async def behaviour(request: web.Request) -> web.Response:
    tally = request.app[TALLY]
    wanted = orjson.loads(await request.read())
    tally.fail_status = int(wanted.get("fail_status", tally.fail_status))
    tally.slow_s = float(wanted.get("slow_s", tally.slow_s))
    body = {"fail_status": tally.fail_status, "slow_s": tally.slow_s}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def serve(port: int) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[TALLY] = Tally()
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    app.router.add_post("/behaviour", behaviour)
    app.router.add_post("/{path:.*}", webhook)
    # SIGTERM ends the process outright: there is nothing to save.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # A deep accept backlog: 1000 tenants open their connections at the same moment.
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    port = int(sys.argv[1])
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
