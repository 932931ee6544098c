"""Large backlogs: 1,000,000 queued webhooks across 1,000 tenants.

The database is built before the daemon starts, with the daemon's own store (`Store.enqueue`
in large group commits, durability "normal"): the same rows, sequences and tenant state an
API ingest would leave, in a fraction of the time. Then the daemon starts on it, and we
measure (a) process start to READY=1 on a NOTIFY_SOCKET we bind, (b) its RSS at ready and
every second while it drains, against the same daemon on an empty database, and (c) the
batched drain rate until the receiver has every webhook, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.context import Context, per_item_us, rate
from bench.harness import EVENT, Daemon, tenant_names, tenant_tables
from bench.report import Figure
from webhookd import logs
from webhookd.records import NewWebhook
from webhookd.store import make_store

MIB = 2**20
TENANTS_PER_COMMIT = 50  # 50,000 rows a transaction: few commits, a WAL of bounded size
READY_TARGET_S = 3.0
DRAIN_BUDGET_S = 75.0  # after READY; the brief keeps the whole scenario near two minutes
EARLY_WINDOW_S = 60.0  # an unfinished drain is reported over its first minute


async def build_backlog(path: Path, names: list[str], per_tenant: int) -> float:
    """Queue `per_tenant` webhooks ({"n": i}) for every tenant; seconds it took."""
    started = time.monotonic()
    logs.configure("json", "warning")  # the store logs its migration at info
    store = make_store(path, durability="normal")
    await store.open()
    try:
        for start in range(0, len(names), TENANTS_PER_COMMIT):
            chunk = names[start : start + TENANTS_PER_COMMIT]
            # Submitted together, they share one group commit.
            await asyncio.gather(
                *(
                    store.enqueue(
                        name,
                        [NewWebhook(None, EVENT, f'{{"n":{i}}}') for i in range(1, per_tenant + 1)],
                        time.time(),
                    )
                    for name in chunk
                )
            )
    finally:
        await store.close()
    await asyncio.to_thread(check_backlog, path, len(names) * per_tenant, len(names))
    return time.monotonic() - started


def check_backlog(path: Path, total: int, tenants: int) -> None:
    """The built file holds what the daemon is meant to find, and no tenant is paused."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT count(*) FROM webhooks").fetchone()[0]
        states, paused, waiting = conn.execute(
            "SELECT count(*), sum(paused), sum(last_sequence - acked_sequence) FROM tenant_state"
        ).fetchone()
    if (rows, states, paused, waiting) != (total, tenants, 0, total):
        raise RuntimeError(
            f"backlog build: {rows} rows, {states} tenants, {paused} paused, {waiting} waiting; "
            f"wanted {total} rows for {tenants} unpaused tenants"
        )


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket that timestamps what arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []
        self.ready = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                message = self.sock.recv(4096).decode(errors="replace")
            except BlockingIOError:
                return
            at = time.monotonic()
            self.messages.append((at, message))
            if "READY=1" in message.split("\n") and not self.ready.done():
                self.ready.set_result((at, time.time()))

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    @classmethod
    @contextlib.contextmanager
    def bound(cls, path: Path) -> Iterator[NotifySocket]:
        notify = cls(path)
        try:
            yield notify
        finally:
            notify.close()


async def wait_ready(daemon: Daemon, notify: NotifySocket) -> tuple[float, float, float]:
    """Seconds from process start to READY=1, and when READY came (monotonic, wall)."""
    at, wall = await asyncio.wait_for(asyncio.shield(notify.ready), 60.0)
    return at - daemon.started_at, at, wall


