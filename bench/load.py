"""The producer side: closed-loop HTTP load (N clients as fast as answers come) and paced load.

Bodies are encoded once up front where the content does not vary, and requests go through
webhookd's own HTTP client (webhookd.http1, half the CPU of aiohttp's per request), so the
producer spends as little as it can of the two cores the daemon shares with it.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.harness import EVENT
from webhookd import http1

JSON = {"Content-Type": "application/json"}
TIMEOUT_S = 60.0  # per request


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


def lean_client(*, keep_bodies: bool = False) -> http1.Client:
    """A client for loopback load: no address check."""
    return http1.Client(ssl.create_default_context(), lambda address: None, keep_bodies=keep_bodies)


def request_head(target: http1.Target, length: int, headers: dict[str, str]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in {**JSON, **headers}.items())
    return (
        f"POST {target.path} HTTP/1.1\r\nHost: {target.authority}\r\n{lines}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def closed_loop(
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
    targets = [http1.parse_target(url) for url in urls]
    heads = [request_head(target, len(body), headers or {}) for target in targets]
    client = lean_client()
    started = time.perf_counter()
    deadline = started + duration if duration is not None else float("inf")

    async def client_loop() -> None:
        while True:
            index = next(counter)
            if total_requests is not None and index >= total_requests:
                return
            if time.perf_counter() >= deadline:
                return
            which = index % len(urls)
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    response = await client.post(targets[which], heads[which], body)
                status = response.status
            except (http1.HTTPError, OSError, TimeoutError) as exc:
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

    try:
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    finally:
        client.close()
    result.elapsed = time.perf_counter() - started
    return result


@dataclass
class PacedResult:
    sent: int
    errors: int
    elapsed: float
    round_trips: list[float]
    behind_max: float  # how late the producer ever was against its schedule, seconds
    # time.time() of each request `k`'s sending and of its 202 (acknowledged ones only)
    sent_at: dict[int, float] = field(default_factory=dict)
    acked_at: dict[int, float] = field(default_factory=dict)


async def paced(
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
    sent_at: dict[int, float] = {}
    acked_at: dict[int, float] = {}
    errors = 0
    behind_max = 0.0
    tasks: set[asyncio.Task[None]] = set()
    client = lean_client()

    async def one(k: int) -> None:
        nonlocal errors
        sent = sent_at[k] = time.time()
        body = orjson.dumps({"event": EVENT, "data": {"t": sent, "k": k}})
        target = http1.parse_target(url_for(k))
        try:
            async with asyncio.timeout(TIMEOUT_S):
                response = await client.post(target, request_head(target, len(body), {}), body)
            ok = response.status == 202
        except (http1.HTTPError, OSError, TimeoutError):
            ok = False
        if ok:
            acked = acked_at[k] = time.time()
            round_trips.append(acked - sent)
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
    client.close()
    elapsed = time.perf_counter() - started
    return PacedResult(total, errors, elapsed, round_trips, behind_max, sent_at, acked_at)
