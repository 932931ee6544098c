"""Several webhookd instances on one PostgreSQL database (PostgreSQL only).

Each instance is its own `webhookd run` process with the same tenants and the same
postgresql:// URL; only `listen` differs. The producer spreads ingest over them, and the
owners of the tenants (the `leases` table joined with `instances`, whose `pid` is the
process's) are read with psql between phases, never while a figure is measured.

- cluster: two instances, batched end to end with ingest running (100 tenants, every
  tenant ingested through both), and an unbatched drain over 1,000 tenants (each paused,
  then resumed, on its owner). CPU is read from /proc for both daemons together and for
  PostgreSQL's processes; the machine's two cores are shared by everything, so CPU per
  webhook is the figure that says what a second machine would add.
- crosslatency: unbatched webhooks at 500/s, each ingested on the instance that does NOT
  own its tenant: the owner learns of it by LISTEN/NOTIFY. Latency from the producer's
  202 (and from its send) to the receiver's arrival stamp, on the same clock.
- failover: `kill -9` of one instance while the producer keeps ingesting on the other;
  for each tenant the killed one owned, the time from the kill to the first arrival of a
  webhook sent after it. With the default lease_seconds and a short one.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import load
from bench.context import MS, Context, expected_events, log_event, postmaster_pid, rate
from bench.harness import (
    CpuMeter,
    Daemon,
    Group,
    Pid,
    ProcTree,
    scratch_dir,
    tenant_names,
    tenant_tables,
)
from bench.report import Figure

DEFAULT_LEASE_S = 10.0  # the daemon's default lease_seconds
SHORT_LEASE_S = 2.0  # the shortest it accepts
BALANCE_TIMEOUT_S = 90.0

OWNERS = """
    SELECT l.tenant, i.pid FROM leases AS l JOIN instances AS i ON i.id = l.owner
    WHERE l.expires_at > now()"""


@dataclass
class Cluster:
    ctx: Context
    database: str
    daemons: list[Daemon]

    def owners(self) -> dict[str, Daemon]:
        """Each tenant's owner now, as the database has it."""
        assert self.ctx.postgres is not None
        by_pid = {daemon.proc.pid: daemon for daemon in self.daemons}
        owners: dict[str, Daemon] = {}
        for line in self.ctx.postgres.psql(OWNERS, self.database).splitlines():
            tenant, _, pid = line.partition("|")
            if int(pid) in by_pid:
                owners[tenant] = by_pid[int(pid)]
        return owners

    async def balanced(self, tenants: list[str]) -> dict[str, Daemon]:
        """Wait until every tenant has an owner and each live instance has its fair share."""
        live = [d for d in self.daemons if d.proc.proc.poll() is None]
        low, high = len(tenants) // len(live), -(-len(tenants) // len(live))
        deadline = time.monotonic() + BALANCE_TIMEOUT_S
        while True:
            owners = await asyncio.to_thread(self.owners)
            counts = [sum(1 for d in owners.values() if d is daemon) for daemon in live]
            if len(owners) == len(tenants) and all(low <= n <= high for n in counts):
                return owners
            if time.monotonic() > deadline:
                raise RuntimeError(f"tenants not balanced in {BALANCE_TIMEOUT_S:g} s: {counts}")
            await asyncio.sleep(0.2)

    def cpu(self) -> CpuMeter:
        """Both daemons together, PostgreSQL's processes, the receiver and the producer."""
        assert self.ctx.postgres is not None
        procs: dict[str, Pid] = {
            "daemon": Group(d.proc for d in self.daemons),
            "postgres": ProcTree(postmaster_pid(self.ctx.postgres)),
            "receiver": self.ctx.receiver.proc,
            "producer": self.ctx.me,
        }
        return CpuMeter(procs).start()


@contextlib.asynccontextmanager
async def cluster(
    ctx: Context,
    name: str,
    tables: dict[str, dict[str, Any]],
    *,
    count: int = 2,
    expected: frozenset[str] = frozenset(),
    **config: Any,
) -> AsyncIterator[Cluster]:
    """`count` instances on one fresh database, started one after the other, balanced."""
    assert ctx.postgres is not None
    server = ctx.postgres
    await ctx.receiver.reset(ctx.client)
    database = await asyncio.to_thread(server.create_database)
    config["database"] = server.database_url(database)
    daemons: list[Daemon] = []
    with scratch_dir(name) as directory:
        try:
            for index in range(count):
                folder = directory / f"instance{index}"
                folder.mkdir()
                daemons.append(await asyncio.to_thread(start, folder, tables, config))
            group = Cluster(ctx, database, daemons)
            await group.balanced(list(tables))
            yield group
        finally:
            problems = [line for d in daemons for line in d.problems()]
            await asyncio.gather(*(asyncio.to_thread(d.stop) for d in daemons))
            await asyncio.to_thread(server.drop_database, database)
            note_problems(ctx, name, problems, expected)


