"""(b) Delivery throughput: draining a paused backlog, and batched end to end under ingest.

Timing of deliveries uses the receiver's own arrival stamps (`time.time()`, the same clock
as the producer's), so polling /stats never adds its interval to a result.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench import load
from bench.context import MS, Context, mean_attempt_ms, per_item_us, rate, system_share
from bench.harness import Daemon, tenant_names, tenant_tables
from bench.report import Figure


async def preload(
    ctx: Context, daemon: Daemon, names: list[str], per_tenant: int, per_request: int
) -> load.LoadResult:
    """Queue `per_tenant` webhooks for every (paused) tenant, in arrays of `per_request`."""
    assert per_tenant % per_request == 0
    urls = [daemon.ingest_url(n) for n in names]
    return await load.closed_loop(
        urls,
        load.array_body(per_request),
        items_per_request=per_request,
        concurrency=8,
        ok_status=202,
        total_requests=len(names) * per_tenant // per_request,
    )


async def drain(
    ctx: Context,
    name: str,
    *,
    tenants: int,
    per_tenant: int,
    per_request: int,
    batching: bool,
    timeout: float,
    **options: Any,
) -> dict[str, Any]:
    """Preload a paused backlog, resume every tenant, time until the receiver has it all.
    `options`: more keys for every tenant's table."""
    names = tenant_names(tenants)
    tables = tenant_tables(names, ctx.receiver, name, batching=batching, **options)
    total = tenants * per_tenant
    async with ctx.daemon(name, tables) as daemon:
        await daemon.control(ctx.client, names, "pause")
        loaded = await preload(ctx, daemon, names, per_tenant, per_request)
        if loaded.errors:
            raise RuntimeError(f"{name}: preload failed: {loaded.error_samples}")
        ctx.say(
            f"  preloaded {loaded.items:,} webhooks for {tenants} paused tenant(s) at "
            f"{loaded.items_per_s:,.0f}/s"
        )
        await ctx.receiver.reset(ctx.client)
        meter = ctx.cpu(daemon)
        async with ctx.sampled(name, daemon):
            started = time.time()
            await daemon.control(ctx.client, names, "resume")
            resumed_s = time.time() - started
            stats = await ctx.receiver.wait_total(ctx.client, total, timeout)
        cpu = meter.stop()
        attempt_ms = await mean_attempt_ms(ctx.client, daemon)
    elapsed = (stats["last_at"] or time.time()) - started
    delivered = stats["total"]
    result = {
        "tenants": tenants,
        "backlog": total,
        "delivered": delivered,
        "complete": delivered >= total,
        "seconds": elapsed,
        "per_s": rate(delivered, elapsed),
        "requests": stats["requests"],
        "disorder": stats["disorder"],
        "resume_calls_s": resumed_s,
        # The daemon's own histogram: connect to last byte of each delivery request.
        "mean_attempt_ms": attempt_ms,
        "mean_cycle_ms_per_tenant": MS * elapsed * tenants / max(1, stats["requests"]),
        "preload_per_s": loaded.items_per_s,
        "cpu_percent": cpu,
        "daemon_cpu_us_per_webhook": per_item_us(meter, delivered),
        "postgres_cpu_us_per_webhook": per_item_us(meter, delivered, "postgres"),
        "daemon_system_cpu_share": system_share(meter),
    }
    ctx.report.details.setdefault(name, {}).update(result)
    partial = "" if result["complete"] else f" (timed out: {delivered:,}/{total:,})"
    ctx.say(
        f"  drained {delivered:,} in {elapsed:.2f} s: {result['per_s']:,.0f} webhooks/s"
        f"{partial}; {stats['requests']:,} requests, disorder {stats['disorder']}; cpu {cpu}"
    )
    ctx.say(
        f"  per tenant, one attempt every {result['mean_cycle_ms_per_tenant']:.2f} ms, of which "
        f"the HTTP request took {attempt_ms:.2f} ms (daemon's delivery-duration histogram); "
        f"daemon CPU {result['daemon_cpu_us_per_webhook'] or 0:.0f} µs/webhook, "
        f"{100 * (result['daemon_system_cpu_share'] or 0):.0f} % of it in the kernel"
    )
    return result


async def drain_batched(ctx: Context) -> None:
    result = await drain(
        ctx,
        "drain",
        tenants=100,
        per_tenant=ctx.size(2000, 200),
        per_request=100,
        batching=True,
        timeout=120.0,
    )
    ctx.report.figures.append(
        Figure(
            "drain_batched",
            "batched drain, 100 tenants",
            result["per_s"],
            "webhooks/s",
            "receiver_webhooks",
            (">=", 30000.0),
            f"backlog {result['backlog']:,}",
            result["cpu_percent"]["others"],
            result["daemon_cpu_us_per_webhook"],
            db_cpu_us=result["postgres_cpu_us_per_webhook"],
        )
    )


