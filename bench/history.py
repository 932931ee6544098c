"""The delivery history: what keeping it costs, how fast a page answers, pruning.

- historycost: batched end to end (100 tenants, ingest running) and the unbatched drain
  over 1,000 tenants, each run twice on fresh daemons: with `history_retention = "0"` (no
  history at all) and with the default (7 days, payloads kept). The figure is the ratio
  of the two rates, beside both rates and the daemon's CPU per webhook in each; the
  issue's design target is >= 0.85. The runs alternate off, on, so that a neighbour's load
  that comes and goes does not favour one side.
- historylist: 10,000,000 history records (10 tenants of 1,000,000) written straight into
  the daemon's schema, then pages of 100 through the API as a user asks them: newest,
  oldest, from a cursor in the middle, by event (common and rare, with a cursor), by
  sequence range, by time range, by a rare outcome, and a lookup by producer id. p50 of 20
  of each, against the 50 ms target.
- historytenants: 10,000 tenants of 30 records over `history_max_bytes`: the longest
  pruning step by size, and the latency at 500/s while the daemon prunes.
- historyprune: 1,000,000 records past their tenants' retention. First pruning steps timed
  through the store (how long one holds the writer, the 20 ms target); then a daemon with a
  30-day retention for them carries unbatched webhooks at 500/s over 50 other tenants, is
  reloaded with a 7-day retention, and carries the same load while it prunes them: the
  latency before and during, and the pruning rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
import tomllib
from pathlib import Path
from typing import Any

import asyncpg
import tomli_w

from bench import load
from bench.context import MS, Context
from bench.delivery import drain, end_to_end
from bench.harness import Daemon, tenant_names, tenant_tables
from bench.report import Figure
from webhookd import logs
from webhookd.config import PostgresURL
from webhookd.service import PRUNE_STEP
from webhookd.store import make_store
from webhookd.store.history import RECORD_OVERHEAD

OFF = {"history_retention": "0"}
ON: dict[str, Any] = {}  # the defaults: history kept 7 days, with payloads


async def history_cost(ctx: Context) -> None:
    runs: dict[str, dict[str, dict[str, Any]]] = {"e2e": {}, "unbatched1000": {}}
    for side, options in (("off", OFF), ("on", ON)):
        ctx.say(f"  history {side}: batched end to end")
        runs["e2e"][side] = await end_to_end(ctx, f"history_{side}_e2e", **options)
        ctx.say(f"  history {side}: unbatched drain over 1000 tenants")
        runs["unbatched1000"][side] = await drain(
            ctx,
            f"history_{side}_unbatched1000",
            tenants=1000,
            per_tenant=ctx.size(30, 5),
            per_request=ctx.size(30, 5),
            batching=False,
            timeout=90.0,
            **options,
        )
    for key, label in (
        ("e2e", "batched end to end"),
        ("unbatched1000", "unbatched drain, 1000 tenants"),
    ):
        off, on = runs[key]["off"], runs[key]["on"]
        ratio = on["per_s"] / off["per_s"] if off["per_s"] else 0.0
        cpu_off = off["daemon_cpu_us_per_webhook"] or 0.0
        cpu_on = on["daemon_cpu_us_per_webhook"] or 0.0
        note = (
            f"off {off['per_s']:,.0f}/s ({cpu_off:.0f} µs), on {on['per_s']:,.0f}/s "
            f"({cpu_on:.0f} µs)"
        )
        ctx.report.details.setdefault("historycost", {})[key] = {
            "off_per_s": off["per_s"],
            "on_per_s": on["per_s"],
            "ratio": ratio,
            "off_daemon_cpu_us_per_webhook": cpu_off,
            "on_daemon_cpu_us_per_webhook": cpu_on,
            "off_postgres_cpu_us_per_webhook": off["postgres_cpu_us_per_webhook"],
            "on_postgres_cpu_us_per_webhook": on["postgres_cpu_us_per_webhook"],
        }
        ctx.report.figures.append(
            Figure(
                f"history_cost_{key}",
                f"history on / off: {label}",
                ratio,
                "×",
                target=(">=", 0.85),
                note=note,
                background=on["cpu_percent"]["others"],
                steal=on["cpu_percent"].get("steal"),
                cpu_us=cpu_on,
                db_cpu_us=on["postgres_cpu_us_per_webhook"],
            )
        )
        ctx.say(f"  {label}: history on / off = {ratio:.2f} ({note})")


# -- a page of history with 10,000,000 records stored -------------------------------------------

LIST_TENANTS = 10
PAD = "x" * 200  # a payload of ~230 bytes, as a small event's data
RARE_EVENT = "RARE_EVENT"  # one record in 1,000
RARE_OUTCOME = "parked"  # one record in 1,000
HISTORY_SPAN_S = 6 * 86400.0  # inside the default 7-day retention: nothing is pruned


# The generated records, as SELECT lists over a series `n` (a record's sequence): the
# delivered ones are webhooks rows at or below acked_sequence (schema: SQLite v3 /
# PostgreSQL v5), covered by one deliveries row per 100 (a batch); one in 1,000 has the rare
# outcome, in `history`.
def _event() -> str:
    return f"CASE WHEN n % 1000 = 7 THEN '{RARE_EVENT}' ELSE 'EVENT_' || (n % 10) END"


def _data() -> str:
    return f"""'{{"n":' || n || ',"pad":"{PAD}"}}'"""


BATCH_RECORDS = 100


def fill_sqlite(
    path: str, names: list[str], per_tenant: int, started: float, span: float = HISTORY_SPAN_S
) -> None:
    """`per_tenant` history records for each tenant, straight into the daemon's schema (made
    by its store just before): the indexes dropped, the rows written by INSERT … SELECT
    per tenant, the indexes made again from their own definitions, the tenant's counters and
    history size set as the writes would have left them. The first tenant's records carry
    producer ids, remembered in webhook_ids (a lookup by id)."""
    step = span / per_tenant
    series = "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < ?)"
    tables = "('history', 'webhook_ids', 'webhooks')"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")
        indexes = [
            sql
            for (sql,) in conn.execute(
                f"SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name IN {tables} "
                "AND sql IS NOT NULL"
            )
        ]
        for (name,) in conn.execute(
            f"SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN {tables} "
            "AND sql IS NOT NULL"
        ).fetchall():
            conn.execute(f"DROP INDEX {name}")
        for number, tenant in enumerate(names):
            args = (per_tenant, tenant, tenant, started, step)
            conn.execute(
                f"""{series}
                    INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data)
                    SELECT ?, n, ? || '-' || n, {_event()}, ? + n * ?, {_data()}
                    FROM s WHERE n % 1000 != 3""",
                args,
            )
            conn.execute(
                f"""{series}
                    INSERT INTO history (tenant, sequence, id, event, accepted_at, finished_at,
                        outcome, attempts, status, duration_ms, data, next_sequence)
                    SELECT ?, n, ? || '-' || n, {_event()}, ? + n * ?, ? + n * ? + 0.05,
                           '{RARE_OUTCOME}', 1, NULL, NULL, {_data()}, NULL
                    FROM s WHERE n % 1000 = 3""",
                (*args, started, step),
            )
            conn.execute(
                f"""{series}
                    INSERT INTO deliveries (tenant, last_sequence, first_sequence, delivered_at,
                        attempts, status, duration_ms, payloads)
                    SELECT ?, min(n * {BATCH_RECORDS}, ?), (n - 1) * {BATCH_RECORDS} + 1,
                           ? + min(n * {BATCH_RECORDS}, ?) * ? + 0.05, 1, 200, 12.5, 1
                    FROM s""",
                (
                    -(-per_tenant // BATCH_RECORDS),
                    tenant,
                    per_tenant,
                    started,
                    per_tenant,
                    step,
                ),
            )
            if number == 0:
                conn.execute(
                    """INSERT INTO webhook_ids (tenant, id, sequence, accepted_at)
                       SELECT tenant, id, sequence, accepted_at FROM webhooks WHERE tenant = ?
                       UNION ALL
                       SELECT tenant, id, sequence, accepted_at FROM history WHERE tenant = ?""",
                    (tenant, tenant),
                )
            conn.execute(
                """INSERT INTO tenant_state (tenant, last_sequence, acked_sequence)
                   VALUES (?, ?, ?)""",
                (tenant, per_tenant, per_tenant),
            )
            conn.execute(
                """INSERT INTO history_sizes (tenant, records, failures, bytes)
                   SELECT ?, count(*), 0, sum(length(id) + length(event) + length(data) + ?)
                   FROM (SELECT id, event, data FROM webhooks WHERE tenant = ?
                         UNION ALL SELECT id, event, data FROM history WHERE tenant = ?)""",
                (tenant, RECORD_OVERHEAD, tenant, tenant),
            )
            conn.commit()
        for sql in indexes:
            conn.execute(sql)
        conn.commit()
        conn.execute("ANALYZE")
        conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def fill_postgres(
    url: str, names: list[str], per_tenant: int, started: float, span: float = HISTORY_SPAN_S
) -> None:
    """As fill_sqlite, on PostgreSQL: generate_series, indexes made again from pg_indexes."""
    step = span / per_tenant
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET synchronous_commit = off")
        indexes = await conn.fetch(
            """SELECT i.indexname, i.indexdef FROM pg_indexes AS i
               WHERE i.tablename IN ('history', 'webhook_ids', 'webhooks') AND NOT EXISTS (
                   SELECT FROM pg_constraint AS c WHERE c.conname = i.indexname)"""
        )
        for row in indexes:
            await conn.execute(f'DROP INDEX "{row["indexname"]}"')
        for number, tenant in enumerate(names):
            await conn.execute(
                f"""INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data)
                    SELECT $1, n, $1 || '-' || n, {_event()}, $2 + n * $3, {_data()}
                    FROM generate_series(1, $4::bigint) AS n WHERE n % 1000 != 3""",
                tenant,
                started,
                step,
                per_tenant,
            )
            await conn.execute(
                f"""INSERT INTO history (tenant, sequence, id, event, accepted_at, finished_at,
                        outcome, attempts, status, duration_ms, data, next_sequence)
                    SELECT $1, n, $1 || '-' || n, {_event()}, $2 + n * $3, $2 + n * $3 + 0.05,
                           '{RARE_OUTCOME}', 1, NULL, NULL, {_data()}, NULL
                    FROM generate_series(1, $4::bigint) AS n WHERE n % 1000 = 3""",
                tenant,
                started,
                step,
                per_tenant,
            )
            await conn.execute(
                f"""INSERT INTO deliveries (tenant, last_sequence, first_sequence, delivered_at,
                        attempts, status, duration_ms, payloads)
                    SELECT $1, least(n * {BATCH_RECORDS}, $4::bigint),
                           (n - 1) * {BATCH_RECORDS} + 1,
                           $2 + least(n * {BATCH_RECORDS}, $4::bigint) * $3 + 0.05,
                           1, 200, 12.5, true
                    FROM generate_series(1, $5::bigint) AS n""",
                tenant,
                started,
                step,
                per_tenant,
                -(-per_tenant // BATCH_RECORDS),
            )
            if number == 0:
                await conn.execute(
                    """INSERT INTO webhook_ids (tenant, id, sequence, accepted_at)
                       SELECT tenant, id, sequence, accepted_at FROM webhooks WHERE tenant = $1
                       UNION ALL
                       SELECT tenant, id, sequence, accepted_at FROM history WHERE tenant = $1""",
                    tenant,
                )
            await conn.execute(
                "INSERT INTO counters (tenant, last_sequence) VALUES ($1, $2)", tenant, per_tenant
            )
            await conn.execute(
                """INSERT INTO tenant_state (tenant, acked_sequence, history_records,
                       history_bytes)
                   SELECT $1, $2, count(*),
                          sum(octet_length(id) + octet_length(event) + octet_length(data) + $3)
                   FROM (SELECT id, event, data FROM webhooks WHERE tenant = $1
                         UNION ALL SELECT id, event, data FROM history WHERE tenant = $1) AS r""",
                tenant,
                per_tenant,
                RECORD_OVERHEAD,
            )
        for row in indexes:
            await conn.execute(row["indexdef"])
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def settle(database: str) -> None:
    """What a database filled over days would be when the bench starts: on disk (the
    fill's writes flushed, not left for the first checkpoint's fsync to pay) and, on
    PostgreSQL, vacuumed and analysed (not left for autovacuum to do under the load)."""
    if database.startswith("postgresql://"):
        conn = await asyncpg.connect(database)
        try:
            await conn.execute("VACUUM ANALYZE")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()
        return

    def flush() -> None:
        with sqlite3.connect(database) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with open(database, "rb") as file:
            os.fsync(file.fileno())

    await asyncio.to_thread(flush)


async def make_schema(database: str) -> None:
    """The daemon's schema in a new database, made by its own store."""
    logs.configure("json", "warning")  # the store logs its migration at info
    store = make_store(
        PostgresURL(database) if database.startswith("postgresql://") else Path(database)
    )
    await store.open()
    await store.close()


