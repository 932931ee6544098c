"""The producer side: closed-loop HTTP load (N clients as fast as answers come) and paced load.

Bodies are encoded once up front where the content does not vary, so the producer spends
its share of the two cores on requests, not on JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.harness import EVENT

JSON = {"Content-Type": "application/json"}


def session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))


def sample_data(n: int) -> dict[str, Any]:
    """A payload of typical size (~120 bytes as JSON)."""
    return {
        "product_id": f"p-{n:08d}",
        "profile_id": f"c-{n * 7 % 1000003:08d}",
        "status": "APPROVED",
        "changed_by": "automation",
    }


def event_body(n: int = 0) -> bytes:
    return orjson.dumps({"event": EVENT, "data": sample_data(n)})


def array_body(count: int, start: int = 0) -> bytes:
    return orjson.dumps([{"event": EVENT, "data": sample_data(start + i)} for i in range(count)])


@dataclass
class LoadResult:
    requests: int = 0
    items: int = 0
    errors: int = 0
    elapsed: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return self.items / self.elapsed if self.elapsed else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0


async def closed_loop(
    client: aiohttp.ClientSession,
    urls: Sequence[str],
    body: bytes,
    *,
    items_per_request: int,
    concurrency: int,
    ok_status: int,
    duration: float | None = None,
    total_requests: int | None = None,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """`concurrency` clients POST `body`, round-robin over `urls`, each waiting for its answer.

    Stops after `duration` seconds or `total_requests` requests, whichever is given.
    """
    result = LoadResult()
    counter = itertools.count()
    send_headers = {**JSON, **(headers or {})}
    started = time.perf_counter()
    deadline = started + duration if duration is not None else float("inf")

    async def client_loop() -> None:
        while True:
            index = next(counter)
            if total_requests is not None and index >= total_requests:
                return
            if time.perf_counter() >= deadline:
                return
            url = urls[index % len(urls)]
            try:
                async with client.post(url, data=body, headers=send_headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, reason = 0, f"{type(exc).__name__}: {exc}"
            else:
                reason = f"HTTP {status}"
            if status == ok_status:
                result.requests += 1
                result.items += items_per_request
            else:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(reason)

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - started
    return result


@dataclass
class PacedResult:
    sent: int
    errors: int
    elapsed: float
    round_trips: list[float]
    behind_max: float  # how late the producer ever was against its schedule, seconds


async def paced(
    client: aiohttp.ClientSession,
    url_for: Callable[[int], str],
    *,
    rate: float,
    duration: float,
) -> PacedResult:
    """Open-loop load: request k leaves at start + k/rate, whatever earlier answers do.

    Each body carries `t` = time.time() at send; the receiver subtracts it on arrival.
    """
    total = int(rate * duration)
    round_trips: list[float] = []
    errors = 0
    behind_max = 0.0
    tasks: set[asyncio.Task[None]] = set()

    async def one(k: int) -> None:
        nonlocal errors
        sent = time.time()
        body = orjson.dumps({"event": EVENT, "data": {"t": sent, "k": k}})
        try:
            async with client.post(url_for(k), data=body, headers=JSON) as response:
                await response.read()
                ok = response.status == 202
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            round_trips.append(time.time() - sent)
        else:
            errors += 1

    started = time.perf_counter()
    for k in range(total):
        due = started + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            behind_max = max(behind_max, -delay)
        task = asyncio.create_task(one(k))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return PacedResult(total, errors, time.perf_counter() - started, round_trips, behind_max)
