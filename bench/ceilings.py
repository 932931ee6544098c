"""(d) Ceilings on this machine, measured in the same run as the figures they divide.

The receiver under a bare webhookd.http1 client (the client the daemon's sender uses), and
SQLite under a bare sqlite3 loop with the store's pragmas and row shape.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson

from bench import load, sqlite_ceiling
from bench.context import MS, Context
from bench.harness import EVENT, scratch_dir
from bench.report import Ceiling


def delivery_like_body(count: int) -> bytes:
    """What the daemon sends: webhook objects with id, sequence, event, secret, timestamp."""
    objects = [
        {
            "id": str(uuid.uuid4()),
            "sequence": i + 1,
            "event": EVENT,
            "secret": "bench-secret",
            "timestamp": int(time.time()),
            "data": load.sample_data(i),
        }
        for i in range(count)
    ]
    return orjson.dumps(objects if count > 1 else objects[0])


async def ceilings(ctx: Context) -> None:
    await receiver_ceilings(ctx)
    await sqlite_ceilings(ctx)


async def receiver_ceilings(ctx: Context) -> None:
    """The receiver under a bare http1 client: single objects and 100-item arrays."""
    duration = ctx.size(4.0, 1.5)
    headers = {"Authorization": "Bearer bench-secret"}
    for key, label, count, unit in (
        ("receiver_requests", "receiver, single-object POSTs", 1, "requests/s"),
        ("receiver_webhooks", "receiver, 100-item arrays", 100, "webhooks/s"),
    ):
        await ctx.receiver.reset(ctx.client)
        urls = [ctx.receiver.url(f"/ceiling/c{i}") for i in range(64)]
        meter = ctx.cpu()
        result = await load.closed_loop(
            urls,
            delivery_like_body(count),
            items_per_request=count,
            concurrency=64,
            ok_status=200,
            duration=duration,
            headers=headers,
        )
        cpu = meter.stop()
        ctx.report.ceilings[key] = Ceiling(key, label, result.items_per_s, unit, cpu["others"])
        ctx.report.details[key] = {"errors": result.errors, "cpu_percent": cpu}
        ctx.say(
            f"  {label}: {result.items_per_s:,.0f} {unit} "
            f"(64 connections, bare http1 client; cpu {cpu})"
        )
    await ctx.receiver.reset(ctx.client)


async def sqlite_ceilings(ctx: Context) -> None:
    """SQLite under a bare sqlite3 loop: 100-row transactions, and 1-row commits' rate and
    durations."""
    duration = ctx.size(4.0, 1.5)
    meter = ctx.cpu()
    with scratch_dir("sqlite") as directory:
        rows = await asyncio.to_thread(
            sqlite_ceiling.group_commit_rows_per_s,
            directory / "rows.db",
            rows_per_tx=100,
            duration=duration,
        )
        commits, durations = await asyncio.to_thread(
            sqlite_ceiling.commits, directory / "commits.db", duration=duration
        )
    others = meter.stop()["others"]
    ctx.report.ceilings["sqlite_rows"] = Ceiling(
        "sqlite_rows", "sqlite, 100-row transactions", rows, "rows/s", others
    )
    ctx.report.ceilings["sqlite_commits"] = Ceiling(
        "sqlite_commits", "sqlite, 1-row transactions", commits, "commits/s", others
    )
    ctx.say(f"  sqlite insert, 100 rows/tx, synchronous=FULL, WAL: {rows:,.0f} rows/s")
    durations.sort()
    p50 = MS * durations[len(durations) // 2]
    p99 = MS * durations[min(len(durations) - 1, int(0.99 * len(durations)))]
    for key, label, value in (
        ("commit_p50", "sqlite commit p50", p50),
        ("commit_p99", "sqlite commit p99", p99),
    ):
        ctx.report.ceilings[key] = Ceiling(key, label, value, "ms", others)
    ctx.say(
        f"  sqlite 1-row durable commits: {commits:,.0f} commits/s; "
        f"each took p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {MS * durations[-1]:.2f} ms"
    )
    await ctx.receiver.reset(ctx.client)


async def postgres_ceilings(ctx: Context) -> None:
    """PostgreSQL's own commit rates on the run's server, with bench/pg_drivers.py's code:
    1-row INSERT commits (1 connection and 8), and 100-row group commits as the engine makes
    them (10 tenants' sequences allocated, then their rows and ids inserted from arrays)."""
    from bench import pg_drivers

    assert ctx.postgres is not None
    if "receiver_requests" not in ctx.report.ceilings:  # --engine postgres: not measured yet
        await receiver_ceilings(ctx)
    server, driver = ctx.postgres, pg_drivers.Asyncpg()
    duration = ctx.size(4.0, 1.5)
    meter = ctx.cpu()
    rows = await pg_drivers.ingest(server, driver, "unnest", duration)
    one = await pg_drivers.commit1(server, driver, 1, duration)
    eight = await pg_drivers.commit1(server, driver, 8, duration)
    others = meter.stop()["others"]
    for key, label, value, unit in (
        ("pg_rows", "postgresql, 100-row transactions (unnest)", rows.rate, "rows/s"),
        ("pg_commits", "postgresql, 1-row commits, 1 connection", one.rate, "commits/s"),
        ("pg_commits8", "postgresql, 1-row commits, 8 connections", eight.rate, "commits/s"),
    ):
        ctx.report.ceilings[key] = Ceiling(key, label, value, unit, others)
        ctx.say(f"  {label}: {value:,.0f} {unit}")
    ctx.report.details["postgres_ceilings"] = {
        "cpu_percent": meter.result,
        "producer_cpu_us_per_row": rows.cpu_us,
        "producer_cpu_us_per_commit": one.cpu_us,
    }