async def timed_get(ctx: Context, url: str, runs: int) -> tuple[float, float, Any]:
    """p50 and max milliseconds of `runs` GETs of `url` (after one untimed), and its answer."""
    async with ctx.client.get(url) as response:
        body = await response.json()
        if response.status != 200:
            raise RuntimeError(f"GET {url}: {response.status} {body}")
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        async with ctx.client.get(url) as response:
            await response.read()
        took.append((time.perf_counter() - started) * MS)
    took.sort()
    return took[len(took) // 2], took[-1], body


async def history_list(ctx: Context) -> None:
    per_tenant = ctx.size(1_000_000, 20_000)
    names = [f"h{n}" for n in range(LIST_TENANTS)]
    total = per_tenant * len(names)
    started = time.time() - HISTORY_SPAN_S - 60
    tables = tenant_tables(names, ctx.receiver, "historylist", batching=True)
    fill_s = 0.0

    async def prepare(_directory: Path, database: str) -> None:
        nonlocal fill_s
        began = time.monotonic()
        await make_schema(database)
        if database.startswith("postgresql://"):
            await fill_postgres(database, names, per_tenant, started)
        else:
            await asyncio.to_thread(fill_sqlite, database, names, per_tenant, started)
        fill_s = time.monotonic() - began
        ctx.say(f"  stored {total:,} history records in {fill_s:.0f} s")

    # No size limit: 10 M records count ~3 GB, past the default 1 GiB, and pruning them
    # meanwhile would measure pages against a busy pruner rather than a history at rest.
    async with ctx.daemon(
        "historylist", tables, prepare=prepare, daemon={"history_max_bytes": "0"}
    ) as daemon:
        async with ctx.client.get(f"{daemon.base}/v1/status") as response:
            totals = (await response.json())["totals"]
        tenant = names[0]
        base = f"{daemon.base}/v1/tenants/{tenant}/history"
        middle = per_tenant // 2
        step = HISTORY_SPAN_S / per_tenant
        at = started + middle * step
        queries = {
            "newest": "?limit=100",
            "oldest": "?order=oldest&limit=100",
            "cursor, middle": f"?cursor={middle}&limit=100",
            "event, 1 in 10": "?event=EVENT_3&limit=100",
            "event, 1 in 1,000": f"?event={RARE_EVENT}&limit=100",
            "event, 1 in 1,000, cursor": f"?event={RARE_EVENT}&cursor={middle}&limit=100",
            "sequence range": f"?from_sequence={middle}&to_sequence={middle + 99}&order=oldest",
            "time range": f"?since={at:.3f}&until={at + 100 * step:.3f}&order=oldest",
            "outcome, 1 in 1,000": f"?outcome={RARE_OUTCOME}&limit=100",
        }
        runs = ctx.size(20, 5)
        results: dict[str, dict[str, float]] = {}
        for label, query in queries.items():
            p50, worst, body = await timed_get(ctx, base + query, runs)
            records = body.get("records", body) if isinstance(body, dict) else body
            results[label] = {"p50_ms": p50, "max_ms": worst, "records": len(records)}
        lookup = f"{daemon.base}/v1/tenants/{tenant}/webhooks/{tenant}-{middle}"
        p50, worst, body = await timed_get(ctx, lookup, runs)
        results["lookup by producer id"] = {"p50_ms": p50, "max_ms": worst, "records": 1}
        if body.get("state") != "delivered":
            raise RuntimeError(f"lookup of {tenant}-{middle}: {body}")
    ctx.report.details["historylist"] = {
        "records": total,
        "tenants": len(names),
        "fill_s": fill_s,
        "status_totals": totals,
        "queries": results,
    }
    for label, result in results.items():
        ctx.report.figures.append(
            Figure(
                f"history_page_{label}",
                f"history, {total / 1e6:g} M records: {label}",
                result["p50_ms"],
                "ms",
                target=("<", 50.0),
            )
        )
        ctx.say(
            f"  {label}: p50 {result['p50_ms']:.1f} ms, max {result['max_ms']:.1f} ms "
            f"({result['records']:.0f} records)"
        )


# -- pruning 1,000,000 records while ingest and deliveries run ----------------------------------

PRUNE_TENANTS = 10
LIVE_TENANTS = 50
LONG_RETENTION = "30d"  # phase 1: nothing of the old records is past it
SHORT_RETENTION = "7d"  # phase 2: all of them are
TIMED_STEPS = 100  # prune steps timed in-process before the daemon starts


async def timed_prune_steps(
    database: str, names: list[str], steps: int, max_bytes: int | None = None
) -> list[float]:
    """Milliseconds each of `steps` pruning steps took through the store, as the daemon's
    pruner calls it (PRUNE_STEP rows, `names` kept 7 days, the history bounded to
    `max_bytes`): how long a step holds the writer, and with it every ingest and delivery
    record waiting behind it. The first also reads the survey (off the writer)."""
    store = make_store(
        PostgresURL(database) if database.startswith("postgresql://") else Path(database)
    )
    await store.open()
    took = []
    try:
        for _ in range(steps):
            began = time.perf_counter()
            result = await store.prune_history(
                time.time(),
                retention=dict.fromkeys(names, 7 * 86400.0),
                default_retention=7 * 86400.0,
                max_bytes=max_bytes,
                idempotency_window=86400.0,
                step=PRUNE_STEP,
            )
            took.append((time.perf_counter() - began) * MS)
            if not result.more:
                break
    finally:
        await store.close()
    return took


def spread(millis: list[float]) -> dict[str, float]:
    """p50, p99 and max of step times."""
    ordered = sorted(millis)
    return {
        "p50": ordered[len(ordered) // 2],
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max": ordered[-1],
    }


def with_retention(daemon: Daemon, names: list[str], retention: str) -> None:
    """Rewrite the daemon's config with `retention` for `names`, and SIGHUP it."""
    raw = tomllib.loads(daemon.config_path.read_text())
    for name in names:
        raw["tenants"][name]["history_retention"] = retention
    daemon.config_path.write_text(tomli_w.dumps(raw))
    daemon.proc.proc.send_signal(signal.SIGHUP)


async def history_records(ctx: Context, daemon: Daemon) -> int:
    async with ctx.client.get(f"{daemon.base}/v1/status") as response:
        return int((await response.json())["totals"]["history_records"])


async def paced_latency(
    ctx: Context, daemon: Daemon, names: list[str], seconds: float
) -> dict[str, float]:
    """Unbatched webhooks at 500/s over `names` for `seconds`: send→arrival ms."""
    await ctx.receiver.reset(ctx.client)
    urls = [daemon.ingest_url(n) for n in names]
    sent = await load.paced(lambda k: urls[k % len(urls)], rate=500.0, duration=seconds)
    stats = await ctx.receiver.wait_total(ctx.client, sent.sent - sent.errors, 15.0)
    lat = stats["latency"] or {}
    return {
        "sent": float(sent.sent),
        "delivered": float(stats["total"]),
        **{k: v * MS for k, v in lat.items() if k != "count"},
    }


async def history_prune(ctx: Context) -> None:
    per_tenant = ctx.size(100_000, 10_000)
    old = [f"p{n}" for n in range(PRUNE_TENANTS)]
    live = tenant_names(LIVE_TENANTS, "l")
    total = per_tenant * len(old)
    # Accepted 9 to 8 days ago: inside a 30-day retention, past a 7-day one.
    started = time.time() - 9 * 86400.0
    tables = {
        **tenant_tables(old, ctx.receiver, "historyprune", history_retention=LONG_RETENTION),
        **tenant_tables(live, ctx.receiver, "historyprune", batching=False),
    }
    steps: list[float] = []

    async def prepare(_directory: Path, database: str) -> None:
        nonlocal steps
        await make_schema(database)
        span = 86400.0 / per_tenant
        if database.startswith("postgresql://"):
            await fill_postgres(database, old, per_tenant, started, span)
        else:
            await asyncio.to_thread(fill_sqlite, database, old, per_tenant, started, span)
        await settle(database)
        steps = await timed_prune_steps(database, old, TIMED_STEPS)
        ctx.say(
            f"  stored {total:,} records past a 7-day retention; {len(steps)} pruning steps of "
            f"{PRUNE_STEP} timed through the store"
        )

    seconds = ctx.size(8.0, 3.0)
    async with ctx.daemon("historyprune", tables, prepare=prepare) as daemon:
        before = await history_records(ctx, daemon)
        quiet = await paced_latency(ctx, daemon, live, seconds)
        with_retention(daemon, old, SHORT_RETENTION)
        began = time.monotonic()
        pruning = await paced_latency(ctx, daemon, live, seconds)
        at_end = await history_records(ctx, daemon)
        # The rest of the old records, if any: the records left are the live tenants' own.
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            left = await history_records(ctx, daemon) - int(
                quiet["delivered"] + pruning["delivered"]
            )
            if left <= 0:
                break
            await asyncio.sleep(0.2)
        prune_s = time.monotonic() - began
    result = {
        "records": total,
        "records_before": before,
        "pruned_during_load": before + int(quiet["delivered"] + pruning["delivered"]) - at_end,
        "prune_s": prune_s,
        "prune_per_s": total / prune_s if prune_s else 0.0,
        "step_rows": PRUNE_STEP,
        "step_ms": spread(steps),
        "latency_quiet_ms": quiet,
        "latency_pruning_ms": pruning,
    }
    ctx.report.details["historyprune"] = result
    ctx.report.figures.append(
        Figure(
            "history_prune_step_max",
            f"history pruning: longest step ({PRUNE_STEP} records)",
            result["step_ms"]["max"],
            "ms",
            target=("<", 20.0),
        )
    )
    ctx.report.figures.append(
        Figure(
            "history_prune_latency_p99",
            "latency p99 @500/s while 1 M records are pruned",
            pruning.get("p99", 0.0),
            "ms",
            note=f"the same load before: p99 {quiet.get('p99', 0.0):.1f} ms",
        )
    )
    ctx.say(
        f"  pruned {total:,} in {prune_s:.1f} s ({result['prune_per_s']:,.0f}/s); a step of "
        f"{PRUNE_STEP}: p50 {result['step_ms']['p50']:.1f} ms, max {result['step_ms']['max']:.1f}"
        f" ms; latency at 500/s before p50/p99/max {quiet.get('p50', 0):.1f}/"
        f"{quiet.get('p99', 0):.1f}/{quiet.get('max', 0):.1f} ms, while pruning "
        f"{pruning.get('p50', 0):.1f}/{pruning.get('p99', 0):.1f}/{pruning.get('max', 0):.1f} ms"
    )


SIZE_TENANTS = 10_000
SIZE_PER_TENANT = 30


def filled_bytes(names: list[str], per_tenant: int) -> int:
    """The history bytes the store counts for what fill_sqlite / fill_postgres write."""
    total = 0
    for tenant in names:
        for n in range(1, per_tenant + 1):
            event = RARE_EVENT if n % 1000 == 7 else f"EVENT_{n % 10}"
            data = f'{{"n":{n},"pad":"{PAD}"}}'
            total += len(f"{tenant}-{n}") + len(event) + len(data) + RECORD_OVERHEAD
    return total


async def history_tenants(ctx: Context) -> None:
    """10,000 tenants (1,000 with --quick) of 30 records each, inside their retention but
    over `history_max_bytes` (half of what they hold): pruning by size goes tenant by
    tenant, their records interleaving in time. How long a step holds the writer (timed
    through the store before the daemon starts), and the latency at 500/s over 50 other
    tenants while the daemon prunes."""
    count = int(ctx.size(SIZE_TENANTS, 1_000))
    old = [f"s{n:05d}" for n in range(count)]
    live = tenant_names(LIVE_TENANTS, "l")
    started = time.time() - 3 * 86400.0  # inside the 7-day default retention
    stored = count * SIZE_PER_TENANT
    counted = filled_bytes(old, SIZE_PER_TENANT)
    bound = max(2**20, counted // 2)
    tables = {
        **tenant_tables(old, ctx.receiver, "historytenants"),
        **tenant_tables(live, ctx.receiver, "historytenants", batching=False),
    }
    steps: list[float] = []

    async def prepare(_directory: Path, database: str) -> None:
        nonlocal steps
        await make_schema(database)
        if database.startswith("postgresql://"):
            await fill_postgres(database, old, SIZE_PER_TENANT, started, 86400.0)
        else:
            await asyncio.to_thread(fill_sqlite, database, old, SIZE_PER_TENANT, started, 86400.0)
        await settle(database)
        # Most of it stays over the bound for the daemon: the steps timed here take a little.
        steps = await timed_prune_steps(
            database, old, TIMED_STEPS, max_bytes=counted - (counted - bound) // 10
        )
        ctx.say(
            f"  stored {stored:,} records of {count:,} tenants ({counted / 2**20:.0f} MiB "
            f"counted); {len(steps)} steps by size timed through the store"
        )

    seconds = ctx.size(8.0, 3.0)
    async with ctx.daemon(
        "historytenants",
        tables,
        prepare=prepare,
        daemon={"history_max_bytes": f"{bound // 2**20}MiB"},
    ) as daemon:
        # Its 10,000 tenants taken up first (on PostgreSQL: their leases claimed, each
        # tenant's state read): the latency measured is the steady state's, while pruning.
        await asyncio.sleep(ctx.size(10.0, 2.0))
        before = await history_records(ctx, daemon)
        async with ctx.sampled("historytenants", daemon):  # --profile
            pruning = await paced_latency(ctx, daemon, live, seconds)
        after = await history_records(ctx, daemon)
    first, step_ms = steps[0], spread(steps[1:] or [0.0])
    result: dict[str, Any] = {
        "tenants": count,
        "records": stored,
        "counted_bytes": counted,
        "first_step_ms": first,
        "step_ms": step_ms,
        "pruned_during_load": before + int(pruning["delivered"]) - after,
        "latency_pruning_ms": pruning,
    }
    ctx.report.details["historytenants"] = result
    ctx.report.figures.append(
        Figure(
            "history_size_step_max",
            f"history by size, {count:,} tenants: longest step",
            step_ms["max"],
            "ms",
            target=("<", 20.0),
            note=f"the first, with the survey read off the writer: {first:.1f} ms",
        )
    )
    ctx.report.figures.append(
        Figure(
            "history_size_latency_p99",
            f"latency p99 @500/s while {count:,} tenants are pruned by size",
            pruning.get("p99", 0.0),
            "ms",
            target=("<", 20.0),
        )
    )
    ctx.say(
        f"  a step by size: first (with the survey) {first:.1f} ms, then p50 "
        f"{step_ms['p50']:.1f} ms, max {step_ms['max']:.1f} ms; latency at "
        f"500/s while pruning p50/p99/max {pruning.get('p50', 0):.1f}/"
        f"{pruning.get('p99', 0):.1f}/{pruning.get('max', 0):.1f} ms; "
        f"{result['pruned_during_load']:,} records pruned meanwhile"
    )