async def empty_baseline(ctx: Context, tables: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The same daemon, same 1,000 tenants, on an empty database: ready time and RSS."""
    notify_path = Path(f"/tmp/webhookd-bench-notify-empty-{time.monotonic_ns()}.sock")
    with NotifySocket.bound(notify_path) as notify:
        try:
            async with ctx.daemon(
                "backlog-empty", tables, env={"NOTIFY_SOCKET": str(notify_path)}
            ) as daemon:
                ready_s, _, _ = await wait_ready(daemon, notify)
                rss_ready = daemon.proc.rss_bytes()
                await asyncio.sleep(3.0)  # every worker at its first wait, nothing to send
                rss_settled = daemon.proc.rss_bytes()
        finally:
            notify_path.unlink(missing_ok=True)
    return {
        "ready_s": ready_s,
        "rss_ready_mb": rss_ready / MIB,
        "rss_settled_mb": rss_settled / MIB,
    }


async def backlog(ctx: Context) -> None:
    per_tenant = ctx.size(1000, 20)
    names = tenant_names(1000)
    total = per_tenant * len(names)
    tables = tenant_tables(
        names, ctx.receiver, "backlog", batching=True, batch_size=100, batch_window=0.0
    )
    empty = await empty_baseline(ctx, tables)
    ctx.say(
        f"  empty database, {len(names):,} tenants: READY after {empty['ready_s']:.2f} s, "
        f"RSS {empty['rss_ready_mb']:.0f} MiB at ready, {empty['rss_settled_mb']:.0f} MiB 3 s later"
    )

    build_s = 0.0

    async def prepare(directory: Path, _database: str) -> None:
        nonlocal build_s
        build_s = await build_backlog(directory / "webhookd.db", names, per_tenant)
        size = (directory / "webhookd.db").stat().st_size
        ctx.say(
            f"  built {total:,} queued webhooks for {len(names):,} tenants with the daemon's "
            f"store in {build_s:.1f} s ({rate(total, build_s):,.0f}/s; file {size / MIB:.0f} MiB)"
        )

    notify_path = Path(f"/tmp/webhookd-bench-notify-backlog-{time.monotonic_ns()}.sock")
    samples: list[dict[str, float]] = []
    with NotifySocket.bound(notify_path) as notify:
        try:
            async with ctx.daemon(
                "backlog", tables, env={"NOTIFY_SOCKET": str(notify_path)}, prepare=prepare
            ) as daemon:
                listen_s = daemon.startup_s
                ready_s, ready_at, ready_wall = await wait_ready(daemon, notify)
                rss_ready = daemon.proc.rss_bytes()
                meter = ctx.cpu(daemon)
                async with ctx.sampled("backlog", daemon):
                    stats = await sample_drain(
                        ctx, daemon, total, ready_at, ready_wall, samples, len(names)
                    )
                cpu = meter.stop()
                rss_end = daemon.proc.rss_bytes()
                final = await ctx.receiver.stats(ctx.client, paths=True, latency=False)
        finally:
            notify_path.unlink(missing_ok=True)

    delivered = stats["total"]
    complete = delivered >= total
    # From READY (deliveries may start a moment before it) to the last arrival.
    drain_s = (stats["last_at"] or time.time()) - ready_wall
    early = [s for s in samples if s["t"] <= EARLY_WINDOW_S]
    if complete:
        drain_rate = rate(delivered, drain_s)
    else:
        last_early = early[-1] if early else {"t": 0.0, "delivered": 0.0}
        drain_rate = rate(last_early["delivered"], last_early["t"])
    per_path = final.get("per_path", {})
    wrong_counts = sum(1 for count in per_path.values() if count != per_tenant)
    rss_peak = max([rss_ready, rss_end] + [int(s["rss_mb"] * MIB) for s in samples])
    result = {
        "tenants": len(names),
        "backlog": total,
        "build_s": build_s,
        "listen_s": listen_s,
        "ready_s": ready_s,
        "empty_db": empty,
        "rss_ready_mb": rss_ready / MIB,
        "rss_peak_mb": rss_peak / MIB,
        "rss_end_mb": rss_end / MIB,
        "delivered": delivered,
        "complete": complete,
        "remaining": total - delivered,
        "drain_s": drain_s,
        "per_s": drain_rate,
        "rate_basis": "READY to last arrival" if complete else f"first {EARLY_WINDOW_S:g} s",
        "requests": stats["requests"],
        "disorder": final["disorder"],
        "received_total": final["total"],
        "paths": len(per_path),
        "paths_with_wrong_count": wrong_counts,
        "cpu_percent": cpu,
        "daemon_cpu_us_per_webhook": per_item_us(meter, delivered),
        "samples": samples,
    }
    ctx.report.details.setdefault("backlog", {}).update(result)
    report(ctx, result, empty)


async def sample_drain(
    ctx: Context,
    daemon: Daemon,
    total: int,
    ready_at: float,
    ready_wall: float,
    samples: list[dict[str, float]],
    tenants: int,
) -> dict[str, Any]:
    """Every second until the receiver has `total` (or the budget ends): RSS and progress."""
    deadline = ready_at + DRAIN_BUDGET_S
    while True:
        stats = await ctx.receiver.stats(ctx.client, latency=False)
        now = time.monotonic()
        sample = {
            "t": round(now - ready_at, 2),
            "rss_mb": round(daemon.proc.rss_bytes() / MIB, 1),
            "delivered": stats["total"],
        }
        samples.append(sample)
        if stats["total"] >= total or now >= deadline:
            return stats
        if len(samples) % 10 == 0:
            ctx.say(
                f"    {sample['t']:5.1f} s after ready: {stats['total']:,}/{total:,} delivered, "
                f"RSS {sample['rss_mb']:.0f} MiB"
            )
        await asyncio.sleep(max(0.05, ready_at + len(samples) - time.monotonic()))


def report(ctx: Context, result: dict[str, Any], empty: dict[str, float]) -> None:
    total, delivered = result["backlog"], result["delivered"]
    rss_note = (
        f"ready {result['rss_ready_mb']:.0f}, end {result['rss_end_mb']:.0f}; empty db, same "
        f"tenants {empty['rss_ready_mb']:.0f} MiB"
    )
    drain_note = (
        f"{total:,} in {result['drain_s']:.1f} s"
        if result["complete"]
        else f"first {EARLY_WINDOW_S:g} s; {result['remaining']:,} left at the end"
    )
    ctx.report.figures.extend(
        [
            Figure(
                "backlog_ready_s",
                f"{total:,} queued: start to READY",
                result["ready_s"],
                "s",
                target=("<", READY_TARGET_S),
                note=f"empty db {empty['ready_s']:.2f} s",
            ),
            Figure(
                "backlog_rss_peak",
                f"{total:,} queued: RSS peak draining",
                result["rss_peak_mb"],
                "MiB",
                note=rss_note,
            ),
            Figure(
                "backlog_drain",
                f"{total:,} queued: batched drain, 1000 tenants",
                result["per_s"],
                "webhooks/s",
                "receiver_webhooks",
                note=drain_note,
                background=result["cpu_percent"]["others"],
                cpu_us=result["daemon_cpu_us_per_webhook"],
            ),
        ]
    )
    ctx.say(
        f"  {total:,} queued: listening after {result['listen_s']:.2f} s, READY after "
        f"{result['ready_s']:.2f} s (target < {READY_TARGET_S:g} s; empty database "
        f"{empty['ready_s']:.2f} s)"
    )
    trail = ", ".join(
        f"{s['rss_mb']:.0f}" for s in result["samples"][:: max(1, len(result["samples"]) // 12)]
    )
    ctx.say(
        f"  RSS at ready {result['rss_ready_mb']:.0f} MiB, peak {result['rss_peak_mb']:.0f} MiB, "
        f"end {result['rss_end_mb']:.0f} MiB (same daemon, empty database: "
        f"{empty['rss_ready_mb']:.0f} MiB); every few s: {trail}"
    )
    state = "complete" if result["complete"] else f"INCOMPLETE, {result['remaining']:,} left"
    ctx.say(
        f"  drained {delivered:,}/{total:,} ({state}) in {result['drain_s']:.1f} s after READY: "
        f"{result['per_s']:,.0f} webhooks/s ({result['rate_basis']}); {result['requests']:,} "
        f"requests; disorder {result['disorder']}; {result['paths']} paths, "
        f"{result['paths_with_wrong_count']} with a count other than {total // result['tenants']};"
        f" cpu {result['cpu_percent']}; daemon "
        f"{result['daemon_cpu_us_per_webhook'] or 0:.0f} µs/webhook"
    )