def start(folder: Path, tables: dict[str, dict[str, Any]], config: dict[str, Any]) -> Daemon:
    return Daemon(folder, tables, None, **config)


def note_problems(ctx: Context, name: str, lines: list[str], expected: frozenset[str]) -> None:
    counted = expected_events(lines, expected)
    problems = [line for line in lines if log_event(line) not in expected]
    details = ctx.report.details.setdefault(name, {})
    if counted:
        ctx.say(f"  instances logged, as expected: {counted}")
        details["daemon_log_expected"] = counted
    if problems:
        ctx.say(f"  ! instances logged {len(problems)} warning/error line(s), e.g.:")
        for line in problems[:3]:
            ctx.say(f"    {line[:300]}")
    details["daemon_log_problems"] = {"count": len(problems), "first": problems[:5]}


def per_thousand(meter: CpuMeter, items: int, proc: str) -> float | None:
    """CPU seconds a process (group) spent per 1,000 items over the meter's window."""
    seconds = meter.seconds.get(proc)
    return None if seconds is None or not items else 1000 * seconds / items


def by_owner(names: list[str], owners: dict[str, Daemon]) -> dict[Daemon, list[str]]:
    grouped: dict[Daemon, list[str]] = {}
    for tenant in names:
        grouped.setdefault(owners[tenant], []).append(tenant)
    return grouped


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


# -- two instances: throughput and CPU per webhook ------------------------------------------


async def cluster_throughput(ctx: Context) -> None:
    await two_e2e(ctx)
    await two_unbatched(ctx)


async def two_e2e(ctx: Context) -> None:
    name = "cluster_e2e"
    duration = ctx.size(15.0, 4.0)
    names = tenant_names(100)
    tables = tenant_tables(names, ctx.receiver, name, batching=True, batch_window=1.0)
    async with cluster(ctx, name, tables) as group:
        # Round robin over tenant × instance: each tenant is ingested through both.
        urls = [d.ingest_url(n) for n in names for d in group.daemons]
        meter = group.cpu()
        async with ctx.sampled(name, group.daemons[0]):
            started = time.time()
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
        final = await ctx.receiver.wait_total(ctx.client, loaded.items, 60.0)
    run_s = ended - started
    result = {
        "instances": 2,
        "seconds": run_s,
        "ingested": loaded.items,
        "ingest_per_s": loaded.items_per_s,
        "ingest_errors": loaded.errors,
        "delivered_in_run": at_end["total"],
        "per_s": rate(at_end["total"], run_s),
        "backlog_at_end": loaded.items - at_end["total"],
        "tail_s": max(0.0, (final["last_at"] or ended) - ended),
        "delivered_total": final["total"],
        "complete": final["total"] >= loaded.items,
        "disorder": final["disorder"],
        "cpu_percent": cpu,
        "daemons_cpu_s_per_1000": per_thousand(meter, loaded.items, "daemon"),
        "postgres_cpu_s_per_1000": per_thousand(meter, loaded.items, "postgres"),
    }
    ctx.report.details.setdefault(name, {}).update(result)
    ctx.report.figures.append(
        Figure(
            "e2e_batched_2i",
            "2 instances: batched end to end, ingest running",
            result["per_s"],
            "webhooks/s",
            "pg_rows",
            (">=", 20000.0),
            f"ingest {loaded.items_per_s:,.0f}/s over both",
            cpu["others"],
            1000 * (result["daemons_cpu_s_per_1000"] or 0),
            db_cpu_us=1000 * (result["postgres_cpu_s_per_1000"] or 0),
        )
    )
    ctx.say(
        f"  ingested {loaded.items:,} ({loaded.items_per_s:,.0f}/s, errors {loaded.errors}) "
        f"over 2 instances while delivering {result['per_s']:,.0f}/s; backlog at end "
        f"{result['backlog_at_end']:,}, caught up {result['tail_s']:.1f} s later; disorder "
        f"{result['disorder']}; cpu {cpu}; CPU s per 1,000 webhooks: daemons "
        f"{result['daemons_cpu_s_per_1000'] or 0:.3f}, postgres "
        f"{result['postgres_cpu_s_per_1000'] or 0:.3f}"
    )


