"""Sustained load: a paced 5,000 events/s for 60 s across 1,000 tenants, some endpoints bad.

80 % of the tenants batch (batch_window 1.0 s), 20 % do not. 10 % of the endpoints answer
503 to everything (under /fail/; retried after 1 s, 2 s, then every 4 s), 5 % answer 200
after 2 s (under /slow/: inside both timeouts). The rest are healthy (under /ok/).

The producer is open loop with bounded concurrency: request j leaves when the events before
it are due at the target rate, on whichever of `CLIENTS` connections is free; when all are
waiting for answers, it leaves late and the lag is reported. It sends with webhookd's own
HTTP client (webhookd.http1), which costs half the CPU of aiohttp's, so that the producer
takes less of the two shared cores from the daemon. Requests are single events or small
arrays; every event carries `t` (time.time() at send) and its phase `p`, so the
receiver measures ingest→delivery per group and phase.

A short control phase first runs the same load with every endpoint healthy, so the healthy
tenants' latency can be compared with and without failing and slow neighbours. After the
main phase: ingest stops, the receiver heals /fail/ and /slow/, POST /v1/retry, and every
acknowledged (tenant, sequence) must arrive, in order, exactly once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench import load
from bench.context import MS, Context, per_item_us, rate
from bench.harness import EVENT, Daemon, tenant_names, tenant_tables
from bench.receiver import DEFAULT_FAIL_STATUS, DEFAULT_SLOW_S, percentiles
from bench.report import Figure
from webhookd import http1

MIB = 2**20
RATE_TARGET = 5000.0  # events/s
CLIENTS = 128  # concurrent producer connections
LATE_S = 0.1  # a request leaving later than this after its due time is late
BATCH_WINDOW = 1.0
RSS_EVERY_S = 5.0
SINGLE_SHARE = 0.5  # of requests; the others carry 2-10 events
ARRAY_SIZES = (2, 10)
RECOVERY_BUDGET_S = 90.0


@dataclass(frozen=True)
class Tenant:
    name: str
    behaviour: str  # ok | fail | slow (the receiver's path prefix)
    batching: bool

    @property
    def group(self) -> str:
        return f"/{self.behaviour}/{'batched' if self.batching else 'single'}"

    @property
    def path(self) -> str:
        return f"{self.group}/{self.name}"


def roles(count: int) -> list[Tenant]:
    """Every 5th tenant unbatched; in each block of 5, its role: 1 block in 10 fails, 1 in 20
    is slow. So failing and slow tenants are batched or not in the same 80/20 proportion."""
    tenants = []
    for index, name in enumerate(tenant_names(count)):
        block = index // 5
        behaviour = "fail" if block % 10 == 1 else "slow" if block % 20 == 3 else "ok"
        tenants.append(Tenant(name, behaviour, batching=index % 5 != 0))
    return tenants


def tables(ctx: Context, tenants: list[Tenant]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for tenant in tenants:
        options: dict[str, Any] = {"batching": tenant.batching}
        if tenant.batching:
            options["batch_window"] = BATCH_WINDOW
        result.update(tenant_tables([tenant.name], ctx.receiver, tenant.group[1:], **options))
    return result


# -- the producer --------------------------------------------------------------------------------


@dataclass
class Phase:
    """What the producer saw during one paced phase."""

    name: str
    events_due: int = 0  # what the schedule asked for in the phase
    events_sent: int = 0
    events_acked: int = 0
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    round_trips: list[float] = field(default_factory=list)
    behind_max: float = 0.0
    late_requests: int = 0  # left more than LATE_S after their due time
    elapsed: float = 0.0


class Producer:
    """Paced ingest over `CLIENTS` connections; remembers every acknowledged sequence."""

    def __init__(self, daemon: Daemon, tenants: list[Tenant]):
        # webhookd's own delivery client: half the CPU of aiohttp's per request, which
        # leaves the shared cores to the daemon (the producer is not what is measured).
        self.client = load.lean_client(keep_bodies=True)
        self.targets = [http1.parse_target(daemon.ingest_url(t.name)) for t in tenants]
        self.names = [t.name for t in tenants]
        self.rng = random.Random(20261125)
        self.last_sequence: dict[str, int] = dict.fromkeys(self.names, 0)
        self.acked: dict[str, int] = dict.fromkeys(self.names, 0)

    def plan(self, per_s: float, duration: float) -> Iterator[tuple[float, int, int]]:
        """(due offset, tenant index, event count) for each request, in due order."""
        events = 0
        while True:
            due = events / per_s
            if due >= duration:
                return
            single = self.rng.random() < SINGLE_SHARE
            count = 1 if single else self.rng.randint(*ARRAY_SIZES)
            yield due, self.rng.randrange(len(self.targets)), count
            events += count

    async def run(self, name: str, per_s: float, duration: float) -> Phase:
        phase = Phase(name)
        plan = self.plan(per_s, duration)
        started = time.perf_counter()

        async def connection() -> None:
            # One shared plan: each connection takes the next request, waits for its due
            # time, sends, and takes the next one only after the answer. The phase ends on
            # the clock: what is still unsent then is the shortfall, not sent late. (A request
            # due just before the end may leave just after it, if no more than LATE_S late.)
            for due, index, count in plan:
                phase.events_due += count
                if time.perf_counter() - started >= max(duration, due + LATE_S):
                    return
                phase.events_sent += count
                delay = started + due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    phase.behind_max = max(phase.behind_max, -delay)
                    if delay < -LATE_S:
                        phase.late_requests += 1
                await self.send(phase, index, count)

        await asyncio.gather(*(connection() for _ in range(CLIENTS)))
        phase.elapsed = time.perf_counter() - started
        phase.events_due += sum(count for _, _, count in plan)
        return phase

    async def send(self, phase: Phase, index: int, count: int) -> None:
        sent = time.time()
        data = {"t": sent, "p": phase.name}
        if count == 1:
            body = orjson.dumps({"event": EVENT, "data": data})
        else:
            body = orjson.dumps([{"event": EVENT, "data": data}] * count)
        target = self.targets[index]
        head = load.request_head(target, len(body), {})
        try:
            async with asyncio.timeout(load.TIMEOUT_S):
                response = await self.client.post(target, head, body)
            answer, status = response.body, response.status
        except (http1.HTTPError, OSError, TimeoutError) as exc:
            status, answer, reason = 0, b"", f"{type(exc).__name__}: {exc}"
        else:
            reason = f"HTTP {status}: {answer[:200]!r}"
        phase.requests += 1
        if status != 202:
            phase.errors += 1
            if len(phase.error_samples) < 5:
                phase.error_samples.append(reason)
            return
        phase.round_trips.append(time.time() - sent)
        name = self.names[index]
        for item in orjson.loads(answer)["webhooks"]:
            if item["status"] == "queued":
                phase.events_acked += 1
                self.acked[name] += 1
                self.last_sequence[name] = max(self.last_sequence[name], item["sequence"])

    @property
    def total_acked(self) -> int:
        return sum(self.last_sequence.values())


# -- measuring around it -------------------------------------------------------------------------


async def sample_rss(daemon: Daemon, samples: list[tuple[float, float]], began: float) -> None:
    """Every RSS_EVERY_S: (seconds since `began`, daemon RSS MiB), until cancelled."""
    while True:
        samples.append((round(time.monotonic() - began, 1), daemon.proc.rss_bytes() / MIB))
        await asyncio.sleep(RSS_EVERY_S)


async def attempt_durations(ctx: Context, daemon: Daemon) -> dict[str, float]:
    """The daemon's delivery-duration histogram: cumulative count per bucket, sum, count."""
    async with ctx.client.get(f"{daemon.base}/metrics") as response:
        text = await response.text()
    found: dict[str, float] = {}
    prefix = "webhookd_delivery_duration_seconds"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith(prefix + "_bucket"):
            found["le " + name.split('le="', 1)[1].split('"', 1)[0]] = float(value)
        elif name in (prefix + "_sum", prefix + "_count"):
            found[name.rsplit("_", 1)[1]] = float(value)
    return found


