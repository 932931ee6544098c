"""The benchmark's webhook endpoint, run as its own process: `python -m bench.receiver PORT`.

It answers every POST with 200 and counts webhooks per path. It parses each body (orjson, as
a real receiver would) to check that every path's sequences only go up (a resend or a
reorder shows as `disorder`) and, for webhooks whose `data` carries `t` (the producer's
`time.time()` at send), records the ingest-to-arrival latency on the same clock.

GET /stats reports; POST /reset clears. Both are cheap next to the traffic being counted.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
import uvloop
from aiohttp import web


class Tally:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self.requests = 0
        self.disorder = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.per_path: dict[str, int] = {}
        self.last_sequence: dict[str, int] = {}
        self.latencies: list[float] = []

    def record(self, path: str, body: bytes) -> None:
        now = time.time()
        document = orjson.loads(body)
        items = document if isinstance(document, list) else (document,)
        last = self.last_sequence.get(path, 0)
        latencies = self.latencies
        for item in items:
            sequence = item.get("sequence", 0)
            if sequence <= last:
                self.disorder += 1
            last = sequence
            sent = item.get("data", {}).get("t")
            if sent is not None:
                latencies.append(now - sent)
        self.last_sequence[path] = last
        self.per_path[path] = self.per_path.get(path, 0) + len(items)
        self.total += len(items)
        self.requests += 1
        if self.first_at is None:
            self.first_at = now
        self.last_at = now

    def stats(self, with_paths: bool) -> dict[str, Any]:
        result: dict[str, Any] = {
            "total": self.total,
            "requests": self.requests,
            "paths": len(self.per_path),
            "disorder": self.disorder,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "latency": percentiles(self.latencies),
        }
        if with_paths:
            result["per_path"] = self.per_path
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
    request.app[TALLY].record(request.path, await request.read())
    return web.Response(status=200)


async def stats(request: web.Request) -> web.Response:
    body = request.app[TALLY].stats(with_paths=request.query.get("paths") == "1")
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def reset(request: web.Request) -> web.Response:
    request.app[TALLY].reset()
    return web.Response(status=200)


async def serve(port: int) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[TALLY] = Tally()
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
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
