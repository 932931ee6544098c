"""(a) Durable ingest with delivery held: every tenant paused before the load starts."""

from __future__ import annotations

from typing import Any

from bench import load
from bench.context import Context, per_item_us, system_share
from bench.harness import tenant_names, tenant_tables
from bench.report import Figure


async def ingest(ctx: Context) -> None:
    duration = ctx.size(6.0, 1.5)
    names = tenant_names(100)
    tenants = tenant_tables(names, ctx.receiver, "ingest")
    async with ctx.daemon("ingest", tenants, durability="full") as daemon:
        # Paused, not disabled: a disabled tenant answers `disabled` without storing.
        await daemon.control(ctx.client, names, "pause")
        urls = [daemon.ingest_url(n) for n in names]
        details: dict[str, Any] = {}
        for key, label, per_request, clients, target, ceiling in (
            (
                "ingest_single",
                "ingest, 1-event requests (64 clients)",
                1,
                64,
                4000.0,
                "receiver_requests",
            ),
            (
                "ingest_array",
                "ingest, 100-event arrays (8 clients)",
                100,
                8,
                25000.0,
                "sqlite_rows",
            ),
        ):
            body = load.event_body() if per_request == 1 else load.array_body(per_request)
            meter = ctx.cpu(daemon)
            async with ctx.sampled(key, daemon):
                result = await load.closed_loop(
                    urls,
                    body,
                    items_per_request=per_request,
                    concurrency=clients,
                    ok_status=202,
                    duration=duration,
                )
            cpu = meter.stop()
            ctx.report.figures.append(
                Figure(
                    key,
                    label,
                    result.items_per_s,
                    "events/s",
                    ceiling,
                    (">=", target),
                    background=cpu["others"],
                    cpu_us=per_item_us(meter, result.items),
                    db_cpu_us=per_item_us(meter, result.items, "postgres"),
                )
            )
            details[key] = {
                "events": result.items,
                "requests_per_s": result.requests_per_s,
                "errors": result.errors,
                "error_samples": result.error_samples,
                "cpu_percent": cpu,
                "daemon_cpu_us_per_event": per_item_us(meter, result.items),
                "postgres_cpu_us_per_event": per_item_us(meter, result.items, "postgres"),
                "daemon_system_cpu_share": system_share(meter),
            }
            ctx.say(
                f"  {label}: {result.items_per_s:,.0f} events/s "
                f"({result.requests_per_s:,.0f} req/s, {result.errors} errors; cpu {cpu})"
            )
        stats = await ctx.receiver.stats(ctx.client)
        details["delivered_while_paused"] = stats["total"]
        ctx.report.details.setdefault("ingest", {}).update(details)