async def unbatched_one(ctx: Context) -> None:
    result = await drain(
        ctx,
        "unbatched1",
        tenants=1,
        per_tenant=ctx.size(10000, 1000),
        per_request=100,
        batching=False,
        timeout=90.0,
    )
    ctx.report.figures.append(
        Figure(
            "unbatched_1",
            "unbatched drain, 1 tenant",
            result["per_s"],
            "webhooks/s",
            "sqlite_commits",
            None,
            f"backlog {result['backlog']:,}",
            result["cpu_percent"]["others"],
            result["daemon_cpu_us_per_webhook"],
            db_cpu_us=result["postgres_cpu_us_per_webhook"],
        )
    )


async def unbatched_many(ctx: Context) -> None:
    result = await drain(
        ctx,
        "unbatched1000",
        tenants=1000,
        per_tenant=ctx.size(30, 5),
        per_request=ctx.size(30, 5),
        batching=False,
        timeout=90.0,
    )
    ctx.report.figures.append(
        Figure(
            "unbatched_1000",
            "unbatched drain, 1000 tenants",
            result["per_s"],
            "webhooks/s",
            "receiver_requests",
            (">=", 2500.0),
            f"backlog {result['backlog']:,}",
            result["cpu_percent"]["others"],
            result["daemon_cpu_us_per_webhook"],
            db_cpu_us=result["postgres_cpu_us_per_webhook"],
        )
    )


async def e2e_batched(ctx: Context) -> None:
    result = await end_to_end(ctx, "e2e")
    cpu = result["cpu_percent"]
    ctx.report.figures.append(
        Figure(
            "e2e_batched",
            "batched end to end, ingest running",
            result["per_s"],
            "webhooks/s",
            "receiver_webhooks",
            (">=", 15000.0),
            f"ingest {result['ingest_per_s']:,.0f}/s",
            cpu["others"],
            result["daemon_cpu_us_per_webhook"],  # each webhook is ingested and delivered
            db_cpu_us=result["postgres_cpu_us_per_webhook"],
        )
    )


async def end_to_end(ctx: Context, name: str, **options: Any) -> dict[str, Any]:
    """Batched end to end over 100 tenants, ingest running; `options`: more keys for
    every tenant's table."""
    duration = ctx.size(15.0, 4.0)
    names = tenant_names(100)
    # A short window only shortens the tail (the last partial batches); under load every
    # batch fills to 100 long before any window.
    tables = tenant_tables(names, ctx.receiver, name, batching=True, batch_window=1.0, **options)
    async with ctx.daemon(name, tables) as daemon:
        urls = [daemon.ingest_url(n) for n in names]
        meter = ctx.cpu(daemon)
        warm = duration / 5

        async def sample_after_warmup() -> tuple[float, int]:
            await asyncio.sleep(warm)
            return time.time(), (await ctx.receiver.stats(ctx.client))["total"]

        async with ctx.sampled(name, daemon):
            started = time.time()
            warm_sample = asyncio.create_task(sample_after_warmup())
            loaded = await load.closed_loop(
                urls,
                load.array_body(100),
                items_per_request=100,
                concurrency=8,
                ok_status=202,
                duration=duration,
            )
            ended = time.time()
            at_end = await ctx.receiver.stats(ctx.client)
        cpu = meter.stop()
        warm_at, warm_total = await warm_sample
        final = await ctx.receiver.wait_total(ctx.client, loaded.items, 60.0)
    run_s = ended - started
    delivered_in_run = at_end["total"]
    result = {
        "seconds": run_s,
        "ingested": loaded.items,
        "ingest_per_s": loaded.items_per_s,
        "ingest_errors": loaded.errors,
        "delivered_in_run": delivered_in_run,
        "per_s": rate(delivered_in_run, run_s),
        "steady_per_s": rate(delivered_in_run - warm_total, ended - warm_at),
        "backlog_at_end": loaded.items - delivered_in_run,
        "tail_s": max(0.0, (final["last_at"] or ended) - ended),
        "delivered_total": final["total"],
        "complete": final["total"] >= loaded.items,
        "disorder": final["disorder"],
        "cpu_percent": cpu,
        "daemon_cpu_us_per_webhook": per_item_us(meter, loaded.items),
        "postgres_cpu_us_per_webhook": per_item_us(meter, loaded.items, "postgres"),
    }
    ctx.report.details[name] = {**ctx.report.details.get(name, {}), **result}
    ctx.say(
        f"  ingested {loaded.items:,} ({loaded.items_per_s:,.0f}/s) while delivering "
        f"{result['per_s']:,.0f}/s (after warm-up {result['steady_per_s']:,.0f}/s); backlog at "
        f"end {result['backlog_at_end']:,}, caught up {result['tail_s']:.1f} s later; "
        f"disorder {result['disorder']}; cpu {cpu}"
    )
    return result
