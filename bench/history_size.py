"""Disk per retained webhook: what the history costs in bytes on each engine, with and
without payloads, beside what the store counts toward `history_max_bytes`.

    make bench ARGS="--only historysize --engine both"

For each history setting (off, on without payloads, on), it queues N webhooks over 10
tenants in batches of 100 and acknowledges them (as delivery does), twice: the first round
fills the pages a steady state reuses (SQLite's free list, PostgreSQL's space freed by
VACUUM), the second is measured. The figure is the growth of the database in that second
round (SQLite: pages in use; PostgreSQL: the tables' and indexes' relation sizes after
VACUUM) divided by N, beside the bytes the store counted for the same records
(`history_size().bytes`, what `history_max_bytes` bounds).
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path

import asyncpg
import orjson

from bench.context import Context
from bench.report import Figure
from webhookd import logs
from webhookd.config import PostgresURL
from webhookd.records import Delivered, HistoryPolicy, NewWebhook
from webhookd.store import Store, make_store

POLICIES = {
    "off": HistoryPolicy(keep=False),
    "no payloads": HistoryPolicy(payloads=False),
    "payloads": HistoryPolicy(),
}
TENANTS = 10
BATCH = 100
OK = Delivered(200, 5.0, 1)


def payload(n: int, size: int) -> str:
    """A JSON object of about `size` bytes, different for each webhook (as real data is:
    nothing for the engine to compress or share)."""
    filler = f"{n:08x}" * (size // 8 + 1)
    text = orjson.dumps({"n": n, "text": filler}).decode()
    return text[: max(size - 2, 20)] + '"}' if len(text) > size else text


async def fill(store: Store, policy: HistoryPolicy, count: int, size: int, start: int) -> None:
    names = [f"tenant-{t:02d}" for t in range(TENANTS)]
    per_tenant = count // TENANTS
    for offset in range(0, per_tenant, BATCH):
        n = start + offset
        batches = [
            [
                NewWebhook(f"p-{t}-{n + i}", "CHECK_COMPLETED", payload(n + i, size))
                for i in range(min(BATCH, per_tenant - offset))
            ]
            for t in range(TENANTS)
        ]
        results = await asyncio.gather(
            *(
                store.enqueue(name, items, time.time())
                for name, items in zip(names, batches, strict=True)
            )
        )
        await asyncio.gather(
            *(
                store.acknowledge(name, result[-1].sequence or 0, time.time(), OK, policy)
                for name, result in zip(names, results, strict=True)
            )
        )


def sqlite_bytes(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


async def postgres_bytes(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM")
        value = await conn.fetchval(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class AS c "
            "JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname = current_schema()"
        )
        return int(value)
    finally:
        await conn.close()


async def measure(
    database: Path | PostgresURL, policy: HistoryPolicy, count: int, size: int
) -> tuple[float, float]:
    store = make_store(database)
    await store.open()
    try:

        async def used() -> int:
            if isinstance(database, Path):
                return await asyncio.to_thread(sqlite_bytes, database)
            return await postgres_bytes(database.url)

        await fill(store, policy, count, size, 0)
        before, counted_before = await used(), (await store.history_size()).bytes
        await fill(store, policy, count, size, count)
        after, counted_after = await used(), (await store.history_size()).bytes
    finally:
        await store.close()
    return (after - before) / count, (counted_after - counted_before) / count


async def history_size(ctx: Context) -> None:
    """`make bench`'s figures: disk per retained webhook with 512-byte data, history off,
    on without payloads and on, on the engine the run uses."""
    logs.configure("json", "warning")  # the store logs its migration at info
    count = ctx.size(100_000, 20_000)
    size = 512
    for name, policy in POLICIES.items():
        with tempfile.TemporaryDirectory() as folder:
            if ctx.engine == "postgres":
                assert ctx.postgres is not None
                server = ctx.postgres
                url = server.database_url(await asyncio.to_thread(server.create_database))
                database: Path | PostgresURL = PostgresURL(url)
            else:
                database = Path(folder) / "webhookd.db"
            disk, counted = await measure(database, policy, count, size)
        ratio = f", {disk / counted:.2f}× the {counted:.0f} B counted" if counted else ""
        ctx.say(f"  history {name}: {disk:.0f} B on disk per webhook{ratio}")
        ctx.report.figures.append(
            Figure(
                f"history_disk_{name.replace(' ', '_')}",
                f"disk per retained webhook, {size} B data, history {name}",
                disk,
                "B",
                note=f"counted toward history_max_bytes: {counted:.0f} B" if counted else "",
                engine=ctx.engine,
            )
        )