async def two_unbatched(ctx: Context) -> None:
    name = "cluster_unbatched1000"
    per_tenant = ctx.size(30, 5)
    names = tenant_names(1000)
    tables = tenant_tables(names, ctx.receiver, name, batching=False)
    total = len(names) * per_tenant
    async with cluster(ctx, name, tables) as group:
        owners = await group.balanced(names)
        # A pause or resume acts on the owner's worker, so each goes to its owner.
        owned = by_owner(names, owners)
        await asyncio.gather(*(d.control(ctx.client, t, "pause") for d, t in owned.items()))
        # Each tenant's backlog in one request, through the instances in turn.
        daemons = group.daemons
        urls = [daemons[i % len(daemons)].ingest_url(n) for i, n in enumerate(names)]
        loaded = await load.closed_loop(
            urls,
            load.array_body(per_tenant),
            items_per_request=per_tenant,
            concurrency=8,
            ok_status=202,
            total_requests=len(names),
        )
        if loaded.errors:
            raise RuntimeError(f"{name}: preload failed: {loaded.error_samples}")
        ctx.say(f"  preloaded {loaded.items:,} webhooks through both instances")
        await ctx.receiver.reset(ctx.client)
        meter = group.cpu()
        started = time.time()
        await asyncio.gather(*(d.control(ctx.client, t, "resume") for d, t in owned.items()))
        stats = await ctx.receiver.wait_total(ctx.client, total, 120.0)
        cpu = meter.stop()
    elapsed = (stats["last_at"] or time.time()) - started
    delivered = stats["total"]
    result = {
        "instances": 2,
        "tenants": len(names),
        "owned": [len(t) for t in owned.values()],
        "backlog": total,
        "delivered": delivered,
        "complete": delivered >= total,
        "seconds": elapsed,
        "per_s": rate(delivered, elapsed),
        "disorder": stats["disorder"],
        "cpu_percent": cpu,
        "daemons_cpu_s_per_1000": per_thousand(meter, delivered, "daemon"),
        "postgres_cpu_s_per_1000": per_thousand(meter, delivered, "postgres"),
    }
    ctx.report.details.setdefault(name, {}).update(result)
    ctx.report.figures.append(
        Figure(
            "unbatched_1000_2i",
            "2 instances: unbatched drain, 1000 tenants",
            result["per_s"],
            "webhooks/s",
            "pg_commits8",
            (">=", 3000.0),
            f"backlog {total:,}",
            cpu["others"],
            1000 * (result["daemons_cpu_s_per_1000"] or 0),
            db_cpu_us=1000 * (result["postgres_cpu_s_per_1000"] or 0),
        )
    )
    partial = "" if result["complete"] else f" (timed out: {delivered:,}/{total:,})"
    ctx.say(
        f"  drained {delivered:,} in {elapsed:.2f} s: {result['per_s']:,.0f} webhooks/s"
        f"{partial}, owners {result['owned']}; disorder {stats['disorder']}; cpu {cpu}; CPU s "
        f"per 1,000 webhooks: daemons {result['daemons_cpu_s_per_1000'] or 0:.3f}, postgres "
        f"{result['postgres_cpu_s_per_1000'] or 0:.3f}"
    )


# -- wake-ups across instances ---------------------------------------------------------------


async def cross_latency(ctx: Context) -> None:
    name = "crosslatency"
    duration = ctx.size(10.0, 3.0)
    per_s = 500.0
    names = tenant_names(50)
    tables = tenant_tables(names, ctx.receiver, name, batching=False)
    async with cluster(ctx, name, tables) as group:
        owners = await group.balanced(names)
        a, b = group.daemons
        # Every webhook goes in through the instance that does not deliver it.
        urls = [(b if owners[n] is a else a).ingest_url(n) for n in names]
        meter = group.cpu()
        async with ctx.sampled(name, a):  # --profile: the first instance (half the owners)
            sent = await load.paced(lambda k: urls[k % len(urls)], rate=per_s, duration=duration)
        stats = await ctx.receiver.wait_total(ctx.client, sent.sent - sent.errors, 15.0)
        cpu = meter.stop()
        arrivals = dict((await ctx.receiver.stats(ctx.client, arrivals=True))["arrivals"])
    from_ack = sorted(arrivals[k] - acked for k, acked in sent.acked_at.items() if k in arrivals)
    lat = stats["latency"] or {}
    result = {
        "rate": per_s,
        "seconds": sent.elapsed,
        "sent": sent.sent,
        "errors": sent.errors,
        "delivered": stats["total"],
        "missing": sum(1 for k in sent.acked_at if k not in arrivals),
        "disorder": stats["disorder"],
        "producer_behind_max_ms": sent.behind_max * MS,
        "send_to_arrival_ms": {k: (v * MS if k != "count" else v) for k, v in lat.items()},
        "ack_to_arrival_ms": {
            "p50": percentile(from_ack, 0.5) * MS,
            "p90": percentile(from_ack, 0.9) * MS,
            "p99": percentile(from_ack, 0.99) * MS,
            "max": percentile(from_ack, 1.0) * MS,
            # A negative figure: the webhook arrived before the producer had its 202.
            "arrived_before_ack": sum(1 for v in from_ack if v < 0),
        },
        "cpu_percent": cpu,
        "daemons_cpu_s_per_1000": per_thousand(meter, stats["total"], "daemon"),
        "postgres_cpu_s_per_1000": per_thousand(meter, stats["total"], "postgres"),
    }
    ctx.report.details.setdefault(name, {}).update(result)
    ack = result["ack_to_arrival_ms"]
    p50, p99 = lat.get("p50", 0.0) * MS, lat.get("p99", 0.0) * MS
    for key, label, value, target in (
        ("latency_cross_p50", "2 instances: cross-instance latency p50 @500/s", p50, None),
        ("latency_cross_p99", "2 instances: cross-instance latency p99 @500/s", p99, 20.0),
        ("latency_cross_ack_p99", "— from the 202 to arrival, p99", ack["p99"], 20.0),
    ):
        ctx.report.figures.append(
            Figure(
                key,
                label,
                value,
                "ms",
                target=None if target is None else ("<", target),
                background=cpu["others"],
                steal=cpu["steal"],
                cpu_us=1000 * (result["daemons_cpu_s_per_1000"] or 0),
                db_cpu_us=1000 * (result["postgres_cpu_s_per_1000"] or 0),
            )
        )
    ctx.say(
        f"  {stats['total']:,}/{sent.sent:,} delivered (missing {result['missing']}), each "
        f"ingested on the instance that does not own its tenant: send→arrival p50 {p50:.1f} "
        f"ms, p99 {p99:.1f} ms, max {lat.get('max', 0) * MS:.1f} ms; 202→arrival p50 "
        f"{ack['p50']:.1f} ms, p99 {ack['p99']:.1f} ms ({ack['arrived_before_ack']} arrived "
        f"before their 202); cpu {cpu}"
    )