def duration_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Delivery attempts in a phase: their count, mean ms, and the share within some bounds."""
    count = after.get("count", 0.0) - before.get("count", 0.0)
    summary = {
        "attempts": count,
        "mean_ms": MS * (after.get("sum", 0.0) - before.get("sum", 0.0)) / count if count else 0.0,
    }
    for bound in ("0.01", "0.05", "0.25", "1.0", "2.5"):
        key = f"le {bound}"
        within = after.get(key, 0.0) - before.get(key, 0.0)
        summary[f"share_within_{float(bound) * MS:g}ms"] = within / count if count else 0.0
    return summary


async def run_phase(
    ctx: Context,
    daemon: Daemon,
    producer: Producer,
    name: str,
    per_s: float,
    duration: float,
) -> dict[str, Any]:
    before = await ctx.receiver.stats(ctx.client, latency=False)
    durations = await attempt_durations(ctx, daemon)
    rss: list[tuple[float, float]] = []
    began = time.monotonic()
    sampler = asyncio.create_task(sample_rss(daemon, rss, began))
    meter = ctx.cpu(daemon)
    try:
        async with ctx.sampled(f"sustained-{name}", daemon):
            phase = await producer.run(name, per_s, duration)
    finally:
        sampler.cancel()
    cpu = meter.stop()
    after = await ctx.receiver.stats(ctx.client, latency=False)
    attempts = duration_summary(durations, await attempt_durations(ctx, daemon))
    rss.append((round(time.monotonic() - began, 1), daemon.proc.rss_bytes() / MIB))
    delivered = after["total"] - before["total"]
    trips = sorted(phase.round_trips)
    return {
        "phase": phase,
        # Ingest is counted over the scheduled window (events answered on schedule at the
        # target rate make exactly the target); deliveries over the measured time.
        "window_s": duration,
        "seconds": phase.elapsed,
        "events_due": phase.events_due,
        "events_sent": phase.events_sent,
        "events_acked": phase.events_acked,
        "ingest_per_s": rate(phase.events_acked, duration),
        "requests": phase.requests,
        "requests_per_s": rate(phase.requests, duration),
        "errors": phase.errors,
        "error_samples": phase.error_samples,
        "producer_behind_max_s": phase.behind_max,
        "late_requests": phase.late_requests,
        "ingest_round_trip_ms": {
            k: (v * MS if k != "count" else v) for k, v in (percentiles(trips) or {}).items()
        },
        "delivered": delivered,
        "delivered_per_s": rate(delivered, phase.elapsed),
        "delivery_requests_per_s": rate(after["requests"] - before["requests"], phase.elapsed),
        "rejected_requests": after["rejected_requests"] - before["rejected_requests"],
        "delivery_attempts": attempts,
        "cpu_percent": cpu,
        "daemon_cpu_us_per_event": per_item_us(meter, phase.events_acked + delivered),
        "rss_mb": [(t, round(m, 1)) for t, m in rss],
    }


async def daemon_totals(ctx: Context, daemon: Daemon) -> dict[str, Any]:
    async with ctx.client.get(f"{daemon.base}/v1/status") as response:
        body: dict[str, Any] = await response.json()
    totals: dict[str, Any] = body["totals"]
    return totals


def latency_of(groups: dict[str, Any], key: str) -> dict[str, float]:
    found = groups.get(key) or {}
    return {k: (v * MS if k != "count" else v) for k, v in found.items()}


def check_delivery(
    tenants: list[Tenant], producer: Producer, final: dict[str, Any]
) -> dict[str, Any]:
    """Every acknowledged (tenant, sequence) arrived: count = last sequence = acknowledged."""
    per_path, last = final["per_path"], final["last_sequence"]
    missing = extra = mismatched = 0
    examples: list[str] = []
    for tenant in tenants:
        acked = producer.last_sequence[tenant.name]
        received = per_path.get(tenant.path, 0)
        newest = last.get(tenant.path, 0)
        if received != acked or newest != acked:
            mismatched += 1
            missing += max(0, acked - received)
            extra += max(0, received - acked)
            if len(examples) < 5:
                examples.append(
                    f"{tenant.name}: acknowledged up to {acked}, received {received} "
                    f"(last sequence {newest})"
                )
    return {
        "acknowledged": producer.total_acked,
        "acknowledged_items": sum(producer.acked.values()),
        "received": final["total"],
        "disorder": final["disorder"],
        "tenants_mismatched": mismatched,
        "missing": missing,
        "extra": extra,
        "examples": examples,
    }


# -- the scenario --------------------------------------------------------------------------------


async def sustained(ctx: Context) -> None:
    per_s = ctx.size(RATE_TARGET, 1000.0)
    duration = ctx.sustained_s or ctx.size(60.0, 8.0)
    control_s = ctx.size(15.0, 3.0)
    tenants = roles(1000)
    # Failing tenants keep retrying all through the run rather than backing off past it.
    delivery = {"retry_base": 1.0, "retry_doublings": 2, "retry_after_doublings": 4.0}
    async with ctx.daemon(
        "sustained",
        tables(ctx, tenants),
        delivery=delivery,
        expected=frozenset({"delivery_failed"}),  # the /fail/ endpoints, by design
    ) as daemon:
        producer = Producer(daemon, tenants)
        # Control: the same load, every endpoint healthy.
        await ctx.receiver.behave(ctx.client, fail_status=200, slow_s=0.0)
        control = await run_phase(ctx, daemon, producer, "control", per_s, control_s)
        say_phase(ctx, "control, all endpoints healthy", control)
        await ctx.receiver.behave(
            ctx.client, fail_status=DEFAULT_FAIL_STATUS, slow_s=DEFAULT_SLOW_S
        )
        main = await run_phase(ctx, daemon, producer, "main", per_s, duration)
        producer.client.close()
        say_phase(ctx, "main, 10 % failing, 5 % slow", main)
        at_end = await daemon_totals(ctx, daemon)
        waiting_by_group = backlog_by_group(
            tenants, producer, await ctx.receiver.stats(ctx.client, paths=True, latency=False)
        )
        ctx.say(
            f"  at the end of the main phase: {at_end['waiting']:,} webhooks waiting, "
            f"{at_end['stalled']} tenants stalled; waiting by group {waiting_by_group}"
        )
        # No loss: heal the endpoints, retry now, and wait for every acknowledged webhook.
        healed = time.monotonic()
        await ctx.receiver.behave(ctx.client, fail_status=200, slow_s=0.0)
        async with ctx.client.post(f"{daemon.base}/v1/retry") as response:
            retried = await response.json()
        await ctx.receiver.wait_total(
            ctx.client, producer.total_acked, RECOVERY_BUDGET_S, 0.5, latency=False
        )
        recovery_s = time.monotonic() - healed
        await asyncio.sleep(1.0)  # anything sent twice would arrive now
        final = await ctx.receiver.stats(ctx.client, paths=True, groups=True)
        rss_after = daemon.proc.rss_bytes() / MIB
    check = check_delivery(tenants, producer, final)
    groups = final["latency_groups"]
    latency = {
        f"{label}_{phase}": latency_of(groups, f"/ok/{mode}@{phase}")
        for label, mode in (("batched", "batched"), ("unbatched", "single"))
        for phase in ("control", "main")
    }
    latency["slow_batched_main"] = latency_of(groups, "/slow/batched@main")
    latency["slow_unbatched_main"] = latency_of(groups, "/slow/single@main")
    result = {
        "rate_target": per_s,
        "tenants": {
            group: sum(1 for t in tenants if t.group == group)
            for group in sorted({t.group for t in tenants})
        },
        "control": strip(control),
        "main": strip(main),
        "status_at_end": at_end,
        "waiting_at_end_by_group": waiting_by_group,
        "retry_answer": retried,
        "recovery_s": recovery_s,
        "rss_after_recovery_mb": rss_after,
        "no_loss": check,
        "latency_ms": latency,
    }
    ctx.report.details.setdefault("sustained", {}).update(result)
    report(ctx, result, per_s)


def strip(phase: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in phase.items() if k != "phase"}


def backlog_by_group(
    tenants: list[Tenant], producer: Producer, stats: dict[str, Any]
) -> dict[str, int]:
    waiting: dict[str, int] = {}
    for tenant in tenants:
        behind = producer.last_sequence[tenant.name] - stats["per_path"].get(tenant.path, 0)
        waiting[tenant.group] = waiting.get(tenant.group, 0) + behind
    return waiting


def say_phase(ctx: Context, label: str, phase: dict[str, Any]) -> None:
    rss = phase["rss_mb"]
    trips = phase["ingest_round_trip_ms"]
    ctx.say(
        f"  {label}, {phase['seconds']:.1f} s: ingested {phase['events_acked']:,} of "
        f"{phase['events_due']:,} due ({phase['ingest_per_s']:,.0f} events/s, "
        f"{phase['requests_per_s']:,.0f} requests/s, {phase['errors']} errors); producer up to "
        f"{phase['producer_behind_max_s']:.2f} s behind schedule, {phase['late_requests']:,} "
        f"requests > 100 ms late; ingest round trip p50 {trips.get('p50', 0):.1f} ms, "
        f"p99 {trips.get('p99', 0):.1f} ms"
    )
    ctx.say(
        f"    delivered {phase['delivered']:,} ({phase['delivered_per_s']:,.0f} webhooks/s in "
        f"{phase['delivery_requests_per_s']:,.0f} requests/s, {phase['rejected_requests']:,} "
        f"answered 503); cpu {phase['cpu_percent']}; daemon "
        f"{phase['daemon_cpu_us_per_event'] or 0:.0f} µs per event in + webhook out"
    )
    attempts = phase["delivery_attempts"]
    ctx.say(
        f"    delivery attempts (daemon's histogram): {attempts['attempts']:,.0f}, mean "
        f"{attempts['mean_ms']:.1f} ms; within 10 ms {100 * attempts['share_within_10ms']:.0f} %, "
        f"50 ms {100 * attempts['share_within_50ms']:.0f} %, "
        f"250 ms {100 * attempts['share_within_250ms']:.0f} %, "
        f"1 s {100 * attempts['share_within_1000ms']:.0f} %"
    )
    ctx.say("    daemon RSS every 5 s (MiB): " + ", ".join(f"{m:.0f}" for _, m in rss))


def report(ctx: Context, result: dict[str, Any], per_s: float) -> None:
    main, control, check = result["main"], result["control"], result["no_loss"]
    latency = result["latency_ms"]
    rss = [m for _, m in main["rss_mb"]]
    figures = [
        Figure(
            "sustained_ingest",
            f"sustained {per_s:,.0f}/s: events ingested",
            main["ingest_per_s"],
            "events/s",
            target=(">=", per_s),
            note=f"{main['requests_per_s']:,.0f} req/s, {main['errors']} errors",
            background=main["cpu_percent"]["others"],
            cpu_us=main["daemon_cpu_us_per_event"],
        ),
        Figure(
            "sustained_delivered",
            f"sustained {per_s:,.0f}/s: webhooks delivered",
            main["delivered_per_s"],
            "webhooks/s",
            note=f"{main['delivery_requests_per_s']:,.0f} requests/s",
            background=main["cpu_percent"]["others"],
        ),
    ]
    for key, label in (("batched", "batched (1 s window)"), ("unbatched", "unbatched")):
        for stat in ("p50", "p99", "max"):
            figures.append(
                Figure(
                    f"sustained_{key}_{stat}",
                    f"sustained: healthy {label} latency {stat}",
                    latency[f"{key}_main"].get(stat, 0.0),
                    "ms",
                    note=f"all healthy: {latency[f'{key}_control'].get(stat, 0.0):,.0f} ms",
                )
            )
    figures += [
        Figure(
            "sustained_rss_peak",
            "sustained: daemon RSS peak",
            max(rss),
            "MiB",
            note=f"start {rss[0]:.0f}, end {rss[-1]:.0f} MiB",
        ),
        Figure(
            "sustained_lost",
            "sustained: acknowledged, not received",
            float(check["missing"]),
            "webhooks",
            target=("<=", 0.0),
            note=f"of {check['acknowledged']:,}; disorder {check['disorder']}",
        ),
    ]
    ctx.report.figures.extend(figures)

    def line(key: str) -> str:
        lat = latency[key]
        if not lat:
            return "none"
        return (
            f"p50 {lat['p50']:,.0f} ms, p99 {lat['p99']:,.0f} ms, max {lat['max']:,.0f} ms "
            f"({lat['count']:,.0f})"
        )

    ctx.say(
        f"  healthy batched ingest→delivery: main {line('batched_main')}; "
        f"all healthy {line('batched_control')}"
    )
    ctx.say(
        f"  healthy unbatched ingest→delivery: main {line('unbatched_main')}; "
        f"all healthy {line('unbatched_control')}"
    )
    ctx.say(
        f"  slow tenants (2 s answers): batched {line('slow_batched_main')}; unbatched "
        f"{line('slow_unbatched_main')}"
    )
    ctx.say(
        f"  main phase daemon RSS start {rss[0]:.0f} MiB, peak {max(rss):.0f} MiB, end "
        f"{rss[-1]:.0f} MiB; control phase started at {control['rss_mb'][0][1]:.0f} MiB; "
        f"after recovery {result['rss_after_recovery_mb']:.0f} MiB"
    )
    verdict = "no loss" if not check["tenants_mismatched"] and not check["disorder"] else "LOSS"
    ctx.say(
        f"  recovery (endpoints healed; POST /v1/retry: {result['retry_answer'].get('count')} "
        "tenants retrying): "
        f"{check['received']:,} received of {check['acknowledged']:,} acknowledged in "
        f"{result['recovery_s']:.1f} s; {verdict}: {check['tenants_mismatched']} tenants "
        f"mismatched, {check['missing']} missing, {check['extra']} extra, disorder "
        f"{check['disorder']}" + (f"; e.g. {check['examples']}" if check["examples"] else "")
    )
