"""(c) Ingest-to-delivery latency at a steady rate, and (e) what idle tenants cost."""

from __future__ import annotations

import asyncio
import time

from bench import load
from bench.context import MS, Context, per_item_us, system_share
from bench.harness import tenant_names, tenant_tables
from bench.report import Figure


async def latency(ctx: Context) -> None:
    duration = ctx.size(10.0, 3.0)
    per_s = 500.0
    names = tenant_names(50)
    tables = tenant_tables(names, ctx.receiver, "latency", batching=False)
    async with ctx.daemon("latency", tables) as daemon:
        urls = [daemon.ingest_url(n) for n in names]
        meter = ctx.cpu(daemon)
        async with ctx.sampled("latency", daemon):
            sent = await load.paced(lambda k: urls[k % len(urls)], rate=per_s, duration=duration)
        stats = await ctx.receiver.wait_total(ctx.client, sent.sent - sent.errors, 15.0)
        cpu = meter.stop()
        rss = daemon.proc.rss_bytes()
    lat = stats["latency"] or {}
    trips = sorted(sent.round_trips)

    def trip(fraction: float) -> float:
        return trips[min(len(trips) - 1, int(fraction * len(trips)))] * MS if trips else 0.0

    result = {
        "rate": per_s,
        "seconds": sent.elapsed,
        "sent": sent.sent,
        "errors": sent.errors,
        "delivered": stats["total"],
        "disorder": stats["disorder"],
        "producer_behind_max_ms": sent.behind_max * MS,
        "latency_ms": {k: (v * MS if k != "count" else v) for k, v in lat.items()},
        "ingest_round_trip_ms": {"p50": trip(0.5), "p99": trip(0.99), "max": trip(1.0)},
        "cpu_percent": cpu,
        "daemon_cpu_us_per_webhook": per_item_us(meter, stats["total"]),
        "postgres_cpu_us_per_webhook": per_item_us(meter, stats["total"], "postgres"),
        "daemon_system_cpu_share": system_share(meter),
        "daemon_rss_mb": rss / 2**20,
    }
    ctx.report.details["latency"] = {**ctx.report.details.get("latency", {}), **result}
    p50, p99 = lat.get("p50", 0.0) * MS, lat.get("p99", 0.0) * MS
    ctx.report.figures.append(
        Figure(
            "latency_p50",
            "unbatched latency p50 @500/s",
            p50,
            "ms",
            "commit_p50",  # a floor rather than a ceiling: ingest answers after its commit
            background=cpu["others"],
            steal=cpu["steal"],
        )
    )
    ctx.report.figures.append(
        Figure(
            "latency_p99",
            "unbatched latency p99 @500/s",
            p99,
            "ms",
            "commit_p99",
            target=("<", 20.0),
            background=cpu["others"],
            steal=cpu["steal"],
            cpu_us=per_item_us(meter, stats["total"]),
            db_cpu_us=per_item_us(meter, stats["total"], "postgres"),
        )
    )
    ctx.say(
        f"  {stats['total']:,}/{sent.sent:,} delivered; ingest→delivery p50 {p50:.1f} ms, "
        f"p90 {lat.get('p90', 0) * MS:.1f} ms, p99 {p99:.1f} ms, max {lat.get('max', 0) * MS:.1f}"
        f" ms; ingest round trip p50 {trip(0.5):.1f} ms p99 {trip(0.99):.1f} ms; cpu {cpu}; "
        f"daemon {result['daemon_cpu_us_per_webhook'] or 0:.0f} µs per webhook in and out, "
        f"{100 * (result['daemon_system_cpu_share'] or 0):.0f} % of it in the kernel"
    )


async def idle(ctx: Context) -> None:
    count = ctx.size(10000, 2000)
    window = ctx.size(5.0, 2.0)
    async with ctx.daemon("idle-baseline", tenant_tables(["solo"], ctx.receiver, "idle")) as one:
        await asyncio.sleep(1.0)
        baseline_rss = one.proc.rss_bytes()
    names = tenant_names(count)
    async with ctx.daemon("idle", tenant_tables(names, ctx.receiver, "idle")) as daemon:
        await asyncio.sleep(2.0)  # let every worker reach its first wait
        meter = ctx.cpu(daemon)
        await asyncio.sleep(window)
        cpu = meter.stop()
        cpu_percent = cpu["daemon"]
        rss = daemon.proc.rss_bytes()
        started = time.perf_counter()
        async with ctx.client.get(f"{daemon.base}/v1/status") as response:
            await response.read()
        status_ms = (time.perf_counter() - started) * MS
    per_tenant_kb = (rss - baseline_rss) / count / 1024
    result = {
        "tenants": count,
        "window_s": window,
        "cpu_percent": cpu_percent,
        "rss_mb": rss / 2**20,
        "baseline_rss_mb": baseline_rss / 2**20,
        "per_tenant_kb": per_tenant_kb,
        "startup_s": daemon.startup_s,
        "status_all_ms": status_ms,
    }
    ctx.report.details["idle"] = {**ctx.report.details.get("idle", {}), **result}
    label = f"{count:,} idle tenants"
    ctx.report.figures.append(
        Figure(
            "idle_cpu",
            f"{label}: CPU",
            cpu_percent,
            "%",
            target=("<", 1.0),
            background=cpu["others"],
            steal=cpu["steal"],
        )
    )
    ctx.report.figures.append(
        Figure(
            "idle_rss",
            f"{label}: RSS",
            rss / 2**20,
            "MiB",
            None,
            None,
            f"{per_tenant_kb:.1f} KiB/tenant over a 1-tenant daemon",
        )
    )
    ctx.say(
        f"  {count:,} tenants: CPU {cpu_percent:.2f} % over {window:g} s, RSS "
        f"{rss / 2**20:.0f} MiB (1-tenant daemon {baseline_rss / 2**20:.0f} MiB, "
        f"{per_tenant_kb:.1f} KiB/tenant); started in {daemon.startup_s:.1f} s; "
        f"GET /v1/status {status_ms:.0f} ms"
    )