# -- failover ----------------------------------------------------------------------------------


async def failover(ctx: Context) -> None:
    leases = [SHORT_LEASE_S] if ctx.quick else [DEFAULT_LEASE_S, SHORT_LEASE_S]
    for lease in leases:
        await failover_once(ctx, lease)


async def failover_once(ctx: Context, lease: float) -> None:
    name = f"failover_lease{lease:g}"
    per_s = 200.0
    before = 2.0
    duration = before + 2 * lease + 4.0
    names = tenant_names(20)
    tables = tenant_tables(names, ctx.receiver, name, batching=False)
    async with cluster(ctx, name, tables, lease_seconds=lease) as group:
        owners = await group.balanced(names)
        victim, survivor = group.daemons
        orphans = {n for n in names if owners[n] is victim}
        urls = [survivor.ingest_url(n) for n in names]
        load_task = asyncio.create_task(
            load.paced(lambda k: urls[k % len(urls)], rate=per_s, duration=duration)
        )
        await asyncio.sleep(before)
        killed_at = time.time()
        victim.proc.proc.kill()
        await asyncio.to_thread(victim.proc.proc.wait)
        sent = await load_task
        await ctx.receiver.wait_total(ctx.client, sent.sent - sent.errors, 3 * lease + 10.0)
        stats = await ctx.receiver.stats(ctx.client, arrivals=True)
    arrivals = dict(stats["arrivals"])
    again: dict[str, float] = {}
    for k, sent_at in sent.sent_at.items():
        tenant = names[k % len(names)]
        if tenant in orphans and sent_at > killed_at and k in arrivals:
            again[tenant] = min(again.get(tenant, float("inf")), arrivals[k] - killed_at)
    waits = sorted(again.values())
    result = {
        "lease_seconds": lease,
        "tenants": len(names),
        "orphaned": len(orphans),
        "delivering_again": len(again),
        "failover_s": {
            "first": waits[0] if waits else None,
            "median": statistics.median(waits) if waits else None,
            "last": waits[-1] if waits else None,
        },
        "sent": sent.sent,
        "errors": sent.errors,
        "missing": sum(1 for k in sent.acked_at if k not in arrivals),
        "disorder": stats["disorder"],  # re-sends of what the killed one had in flight
    }
    ctx.report.details.setdefault(name, {}).update(result)
    last = waits[-1] if len(waits) == len(orphans) and waits else float("nan")
    ctx.report.figures.append(
        Figure(
            f"failover_{lease:g}s",
            f"2 instances: failover after kill -9, lease_seconds {lease:g}",
            last,
            "s",
            target=("<=", 2 * lease),
            note=f"all {len(orphans)} orphaned tenants delivering again",
        )
    )
    ctx.say(
        f"  lease_seconds {lease:g}: killed the owner of {len(orphans)} of {len(names)} tenants; "
        f"{len(again)} delivering again on the other after {waits[0] if waits else 0:.2f} s "
        f"(first) to {waits[-1] if waits else 0:.2f} s (last), median "
        f"{result['failover_s']['median'] or 0:.2f} s; {sent.sent:,} sent, {sent.errors} "
        f"refused, {result['missing']} acknowledged but missing, re-sends {stats['disorder']}"
    )
